"""fp32 ONNX -> mixed fp16 / bf16 ONNX, io types kept: lora-deploy's own converter.

TensorRT 11 builds strongly typed networks, so a float16 engine needs a float16 graph; the
same graph serves ONNX Runtime's CUDA and TensorRT providers. Pure onnx and numpy: no
TensorRT, no ONNX Runtime (convert.py checks the result in ONNX Runtime).

What runs in low precision. Every float value gets one precision, decided node by node in
graph order:
* Ops in BLOCKED run in float32 (reasons in the table); their float inputs are cast up.
* A node that reads a weight (a float initializer or constant of rank >= 2: the matrices
  and embedding tables, what makes the model big) or a low-precision value runs low.
* Otherwise it stays float32: nodes fed only by integers, shapes, small constants and
  float32 results. That keeps the position and mask arithmetic (rotary angles, arange,
  masks built from finfo(float32).min) and the tail of a normalisation (mean of squares +
  eps) in float32 until they meet the activations, where they are cast down once.
* Cast(to=FLOAT) of a float value follows its input (the fp32 export casts float to float
  where the model code casts to its own dtype); Cast from an integer starts float32.
* Graph inputs and outputs keep their types (float32 inputs are cast where low nodes read
  them; low outputs are cast back): a graph that took and returned float32 still does,
  so the dynamic-adapter graphs' LoRA inputs and their rank-0 defaults stay float32 and
  packed float32 adapters still fit.

Initializers and Constant values read only by low nodes are stored low under the same name
(refit and the initializer -> checkpoint map keep working); those read by float32 nodes too
stay float32 and are cast for the low readers. float16 has a narrow range: constants beyond
it are clamped to +-65504 (finfo(float32).min mask values become finfo(float16).min, as in
Hugging Face's own float16 models), and a float32 value that descends from such a constant
is clipped before it is cast down, so a mask never turns into -inf (and a fully masked row
into NaN). bfloat16 has float32's range: nothing is clamped.

Refused: control flow with subgraphs (If, Loop, Scan), and sequence values whose
precision would need a cast. Local functions are inlined first (`prepare`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lora_deploy.dtypes import BY_NAME
from lora_deploy.errors import BadInputError, ExportError
from lora_deploy.util import first_line

LOW_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504

# Ops computed in float32, and why. A block list rather than an allow list: an op not named
# here runs low, like a MatMul, which is what a float16 engine is for.
BLOCKED: Mapping[str, str] = {
    # Reductions over the hidden size or the sequence: fp16 accumulation loses the small terms
    # and x**2 overflows 65504 once |x| > 256 (TensorRT itself warns about fp16 layer norms).
    "LayerNormalization": "mean and variance over the hidden size",
    "SimplifiedLayerNormalization": "mean of squares over the hidden size (RMSNorm)",
    "SkipLayerNormalization": "mean and variance over the hidden size",
    "SkipSimplifiedLayerNormalization": "mean of squares over the hidden size",
    "GroupNormalization": "mean and variance over a group",
    "InstanceNormalization": "mean and variance over the spatial dims",
    "ReduceMean": "a reduction (RMSNorm's mean of squares in the exported graph)",
    "ReduceSum": "a reduction",
    "ReduceSumSquare": "a reduction of squares",
    "ReduceL2": "a reduction of squares",
    "ReduceLogSumExp": "a reduction of exponentials",
    "Pow": "x**2 and x**3 overflow float16 at |x| > 256 and > 40 (RMSNorm, GELU's cubic term)",
    "Sqrt": "the normalisation's 1/sqrt(variance + eps) chain",
    "Reciprocal": "1/x overflows float16 for |x| < 1.5e-5",
    "Softmax": "exponentials summed over the sequence; its inputs hold -65504-style masks",
    "LogSoftmax": "exponentials summed over the sequence",
    "Exp": "overflows float16 for x > 11",
    "Log": "loses the small arguments",
    # Positions and angles: float16 holds integers exactly only up to 2048 and has a step of
    # 0.5 at 1024, so rotary angles (position * frequency) would lose every digit.
    "Sin": "rotary angles grow with the position",
    "Cos": "rotary angles grow with the position",
    "Range": "positions: integers above 2048 are not exact in float16",
    "CumSum": "running sums of positions or masks",
    # Inputs with fixed float32 types, or outputs typed by an attribute.
    "Resize": "roi and scales are float32 inputs",
    "Upsample": "scales is a float32 input",
    "RandomNormalLike": "output type set by an attribute",
    "RandomUniformLike": "output type set by an attribute",
    "EyeLike": "output type set by an attribute",
    "Bernoulli": "output type set by an attribute",
    # Decisions on values (which box, which index): float16 ties change the answer.
    "TopK": "ordering decisions",
    "NonMaxSuppression": "ordering decisions",
    "RoiAlign": "box coordinates",
    # A quantized graph carries its own precision.
    "QuantizeLinear": "a quantized graph's scales",
    "DequantizeLinear": "a quantized graph's scales",
}
# Inputs any float type may feed (no cast needed): the op reads only their shape or converts them.
UNCONSTRAINED: Mapping[str, tuple[int, ...]] = {"Cast": (0,), "CastLike": (0,), "Shape": (0,), "Size": (0,)}
SUBGRAPH_OPS = ("If", "Loop", "Scan")

HIGH, LOW = "fp32", "low"
_FLOAT = 1  # onnx.TensorProto.FLOAT


@dataclass
class Conversion:
    """What to_mixed_precision did, for the engine manifest."""

    precision: str
    low_nodes: int = 0
    fp32_nodes: dict[str, int] = field(default_factory=dict)  # op type -> count of nodes kept in float32
    casts: int = 0
    clips: int = 0
    initializers_converted: int = 0
    initializers_kept: int = 0
    constants_clamped: int = 0
    io_types_kept: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "converter": "builtin",
            "precision": self.precision,
            "io_types_kept": self.io_types_kept,
            "low_nodes": self.low_nodes,
            "fp32_nodes": dict(sorted(self.fp32_nodes.items())),
            "casts_inserted": self.casts,
            "clips_inserted": self.clips,
            "initializers_converted": self.initializers_converted,
            "initializers_kept_fp32": self.initializers_kept,
            "constants_clamped": self.constants_clamped,
            "blocked_ops": sorted(BLOCKED),
        }


# ----------------------------------------------------------------- pre-pass ----


def prepare(model) -> dict[str, int]:
    """The pre-pass every converter gets (ours and ModelOpt's autocast): local functions
    inlined, and each Constant with an empty `value_ints` replaced by an empty int64 tensor
    (ModelOpt's graph surgeon cannot type an empty list: "Could not infer attribute
    `value_ints` type from empty iterator"). Returns what was changed."""
    from onnx import helper, inliner, numpy_helper

    functions = len(model.functions)
    if functions:
        inlined = inliner.inline_local_functions(model)
        model.CopyFrom(inlined)
    fixed = 0
    for node in model.graph.node:
        if node.op_type != "Constant":
            continue
        for attr in list(node.attribute):
            if attr.name == "value_ints" and len(attr.ints) == 0:
                node.attribute.remove(attr)
                node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(0, np.int64))))
                fixed += 1
    return {"inlined_functions": functions, "empty_value_ints_fixed": fixed}


