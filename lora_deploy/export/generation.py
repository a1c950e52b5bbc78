"""Generation-ready decoder graphs: `--task text-generation-with-past` (Optimum's name).

The graph takes the key/value cache and returns the updated one (modeling.generation):

    input_ids [batch, sequence], attention_mask [batch, total_sequence],
    position_ids [batch, sequence], past_key_values.{i}.key/.value
    [batch, kv_heads, past_sequence, head_size]
      -> logits [batch, sequence, vocab], present.{i}.key/.value

so one graph runs the prefill (past_sequence 0, the prompt) and every decode step (one
new token per row after `past_sequence` cached ones). GQA models cache their fewer
key/value heads. Families: modeling.tasks.KV_CACHE_FAMILIES (LLaMA, GPT-2); any other
is refused in one line before anything is written.

- `export_generation`: a merged (or any) checkpoint, float32 or float16, initializers
  named as the checkpoint's tensors (like export_checkpoint).
- `export_generation_adapters`: the same graph with LoRA inputs, either a dynamic-adapter
  graph (ONNX Runtime's multi-LoRA convention, rank-0 defaults: `.onnx_adapter` files
  from `pack` switch tasks per run) or a multi-adapter graph (`adapter_ids`, one adapter
  per row), built by export/dynamic.py's and export/multi.py's machinery.

Each graph is proven before it is moved into place: onnx.checker, then ONNX Runtime
against the torch model at the traced step, at a prefill (past 0) and at a one-token
decode step with another batch size (adapter graphs: with the LoRA inputs fed and at
their defaults).

`export_generation(stream_weights=True)` traces the same function on a decoder built in
FakeTensorMode (`trace_fake_kv`), names its dims as the loaded export does, and streams the
initializers from the checkpoint (export/streamed.py's write_streamed), proving it at the
same steps on the real model or on a one-layer proxy of its config.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from lora_deploy.adapter.read import load_adapter
from lora_deploy.adapter.variants import refuse_non_additive
from lora_deploy.arrays import from_torch
from lora_deploy.backends.onnxrt.lora_format import METADATA_KEY, check_output_file
from lora_deploy.backends.onnxrt.runner import OnnxrtRunner
from lora_deploy.backends.onnxrt.sessions import BASE_ID, IDS_INPUT
from lora_deploy.compare import Comparison, compare_array, tolerance
from lora_deploy.dtypes import of_torch
from lora_deploy.errors import BadInputError, ExportError
from lora_deploy.export import graph as onnx_graph
from lora_deploy.export.dynamic import (
    DynamicGraph,
    LoraExport,
    default_value,
    example_lora,
    finish_graph,
    flatten,
    lora_dims,
    low_rank_update,
    resolve_slots,
    uncomputed_modules,
)
from lora_deploy.export.model import ExportResult, _check_onnx, export_result, resolve_dtype
from lora_deploy.export.multi import adapter_names, bank_dims, banked_update, build_banks, example_banks
from lora_deploy.io.checkpoint import check_checkpoint
from lora_deploy.io.staging import make_parent
from lora_deploy.modeling.generation import KvCacheWrapper, example_cache_inputs, forward_with_cache, load_decoder
from lora_deploy.modeling.hf import parse_dtype
from lora_deploy.modeling.tasks import (
    ATTENTION_MASK,
    BATCH_DIM,
    CAUSAL_LM,
    LOGITS,
    PAST_DIM,
    SEQUENCE_DIM,
    TEXT_GENERATION_WITH_PAST,
    TOTAL_DIM,
    KvLayout,
    kv_layout,
    load_config,
)

# (batch, new tokens, past) of the traced example: none 0 or 1 (the exporter would
# specialise it), all different from each other and from the LoRA example rank (3).
TRACED = (2, 4, 6)
# Where else the graph is proven: a prefill (no past) and a one-token decode step.
PROVEN = (TRACED, (2, 7, 0), (5, 1, 9))


def cache_dims(layout: KvLayout) -> list[dict[int, str]]:
    """Dynamic dims of the inputs in KvLayout order. Named strings, not torch.export.Dim:
    the exporter then lets total_sequence be derived as past_sequence + sequence."""
    tokens = {0: BATCH_DIM, 1: SEQUENCE_DIM}
    dims = [tokens, {0: BATCH_DIM, 1: TOTAL_DIM}] + ([dict(tokens)] if layout.position_ids else [])
    return dims + [{0: BATCH_DIM, 2: PAST_DIM} for _ in layout.past_names]


def model_input_count(layout: KvLayout) -> int:
    return 3 if layout.position_ids else 2


# ------------------------------------------------------------------ merged ----


def export_generation(
    model_dir: str | os.PathLike,
    path: str | os.PathLike,
    *,
    task: str = TEXT_GENERATION_WITH_PAST,
    opset: int | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    stream_weights: bool = False,
    parity: str = "auto",
    module: str | None = None,
    inputs_path: str | os.PathLike | None = None,
    static: bool = False,
    part: str | None = None,
) -> ExportResult:
    """Export a decoder checkpoint with its key/value cache as inputs and outputs, checked
    in ONNX Runtime against torch at a cached step, a prefill and a decode step.

    Takes export_checkpoint's options (ExportOptions) so the CLI calls either the same way;
    `task` must be text-generation-with-past. `stream_weights` traces the decoder without
    its weights and streams them from the checkpoint (export/streamed.py); `parity` (auto,
    full, proxy, skip) then says where the ONNX Runtime check runs, as there. The plain
    module options (`module`, `inputs_path`, `static`, `part`) do not apply to a KV-cache graph.
    """
    path = Path(path)
    if task != TEXT_GENERATION_WITH_PAST:
        raise BadInputError(f"export_generation exports task {TEXT_GENERATION_WITH_PAST}, not {task!r}")
    if module is not None or inputs_path is not None or static or part is not None:
        raise BadInputError(f"--module, --inputs, --static and --part export plain modules, not --task {task}")
    onnx_graph.check_output(path, [model_dir], overwrite)
    onnx_graph.check_opset(opset)
    dtype, dtype_source = resolve_dtype(model_dir, dtype)
    torch_dtype = parse_dtype(dtype)
    if stream_weights:
        return export_generation_streamed(model_dir, path, torch_dtype, dtype_source, opset, overwrite, parity)
    if parity != "auto":
        raise BadInputError("parity applies to stream_weights exports (a loaded model is always checked)")
    model, layout = load_decoder(model_dir, torch_dtype)
    wrapper = KvCacheWrapper(model, layout).eval()
    points, expected = proof_points(model, layout, torch_dtype)
    inputs, past = points[0]
    program = onnx_graph.run_exporter(
        wrapper,
        (inputs, past),
        dynamic_shapes=(cache_dims(layout)[: len(inputs)], cache_dims(layout)[len(inputs) :]),
        output_names=layout.output_names,
        opset=opset,
    )
    ir_model = program.model
    opset_used = name_kv_graph(ir_model, wrapper, opset)

    make_parent(path)
    prove = lambda tmp: prove_kv(tmp, layout, points, expected, dtype)  # noqa: E731
    max_err = onnx_graph.save_atomic(ir_model, path, prove, overwrite=overwrite, inputs=[model_dir])
    return export_result(path, wrapper, max_err, torch_dtype, opset_used, dtype_source=dtype_source)


def name_kv_graph(ir_model: Any, wrapper: KvCacheWrapper, opset: int | None) -> int:
    """The traced KV-cache graph's inputs, outputs and initializers named as the checkpoint
    and KvLayout name them, the layout recorded in its metadata; the opset it has (the
    requested one, or ExportError)."""
    layout = wrapper.layout
    onnx_graph.name_values(ir_model.graph, layout.input_names, layout.output_names)
    onnx_graph.rename_tied(ir_model.graph, wrapper)
    onnx_graph.strip_prefix(ir_model.graph, KvCacheWrapper.PARAM_PREFIX)
    ir_model.metadata_props[METADATA_KEY] = json.dumps({"format": "kv-cache", "kv_cache": layout.to_dict()})
    opset_used = ir_model.opset_imports.get("", 0)
    if opset is not None and opset_used != opset:
        raise ExportError(f"requested opset {opset} but the exporter produced opset {opset_used}")
    return opset_used


def proof_points(model, layout: KvLayout, torch_dtype: torch.dtype) -> tuple[list, list]:
    """The PROVEN steps' inputs (model inputs, past) and torch's outputs at each."""
    points = [example_cache_inputs(model, layout, *shape, seed=i, dtype=torch_dtype) for i, shape in enumerate(PROVEN)]
    wrapper = KvCacheWrapper(model, layout).eval()
    with torch.inference_mode():
        expected = [wrapper(inputs, past) for inputs, past in points]
    return points, expected


def prove_kv(tmp: Path, layout: KvLayout, points: list, expected: list, dtype: str) -> float | None:
    """onnx.checker, then ONNX Runtime against torch's outputs at every proof point (real
    positions only, the dtype's tolerance): ExportError on a difference; the largest error."""
    _check_onnx(tmp)
    worst = None
    with OnnxrtRunner(tmp, name="export-check") as runner:
        for (inputs, past), want in zip(points, expected):
            try:
                got = runner.infer(feed_of(layout, inputs, past))
            except BadInputError as err:
                raise ExportError(f"ONNX Runtime cannot run the exported graph: {err}") from None
            for name, tensor in zip(layout.output_names, want):
                result = compare_real(name, got[name], from_torch(tensor), from_torch(inputs[1]), dtype)
                result.raise_for(ExportError, "ONNX Runtime differs from torch")
                if result.max_abs is not None:
                    worst = result.max_abs if worst is None else max(worst, result.max_abs)
    return worst


