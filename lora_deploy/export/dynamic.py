"""One ONNX graph, many LoRA adapters: ONNX Runtime's multi-LoRA convention.

`export_dynamic` exports the base model once. Every targeted layer (nn.Linear, or
GPT-2's Conv1D) computes

    y = base(x) + (x @ A) @ B  [+ bias]

where A and B are graph inputs named after the base model's module path:

    <module>.lora_A.weight   [in_features, rank]   = PEFT's lora_A.weight transposed
    <module>.lora_B.weight   [rank, out_features]  = (scaling * PEFT's lora_B.weight) transposed
    <module>.lora_B.bias     [out_features]        = scaling * PEFT's lora_B.bias
                                                     (only in graphs exported with lora_bias)

`rank` is a symbolic dimension of its own per layer (rank_<module with _ for .>), so
adapters of different ranks, rank_pattern included, fit one graph. Each of these inputs
also has a same-named initializer holding a rank-0 default ([in, 0] and [0, out], zero
bias): a run that feeds nothing is exactly the base model (a MatMul with K=0 yields
zeros). `default_rank=1` writes rank-1 zero defaults instead ([in, 1] and [1, out], all
zero: x @ 0 @ 0 adds exact zeros): for runtimes whose MatMul fails on an inner dim of 0
(ONNX Runtime's CUDA and DirectML providers have); the inputs keep their symbolic rank,
so packed adapters load and switch the same way. A plain module's static graph
(export/dynamic_module.py) fixes the rank instead (graph.rank: [in, R] and [R, out], zero
defaults of rank R) and may be float16 (graph.dtype), its proof at float16's tolerance;
with graph.lora_defaults False its A/B are required inputs without defaults (TensorRT's
ONNX parser takes a defaulted input as a constant weight), the "no adapter" run fed zeros.
Inputs with a default are ONNX Runtime's "overridable initializers": they are listed by
session.get_overridable_initializers(), not get_inputs(), and ONNX Runtime never
constant-folds them.

`pack_adapter` writes a PEFT adapter in ONNX Runtime's adapter format (.onnx_adapter)
with those names and orientations, the scaling already folded into B. `DynamicSession`
(sessions.py, re-exported here) loads the graph once and activates any loaded adapter
per call through RunOptions.add_active_adapter. ONNX Runtime ignores active adapters
when IO binding is used, so the session never binds.

Modules the graph does not compute (BertModel's pooler in a feature-extraction graph,
which returns last_hidden_state) get no LoRA inputs; an adapter's LoRA there changes no
output and is skipped with a note (uncomputed_modules; the list goes into the graph's
metadata so that pack_adapter skips them too). A sentence-transformers checkpoint's
graph also returns sentence_embedding.

DoRA and embedding LoRA are refused: DoRA rescales every output feature by a norm of
the merged weight, and an embedding LoRA is a lookup, not x @ A; neither is an additive
low-rank term on a layer's input. Adapters that replace whole base tensors
(modules_to_save, trained biases) are refused for the same reason.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lora_deploy.adapter.read import Adapter, LoraModule, load_adapter
from lora_deploy.adapter.variants import refuse_non_additive
from lora_deploy.backends.onnxrt.lora_format import (
    A_SUFFIX,
    B_SUFFIX,
    BIAS_SUFFIX,
    METADATA_KEY,
    check_output_file,
    split_lora_name,
)
from lora_deploy.backends.onnxrt.runner import OnnxrtRunner
from lora_deploy.compare import require_close
from lora_deploy.dtypes import dtype as dtype_row
from lora_deploy.errors import AdapterError, BadInputError, ExportError
from lora_deploy.export import graph as onnx_graph
from lora_deploy.modeling.hf import load_for_task
from lora_deploy.modeling.samples import sample_inputs
from lora_deploy.modeling.sentence import SENTENCE_EMBEDDING, SentencePooling, pooling_for_task
from lora_deploy.modeling.tasks import TASK_OUTPUT, load_config, model_input_names, resolve_task
from lora_deploy.modeling.unmerged import choose_prefix, layer_kind

FORMAT_VERSION = 1
DEFAULT_RANKS = (0, 1)  # rank of the LoRA inputs' all-zero defaults (export onnx --default-rank)
# Example sizes for tracing; none may be 0 or 1 (the exporter would specialise them)
# and they differ from each other so no two dynamic dimensions look related.
EXAMPLE_BATCH, EXAMPLE_SEQUENCE, EXAMPLE_RANK = 2, 5, 3


@dataclass(frozen=True)
class LoraSlot:
    """One targeted layer of a graph: where its LoRA inputs go and what shapes they take."""

    module: str
    kind: str  # "linear" (nn.Linear) or "transposed" (GPT-2 Conv1D)
    in_features: int
    out_features: int

    @property
    def a_name(self) -> str:
        return self.module + A_SUFFIX

    @property
    def b_name(self) -> str:
        return self.module + B_SUFFIX

    @property
    def bias_name(self) -> str:
        return self.module + BIAS_SUFFIX

    @property
    def rank_dim(self) -> str:
        return "rank_" + self.module.replace(".", "_")


@dataclass
class DynamicGraph:
    """What an export wrote: the file, its targeted layers and its named inputs/outputs.

    `uncomputed` are the model's modules that the graph's outputs do not depend on
    (BertModel's pooler when only last_hidden_state is returned); they get no LoRA
    inputs, and `skipped` lists those an adapter or the targets asked for.
    """

    path: Path
    slots: dict[str, LoraSlot]  # by module path
    inputs: list[str]  # model inputs (input_ids, attention_mask, ...), not LoRA inputs
    output: str  # logits or last_hidden_state
    task: str
    lora_bias: bool
    adapters: list[str] = field(default_factory=list)  # multi-adapter graphs: names by id
    default_rank: int = 0  # dynamic graphs: the rank of the LoRA inputs' zero defaults
    dtype: str = "float32"  # the graph's float dtype (plain modules may be float16: LoRA inputs too)
    rank: int | None = None  # static graphs: the rank every LoRA input fixes (None: symbolic ranks)
    lora_defaults: bool = True  # False: LoRA inputs are required (no initializer; TensorRT's reading of a graph)
    seconds: float = 0.0
    sentence: SentencePooling | None = None  # sentence-transformers pooling: a sentence_embedding output
    uncomputed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def outputs(self) -> list[str]:
        """The graph's outputs: `output`, then sentence_embedding for a sentence-transformers model."""
        return [self.output] + ([SENTENCE_EMBEDDING] if self.sentence is not None else [])

    def lora_inputs(self) -> list[str]:
        """Names of the overridable LoRA inputs (dynamic graphs)."""
        names = []
        for slot in self.slots.values():
            names += [slot.a_name, slot.b_name] + ([slot.bias_name] if self.lora_bias else [])
        return names

    def metadata(self, kind: str) -> dict:
        return {
            "format": kind,
            "version": FORMAT_VERSION,
            "task": self.task,
            "inputs": self.inputs,
            "output": self.output,
            "outputs": self.outputs,
            "lora_bias": self.lora_bias,
            "modules": {s.module: [s.kind, s.in_features, s.out_features] for s in self.slots.values()},
            "uncomputed": self.uncomputed,
            "adapters": self.adapters,
            "default_rank": self.default_rank,
            "dtype": self.dtype,
            "rank": self.rank,
            "lora_defaults": self.lora_defaults,
        }


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------


def export_dynamic(
    model_dir: str | os.PathLike,
    path: str | os.PathLike,
    *,
    adapters: Iterable[str | os.PathLike] = (),
    targets: Sequence[str] | str | None = None,
    task: str = "auto",
    opset: int | None = None,
    lora_bias: bool | None = None,
    default_rank: int = 0,
    overwrite: bool = False,
) -> DynamicGraph:
    """Export the base model with LoRA A/B inputs on every targeted layer.

    Targets are the union of the given adapters' layers and `targets` (PEFT's
    target_modules rule: a list matches module-name suffixes at a dot boundary, a string
    is a full regex). `lora_bias` adds `<module>.lora_B.bias` inputs; by default it is on
    when one of the adapters was trained with lora_bias. `default_rank` (0 or 1): the rank
    of the all-zero defaults a run without an adapter uses (1 for runtimes that fail on a
    MatMul with an inner dim of 0). An existing file is replaced only with overwrite=True,
    and never an input.
    """
    start = time.perf_counter()
    if default_rank not in DEFAULT_RANKS:
        raise BadInputError(f"default rank {default_rank!r}: choose {' or '.join(map(str, DEFAULT_RANKS))}")
    path = Path(path)
    if isinstance(adapters, (str, os.PathLike)):  # one directory, not its characters
        adapters = [adapters]
    adapters = list(adapters)
    inputs = [model_dir, *adapters]
    check_output_file(path, inputs, overwrite)
    onnx_graph.check_output(path, inputs, overwrite)
    onnx_graph.check_opset(opset)
    loaded = [load_adapter(d) for d in adapters]
    for adapter in loaded:
        refuse_non_additive(adapter)
    if not loaded and not targets:
        raise BadInputError("nothing to target: give adapters or targets (e.g. ['q_proj', 'v_proj'])")
    model, task, inputs, output = load_model(model_dir, task)
    uncomputed = uncomputed_modules(model, inputs, output)
    slots, skipped = resolve_slots(model, loaded, targets, uncomputed)
    with_bias = any(a.config.lora_bias for a in loaded) if lora_bias is None else lora_bias
    sentence = pooling_for_task(model_dir, task)
    graph = DynamicGraph(
        path, slots, inputs, output, task, with_bias, sentence=sentence, uncomputed=uncomputed, skipped=skipped
    )
    graph.default_rank = default_rank
    shapes = [lora_dims(slot, with_bias) for slot in slots.values()]
    wrapper = LoraExport(model, graph, 3 if with_bias else 2, low_rank_update)
    defaults = {name: default_value(name, graph) for name in graph.lora_inputs()}
    lora = flatten(example_lora(slots, with_bias))
    build_graph(
        wrapper, graph, lora, flatten(shapes), defaults, "dynamic", opset, overwrite=overwrite, input_paths=inputs
    )
    graph.seconds = time.perf_counter() - start
    return graph


def load_model(model_dir: str | os.PathLike, task: str) -> tuple[nn.Module, str, list[str], str]:
    """The base model as export.py loads it (float32, eval, eager attention), so dynamic
    and merged graphs are built alike; returns (model, task, input names, output name)."""
    config = load_config(model_dir)
    task = resolve_task(task, config)
    model = load_for_task(model_dir, task, "float32")
    return model, task, model_input_names(config), TASK_OUTPUT[task]


def uncomputed_modules(model: nn.Module, input_names: list[str], output: str) -> list[str]:
    """Modules holding parameters that `output` does not depend on, found by walking the
    autograd graph of one forward pass on the sample inputs (no backward, no gradients).

    BertModel computes its pooler in forward, but a feature-extraction graph returns only
    last_hidden_state, so the exporter drops the pooler, and a LoRA input there would be
    read by nothing: such modules get none, and adapters' LoRA on them is skipped (it
    changes nothing the graph outputs).
    """
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    named = dict(zip(input_names, example_inputs(model, input_names)))
    try:
        for p in params:
            p.requires_grad_(True)  # a frozen weight would look unreached
        with torch.enable_grad():
            result = getattr(model(**named, **call_kwargs(model), return_dict=True), output)
            reached = reached_parameters(result)
            del result
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)
    return sorted(
        name
        for name, module in model.named_modules()
        if list(module.parameters(recurse=False))
        and not any(id(p) in reached for p in module.parameters(recurse=False))
    )