# --------------------------------------------------------------- conversion ----


@dataclass
class _Value:
    kind: str  # "tensor" or "sequence"
    elem: int  # onnx element type

    @property
    def is_float(self) -> bool:
        return self.elem == _FLOAT


def to_mixed_precision(model, precision: str) -> Conversion:
    """Convert `model` (an onnx.ModelProto, changed in place) to `precision` ("fp16" or
    "bf16") as described in the module docstring; the returned record says what was done.
    Raises BadInputError for graphs it cannot convert and ExportError when the converted
    graph does not type-check."""
    from onnx import TensorProto

    if precision not in LOW_DTYPES:
        raise BadInputError(f"no mixed-precision conversion to {precision!r}; choose {', '.join(LOW_DTYPES)}")
    low_row = BY_NAME[LOW_DTYPES[precision]]
    low_elem = int(low_row.onnx or TensorProto.FLOAT16)
    graph = model.graph
    for node in graph.node:
        if node.op_type in SUBGRAPH_OPS or any(a.g.node or a.graphs for a in node.attribute):
            raise BadInputError(
                f"node {node.name or node.op_type}: graphs with subgraphs ({node.op_type}) are not converted"
            )
    types = infer_types(model)
    graph_inputs = {v.name for v in graph.input}
    initializers = {t.name: t for t in graph.initializer if t.name not in graph_inputs}
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and _constant_is_float(n)}
    stats = Conversion(precision)
    opsets = {o.domain or "": o.version for o in model.opset_import}

    def is_float(name: str) -> bool:
        value = types.get(name)
        return bool(name) and value is not None and value.is_float

    def const_rank(name: str) -> int | None:
        if name in initializers:
            return len(initializers[name].dims)
        if name in constants:
            return _constant_rank(constants[name])
        return None

    # 1. Precision of every computed float value, in graph order.
    precision_of: dict[str, str] = {name: HIGH for name in graph_inputs}
    node_precision: list[str | None] = []
    for node in graph.node:
        if node.op_type == "Constant":
            node_precision.append(None)
            continue
        float_outs = [o for o in node.output if is_float(o)]
        p = decide(node, is_float, const_rank, precision_of)
        if p == LOW and not schema_allows(node, low_row.name, opsets):
            p = HIGH  # no float16 / bfloat16 version of this op at the graph's opset
        node_precision.append(p)
        for out in float_outs:
            precision_of[out] = p or HIGH
        if float_outs or any(is_float(i) for i in node.input):
            if p == LOW:
                stats.low_nodes += 1
            else:
                stats.fp32_nodes[node.op_type] = stats.fp32_nodes.get(node.op_type, 0) + 1

    # 2. What each input slot needs: None (any float type), HIGH or LOW.
    def need(node, index: int, p: str | None) -> str | None:
        name = node.input[index]
        if not is_float(name) or p is None or index in UNCONSTRAINED.get(node.op_type, ()):
            return None
        return p

    needs: dict[str, set[str]] = {}
    for node, p in zip(graph.node, node_precision):
        for index, name in enumerate(node.input):
            wanted = need(node, index, p)
            if wanted is not None:
                needs.setdefault(name, set()).add(wanted)
    outputs = {v.name for v in graph.output}
    for name in outputs:
        needs.setdefault(name, set()).add(HIGH)

    # 3. Constants: stored low when only low nodes read them.
    def stored_low(name: str) -> bool:
        return needs.get(name) == {LOW}

    for name, tensor in initializers.items():
        if types[name].is_float and stored_low(name):
            _convert_tensor(tensor, low_elem, precision, stats)
            precision_of[name] = LOW
            stats.initializers_converted += 1
        elif types[name].is_float:
            precision_of[name] = HIGH
            stats.initializers_kept += 1
    for name, node in constants.items():
        if stored_low(name):
            _convert_constant(node, low_elem, precision, stats)
            precision_of[name] = LOW
        else:
            precision_of[name] = HIGH

    # 4. Values that may exceed float16's range in float32: clipped before a cast down.
    wide = wide_values(graph, constants, initializers, precision_of) if precision == "fp16" else set()

    # 5. Low graph outputs: the node writes NAME/low, a Cast gives NAME back in float32.
    renamed = {name: f"{name}/{precision}" for name in outputs if precision_of.get(name) == LOW}

    # 6. Rewrite: casts where a reader needs another precision than the value has.
    new_nodes = []
    made: dict[tuple[str, str], str] = {}

    def source(name: str, wanted: str) -> str:
        current = renamed.get(name, name)
        if precision_of.get(name, HIGH) == wanted:
            return current
        key = (name, wanted)
        if key not in made:
            if types[name].kind != "tensor":
                raise BadInputError(f"value {name} is a sequence read in two precisions: not converted")
            from onnx import helper

            src = current
            if wanted == LOW and name in wide:
                src = f"{name}/clipped"
                bounds = [f"{name}/fp16_min", f"{name}/fp16_max"]
                new_nodes.append(_scalar(bounds[0], -FLOAT16_MAX))
                new_nodes.append(_scalar(bounds[1], FLOAT16_MAX))
                new_nodes.append(helper.make_node("Clip", [current, *bounds], [src], name=f"{name}/clip"))
                stats.clips += 1
            target = f"{name}/to_{precision if wanted == LOW else 'fp32'}"
            to = low_elem if wanted == LOW else _FLOAT
            new_nodes.append(helper.make_node("Cast", [src], [target], name=f"{target}/cast", to=to))
            stats.casts += 1
            made[key] = target
        return made[key]

    for node, p in zip(graph.node, node_precision):
        for index, name in enumerate(node.input):
            wanted = need(node, index, p)
            if wanted is not None:
                node.input[index] = source(name, wanted)
        for index, name in enumerate(node.output):
            if name in renamed:
                node.output[index] = renamed[name]
        if node.op_type == "Cast" and p == LOW and any(is_float(o) for o in node.output):
            for attr in node.attribute:
                if attr.name == "to":
                    attr.i = low_elem
        new_nodes.append(node)
    from onnx import helper

    for name, low_name in renamed.items():
        new_nodes.append(helper.make_node("Cast", [low_name], [name], name=f"{name}/to_fp32/cast", to=_FLOAT))
        stats.casts += 1
    del graph.node[:]
    graph.node.extend(new_nodes)

    # 7. value_info: the exporter's types are stale now; inferred afresh, strictly.
    graph.ClearField("value_info")
    check_types(model)
    return stats