# ---------------------------------------------------------------- streamed ----


def trace_fake_kv(config, layout: KvLayout, torch_dtype: torch.dtype, opset: int | None) -> tuple[Any, KvCacheWrapper]:
    """(ONNX program, fake wrapper): the KV-cache function traced on a decoder built from its
    config inside FakeTensorMode (no weights), at the TRACED step. As torch.onnx.export
    traces a real module: non-strict, size-oblivious, deferred runtime asserts."""
    import transformers
    from torch._subclasses.fake_tensor import FakeTensorMode

    inputs, past = example_cache_inputs(SimpleNamespace(config=config), layout, *TRACED, dtype=torch_dtype)
    dynamic = torch.export.Dim.DYNAMIC
    dims = [{axis: dynamic for axis in d} for d in cache_dims(layout)]
    try:
        with (
            onnx_graph.quiet_exporter(),
            FakeTensorMode(allow_non_fake_inputs=True),
            torch.fx.experimental._config.patch(backed_size_oblivious=True),
        ):
            model = transformers.AutoModelForCausalLM.from_config(
                config, dtype=torch_dtype, attn_implementation="eager"
            ).eval()
            wrapper = KvCacheWrapper(model, layout)
            exported = torch.export.export(
                wrapper,
                (inputs, past),
                dynamic_shapes=(dims[: len(inputs)], dims[len(inputs) :]),
                strict=False,
                prefer_deferred_runtime_asserts_over_guards=True,
            )
    except Exception as err:
        raise ExportError(f"torch.export failed on the fake model: {onnx_graph.exporter_summary(err)}") from err
    program = onnx_graph.run_exporter(exported, output_names=layout.output_names, opset=opset)
    return program, wrapper


