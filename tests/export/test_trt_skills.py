"""The skills graph a TensorRT engine is built from: export onnx --module --dynamic-adapters
--static --lora-defaults none writes A/B as required inputs (TensorRT's ONNX parser takes a
graph input with an initializer as a constant weight). ONNX Runtime runs it here: `pack
--onnx` reads the rank and dtype from the inputs' fixed shapes, DynamicSession and verify
feed zeros for "no adapter" and a skill's packed arrays, and PEFT's float32 forward is the
oracle at float16's tolerance. TensorRT itself cannot run here: `build trt` is checked only
up to its refusal of a graph whose LoRA inputs have defaults."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from lora_deploy.backends.onnxrt.lora_format import read_graph_inputs
from lora_deploy.backends.onnxrt.sessions import DynamicSession
from lora_deploy.backends.trt.build import build_engine
from lora_deploy.cli import main
from lora_deploy.compare import tolerance
from lora_deploy.errors import BadInputError
from lora_deploy.proof.plain import verify_module
from tests.oracle import policy_actions

F16 = tolerance("float16")


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def trt16(robot, tmp_path_factory):
    """The policy's float16 static skills graph without LoRA defaults, rank fixed to 16, via the CLI."""
    paths = robot("policy")
    graph = tmp_path_factory.mktemp("trt16") / "skills16-trt.onnx"
    args = ["export", "onnx", paths["base"], "-o", graph, "--module", paths["spec"], "--dynamic-adapters"]
    args += ["--adapter", paths["adapter"], "--inputs", paths["obs1"], "--dtype", "float16", "--static"]
    result = run_cli(*args, "--lora-defaults", "none", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert (info["lora_defaults"], info["rank"], info["dtype"]) == ("none", 16, "float16")
    return graph


def test_the_graph_has_required_lora_inputs_of_fixed_shape(trt16):
    model = onnx.load(str(trt16))
    lora = [v for v in model.graph.input if v.name.endswith((".lora_A.weight", ".lora_B.weight"))]
    assert lora and not {i.name for i in model.graph.initializer} & {v.name for v in lora}
    for value in lora:
        dims = value.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") for d in dims) and 16 in [d.dim_value for d in dims]
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert ort.InferenceSession(str(trt16)).get_overridable_initializers() == []
    graph = read_graph_inputs(trt16)
    assert set(graph.required) == {v.name for v in lora} and graph.lora_dtype() == "float16"


def test_packed_skills_and_zeros_give_policy_actions(robot, policy_skill_r4, trt16, tmp_path):
    paths = robot("policy")
    packed = tmp_path / "r4.onnx_adapter"
    result = run_cli("pack", policy_skill_r4, "-o", packed, "--onnx", trt16)  # rank 4 padded to 16, float16
    assert result.exit_code == 0, result.output
    fmt = ort.AdapterFormat.read_adapter(str(packed))
    a = next(np.array(v.numpy()) for n, v in fmt.get_parameters().items() if n.endswith(".lora_A.weight"))
    assert a.dtype == np.float16 and a.shape[1] == 16 and not a[:, 4:].any()

    session = DynamicSession(trt16)
    session.load_adapter("r4", packed)
    obs = dict(np.load(paths["obs1"]))
    feed = {k: v.astype(np.float16) for k, v in obs.items()}
    want, base = policy_actions(paths, policy_skill_r4, obs), policy_actions(paths, None, obs)
    assert np.abs(want - base).max() > 0.1  # the skill really changes the actions
    np.testing.assert_allclose(session.run(feed, adapter="r4")["actions"], want, atol=F16.atol, rtol=F16.rtol)
    np.testing.assert_allclose(session.run(feed)["actions"], base, atol=F16.atol, rtol=F16.rtol)


def test_verify_feeds_zeros_and_each_skill(robot, policy_skill_r4, trt16):
    paths = robot("policy")
    for adapter in (paths["adapter"], policy_skill_r4):
        report = verify_module(
            paths["base"], adapter, module=paths["spec"], dynamic_path=trt16, inputs_path=paths["obs1"], batch=2
        )
        assert report.equivalent, [c.name + ": " + (c.detail or "") for c in report.failures()]
        checks = {c.name: c for c in report.checks}
        active = checks["actions [obs1.npz]: dynamic (adapter active) vs unmerged"]
        idle = checks["actions [obs1.npz]: dynamic (no adapter) vs base"]
        assert 0 < active.max_abs < F16.atol and idle.max_abs < F16.atol
        assert report.effect["obs1.npz"]["max_abs"] > 0.1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dynamic-adapters", "--adapter", "ADAPTER", "--lora-defaults", "none"], "--static"),
        (["--multi-adapter", "--adapter", "ADAPTER", "--static", "--lora-defaults", "none"], "banks are its weights"),
        (["--static", "--lora-defaults", "none"], "--lora-defaults needs"),
    ],
)
def test_lora_defaults_none_without_a_static_dynamic_graph_is_refused(robot, tmp_path, extra, message):
    paths = robot("policy")
    out = tmp_path / "g.onnx"
    extra = [paths["adapter"] if arg == "ADAPTER" else arg for arg in extra]
    result = run_cli("export", "onnx", paths["base"], "-o", out, "--module", paths["spec"], *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_trt_build_refuses_lora_inputs_with_defaults(robot, trt16, tmp_path):
    """Before TensorRT is needed: a defaulted graph is refused, the required-inputs graph passes."""
    paths = robot("policy")
    defaulted = tmp_path / "skills.onnx"
    result = run_cli(
        "export", "onnx", paths["base"], "-o", defaulted, "--module", paths["spec"], "--dynamic-adapters",
        "--adapter", paths["adapter"], "--static",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with pytest.raises(BadInputError, match="--lora-defaults none"):
        build_engine(defaulted, tmp_path / "skills.engine")
    try:
        build_engine(trt16, tmp_path / "trt.engine")
    except BadInputError as exc:  # here: TensorRT is not installed
        assert "lora-defaults" not in str(exc)
    assert not (tmp_path / "skills.engine").exists()


def test_the_api_refuses_no_defaults_without_static(robot, tmp_path):
    from lora_deploy.export.dynamic_module import export_dynamic_module

    paths = robot("policy")
    with pytest.raises(BadInputError, match="add --static"):
        export_dynamic_module(
            paths["base"], tmp_path / "g.onnx", module=paths["spec"], adapters=[paths["adapter"]], lora_defaults="none"
        )
    assert not (tmp_path / "g.onnx").exists()


def test_bench_feeds_zeros_or_the_skill_not_drawn_noise(robot, trt16, tmp_path):
    """bench on this graph: its required LoRA inputs take zeros ("no adapter") or the packed
    skill's arrays, never random draws, and the adapter-off check feeds zeros."""
    from lora_deploy.backends.onnxrt.sessions import adapter_arrays
    from lora_deploy.backends.onnxrt.timed import timed_model

    paths = robot("policy")
    packed = tmp_path / "skill.onnx_adapter"
    assert run_cli("pack", paths["adapter"], "-o", packed, "--onnx", trt16).exit_code == 0
    skill = adapter_arrays(packed)
    plain = timed_model("dynamic", trt16, "cpu", 1, None, {})
    active = timed_model("dynamic", trt16, "cpu", 1, packed, {})
    try:
        zeros, fed = plain.extra_inputs(1), active.extra_inputs(1)
        lora = set(read_graph_inputs(trt16).required)
        assert set(zeros) == set(fed) == lora and not any(v.any() for v in zeros.values())
        assert all(np.array_equal(fed[name], skill.get(name, zeros[name])) for name in lora)
        assert any(fed[name].any() for name in lora)
    finally:
        plain.runner.deactivate()
        active.runner.deactivate()
