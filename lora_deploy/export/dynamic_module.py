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

What a robot runs (TensorRT on a Jetson): `dtype="float16"` makes the module, its inputs
and the LoRA inputs/banks float16 (the same overflow checks as a plain float16 export,
with each adapter attached too); `static=True` fixes every dim, the LoRA rank included:
every layer's A is [in, R] and B [R, out], R the largest rank among the adapters (or
`max_rank`), with all-zero defaults of rank R ("no adapter" adds exact zeros, as the
rank-0 defaults of the other graphs do). `pack` zero-pads a smaller-rank adapter to R
and refuses a larger one; a session refuses an adapter file of another rank or dtype.
`lora_defaults="none"` (export onnx --lora-defaults none) writes the static graph
without those defaults, A/B as required inputs: TensorRT's ONNX parser imports a graph
input that has an initializer as a constant weight, so only this form builds an engine
that switches skills. `pack`, `DynamicSession` and `verify --module --dynamic` take it
(zeros fed for "no adapter", a skill's packed arrays fed for it); `without_lora_defaults`
converts an already exported graph.

Measured on the reference policy (examples/robot.py, r 16): the float16 graph's LoRA
math in float16 stays within float16's tolerance of the unmerged float32 reference, as
the merged float16 graph does; the LoRA inputs are therefore float16 like the rest (no
casts around the low-rank term, adapters half the size).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lora_deploy.adapter.read import load_adapter
from lora_deploy.adapter.variants import refuse_non_additive
from lora_deploy.backends.onnxrt.lora_format import METADATA_KEY, check_output_file, graph_metadata, read_graph_inputs
from lora_deploy.backends.onnxrt.sessions import BASE_ID, IDS_INPUT
from lora_deploy.dtypes import dtype as dtype_row
from lora_deploy.errors import BadInputError
from lora_deploy.export import graph as onnx_graph
from lora_deploy.export.dynamic import (
    DEFAULT_RANKS,
    EXAMPLE_RANK,
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
    small_random,
)
from lora_deploy.export.multi import adapter_names, bank_dims, banked_update, build_banks, example_banks
from lora_deploy.export.plain import as_dtype, check_float16_outputs, check_float16_range, module_feed
from lora_deploy.modeling.factory import check_module_checkpoint, load_module
from lora_deploy.modeling.unmerged import attach

TASK = "module"
DTYPES = ("float32", "float16")  # what an adapter graph of a plain module is exported in
LORA_DEFAULTS = ("zeros", "none")  # export onnx --lora-defaults: zero initializers, or required inputs


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
    dtype: str = "float32",
    max_rank: int | None = None,
    lora_defaults: str = "zeros",
) -> DynamicGraph:
    """Export the plain module (float32 or float16: `dtype`) with LoRA A/B inputs on every
    targeted layer: the layers of `adapters`, plus `targets` (PEFT's target_modules rule).

    Without `static`, the batch and each layer's LoRA rank are symbolic, the defaults of
    rank `default_rank` (ONNX Runtime's multi-LoRA convention). `static` fixes every dim:
    the module's inputs to the example's (the batch too), every LoRA rank to `max_rank`
    (default: the largest rank among `adapters`), with all-zero defaults of that rank.
    `lora_defaults="none"` (static only) leaves the LoRA inputs without defaults: required
    inputs, the graph TensorRT needs (its ONNX parser takes a defaulted input as a
    constant weight); "no adapter" is then zeros fed (DynamicSession does)."""
    start = time.perf_counter()
    if default_rank not in DEFAULT_RANKS:
        raise BadInputError(f"default rank {default_rank!r}: choose {' or '.join(map(str, DEFAULT_RANKS))}")
    _check_dtype(dtype)
    if static and default_rank:
        raise BadInputError("--default-rank is for symbolic ranks; a --static graph's defaults are zeros of its rank")
    check_lora_defaults(lora_defaults, static)
    path = Path(path)
    adapters = [adapters] if isinstance(adapters, (str, os.PathLike)) else list(adapters)
    inputs = _check_paths(checkpoint, path, adapters, inputs_path, overwrite)
    onnx_graph.check_opset(opset)
    loaded = _adapters(adapters)
    if not loaded and not targets:
        raise BadInputError("nothing to target: give adapters or targets (e.g. ['q', 'v'])")
    rank = _fixed_rank(loaded, max_rank, static)
    model, example, graph = _prepare(
        checkpoint, path, module, inputs_path, loaded, targets, keep_batch=static, dtype=dtype
    )
    graph.default_rank, graph.rank = default_rank, rank
    graph.lora_defaults = lora_defaults == "zeros"
    torch_dtype = dtype_row(dtype).torch()
    defaults = {name: default_value(name, graph) for name in graph.lora_inputs()}
    lora = [t.to(torch_dtype) for t in flatten(example_lora(graph.slots, graph.lora_bias, rank or EXAMPLE_RANK))]
    batch = torch.export.Dim("batch")
    build_graph(
        ModuleLoraExport(model, graph, 3 if graph.lora_bias else 2, low_rank_update),
        graph,
        lora,
        flatten([lora_dims(slot, graph.lora_bias, static) for slot in graph.slots.values()]),
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
    static: bool = False,
    dtype: str = "float32",
    max_rank: int | None = None,
) -> DynamicGraph:
    """The plain module (float32 or float16: `dtype`) with every adapter of `adapter_dirs`
    in per-layer banks; input `adapter_ids` [batch] picks one per row (its position; -1
    the base). `static` fixes every dim: the batch to the example's, each bank's rank to
    the layer's largest (or `max_rank` for every layer)."""
    start = time.perf_counter()
    _check_dtype(dtype)
    path = Path(path)
    adapter_dirs = [adapter_dirs] if isinstance(adapter_dirs, (str, os.PathLike)) else list(adapter_dirs)
    inputs = _check_paths(checkpoint, path, adapter_dirs, inputs_path, overwrite)
    onnx_graph.check_opset(opset)
    if not adapter_dirs:
        raise BadInputError("a multi-adapter graph needs at least one adapter")
    loaded = _adapters(adapter_dirs)
    rank = _fixed_rank(loaded, max_rank, static)
    model, example, graph = _prepare(
        checkpoint, path, module, inputs_path, loaded, None, keep_batch=static, dtype=dtype
    )
    graph.adapters = adapter_names(adapter_dirs)
    graph.rank = rank
    torch_dtype = dtype_row(dtype).torch()
    n = len(loaded)
    # Every adapter id and the base among the example rows.
    ids = torch.tensor([i % (n + 1) if i % (n + 1) < n else BASE_ID for i in range(example[0].shape[0])])
    banks = build_banks(model, loaded, graph.slots, graph.lora_bias, rank)
    np_dtype = dtype_row(dtype).numpy
    for name, bank in banks.items():
        banks[name] = bank.astype(np_dtype)
        if not np.isfinite(banks[name]).all():
            raise BadInputError(f"float16 overflow: {name} (an adapter's scaled LoRA weights) leaves float16's range")
    if static:  # random values of the banks' own fixed shapes
        gen = torch.Generator().manual_seed(0)
        traced = [small_random(tuple(bank.shape), gen).to(torch_dtype) for bank in banks.values()]
    else:
        traced = [t.to(torch_dtype) for t in flatten(example_banks(graph.slots, n, graph.lora_bias))]
    batch = torch.export.Dim("batch")
    build_graph(
        ModuleLoraExport(model, graph, 3 if graph.lora_bias else 2, banked_update),
        graph,
        traced,
        flatten([bank_dims(slot, graph.lora_bias, static) for slot in graph.slots.values()]),
        banks,
        "multi",
        opset,
        extra={IDS_INPUT: ids},
        overwrite=overwrite,
        input_paths=inputs,
        example=example,
        input_dims=[{} if static else {0: batch} for _ in example],
        extra_dims=[{} if static else {0: batch}],
    )
    graph.seconds = time.perf_counter() - start
    return graph