_SYMBOL = re.compile(r"\b[su]\d+\b")


def name_cache_dims(model: Any, layout: KvLayout) -> None:
    """The traced graph's symbolic dims named as export_generation names them: inputs by
    cache_dims ("batch", "sequence", "total_sequence", "past_sequence"), outputs' dims
    rewritten in those names ("past_sequence + sequence")."""
    import onnx_ir as ir

    names: dict[str, str] = {}
    for value, labels in zip(model.graph.inputs, cache_dims(layout)):
        dims = list(value.shape)
        for axis, label in labels.items():
            if isinstance(dims[axis], ir.SymbolicDim) and dims[axis].value:
                names.setdefault(dims[axis].value, label)
            dims[axis] = ir.SymbolicDim(label)
        value.shape = ir.Shape(dims)
    for value in model.graph.outputs:
        if value.shape is None:
            continue
        dims = [
            ir.SymbolicDim(_SYMBOL.sub(lambda m: names.get(m.group(0), m.group(0)), d.value))
            if isinstance(d, ir.SymbolicDim) and d.value
            else d
            for d in value.shape
        ]
        value.shape = ir.Shape(dims)


def export_generation_streamed(
    model_dir: str | os.PathLike,
    path: Path,
    torch_dtype: torch.dtype,
    dtype_source: str,
    opset: int | None,
    overwrite: bool,
    parity_mode: str = "auto",
) -> ExportResult:
    """export_generation(stream_weights=True): the KV-cache function traced without weights
    (trace_fake_kv), its initializers streamed from the checkpoint by name, proven at the
    PROVEN steps on the real model or on a one-layer proxy (export/streamed.py)."""
    from lora_deploy.export import streamed

    model_dir = Path(model_dir)
    config = load_config(model_dir)
    layout = kv_layout(config)
    check_checkpoint(model_dir)
    streamed.parity_plan(0, parity_mode)  # an unknown mode is refused before the work
    dtype = of_torch(torch_dtype).name
    program, wrapper = trace_fake_kv(config, layout, torch_dtype, opset)  # a fake wrapper: no weights held
    ir_model = program.model
    opset_used = name_kv_graph(ir_model, wrapper, opset)
    name_cache_dims(ir_model, layout)
    buffers = streamed.real_buffers(config, CAUSAL_LM, torch_dtype)
    del program

    def parity(tmp: Path) -> float | None:
        model, _ = load_decoder(model_dir, torch_dtype)
        points, expected = proof_points(model, layout, torch_dtype)
        del model  # the torch model goes before the ORT session comes
        return prove_kv(tmp, layout, points, expected, dtype)

    def proxy() -> tuple[float | None, str]:
        import tempfile

        import transformers

        small = streamed.proxy_config(config)
        with tempfile.TemporaryDirectory(prefix="lora-deploy-proxy-") as tmp:
            torch.manual_seed(0)
            transformers.AutoModelForCausalLM.from_config(small, dtype=torch_dtype).save_pretrained(tmp)
            result = export_generation_streamed(tmp, Path(tmp) / "proxy.onnx", torch_dtype, "", opset, False, "full")
        return result.max_abs_error, f"checked on a 1-layer proxy of the config, vocab {small.vocab_size}"

    make_parent(path)
    max_err, status = streamed.write_streamed(ir_model, model_dir, path, buffers, parity, proxy, parity_mode, overwrite)
    return export_result(
        path, wrapper, max_err, torch_dtype, opset_used, dtype_source=dtype_source, weights="streamed", parity=status
    )


