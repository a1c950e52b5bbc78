"""The fp16 / bf16 ONNX conversion (backends/trt/convert.py, mixed_precision.py), checked
without TensorRT: converted graphs against their fp32 graph, in ONNX Runtime on the CPU
(fp16) and in onnx's reference evaluator (fp16 and bf16: numpy arithmetic in the graph's
types, one rounding per op; ONNX Runtime's CPU provider has almost no bf16 kernels).

ONNX Runtime's CPU provider runs most fp16 nodes in fp32 behind casts it inserts, so
there it checks the graph's typing and the rounding at every node boundary; the reference
evaluator computes each op in fp16 / bf16 itself."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from lora_deploy.backends.onnxrt.loader import SessionFromOnnx
from lora_deploy.backends.trt.convert import convert
from lora_deploy.backends.trt.mixed_precision import BLOCKED, prepare, to_mixed_precision
from lora_deploy.compare import TOLERANCES, compare
from lora_deploy.errors import BadInputError
from lora_deploy.examples import models as ref
from lora_deploy.modeling.samples import sample_inputs
from lora_deploy.modeling.tasks import load_config

LOW = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
TOLERANCE = {"fp16": TOLERANCES["float16"], "bf16": TOLERANCES["bfloat16"]}


@pytest.fixture
def graphs(example_graphs):
    """{family: (fp32 graph, feed)} for the example models."""
    return {family: example_graphs(family)[1:] for family in ref.FAMILIES}


def run_ort(path, feed):
    session = SessionFromOnnx(path)()
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


def run_reference(path, feed):
    evaluator = ReferenceEvaluator(str(path))
    return dict(zip(evaluator.output_names, evaluator.run(None, feed)))


def io_types(path):
    model = onnx.load(str(path), load_external_data=False)
    return [(v.name, v.type.tensor_type.elem_type) for v in [*model.graph.input, *model.graph.output]]


@pytest.mark.parametrize("family", ref.FAMILIES)
def test_fp16_graph_matches_fp32_in_onnx_runtime(graphs, family, tmp_path):
    path, feed = graphs[family]
    out = tmp_path / "fp16.onnx"
    info = convert(path, out, "fp16")
    assert info["converter"] == "builtin" and info["io_types_kept"] and info["pre_pass"]["empty_value_ints_fixed"] >= 0
    assert io_types(out) == io_types(path)  # takes and returns what the fp32 graph does
    before = {t.name for t in onnx.load(str(path)).graph.initializer}
    converted = {t.name: t.data_type for t in onnx.load(str(out)).graph.initializer}
    assert before <= set(converted)  # same names: refit and the checkpoint map still work
    assert sum(t == TensorProto.FLOAT16 for t in converted.values()) == info["initializers_converted"] > 0
    fp32, fp16 = run_ort(path, feed), run_ort(out, feed)
    result = compare(fp16, fp32, TOLERANCE["fp16"], feed.get("attention_mask"))
    assert result.passed, [c.reason for c in result.outputs]
    assert result.max_abs > 0  # the weights really were rounded
    # And computed in fp16 op by op (the reference evaluator has no fp32 fallback).
    assert compare(run_reference(out, feed), fp32, TOLERANCE["fp16"], feed.get("attention_mask")).passed


@pytest.mark.parametrize("family", ref.FAMILIES)
def test_bf16_graph_matches_fp32_in_the_reference_evaluator(graphs, family, tmp_path):
    path, feed = graphs[family]
    out = tmp_path / "bf16.onnx"
    info = convert(path, out, "bf16")  # type-checked by onnx's checker; ONNX Runtime's CPU cannot run it
    assert info["initializers_converted"] > 0 and info["constants_clamped"] == 0  # bf16 has fp32's range
    assert io_types(out) == io_types(path)
    model = onnx.load(str(out))
    if family == "gpt2":  # SplitToSequence has no bf16 before opset 24: it stays fp32
        split = next(n for n in model.graph.node if n.op_type == "SplitToSequence")
        assert split.input[0].endswith("/to_fp32")
    fp32 = run_ort(path, feed)
    low = run_reference(out, feed)
    result = compare(low, fp32, TOLERANCE["bf16"], feed.get("attention_mask"))
    assert result.passed, [c.reason for c in result.outputs]
    # bf16 keeps 8 bits of mantissa, fp16 11: the bf16 graph must be the further one.
    convert(path, tmp_path / "fp16.onnx", "fp16")
    half = run_reference(tmp_path / "fp16.onnx", feed)
    assert result.max_abs > compare(half, fp32, TOLERANCE["fp16"]).max_abs


def test_dynamic_adapter_graph_in_fp16(reference, tmp_path):
    """LoRA inputs stay fp32 inputs (their rank-0 defaults too), so a packed fp32 adapter
    still loads and switches; with it and without it, the fp16 graph follows the fp32 one."""
    from lora_deploy.backends.onnxrt.lora_format import pack_adapter
    from lora_deploy.backends.onnxrt.sessions import DynamicSession
    from lora_deploy.export.dynamic import export_dynamic

    base, adapter = reference("llama", "plain")
    graph = export_dynamic(base, tmp_path / "dynamic.onnx", adapters=[adapter])
    packed = pack_adapter(adapter, tmp_path / "a.onnx_adapter", onnx_path=graph.path)
    convert(graph.path, tmp_path / "dynamic16.onnx", "fp16")
    assert io_types(tmp_path / "dynamic16.onnx") == io_types(graph.path)
    feed = sample_inputs(load_config(base), batch=2, seq=16, seed=0)
    runs = {}
    for name in ("dynamic.onnx", "dynamic16.onnx"):
        session = DynamicSession(tmp_path / name)
        session.load_adapter("a", packed)
        runs[name] = (session.run(feed), session.run(feed, adapter="a"), session.run(feed))
    for fp32, fp16 in zip(runs["dynamic.onnx"], runs["dynamic16.onnx"]):
        assert compare(fp16, fp32, TOLERANCE["fp16"], feed["attention_mask"]).passed
    base_out, with_adapter, _ = runs["dynamic16.onnx"]
    assert not compare(with_adapter, base_out, TOLERANCE["fp16"], feed["attention_mask"]).passed  # it switched


# ------------------------------------------------- why the block list holds ----


def tiny_model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def converted_matches(model, feed, tmp_path, precision="fp16"):
    """(fp32 outputs, converted outputs computed op by op in `precision`, conversion record)."""
    fp32 = run_reference_model(model, feed)
    info = to_mixed_precision(model, precision)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return fp32, run_reference(path, feed), info


def run_reference_model(model, feed):
    evaluator = ReferenceEvaluator(model)
    return dict(zip(evaluator.output_names, evaluator.run(None, feed)))


def value(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def weight(name, rng, shape, scale=0.1):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def test_rms_norm_of_large_activations_stays_finite(tmp_path):
    """x**2 of |x| ~ 300 overflows fp16 (65504): Pow and ReduceMean run in fp32, and the
    eps Add between them and Sqrt stays fp32 (it reads only fp32 values and a scalar)."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w_in"], ["h"]),
        helper.make_node("Pow", ["h", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["var"]),
        helper.make_node("Sqrt", ["var"], ["rms"]),
        helper.make_node("Reciprocal", ["rms"], ["inv"]),
        helper.make_node("Mul", ["h", "inv"], ["normed"]),
        helper.make_node("MatMul", ["normed", "w_out"], ["y"]),
    ]
    inits = [
        weight("w_in", rng, (16, 32), scale=30.0),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
        numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
        weight("w_out", rng, (32, 8)),
    ]
    model = tiny_model(nodes, [value("x", 1, [4, 16])], [value("y", 1, [4, 8])], inits)
    feed = {"x": rng.standard_normal((4, 16)).astype(np.float32)}
    fp32, fp16, info = converted_matches(model, feed, tmp_path)
    assert compare(fp16, fp32, TOLERANCE["fp16"]).passed
    assert info.fp32_nodes == {"Add": 1, "Pow": 1, "ReduceMean": 1, "Sqrt": 1, "Reciprocal": 1}


