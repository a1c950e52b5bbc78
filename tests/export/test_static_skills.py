"""What a robot runs: a float16, fully static plain-module graph whose skills (adapters)
are switched by feeding their A/B tensors (export onnx --module --dynamic-adapters
--dtype float16 --static, then pack). Every input and output dim is a number (onnx shape
inference), the LoRA rank included; PEFT's float32 forward is the oracle, at compare.py's
float16 tolerance; ONNX Runtime runs the graph (also without its LoRA defaults, the
form TensorRT needs to take A/B as inputs)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from lora_deploy.backends.onnxrt.sessions import DynamicSession, MultiSession
from lora_deploy.cli import main
from lora_deploy.compare import tolerance
from lora_deploy.errors import AdapterError, BadInputError
from lora_deploy.examples import robot as robots
from lora_deploy.export.dynamic_module import without_lora_defaults
from tests.oracle import policy_actions

F16 = tolerance("float16")
ROWS = 4  # observations run one by one (the graph's batch is 1)


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def symbolic_dims(path) -> list[str]:
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    return [
        value.name
        for value in [*model.graph.input, *model.graph.output]
        if any(not d.HasField("dim_value") for d in value.type.tensor_type.shape.dim)
    ]


def row_by_row(run, obs) -> np.ndarray:
    """The static batch-1 graph over every observation, float16 inputs, float32 actions."""
    rows = len(next(iter(obs.values())))
    return np.concatenate(
        [run({k: v[i : i + 1].astype(np.float16) for k, v in obs.items()}) for i in range(rows)]
    ).astype(np.float32)


def assert_close(got, want, what):
    np.testing.assert_allclose(got, want, atol=F16.atol, rtol=F16.rtol, err_msg=what)


def test_float16_static_graph_switches_skills_of_two_ranks_like_peft(robot, policy_skill_r4, tmp_path):
    paths = robot("policy")
    graph = tmp_path / "skills16.onnx"
    result = run_cli(
        "export", "onnx", paths["base"], "-o", graph, "--module", paths["spec"], "--dynamic-adapters",
        "--adapter", paths["adapter"], "--adapter", policy_skill_r4, "--dtype", "float16", "--static",
        "--inputs", paths["obs1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "float16, static (LoRA rank 16)" in result.output
    assert symbolic_dims(graph) == []
    inputs = {v.name: v.type.tensor_type for v in onnx.load(str(graph), load_external_data=False).graph.input}
    lora_a = [t for name, t in inputs.items() if name.endswith(".lora_A.weight")]
    assert lora_a and all(t.elem_type == onnx.TensorProto.FLOAT16 and t.shape.dim[1].dim_value == 16 for t in lora_a)
    assert inputs["image"].elem_type == onnx.TensorProto.FLOAT16

    session = DynamicSession(graph)
    for name, adapter in (("a", paths["adapter"]), ("b", policy_skill_r4)):
        packed = tmp_path / f"{name}.onnx_adapter"
        result = run_cli("pack", adapter, "-o", packed, "--onnx", graph)  # float16, padded to rank 16
        assert result.exit_code == 0, result.output
        fmt = ort.AdapterFormat.read_adapter(str(packed))  # kept alive: its values point into it
        params = fmt.get_parameters()
        assert {tuple(v.shape())[1] for n, v in params.items() if n.endswith(".lora_A.weight")} == {16}
        session.load_adapter(name, packed)

    obs = robots.example_observations(batch=ROWS, seed=21)
    want_base = policy_actions(paths, None, obs)
    for name, adapter in (("a", paths["adapter"]), ("b", policy_skill_r4)):
        want = policy_actions(paths, adapter, obs)
        assert np.abs(want - want_base).max() > 0.1  # the skill really changes the actions
        assert_close(row_by_row(lambda feed: session.run(feed, adapter=name)["actions"], obs), want, name)
    assert_close(row_by_row(lambda feed: session.run(feed)["actions"], obs), want_base, "no adapter")

    # Switching is stateless: a after b gives a's actions again, exactly.
    feed = {k: v[:1].astype(np.float16) for k, v in obs.items()}
    first = session.run(feed, adapter="a")["actions"]
    session.run(feed, adapter="b")
    np.testing.assert_array_equal(session.run(feed, adapter="a")["actions"], first)

    # For TensorRT (whose parser takes an input with an initializer as a constant): the same
    # graph with A/B as plain required inputs; a skill's packed arrays give its actions exactly.
    trt_graph = without_lora_defaults(graph, tmp_path / "skills16-trt.onnx")
    plain = ort.InferenceSession(str(trt_graph))
    assert plain.get_overridable_initializers() == [] and symbolic_dims(trt_graph) == []
    zeros = {i.name: np.zeros(i.shape, np.float16) for i in plain.get_inputs() if i.name not in feed}
    fmt = ort.AdapterFormat.read_adapter(str(tmp_path / "b.onnx_adapter"))
    skill_b = {name: np.array(value.numpy(), copy=True) for name, value in fmt.get_parameters().items()}
    assert set(skill_b) <= set(zeros)
    got = plain.run(["actions"], {**feed, **zeros, **skill_b})[0]
    np.testing.assert_array_equal(got, session.run(feed, adapter="b")["actions"])
    np.testing.assert_array_equal(plain.run(["actions"], {**feed, **zeros})[0], session.run(feed)["actions"])
    with pytest.raises(BadInputError, match="not a dynamic-adapter graph"):
        without_lora_defaults(trt_graph, tmp_path / "again.onnx")


def test_an_adapter_packed_for_another_rank_or_dtype_is_refused(robot, policy_skill_r4, tmp_path):
    paths = robot("policy")
    graph = tmp_path / "skills16.onnx"
    args = ["export", "onnx", paths["base"], "-o", graph, "--module", paths["spec"], "--dynamic-adapters"]
    result = run_cli(*args, "--adapter", policy_skill_r4, "--dtype", "float16", "--static", "--max-rank", "8")
    assert result.exit_code == 0, result.output
    assert "static (LoRA rank 8)" in result.output and symbolic_dims(graph) == []

    wrong = tmp_path / "f32.onnx_adapter"
    result = run_cli("pack", policy_skill_r4, "-o", wrong, "--onnx", graph, "--dtype", "float32")
    assert result.exit_code == 2 and "expects float16 (pack it with --dtype float16)" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not wrong.exists()
    result = run_cli("pack", paths["adapter"], "-o", wrong, "--onnx", graph)  # rank 16 > the fixed 8
    assert result.exit_code == 2 and "fixes rank 8" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not wrong.exists()

    unpadded = tmp_path / "r4.onnx_adapter"  # packed without the graph: rank 4, float32
    assert run_cli("pack", policy_skill_r4, "-o", unpadded, "--dtype", "float16").exit_code == 0
    with pytest.raises(AdapterError, match=r"is \[\d+, 4\] but skills16.onnx expects \[\d+, 8\]"):
        DynamicSession(graph).load_adapter("r4", unpadded)
    args = ["verify", paths["base"], policy_skill_r4, "--module", paths["spec"], "--dynamic", graph]
    result = run_cli(*args, "--packed", unpadded)
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output


def test_float16_static_multi_adapter_graph_serves_each_skill(robot, policy_skill_r4, tmp_path):
    paths = robot("policy")
    graph = tmp_path / "multi16.onnx"
    result = run_cli(
        "export", "onnx", paths["base"], "-o", graph, "--module", paths["spec"], "--multi-adapter",
        "--adapter", paths["adapter"], "--adapter", policy_skill_r4, "--dtype", "float16", "--static",
        "--inputs", paths["obs1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert symbolic_dims(graph) == []
    session = MultiSession(graph)
    obs = robots.example_observations(batch=ROWS, seed=22)
    for adapter_id, adapter in ((0, paths["adapter"]), (1, policy_skill_r4), (-1, None)):
        got = row_by_row(lambda feed, i=adapter_id: session.run(feed, [i])["actions"], obs)
        assert_close(got, policy_actions(paths, adapter, obs), f"adapter id {adapter_id}")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--adapter", "ADAPTER", "--static", "--max-rank", "8"], "below the adapters' largest rank 16"),
        (["--targets", "action_head", "--static"], "needs --max-rank R"),
        (["--adapter", "ADAPTER", "--max-rank", "32"], "add --static"),
        (["--adapter", "ADAPTER", "--static", "--default-rank", "1"], "defaults are zeros of its rank"),
        (["--adapter", "ADAPTER", "--dtype", "float16", "--stream-weights"], "with their weights"),
    ],
)
def test_bad_static_or_float16_adapter_graphs_are_refused(robot, tmp_path, extra, message):
    paths = robot("policy")
    out = tmp_path / "skills.onnx"
    extra = [paths["adapter"] if a == "ADAPTER" else a for a in extra]
    args = ["export", "onnx", paths["base"], "-o", out, "--module", paths["spec"], "--dynamic-adapters", *extra]
    result = run_cli(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()


def test_hf_adapter_graphs_stay_float32(tmp_path):
    """The same flags without --module (a Hugging Face checkpoint): one line, exit 2."""
    out = tmp_path / "hf.onnx"
    args = ["export", "onnx", tmp_path, "-o", out, "--dynamic-adapters", "--targets", "q"]
    result = run_cli(*args, "--dtype", "float16")
    assert result.exit_code == 2 and "a --module's also in float16" in result.output, result.output
    result = run_cli(*args, "--static")
    assert result.exit_code == 2 and "graphs of a --module" in result.output, result.output
    assert not out.exists()
