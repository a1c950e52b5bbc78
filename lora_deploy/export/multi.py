"""One ONNX graph serving several adapters in one batch: row i uses adapter adapter_ids[i].

`export_multi` exports the base model with an extra input

    adapter_ids   int64 [batch]   position of the adapter in the list given at export;
                                  -1 = the base model alone

and, on every layer any of the adapters targets, two weight banks (three with lora_bias):

    <module>.lora_A.bank       [n_adapters, in_features, rank]   A^T of each adapter
    <module>.lora_B.bank       [n_adapters, rank, out_features]  (scaling * B)^T of each adapter
    <module>.lora_B.bias_bank  [n_adapters, out_features]        scaling * lora_B bias
                                                                  (only when an adapter has one)

`rank` is the largest rank any adapter uses on that layer (a symbolic dimension, one per
layer); smaller ranks are zero-padded, and an adapter that does not target the layer has
an all-zero slice. Row i adds (x_i @ A[id_i]) @ B[id_i]. The banks are initializers that
are also graph inputs, so a bank can be replaced at run time by feeding it (same
n_adapters, any rank) without re-exporting.

In the graph an id outside [0, n_adapters) selects no adapter: the row's A slice is
multiplied by zero, so it runs as the base model. `MultiSession.run` refuses such ids
before running (BadInputError); only -1 means "base" there.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lora_deploy.adapter.read import Adapter, load_adapter
from lora_deploy.adapter.variants import refuse_non_additive
from lora_deploy.backends.onnxrt.lora_format import adapter_parameters, check_output_file, split_lora_name
from lora_deploy.backends.onnxrt.sessions import BASE_ID, IDS_INPUT
from lora_deploy.errors import BadInputError
from lora_deploy.export import graph as onnx_graph
from lora_deploy.export.dynamic import (
    EXAMPLE_BATCH,
    EXAMPLE_RANK,
    DynamicGraph,
    LoraExport,
    LoraSlot,
    build_graph,
    flatten,
    load_model,
    resolve_slots,
    small_random,
    uncomputed_modules,
)
from lora_deploy.modeling.sentence import pooling_for_task
from lora_deploy.modeling.unmerged import choose_prefix

A_BANK = ".lora_A.bank"
B_BANK = ".lora_B.bank"
BIAS_BANK = ".lora_B.bias_bank"


def bank_names(slot: LoraSlot, with_bias: bool) -> list[str]:
    names = [slot.module + A_BANK, slot.module + B_BANK]
    return names + ([slot.module + BIAS_BANK] if with_bias else [])


def export_multi(
    model_dir: str | os.PathLike,
    path: str | os.PathLike,
    adapter_dirs: Sequence[str | os.PathLike],
    *,
    task: str = "auto",
    opset: int | None = None,
    overwrite: bool = False,
) -> DynamicGraph:
    """Export one graph holding every adapter of `adapter_dirs`; the id of each is its position.

    An existing file is replaced only with overwrite=True, and never an input."""
    start = time.perf_counter()
    path = Path(path)
    adapter_dirs = [adapter_dirs] if isinstance(adapter_dirs, (str, os.PathLike)) else list(adapter_dirs)
    inputs = [model_dir, *adapter_dirs]
    check_output_file(path, inputs, overwrite)
    onnx_graph.check_output(path, inputs, overwrite)
    onnx_graph.check_opset(opset)
    if not adapter_dirs:
        raise BadInputError("export_multi needs at least one adapter")
    adapters = [load_adapter(d) for d in adapter_dirs]
    for adapter in adapters:
        refuse_non_additive(adapter)
    model, task, inputs, output = load_model(model_dir, task)
    uncomputed = uncomputed_modules(model, inputs, output)
    slots, skipped = resolve_slots(model, adapters, None, uncomputed)
    with_bias = any(a.config.lora_bias for a in adapters)
    names = adapter_names(adapter_dirs)
    sentence = pooling_for_task(model_dir, task)
    graph = DynamicGraph(
        path, slots, inputs, output, task, with_bias, names, sentence=sentence, uncomputed=uncomputed, skipped=skipped
    )
    banks = build_banks(model, adapters, slots, with_bias)
    wrapper = LoraExport(model, graph, 3 if with_bias else 2, banked_update)
    # Row 0 uses the last adapter, row 1 the base model: both paths are proven.
    ids = torch.tensor([len(adapters) - 1, BASE_ID][:EXAMPLE_BATCH])
    example = flatten(example_banks(slots, len(adapters), with_bias))
    shapes = flatten([bank_dims(slot, with_bias) for slot in slots.values()])
    build_graph(
        wrapper,
        graph,
        example,
        shapes,
        banks,
        "multi",
        opset,
        extra={IDS_INPUT: ids},
        overwrite=overwrite,
        input_paths=inputs,
    )
    graph.seconds = time.perf_counter() - start
    return graph


def adapter_names(adapter_dirs: list) -> list[str]:
    """Directory names, made unique with "#<id>" so each names exactly one id."""
    names = [Path(d).resolve().name for d in adapter_dirs]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def build_banks(
    model: nn.Module, adapters: list[Adapter], slots: Mapping[str, LoraSlot], with_bias: bool, rank: int | None = None
) -> dict[str, np.ndarray]:
    """Every layer's banks (float32), adapters stacked in order, zero-padded to the layer's
    largest rank, or to `rank` for every layer (a static graph's fixed rank, at least that)."""
    modules = dict(model.named_modules())
    per_adapter = [renamed_parameters(a, modules) for a in adapters]
    n = len(adapters)
    banks: dict[str, np.ndarray] = {}
    for slot in slots.values():
        ranks = [p[slot.a_name].shape[1] for p in per_adapter if slot.a_name in p]
        width = rank if rank is not None else max(ranks)
        a_bank = np.zeros((n, slot.in_features, width), np.float32)
        b_bank = np.zeros((n, width, slot.out_features), np.float32)
        bias_bank = np.zeros((n, slot.out_features), np.float32)
        for k, params in enumerate(per_adapter):
            if slot.a_name in params:
                r = params[slot.a_name].shape[1]
                a_bank[k, :, :r] = params[slot.a_name]
                b_bank[k, :r, :] = params[slot.b_name]
            if slot.bias_name in params:
                bias_bank[k] = params[slot.bias_name]
        for name, bank in zip(bank_names(slot, with_bias), (a_bank, b_bank, bias_bank)):
            banks[name] = bank
    return banks


def renamed_parameters(adapter: Adapter, modules: Mapping[str, nn.Module]) -> dict[str, np.ndarray]:
    """The adapter's packed parameters (A^T, (sB)^T, s*bias), keyed by the model's module paths."""
    rename = choose_prefix(list(adapter.modules), modules)
    out = {}
    for name, array in adapter_parameters(adapter, np.float32).items():
        module, suffix = split_lora_name(name)
        out[rename(module) + suffix] = array
    return out


def example_banks(slots: Mapping[str, LoraSlot], n: int, with_bias: bool) -> list[list[torch.Tensor]]:
    """Random tracing values at a rank of 3: real ranks may be 1, which the exporter would specialise."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for s in slots.values():
        tensors = [
            small_random((n, s.in_features, EXAMPLE_RANK), gen),
            small_random((n, EXAMPLE_RANK, s.out_features), gen),
        ]
        out.append(tensors + ([small_random((n, s.out_features), gen)] if with_bias else []))
    return out


def bank_dims(slot: LoraSlot, with_bias: bool, static: bool = False) -> list:
    """The dynamic dims of a layer's banks: its own symbolic rank, none when `static`."""
    if static:
        return [{}, {}] + ([{}] if with_bias else [])
    rank = torch.export.Dim(slot.rank_dim)
    return [{2: rank}, {1: rank}] + ([{}] if with_bias else [])


def banked_update(x: torch.Tensor, banks: list[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Row i: (x_i @ A[ids_i]) @ B[ids_i] (+ bias[ids_i]); ids outside the bank add exactly 0."""
    n = banks[0].shape[0]
    valid = (ids >= 0) & (ids < n)
    pick = torch.where(valid, ids, torch.zeros_like(ids))  # a safe index for the gather
    keep = valid.to(x.dtype)
    # Zeroing the (smaller) A slice makes the whole update 0 for base rows.
    a = banks[0][pick] * keep.reshape(-1, 1, 1)
    b = banks[1][pick]
    rows = x.reshape(x.shape[0], -1, x.shape[-1])  # [batch, tokens, in]
    y = torch.matmul(torch.matmul(rows, a), b)
    if len(banks) == 3:
        y = y + (banks[2][pick] * keep.reshape(-1, 1)).unsqueeze(1)
    return y.reshape(*x.shape[:-1], b.shape[-1])


__all__ = ["export_multi", "A_BANK", "B_BANK", "BIAS_BANK"]