def test_rotary_angles_at_far_positions_stay_fp32(tmp_path):
    """position * frequency reaches 1500 rad; fp16's step there is 1.0, so sin/cos of an fp16
    angle is noise. The angle is built from integers and a small constant: it stays fp32."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Cast", ["positions"], ["pos_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["pos_f", "last"], ["pos_col"]),
        helper.make_node("Mul", ["pos_col", "inv_freq"], ["angle"]),
        helper.make_node("Sin", ["angle"], ["sin"]),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Mul", ["h", "sin"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([-1], np.int64), "last"),
        numpy_helper.from_array(np.array([1.0, 0.37, 0.011, 1e-4], np.float32), "inv_freq"),
        weight("w", rng, (4, 4), scale=1.0),
    ]
    model = tiny_model(
        nodes,
        [value("positions", TensorProto.INT64, [8]), value("x", 1, [8, 4])],
        [value("y", 1, [8, 4])],
        inits,
    )
    feed = {"positions": np.arange(1493, 1501, dtype=np.int64), "x": rng.standard_normal((8, 4)).astype(np.float32)}
    fp32, fp16, info = converted_matches(model, feed, tmp_path)
    assert compare(fp16, fp32, TOLERANCE["fp16"]).passed
    assert info.fp32_nodes.get("Sin") == 1 and info.fp32_nodes.get("Mul") == 1  # the angle's Mul


def test_a_float32_min_mask_stays_finite_in_fp16(tmp_path):
    """A mask of finfo(float32).min turns into -inf when cast to fp16, and a fully masked
    row (left padding) into NaN after Softmax; it is clipped to -65504 before the cast."""
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Where", ["keep", "zero", "minimum"], ["mask"]),
        helper.make_node("MatMul", ["q", "k"], ["scores"]),
        helper.make_node("Add", ["scores", "mask"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "minimum"),
        weight("k", rng, (8, 6), scale=1.0),
        weight("v", rng, (6, 8), scale=1.0),
    ]
    model = tiny_model(
        nodes,
        [value("keep", TensorProto.BOOL, [4, 6]), value("q", 1, [4, 8])],
        [value("y", 1, [4, 8])],
        inits,
    )
    keep = np.ones((4, 6), bool)
    keep[0] = False  # a row with every key masked, as left padding gives
    keep[1, :3] = False
    feed = {"keep": keep, "q": rng.standard_normal((4, 8)).astype(np.float32)}
    fp32, fp16, info = converted_matches(model, feed, tmp_path)
    assert np.isfinite(fp16["y"]).all()
    assert compare({"y": fp16["y"][1:]}, {"y": fp32["y"][1:]}, TOLERANCE["fp16"]).passed  # the real rows
    assert info.clips == 1


def test_prepare_replaces_empty_value_ints(graphs):
    """The pre-pass ModelOpt needs: the export's Constant with an empty value_ints becomes an
    empty int64 tensor, and the graph computes the same."""
    path, feed = graphs["llama"]
    model = onnx.load(str(path))
    empty = [
        n
        for n in model.graph.node
        if n.op_type == "Constant" and any(a.name == "value_ints" and not a.ints for a in n.attribute)
    ]
    assert empty  # the exporter writes one (FIELD-NOTES), so the fix is exercised
    assert prepare(model)["empty_value_ints_fixed"] == len(empty)
    for node in empty:
        (attr,) = node.attribute
        assert attr.name == "value" and attr.t.data_type == TensorProto.INT64 and list(attr.t.dims) == [0]
    expected = run_ort(path, feed)
    got = dict(zip(["logits"], ReferenceEvaluator(model).run(["logits"], feed)))
    assert compare(got, expected, TOLERANCES["float32"]).passed


def test_refusals(graphs, tmp_path, monkeypatch):
    body = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "b", [], [value("y", 1, [1])])
    model = tiny_model(
        [helper.make_node("If", ["c"], ["x"], then_branch=body, else_branch=body)],
        [value("c", TensorProto.BOOL, []), value("x", 1, [1])],
        [value("x", 1, [1])],
    )
    with pytest.raises(BadInputError, match="subgraphs"):
        to_mixed_precision(model, "fp16")
    with pytest.raises(BadInputError, match="choose fp16, bf16"):
        to_mixed_precision(model, "fp8")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "modelopt" else real(name, *a))
    with pytest.raises(BadInputError, match="nvidia-modelopt"):
        convert(graphs["llama"][0], tmp_path / "x.onnx", "fp16", converter="modelopt")
    assert not (tmp_path / "x.onnx").exists()
    assert {"LayerNormalization", "Softmax", "Pow", "ReduceMean", "Sin", "Cos", "Range"} <= set(BLOCKED)