def decide(node, is_float, const_rank, precision_of: Mapping[str, str]) -> str | None:
    """HIGH or LOW for one node (None: it touches no float value)."""
    float_ins = [(i, n) for i, n in enumerate(node.input) if is_float(n)]
    float_outs = [o for o in node.output if is_float(o)]
    if not float_ins and not float_outs:
        return None
    if node.op_type in BLOCKED:
        return HIGH
    if node.op_type == "Cast":
        if not float_outs:
            return None  # float -> int or bool: reads any float type
        if not float_ins:
            return HIGH  # an integer or bool becomes float: positions, masks
        return precision_of.get(node.input[0], HIGH)  # float -> float: follows its input
    if node.op_type == "CastLike":
        like = node.input[1]
        if not is_float(like):
            return None
        return precision_of.get(like, HIGH) if const_rank(like) is None else HIGH
    if node.op_type in UNCONSTRAINED and not float_outs:
        return None
    votes = []
    for index, name in float_ins:
        if index in UNCONSTRAINED.get(node.op_type, ()):
            continue
        rank = const_rank(name)
        if rank is None:
            votes.append(precision_of.get(name, HIGH))
        elif rank >= 2:
            votes.append(LOW)  # a weight matrix or embedding table
    return LOW if LOW in votes else HIGH


