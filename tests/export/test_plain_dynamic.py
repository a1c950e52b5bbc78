"""Switchable skills on one plain-module graph: export onnx --module --dynamic-adapters,
pack, DynamicSession and verify --module --dynamic; --multi-adapter (a skill per batch
row), MultiSession and verify --module --multi. PEFT's forward is the oracle."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel

from lora_deploy.backends.onnxrt.sessions import DynamicSession, MultiSession
from lora_deploy.cli import main
from lora_deploy.examples import robot as robots
from tests.oracle import policy_actions, policy_base


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def second_skill(robot, tmp_path_factory):
    return robots.train_adapter(
        "policy", policy_base(robot("policy")), tmp_path_factory.mktemp("skill") / "skill-b", steps=5, seed=1
    )


def test_two_skills_switch_per_call_on_one_graph(robot, tmp_path, second_skill):
    paths = robot("policy")
    base = policy_base(paths)
    second = second_skill
    graph = tmp_path / "skills.onnx"
    result = run_cli(
        "export", "onnx", paths["base"], "-o", graph, "--module", paths["spec"], "--dynamic-adapters",
        "--adapter", paths["adapter"], "--adapter", second,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    session = DynamicSession(graph)
    for name, adapter in (("a", paths["adapter"]), ("b", second)):
        packed = tmp_path / f"{name}.onnx_adapter"
        assert run_cli("pack", adapter, "-o", packed, "--onnx", graph).exit_code == 0
        session.load_adapter(name, packed)

    obs = robots.example_observations(batch=3, seed=11)
    tensors = {k: torch.from_numpy(v) for k, v in obs.items()}
    with torch.no_grad():
        want_base = base(**tensors).numpy()
        for name, adapter in (("a", paths["adapter"]), ("b", second)):
            fresh = robots.build_policy()
            fresh.load_state_dict(torch.load(paths["base"], weights_only=True))
            want = PeftModel.from_pretrained(fresh, adapter).eval()(**tensors).numpy()
            got = session.run(obs, adapter=name)["actions"]
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3, err_msg=name)
            assert np.abs(want - want_base).max() > 0.1  # each skill really differs from the base
    np.testing.assert_allclose(session.run(obs)["actions"], want_base, atol=1e-4, rtol=1e-3)  # no skill: the base

    args = ["verify", paths["base"], paths["adapter"], "--module", paths["spec"], "--dynamic", graph]
    result = run_cli(*args, "--packed", tmp_path / "a.onnx_adapter")
    assert result.exit_code == 0, result.output


def test_a_skill_per_batch_row_on_one_multi_adapter_graph(robot, tmp_path, second_skill):
    paths = robot("policy")
    graph = tmp_path / "multi.onnx"
    result = run_cli(
        "export", "onnx", paths["base"], "-o", graph, "--module", paths["spec"], "--multi-adapter",
        "--adapter", paths["adapter"], "--adapter", second_skill,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    obs = robots.example_observations(batch=3, seed=13)
    got = MultiSession(graph).run(obs, [0, 1, -1])["actions"]  # skill a, skill b, no skill
    with torch.no_grad():
        want_base = policy_base(paths)(**{k: torch.from_numpy(v) for k, v in obs.items()}).numpy()
    for row, want in enumerate(
        [policy_actions(paths, paths["adapter"], obs), policy_actions(paths, second_skill, obs)]
    ):
        np.testing.assert_allclose(got[row], want[row], atol=1e-4, rtol=1e-3, err_msg=f"row {row}")
    np.testing.assert_allclose(got[2], want_base[2], atol=1e-4, rtol=1e-3)

    result = run_cli("verify", paths["base"], second_skill, "--module", paths["spec"], "--multi", graph)
    assert result.exit_code == 0, result.output


def test_a_static_batch_skills_graph_switches_like_peft(robot, tmp_path):
    """--dynamic-adapters --static: the observations' dims fixed (batch 1, as a robot runs),
    the LoRA rank dims too (the adapter's rank); verify runs it row by row."""
    import onnx

    paths = robot("policy")
    graph = tmp_path / "static-skills.onnx"
    args = ["export", "onnx", paths["base"], "-o", graph, "--module", paths["spec"], "--dynamic-adapters"]
    result = run_cli(*args, "--adapter", paths["adapter"], "--inputs", paths["obs1"], "--static")
    assert result.exit_code == 0, result.output
    inputs = {v.name: v for v in onnx.load(str(graph), load_external_data=False).graph.input}
    assert [d.dim_value for d in inputs["image"].type.tensor_type.shape.dim] == [1, 3, 32, 32]
    assert [d.dim_value for d in inputs["proprio"].type.tensor_type.shape.dim] == [1, robots.PROPRIO_DIM]
    lora = next(v for name, v in inputs.items() if name.endswith("lora_A.weight"))
    rank = json.loads((paths["adapter"] / "adapter_config.json").read_text())["r"]
    assert lora.type.tensor_type.shape.dim[1].dim_value == rank  # the rank is fixed too

    packed = tmp_path / "a.onnx_adapter"
    assert run_cli("pack", paths["adapter"], "-o", packed, "--onnx", graph).exit_code == 0
    session = DynamicSession(graph)
    session.load_adapter("a", packed)
    obs = robots.example_observations(batch=1, seed=12)
    want = policy_actions(paths, paths["adapter"], obs)
    np.testing.assert_allclose(session.run(obs, adapter="a")["actions"], want, atol=1e-4, rtol=1e-3)

    args = ["verify", paths["base"], paths["adapter"], "--module", paths["spec"], "--dynamic", graph, "--json"]
    result = run_cli(*args, "--inputs", paths["observations"])
    assert result.exit_code == 0, result.output
    assert '"actions [observations.npz]: dynamic (adapter active) vs unmerged"' in result.output


@pytest.mark.parametrize("kind", ["--dynamic-adapters", "--multi-adapter"])
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dtype", "auto"], "in float32 (a --module's also in float16)"),
        (["--part", "blocks.0"], "adapter graphs take the whole module"),
    ],
)
def test_other_dtypes_and_part_adapter_graphs_are_refused(robot, tmp_path, kind, extra, message):
    """Adapter graphs of plain modules are float32 or float16 (tests/export/test_static_skills.py)
    and of the whole module."""
    paths = robot("policy")
    out = tmp_path / "skills.onnx"
    args = ["export", "onnx", paths["base"], "-o", out, "--module", paths["spec"], kind, "--adapter", paths["adapter"]]
    result = run_cli(*args, *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()