def check_lora_defaults(lora_defaults: str, static: bool) -> None:
    """--lora-defaults: zeros (ONNX Runtime's overridable initializers) or none (required
    inputs, TensorRT), the latter only with every dim fixed (a required input of symbolic
    rank has no shape an engine could be built for)."""
    if lora_defaults not in LORA_DEFAULTS:
        raise BadInputError(f"--lora-defaults {lora_defaults}: choose {' or '.join(LORA_DEFAULTS)}")
    if lora_defaults == "none" and not static:
        raise BadInputError(
            "--lora-defaults none makes the LoRA inputs required inputs of fixed shape (for TensorRT): add --static"
        )


def without_lora_defaults(onnx_path: str | os.PathLike, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """The same dynamic-adapter graph with its LoRA inputs' zero defaults removed: A, B
    (and bias) become plain required inputs, for TensorRT, whose ONNX parser takes a graph
    input that has an initializer as a constant weight (an engine built from the graph as
    exported would run without any skill). Nodes, weights and names are unchanged, so
    `verify --module --dynamic` of the original graph holds for this one; a caller feeds a
    skill's arrays (those of its .onnx_adapter, packed for the original graph) or zeros
    of the same shapes for none. Returns the written path."""
    import onnx

    from lora_deploy.io.staging import write_path_atomic

    onnx_path, path = Path(onnx_path), Path(path)
    check_output_file(path, [onnx_path], overwrite)
    graph = read_graph_inputs(onnx_path)
    if graph_metadata_format(onnx_path) != "dynamic" or not graph.overridable or graph.required:
        raise BadInputError(f"{onnx_path}: not a dynamic-adapter graph with LoRA defaults (export --dynamic-adapters)")
    model = onnx.load(str(onnx_path))
    kept = [t for t in model.graph.initializer if t.name not in graph.overridable]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    info = json.loads(next(e.value for e in model.metadata_props if e.key == METADATA_KEY))
    info["lora_defaults"] = False
    for entry in model.metadata_props:
        if entry.key == METADATA_KEY:
            entry.value = json.dumps(info)
    return write_path_atomic(path, lambda tmp: onnx.save(model, str(tmp)), overwrite=overwrite, inputs=[onnx_path])


def graph_metadata_format(onnx_path: Path) -> str | None:
    """The "format" an adapter-graph exporter wrote into the graph's metadata (dynamic, multi)."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    text = next((e.value for e in proto.metadata_props if e.key == METADATA_KEY), None)
    return graph_metadata(text).get("format")


def _check_paths(checkpoint, path: Path, adapters: list, inputs_path, overwrite: bool) -> list:
    """The output policy and the checkpoint, before any work; returns the inputs."""
    inputs = [checkpoint, *adapters, *([inputs_path] if inputs_path else [])]
    check_module_checkpoint(checkpoint)
    check_output_file(path, inputs, overwrite)
    onnx_graph.check_output(path, inputs, overwrite)
    return inputs


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise BadInputError(f"--dtype {dtype}: an adapter graph of a plain module is float32 or float16")


def _fixed_rank(loaded: list, max_rank: int | None, static: bool) -> int | None:
    """The rank a static graph fixes: `max_rank`, else the adapters' largest (None: not static)."""
    if not static:
        if max_rank is not None:
            raise BadInputError("--max-rank fixes the LoRA rank of a --static adapter graph; add --static")
        return None
    largest = max((lora.a.shape[0] for adapter in loaded for lora in adapter.modules.values()), default=None)
    if max_rank is None:
        if largest is None:
            raise BadInputError("a --static adapter graph with --targets only needs --max-rank R (the LoRA rank)")
        return int(largest)
    if max_rank < 1:
        raise BadInputError(f"--max-rank {max_rank}: the rank must be at least 1")
    if largest is not None and max_rank < largest:
        raise BadInputError(f"--max-rank {max_rank} is below the adapters' largest rank {largest}")
    return int(max_rank)


def _adapters(paths: list) -> list:
    loaded = [load_adapter(d) for d in paths]
    for adapter in loaded:
        refuse_non_additive(adapter)
    return loaded


def _prepare(
    checkpoint, path: Path, module: str, inputs_path, loaded, targets, keep_batch: bool = False, dtype="float32"
):
    """(the module in `dtype`, its example inputs as tensors (batch >= 2 unless
    `keep_batch`, for a static graph; float ones in `dtype`), the graph's description with
    its LoRA slots). float16: the float32 module's weights and activations, alone and with
    each adapter attached, must fit float16's range, and the float16 module's outputs must
    be finite (export/plain.py's checks)."""
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
    graph.dtype = dtype
    if dtype == "float16":
        check_float16_range(model, feed)
        for adapter in loaded:
            with attach(model, adapter):
                check_float16_range(model, feed)
        model = model.half()
        feed = as_dtype(feed, np.dtype(np.float16))
        check_float16_outputs(model, feed)
        example = [torch.from_numpy(np.ascontiguousarray(arr)) for arr in feed.values()]
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