def compare_real(name: str, got: np.ndarray, want: np.ndarray, mask: np.ndarray, dtype: str) -> Comparison:
    """An output of a cached step against torch's at the real (unpadded) positions only:
    logits [batch, new, vocab] at the new tokens' mask, present.* [batch, heads, total,
    head_size] at the whole mask. Padded positions are undefined (their attention rows are
    fully masked, and kernels fill those differently)."""
    if name == LOGITS:
        return compare_array(name, got, want, tolerance(dtype), mask[:, mask.shape[1] - got.shape[1] :])
    swap = (0, 2, 1, 3)
    return compare_array(name, got.transpose(swap), want.transpose(swap), tolerance(dtype), mask)


def feed_of(layout: KvLayout, inputs: Sequence[torch.Tensor], past: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: from_torch(t) for name, t in zip(layout.input_names, [*inputs, *past])}


# ---------------------------------------------------------------- adapters ----


@dataclass
class KvAdapterGraph(DynamicGraph):
    """A dynamic- or multi-adapter graph of a decoder with its cache: DynamicGraph's slots and
    LoRA inputs, KvLayout's inputs and outputs."""

    layout: KvLayout | None = None
    adapter_files: list[str] = field(default_factory=list)

    @property
    def outputs(self) -> list[str]:
        return self.layout.output_names

    def metadata(self, kind: str) -> dict:
        return {**super().metadata(kind), "kv_cache": self.layout.to_dict()}


class KvLoraExport(LoraExport):
    """LoraExport (forward hooks adding each layer's LoRA) around the cached forward:
    `forward(inputs, lora)` takes the model inputs, the past, then adapter_ids if any."""

    def __init__(self, model, graph: KvAdapterGraph, per_layer: int, update):
        super().__init__(model, graph, per_layer, update)
        self.layout = graph.layout

    def forward(self, inputs: list[torch.Tensor], lora: list[torch.Tensor]):
        n, layers = model_input_count(self.layout), len(self.layout.past_names)
        self.ids = inputs[n + layers] if len(inputs) > n + layers else None
        k = self.per_layer
        self.current = {name: lora[i * k : (i + 1) * k] for i, name in enumerate(self.layers)}
        try:
            return forward_with_cache(self.base, self.layout, inputs[:n], inputs[n : n + layers])
        finally:
            self.current, self.ids = {}, None