def schema_allows(node, low_name: str, opsets: Mapping[str, int]) -> bool:
    """Whether the op's schema at the graph's opset takes `low_name` (float16, bfloat16)
    wherever it takes float (SplitToSequence before opset 24 has no bfloat16, for one).
    Ops without a known schema (other domains) are taken to."""
    from onnx import defs

    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    try:
        schema = defs.get_schema(node.op_type, opsets.get(domain, 1), domain)
    except Exception:  # SchemaError: an op onnx does not know
        return True
    low = "tensor(float16)" if low_name == "float16" else "tensor(bfloat16)"
    for constraint in schema.type_constraints:
        allowed = set(constraint.allowed_type_strs)
        for kind in ("tensor(float)", "seq(tensor(float))"):
            if kind in allowed and kind.replace("tensor(float)", low) not in allowed:
                return False
    return True


def wide_values(graph, constants, initializers, precision_of: Mapping[str, str]) -> set[str]:
    """float32 values that descend (through float32 nodes) from a constant beyond float16's range."""
    from onnx import numpy_helper

    wide = set()
    for name, node in constants.items():
        if precision_of.get(name) == HIGH and _beyond_float16(_constant_array(node)):
            wide.add(name)
    for name, tensor in initializers.items():
        if precision_of.get(name) == HIGH and tensor.data_type == _FLOAT:
            if _beyond_float16(numpy_helper.to_array(tensor)):
                wide.add(name)
    for node in graph.node:
        if any(i in wide for i in node.input):
            wide.update(o for o in node.output if precision_of.get(o) == HIGH)
    return wide


def _beyond_float16(array: np.ndarray) -> bool:
    finite = array[np.isfinite(array)] if array.size else array
    return bool(array.size) and (not np.isfinite(array).all() or bool((np.abs(finite) > FLOAT16_MAX).any()))


def _constant_is_float(node) -> bool:
    for attr in node.attribute:
        if attr.name in ("value_float", "value_floats"):
            return True
        if attr.name == "value" and attr.t.data_type == _FLOAT:
            return True
    return False


def _constant_rank(node) -> int:
    for attr in node.attribute:
        if attr.name == "value":
            return len(attr.t.dims)
        if attr.name == "value_floats":
            return 1
    return 0


def _constant_array(node) -> np.ndarray:
    from onnx import numpy_helper

    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_floats":
            return np.asarray(attr.floats, np.float32)
        if attr.name == "value_float":
            return np.asarray(attr.f, np.float32)
    raise ExportError(f"Constant {node.name} holds no float value")