def reached_parameters(result: torch.Tensor) -> set[int]:
    """ids of the leaf tensors (parameters) the autograd graph of `result` reads."""
    reached: set[int] = set()
    seen: set[int] = set()
    stack = [result.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        leaf = getattr(fn, "variable", None)  # AccumulateGrad: a parameter
        if leaf is not None:
            reached.add(id(leaf))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return reached


def call_kwargs(model: nn.Module) -> dict:
    """Decoders would otherwise compute and return their key/value cache."""
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


def resolve_slots(
    model: nn.Module, adapters: list[Adapter], targets, uncomputed: Iterable[str] = ()
) -> tuple[dict[str, LoraSlot], list[str]]:
    """Targeted layers: the adapters' layers (renamed to the model's paths) plus `targets`.

    Returns (slots by module path, skipped): modules in `uncomputed` (uncomputed_modules:
    the graph does not compute them) get no slot and are listed in `skipped`.
    """
    modules = dict(model.named_modules())
    idle = set(uncomputed)
    placed: list[tuple[Adapter, LoraModule, str]] = []  # (adapter, module, model path)
    for adapter in adapters:
        try:
            rename = choose_prefix(list(adapter.modules), modules)
        except AdapterError as exc:
            raise AdapterError(f"{adapter.path}: {exc}") from None
        placed += [(adapter, lora, rename(lora.name)) for lora in adapter.modules.values()]
    names = {path for _, _, path in placed}
    if targets:
        matched = {n for n in modules if n and matches_target(n, targets)}
        if not matched:
            raise BadInputError(f"targets {targets!r} match no module of the model")
        if matched <= idle:
            raise BadInputError(
                f"targets {targets!r} match only modules the graph does not compute: {', '.join(sorted(matched))}"
            )
        names |= matched
    skipped = sorted(names & idle)
    if names and names <= idle:
        raise BadInputError(f"the adapters target only modules the graph does not compute: {', '.join(skipped)}")
    slots = {name: make_slot(name, modules[name]) for name in sorted(names - idle)}
    for adapter, lora, path in placed:
        if path in slots:
            check_fits(lora, slots[path], adapter.path)
    return slots, skipped


def matches_target(name: str, targets: Sequence[str] | str) -> bool:
    """PEFT's target_modules rule."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def make_slot(name: str, layer: nn.Module) -> LoraSlot:
    kind = layer_kind(layer)
    if kind == "linear":
        return LoraSlot(name, kind, layer.in_features, layer.out_features)
    if kind == "transposed":
        in_features, out_features = layer.weight.shape
        return LoraSlot(name, kind, int(in_features), int(out_features))
    raise AdapterError(f"{name}: LoRA on a {kind} layer cannot be expressed as an additive low-rank input")


def check_fits(lora: LoraModule, slot: LoraSlot, where) -> None:
    if lora.a.shape[1] != slot.in_features or lora.b.shape[0] != slot.out_features:
        raise AdapterError(
            f"{where}: module {lora.name} is {lora.a.shape[1]} -> {lora.b.shape[0]} features "
            f"but layer {slot.module} is {slot.in_features} -> {slot.out_features}"
        )


def example_lora(slots: Mapping[str, LoraSlot], with_bias: bool, rank: int = EXAMPLE_RANK) -> list[list[torch.Tensor]]:
    """Tracing values for each layer's (A, B[, bias]); random so nothing looks constant.
    `rank`: a static graph's fixed rank (else EXAMPLE_RANK, which the exporter keeps symbolic)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for s in slots.values():
        tensors = [small_random((s.in_features, rank), gen), small_random((rank, s.out_features), gen)]
        out.append(tensors + ([small_random((s.out_features,), gen)] if with_bias else []))
    return out


def small_random(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Seeded, and small enough that a dozen LoRA layers keep activations in range."""
    return torch.randn(shape, generator=gen) * 0.1


def lora_dims(slot: LoraSlot, with_bias: bool, static: bool = False) -> list:
    """The dynamic dims of a layer's (A, B[, bias]): its own symbolic rank, none when `static`."""
    if static:
        return [{}, {}] + ([{}] if with_bias else [])
    rank = torch.export.Dim(slot.rank_dim)
    return [{1: rank}, {0: rank}] + ([{}] if with_bias else [])


def flatten(nested: list[list]) -> list:
    return [x for group in nested for x in group]


def low_rank_update(x: torch.Tensor, tensors: list[torch.Tensor], _ids) -> torch.Tensor:
    """(x @ A) @ B (+ bias), A [in, r], B [r, out]."""
    y = torch.matmul(torch.matmul(x, tensors[0]), tensors[1])
    return y + tensors[2] if len(tensors) == 3 else y


class LoraExport(nn.Module):
    """The module handed to the exporter: the HF model plus LoRA tensors as extra inputs.

    Forward hooks on the targeted layers (the base modules themselves, not wrappers)
    add `update(x, tensors, ids)`, so every base parameter keeps its name. Tensors for a
    call are parked on the module for the duration of forward; non-strict export traces
    plain Python, so this plumbing leaves no trace in the graph.
    """

    PREFIX = "base."  # the model's attribute below: traced weight names start with it

    def __init__(self, model: nn.Module, graph: DynamicGraph, per_layer: int, update: Callable):
        super().__init__()
        self.base = model
        self.input_names = graph.inputs
        self.output_name = graph.output
        self.sentence = graph.sentence
        self.layers = list(graph.slots)
        self.per_layer = per_layer  # LoRA tensors per layer, in input order
        self.update = update
        self.extra_kwargs = call_kwargs(model)
        self.current: dict[str, list[torch.Tensor]] = {}
        self.ids: torch.Tensor | None = None
        modules = dict(model.named_modules())
        self.hooks = [modules[name].register_forward_hook(self.hook(name)) for name in graph.slots]

    def hook(self, name: str):
        def add_lora(_layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if name not in self.current:
                return output
            return output + self.update(args[0], self.current[name], self.ids)

        return add_lora

    def forward(self, inputs: list[torch.Tensor], lora: list[torch.Tensor]):
        # Inputs past the model's own are adapter ids (multi-adapter graphs).
        self.ids = inputs[len(self.input_names)] if len(inputs) > len(self.input_names) else None
        k = self.per_layer
        self.current = {name: lora[i * k : (i + 1) * k] for i, name in enumerate(self.layers)}
        try:
            named = dict(zip(self.input_names, inputs[: len(self.input_names)]))
            out = self.base(**named, **self.extra_kwargs, return_dict=True)
        finally:
            self.current, self.ids = {}, None
        output = getattr(out, self.output_name)
        if self.sentence is None:
            return output
        return output, self.sentence(output, named.get("attention_mask"))

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()


def build_graph(
    wrapper: LoraExport,
    graph: DynamicGraph,
    lora: list[torch.Tensor],
    lora_shapes: list,
    defaults: dict[str, np.ndarray],
    kind: str,
    opset: int | None,
    extra: Mapping[str, torch.Tensor] | None = None,
    *,
    overwrite: bool = False,
    input_paths: Iterable[str | os.PathLike] = (),
    example: list[torch.Tensor] | None = None,
    input_dims: list[dict] | None = None,
    extra_dims: list[dict] | None = None,
) -> None:
    """Trace, name the graph exactly, prove it against PyTorch on the example, move it into place.

    `example` and `input_dims` (the model inputs' tracing values and dynamic dims) default
    to a text model's sample inputs with dynamic batch and sequence; a plain module's
    graph (export/dynamic_module.py) gives its own observations. `extra_dims`: the extra
    inputs' dynamic dims (default: a dynamic batch). The proof is at graph.dtype's
    tolerance (compare.py): a float16 graph against the float16 module in torch.

    `lora` are tracing values of the LoRA inputs (in `defaults` order), `defaults` the
    initializers they get; `extra` inputs sit between the model's inputs and the LoRA
    ones (adapter_ids). Two runs are proven: the LoRA inputs fed, and left at their
    defaults. Hooks are removed before returning, whatever happens. `overwrite` and
    `input_paths`: the output policy (lora_deploy.io.staging.check_output).
    """
    extra = dict(extra or {})
    inputs = example if example is not None else example_inputs(wrapper.base, graph.inputs)
    try:
        wrapper.eval()
        with torch.no_grad():
            expected_fed = output_arrays(wrapper(inputs + list(extra.values()), lora))
            as_default = [torch.from_numpy(a) for a in defaults.values()]
            expected_default = output_arrays(wrapper(inputs + list(extra.values()), as_default))
        ir_model = export_wrapper(
            wrapper, inputs, list(extra.values()), lora, lora_shapes, opset, input_dims, extra_dims
        )
    finally:
        wrapper.remove_hooks()
    finish_graph(ir_model, graph, list(defaults), list(defaults.values()), kind, wrapper.base, list(extra))
    feeds = {n: t.numpy() for n, t in zip(graph.inputs + list(extra), inputs + list(extra.values()))}
    fed = {**feeds, **{n: t.numpy() for n, t in zip(defaults, lora)}}
    unfed = feeds if graph.lora_defaults else {**feeds, **defaults}  # required LoRA inputs: zeros fed

    def prove(tmp: Path) -> None:
        try:
            with OnnxrtRunner(tmp) as runner:
                with_fed, with_default = (runner.infer(f) for f in (fed, unfed))
        except BadInputError as exc:  # here a failure of the export, not of the user's input
            raise ExportError(f"ONNX Runtime cannot run the exported graph: {exc}") from None
        for name, want_fed, want_default in zip(graph.outputs, expected_fed, expected_default):
            require_close(with_fed[name], want_fed, graph.dtype, f"{name} with LoRA inputs fed")
            require_close(with_default[name], want_default, graph.dtype, f"{name} with default LoRA inputs")

    onnx_graph.save_atomic(ir_model, graph.path, prove, overwrite=overwrite, inputs=input_paths)


def output_arrays(result) -> list[np.ndarray]:
    """The wrapper's output (one tensor, or a tuple with sentence_embedding) as arrays."""
    return [t.numpy() for t in (result if isinstance(result, tuple) else (result,))]


def example_inputs(model: nn.Module, names: list[str]) -> list[torch.Tensor]:
    """The sample inputs every check uses (right padding on row 1), as tensors in `names` order."""
    feed = sample_inputs(model.config, batch=EXAMPLE_BATCH, seq=EXAMPLE_SEQUENCE)
    return [torch.from_numpy(feed[name]) for name in names]


def export_wrapper(
    wrapper: LoraExport,
    inputs: list[torch.Tensor],
    extra: list[torch.Tensor],
    lora: list[torch.Tensor],
    lora_shapes: list,
    opset: int | None,
    input_dims: list[dict] | None = None,
    extra_dims: list[dict] | None = None,
):
    """torch.onnx.export (dynamo, non-strict) -> onnx_ir model.

    The exporter's graph optimiser is off: it folds Transpose(weight) into new
    anonymous initializers and merges identical ones, which would rename base weights.
    ONNX Runtime performs the same folding at session load, on the base weights only,
    since overridable initializers are never treated as constants.
    """
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dims = list(input_dims) if input_dims is not None else [{0: batch, 1: sequence} for _ in inputs]
    dims += list(extra_dims) if extra_dims is not None else [{0: batch} for _ in extra]
    with torch.no_grad():
        program = onnx_graph.run_exporter(
            wrapper, (inputs + extra, lora), dynamic_shapes=(dims, lora_shapes), opset=opset, optimize=False
        )
    return program.model


# --------------------------------------------------------------------------
# Post-processing: exact names and rank-0 defaults
# --------------------------------------------------------------------------


def default_value(name: str, graph: DynamicGraph) -> np.ndarray:
    """The zero default of a dynamic graph's LoRA input, in graph.dtype: rank
    graph.default_rank (0 or 1), or a static graph's fixed graph.rank. The base model, exactly."""
    module, suffix = split_lora_name(name)
    slot = graph.slots[module]
    rank = graph.default_rank if graph.rank is None else graph.rank
    dtype = dtype_row(graph.dtype).numpy
    if suffix == A_SUFFIX:
        return np.zeros((slot.in_features, rank), dtype)
    if suffix == B_SUFFIX:
        return np.zeros((rank, slot.out_features), dtype)
    return np.zeros((slot.out_features,), dtype)


def finish_graph(
    ir_model,
    graph: DynamicGraph,
    lora_names: list[str],
    defaults: list[np.ndarray],
    kind: str,
    model: nn.Module,
    extra_names: Sequence[str],
) -> None:
    """Name inputs/outputs exactly, strip the wrapper prefix, add overridable defaults."""
    import onnx_ir as ir

    g = ir_model.graph
    names = list(graph.inputs) + list(extra_names) + list(lora_names)
    onnx_graph.name_values(g, names, graph.outputs)
    onnx_graph.strip_prefix(g, LoraExport.PREFIX)
    onnx_graph.rename_tied(g, model)
    lora_values = g.inputs[len(names) - len(lora_names) :]
    for value, array in zip(lora_values, defaults):
        if not value.uses():
            # Modules the outputs do not depend on got no slot (uncomputed_modules), so an
            # input nobody reads means the exporter folded the LoRA path of a computed layer.
            raise ExportError(
                f"exported graph does not use LoRA input {value.name}, though the model computes that layer"
            )
        if not graph.lora_defaults:  # a required input (TensorRT would take a defaulted one as a constant)
            continue
        value.const_value = ir.tensor(array, name=value.name)
        g.register_initializer(value)  # also a graph input: ONNX Runtime may override it
    ir_model.metadata_props[METADATA_KEY] = json.dumps(graph.metadata(kind))
    ir_model.producer_name = "lora-deploy"