def export_generation_adapters(
    model_dir: str | os.PathLike,
    path: str | os.PathLike,
    *,
    adapters: Iterable[str | os.PathLike] = (),
    targets: Sequence[str] | str | None = None,
    multi: bool = False,
    opset: int | None = None,
    overwrite: bool = False,
) -> KvAdapterGraph:
    """A KV-cache graph that keeps LoRA separate: dynamic (default; `adapters` and/or
    `targets` decide the LoRA inputs) or multi-adapter (`multi`: every adapter in the
    graph's banks, input adapter_ids picks one per row, -1 the base)."""
    start = time.perf_counter()
    path = Path(path)
    adapters = [adapters] if isinstance(adapters, (str, os.PathLike)) else list(adapters)
    paths = [model_dir, *adapters]
    check_output_file(path, paths, overwrite)
    onnx_graph.check_output(path, paths, overwrite)
    onnx_graph.check_opset(opset)
    if multi and (not adapters or targets):
        raise BadInputError("a multi-adapter graph needs --adapter (one or more) and no --targets")
    if not adapters and not targets:
        raise BadInputError("nothing to target: give adapters or targets (e.g. q_proj,v_proj)")
    loaded = [load_adapter(a) for a in adapters]
    for adapter in loaded:
        refuse_non_additive(adapter)
    model, layout = load_decoder(model_dir)
    uncomputed = uncomputed_modules(model, ["input_ids", ATTENTION_MASK], LOGITS)
    slots, skipped = resolve_slots(model, loaded, None if multi else targets, uncomputed)
    with_bias = any(a.config.lora_bias for a in loaded)
    graph = KvAdapterGraph(
        path,
        slots,
        layout.input_names,
        LOGITS,
        TEXT_GENERATION_WITH_PAST,
        with_bias,
        adapter_names(adapters) if multi else [],
        uncomputed=uncomputed,
        skipped=skipped,
        layout=layout,
    )
    per_layer = 3 if with_bias else 2
    if multi:
        wrapper = KvLoraExport(model, graph, per_layer, banked_update)
        defaults = build_banks(model, loaded, slots, with_bias)
        lora = flatten(example_banks(slots, len(loaded), with_bias))
        shapes = flatten([bank_dims(slot, with_bias) for slot in slots.values()])
        ids = lambda batch: torch.tensor([(len(loaded) - 1 - i) if i % 2 == 0 else BASE_ID for i in range(batch)])
    else:
        wrapper = KvLoraExport(model, graph, per_layer, low_rank_update)
        defaults = {name: default_value(name, graph) for name in graph.lora_inputs()}
        lora = flatten(example_lora(slots, with_bias))
        shapes = flatten([lora_dims(slot, with_bias) for slot in slots.values()])
        ids = None
    build_kv_graph(
        wrapper, graph, lora, shapes, defaults, "multi" if multi else "dynamic", opset, ids, overwrite, paths
    )
    graph.seconds = time.perf_counter() - start
    return graph


def build_kv_graph(
    wrapper: KvLoraExport,
    graph: KvAdapterGraph,
    lora: list[torch.Tensor],
    lora_shapes: list,
    defaults: dict[str, np.ndarray],
    kind: str,
    opset: int | None,
    ids,
    overwrite: bool,
    input_paths: Sequence,
) -> None:
    """Trace, name exactly (finish_graph: rank-0 defaults or banks), prove at every PROVEN
    step with the LoRA inputs fed and at their defaults, move into place."""
    layout = graph.layout
    model = wrapper.base
    points = []
    for i, (batch, seq, past) in enumerate(PROVEN):
        inputs, cache = example_cache_inputs(model, layout, batch, seq, past, seed=i)
        extra = [] if ids is None else [ids(batch)]
        points.append([*inputs, *cache, *extra])
    as_default = [torch.from_numpy(a) for a in defaults.values()]
    try:
        wrapper.eval()
        with torch.no_grad():
            expected = [(wrapper(p, lora), wrapper(p, as_default)) for p in points]
            dims = cache_dims(layout) + ([] if ids is None else [{0: BATCH_DIM}])
            program = onnx_graph.run_exporter(
                wrapper, (points[0], lora), dynamic_shapes=(dims, lora_shapes), opset=opset, optimize=False
            )
    finally:
        wrapper.remove_hooks()
    extra_names = [] if ids is None else [IDS_INPUT]
    finish_graph(program.model, graph, list(defaults), list(defaults.values()), kind, model, extra_names)
    names = layout.input_names + extra_names

    def prove(tmp: Path) -> None:
        try:
            with OnnxrtRunner(tmp) as runner:
                for (batch, seq, past), point, (want_fed, want_default) in zip(PROVEN, points, expected):
                    feed = {n: t.numpy() for n, t in zip(names, point)}
                    fed = {**feed, **{n: t.numpy() for n, t in zip(defaults, lora)}}
                    got_fed, got_default = runner.infer(fed), runner.infer(feed)
                    mask = point[1].numpy()
                    for name, a, b in zip(layout.output_names, want_fed, want_default):
                        for got, want, how in ((got_fed, a, "LoRA inputs fed"), (got_default, b, "defaults")):
                            where = f"ONNX Runtime differs from torch at {batch}x{seq}+{past}, {how}"
                            compare_real(name, got[name], want.numpy(), mask, "float32").raise_for(ExportError, where)
        except BadInputError as exc:
            raise ExportError(f"ONNX Runtime cannot run the exported graph: {exc}") from None

    onnx_graph.save_atomic(program.model, graph.path, prove, overwrite=overwrite, inputs=input_paths)
