"""Adapter graphs of plain torch modules: one robot controller, switchable skills.

The graph export/dynamic.py builds for Hugging Face checkpoints (LoRA A and B of every
targeted layer as overridable inputs with rank-0 defaults, ONNX Runtime's multi-LoRA
convention), for a module in the factory form (`--module package.module:factory` plus a
checkpoint, modeling/factory.py). Its inputs are the module's `forward` arguments, named
and shaped by the example inputs (an .npz or the module's `example_inputs()`), axis 0
the dynamic `batch`; its output is the module's one output (`output_names`). `pack`,
`DynamicSession` and `verify --module --dynamic` take it like any dynamic graph, so a
robot switches skills (adapters) per call without re-export. `export_multi_module` is the
multi-adapter graph of export/multi.py for such a module (input `adapter_ids`, a skill per
batch row), checked by `MultiSession` and `verify --module --multi`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lora_deploy.adapter.read import load_adapter
from lora_deploy.adapter.variants import refuse_non_additive
from lora_deploy.backends.onnxrt.lora_format import check_output_file
from lora_deploy.backends.onnxrt.sessions import BASE_ID, IDS_INPUT
from lora_deploy.errors import BadInputError
from lora_deploy.export import graph as onnx_graph
from lora_deploy.export.dynamic import (
    DEFAULT_RANKS,
    DynamicGraph,
    LoraExport,
    build_graph,
    default_value,
    example_lora,
    flatten,
    lora_dims,
    low_rank_update,
    reached_parameters,
    resolve_slots,
)
from lora_deploy.export.multi import adapter_names, bank_dims, banked_update, build_banks, example_banks
from lora_deploy.export.plain import module_feed
from lora_deploy.modeling.factory import check_module_checkpoint, load_module

TASK = "module"


class ModuleLoraExport(LoraExport):
    """LoraExport around a plain module: forward takes the module's own arguments and
    returns its one output."""

    def forward(self, inputs: list[torch.Tensor], lora: list[torch.Tensor]):
        # Inputs past the module's own are adapter ids (multi-adapter graphs).
        self.ids = inputs[len(self.input_names)] if len(inputs) > len(self.input_names) else None
        k = self.per_layer
        self.current = {name: lora[i * k : (i + 1) * k] for i, name in enumerate(self.layers)}
        try:
            return self.base(**dict(zip(self.input_names, inputs[: len(self.input_names)])))
        finally:
            self.current, self.ids = {}, None


def export_dynamic_module(
    checkpoint: str | os.PathLike,
    path: str | os.PathLike,
    *,
    module: str,
    adapters: Iterable[str | os.PathLike] = (),
    targets: Sequence[str] | str | None = None,
    inputs_path: str | os.PathLike | None = None,
    opset: int | None = None,
    default_rank: int = 0,
    overwrite: bool = False,
    static: bool = False,
) -> DynamicGraph:
    """Export the plain module (float32) with LoRA A/B inputs on every targeted layer:
    the layers of `adapters`, plus `targets` (PEFT's target_modules rule). `static` fixes
    every dim of the module's inputs to the example's (the batch too); the LoRA inputs'
    rank dims stay symbolic (their rank-0 defaults need them: ONNX Runtime's multi-LoRA
    convention)."""
    start = time.perf_counter()
    if default_rank not in DEFAULT_RANKS:
        raise BadInputError(f"default rank {default_rank!r}: choose {' or '.join(map(str, DEFAULT_RANKS))}")
    path = Path(path)
    adapters = [adapters] if isinstance(adapters, (str, os.PathLike)) else list(adapters)
    inputs = _check_paths(checkpoint, path, adapters, inputs_path, overwrite)
    loaded = _adapters(adapters)
    if not loaded and not targets:
        raise BadInputError("nothing to target: give adapters or targets (e.g. ['q', 'v'])")
    model, example, graph = _prepare(checkpoint, path, module, inputs_path, loaded, targets, keep_batch=static)
    graph.default_rank = default_rank
    defaults = {name: default_value(name, graph) for name in graph.lora_inputs()}
    batch = torch.export.Dim("batch")
    build_graph(
        ModuleLoraExport(model, graph, 3 if graph.lora_bias else 2, low_rank_update),
        graph,
        flatten(example_lora(graph.slots, graph.lora_bias)),
        flatten([lora_dims(slot, graph.lora_bias) for slot in graph.slots.values()]),
        defaults,
        "dynamic",
        opset,
        overwrite=overwrite,
        input_paths=inputs,
        example=example,
        input_dims=[{} if static else {0: batch} for _ in example],
    )
    graph.seconds = time.perf_counter() - start
    return graph


def export_multi_module(
    checkpoint: str | os.PathLike,
    path: str | os.PathLike,
    adapter_dirs: Sequence[str | os.PathLike],
    *,
    module: str,
    inputs_path: str | os.PathLike | None = None,
    opset: int | None = None,
    overwrite: bool = False,
) -> DynamicGraph:
    """The plain module (float32) with every adapter of `adapter_dirs` in per-layer banks;
    input `adapter_ids` [batch] picks one per row (its position; -1 the base)."""
    start = time.perf_counter()
    path = Path(path)
    adapter_dirs = [adapter_dirs] if isinstance(adapter_dirs, (str, os.PathLike)) else list(adapter_dirs)
    inputs = _check_paths(checkpoint, path, adapter_dirs, inputs_path, overwrite)
    if not adapter_dirs:
        raise BadInputError("a multi-adapter graph needs at least one adapter")
    loaded = _adapters(adapter_dirs)
    model, example, graph = _prepare(checkpoint, path, module, inputs_path, loaded, None)
    graph.adapters = adapter_names(adapter_dirs)
    n = len(loaded)
    # Every adapter id and the base among the example rows.
    ids = torch.tensor([i % (n + 1) if i % (n + 1) < n else BASE_ID for i in range(example[0].shape[0])])
    batch = torch.export.Dim("batch")
    build_graph(
        ModuleLoraExport(model, graph, 3 if graph.lora_bias else 2, banked_update),
        graph,
        flatten(example_banks(graph.slots, n, graph.lora_bias)),
        flatten([bank_dims(slot, graph.lora_bias) for slot in graph.slots.values()]),
        build_banks(model, loaded, graph.slots, graph.lora_bias),
        "multi",
        opset,
        extra={IDS_INPUT: ids},
        overwrite=overwrite,
        input_paths=inputs,
        example=example,
        input_dims=[{0: batch} for _ in example],
    )
    graph.seconds = time.perf_counter() - start
    return graph


def _check_paths(checkpoint, path: Path, adapters: list, inputs_path, overwrite: bool) -> list:
    """The output policy and the checkpoint, before any work; returns the inputs."""
    inputs = [checkpoint, *adapters, *([inputs_path] if inputs_path else [])]
    check_module_checkpoint(checkpoint)
    check_output_file(path, inputs, overwrite)
    onnx_graph.check_output(path, inputs, overwrite)
    return inputs


def _adapters(paths: list) -> list:
    loaded = [load_adapter(d) for d in paths]
    for adapter in loaded:
        refuse_non_additive(adapter)
    return loaded


def _prepare(checkpoint, path: Path, module: str, inputs_path, loaded, targets, keep_batch: bool = False):
    """(the module in float32, its example inputs as tensors (batch >= 2 unless
    `keep_batch`, for a static graph), the graph's description with its LoRA slots)."""
    model = load_module(module, checkpoint).float()
    source = f"the module from {module}"
    feed = module_feed(model, inputs_path, source)
    if not keep_batch and next(iter(feed.values())).shape[0] < 2:  # a dynamic batch of 1 would be traced as constant
        feed = {name: np.concatenate([arr, arr]) for name, arr in feed.items()}
    example = [torch.from_numpy(arr) for arr in feed.values()]
    outputs = _outputs(model, dict(zip(feed, example)), source)
    names = list(getattr(model, "output_names", None) or ["output"])
    if len(outputs) != 1 or len(names) != 1:
        raise BadInputError(f"{source}: an adapter graph of a plain module takes one output, it has {len(outputs)}")
    uncomputed = _uncomputed(model, outputs[0])
    slots, skipped = resolve_slots(model, loaded, targets, uncomputed)
    with_bias = any(a.config.lora_bias for a in loaded)
    graph = DynamicGraph(path, slots, list(feed), names[0], TASK, with_bias, uncomputed=uncomputed, skipped=skipped)
    return model, example, graph


def _outputs(model: nn.Module, feed: dict[str, torch.Tensor], source: str) -> list[torch.Tensor]:
    """One forward with gradients recorded (for _uncomputed), outputs flattened."""
    from lora_deploy.modeling.hf import flatten_outputs

    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            return flatten_outputs(model(**feed))
    except Exception as err:  # user code on its own inputs
        raise BadInputError(f"{source} fails on its inputs: {type(err).__name__}: {err}") from err
    finally:
        for p in params:
            p.requires_grad_(False)


def _uncomputed(model: nn.Module, output: torch.Tensor) -> list[str]:
    """Modules with parameters the output does not depend on (they get no LoRA inputs)."""
    reached = reached_parameters(output)
    return sorted(
        name
        for name, sub in model.named_modules()
        if list(sub.parameters(recurse=False)) and not any(id(p) in reached for p in sub.parameters(recurse=False))
    )