def _low_array(array: np.ndarray, precision: str, stats: Conversion) -> np.ndarray:
    if precision == "fp16":
        beyond = np.isfinite(array) & (np.abs(array) > FLOAT16_MAX)
        if beyond.any():
            stats.constants_clamped += int(beyond.sum())
            array = np.clip(array, -FLOAT16_MAX, FLOAT16_MAX)
    return array.astype(BY_NAME[LOW_DTYPES[precision]].numpy)


def _convert_tensor(tensor, low_elem: int, precision: str, stats: Conversion) -> None:
    """An initializer converted in place, its name kept (data moved inline)."""
    from onnx import numpy_helper

    converted = numpy_helper.from_array(_low_array(numpy_helper.to_array(tensor), precision, stats), tensor.name)
    assert converted.data_type == low_elem
    tensor.CopyFrom(converted)


def _convert_constant(node, low_elem: int, precision: str, stats: Conversion) -> None:
    from onnx import helper, numpy_helper

    array = _low_array(_constant_array(node), precision, stats)
    for attr in list(node.attribute):
        node.attribute.remove(attr)
    node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(array)))
    assert node.attribute[0].t.data_type == low_elem


def _scalar(name: str, value: float):
    from onnx import helper, numpy_helper

    tensor = numpy_helper.from_array(np.asarray(value, np.float32))
    return helper.make_node("Constant", [], [name], name=f"{name}/const", value=tensor)


# ------------------------------------------------------------------ types ----


def structure_only(model):
    """A copy of `model` without the data of its large initializers (dims and types kept):
    type inference needs only the small ones (axes, shapes), and a model over 2 GB cannot
    be handed to it whole."""
    from onnx import ModelProto

    copy = ModelProto()
    if model.ByteSize() < 1 << 30:
        copy.CopyFrom(model)
    else:
        _copy_structure(model, copy)
    for tensor in copy.graph.initializer:
        if int(np.prod(tensor.dims)) <= SMALL and not tensor.external_data:
            continue
        for field_name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            tensor.ClearField(field_name)
        del tensor.external_data[:]
        tensor.data_location = 0
    return copy


SMALL = 1024  # elements: initializers up to this size keep their data for type inference


def _copy_structure(model, copy) -> None:
    copy.ir_version, copy.producer_name = model.ir_version, model.producer_name
    copy.opset_import.extend(model.opset_import)
    copy.functions.extend(model.functions)
    g = copy.graph
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    for tensor in model.graph.initializer:
        if int(np.prod(tensor.dims)) <= SMALL:
            g.initializer.append(tensor)
            continue
        shell = g.initializer.add()
        shell.name, shell.data_type = tensor.name, tensor.data_type
        shell.dims.extend(tensor.dims)


def infer_types(model, *, strict: bool = False) -> dict[str, _Value]:
    """{value name: kind and element type} for every value: inputs, outputs, initializers,
    and what ONNX's type inference derives for the rest."""
    from onnx import shape_inference

    try:
        inferred = shape_inference.infer_shapes(structure_only(model), strict_mode=strict)
    except Exception as exc:  # onnx raises InferenceError, ValidationError and friends
        if strict:
            raise ExportError(f"the converted graph does not type-check: {first_line(exc, 300)}") from exc
        raise BadInputError(f"ONNX type inference fails on this graph: {first_line(exc, 300)}") from exc
    found: dict[str, _Value] = {}
    for value in _values(inferred.graph):
        kind = value.type.WhichOneof("value")
        if kind == "tensor_type":
            found[value.name] = _Value("tensor", value.type.tensor_type.elem_type)
        elif kind == "sequence_type":
            elem = value.type.sequence_type.elem_type
            found[value.name] = _Value("sequence", elem.tensor_type.elem_type if elem.HasField("tensor_type") else 0)
    for tensor in model.graph.initializer:
        found.setdefault(tensor.name, _Value("tensor", tensor.data_type))
    for node in model.graph.node:
        for out in node.output:
            if out and out not in found:
                raise BadInputError(f"ONNX type inference gives no type for {out} ({node.op_type}): not converted")
    return found


def _values(graph) -> Iterable:
    yield from graph.input
    yield from graph.output
    yield from graph.value_info


def check_types(model) -> None:
    """Strict type inference over the converted graph, its value_info refreshed from it."""
    from onnx import shape_inference

    try:
        inferred = shape_inference.infer_shapes(structure_only(model), strict_mode=True)
    except Exception as exc:
        raise ExportError(f"the converted graph does not type-check: {first_line(exc, 300)}") from exc
    model.graph.value_info.extend(inferred.graph.value_info)
