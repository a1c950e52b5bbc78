"""verify --module: plain modules without config.json, checked at the level of actions
(continuous: max action error; token bins: decoded bins, mismatches with their margins)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from lora_deploy.cli import main
from lora_deploy.compare import tolerance
from lora_deploy.proof.actions import compare_bins


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def graphs(robot, tmp_path_factory):
    """{kind: float16 static graph of the merged controller}, exported once."""
    root = tmp_path_factory.mktemp("robot-graphs")
    out = {}
    for kind in ("policy", "vla"):
        paths = robot(kind)
        out[kind] = root / f"{kind}.onnx"
        args = ["export", "onnx", paths["merged"], "-o", out[kind], "--module", paths["spec"], "--inputs"]
        result = run_cli(*args, paths["obs1"], "--dtype", "float16", "--static")
        assert result.exit_code == 0, result.output
    return out


def verify_json(paths, *extra):
    args = ["verify", paths["base"], paths["adapter"], "--module", paths["spec"], "--json", *extra]
    result = run_cli(*args)
    return result, json.loads(result.stdout)


def test_policy_merged_and_float16_graph_on_recorded_observations(robot, graphs):
    paths = robot("policy")
    result, report = verify_json(
        paths, "--merged", paths["merged"], "--onnx", graphs["policy"], "--inputs", paths["observations"]
    )
    assert result.exit_code == 0, result.output
    checks = {c["name"]: c for c in report["checks"]}
    action = checks["actions [observations.npz]: onnx (onnxruntime) vs unmerged"]
    assert action["status"] == "passed" and 0 < action["max_abs"] < 2e-2  # float16 rounding in action units
    assert checks["actions [generated]: merged (torch) vs unmerged"]["max_abs"] < 1e-5
    assert any(c["name"].startswith("weights:") and c["status"] == "passed" for c in report["checks"])
    assert report["effect"]["observations.npz"]["max_abs"] > 0.5  # the adapter really moves the arm
    assert report["inputs"]["action_kind"] == "continuous"


def test_a_graph_with_one_weight_changed_fails_at_the_action_level(robot, graphs, tmp_path):
    paths = robot("policy")
    model = onnx.load(str(graphs["policy"]))
    for init in model.graph.initializer:
        if init.name == "action_head.bias":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float16(0.1), init.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    result, report = verify_json(paths, "--onnx", tampered)
    assert result.exit_code == 1, result.output
    failed = [c["name"] for c in report["checks"] if c["status"] == "failed"]
    assert "actions [generated]: onnx (onnxruntime) vs unmerged" in failed


def test_vla_float16_graph_decodes_the_reference_bins(robot, graphs):
    paths = robot("vla")
    result, report = verify_json(paths, "--onnx", graphs["vla"], "--inputs", paths["observations"])
    assert result.exit_code == 0, result.output
    name = "actions [observations.npz]: onnx (onnxruntime) vs unmerged"
    check = next(c for c in report["checks"] if c["name"] == name)
    assert check["status"] == "passed"  # every bin equal, or every mismatch a reported near-tie
    assert check["detail"].startswith(f"{int(round(check['top1'] * 448))} of 448 action bins equal")
    assert report["inputs"]["action_kind"] == "bins"
    assert report["effect"]["observations.npz"]["top1_changed"] > 0.5  # the adapter changes most bins


def test_bin_mismatches_are_reported_with_their_margin():
    tol = tolerance("float16")
    reference = np.zeros((2, 3, 8), np.float32)
    reference[..., 2] = 1.0  # bin 2 everywhere, by a clear margin
    reference[0, 1, 5] = 1.0 + 1e-3  # a near-tie: bin 5 by 1e-3
    got = reference.copy()
    got[0, 1, 5] = 1.0 - 1e-3  # float16 flips the near-tie to bin 2
    got[1, 2, 7] = 3.0  # a real difference: bin 7
    result = compare_bins(got, reference, tol)
    assert (result.total, result.agree) == (6, 4)
    by_index = {m.index: m for m in result.mismatches}
    assert by_index[(0, 1)].near_tie and by_index[(0, 1)].margin == pytest.approx(1e-3, rel=1e-3)
    assert (by_index[(0, 1)].reference_bin, by_index[(0, 1)].got_bin) == (5, 2)
    assert not by_index[(1, 2)].near_tie and by_index[(1, 2)].margin == pytest.approx(1.0)
    assert not result.all_near_ties
    assert "near-tie" in result.summary() and "NOT a near-tie" in result.summary()


def test_bad_input_is_one_line(robot, tmp_path):
    paths = robot("policy")
    np.savez(tmp_path / "wrong.npz", image=np.ones((2, 3, 32, 32), np.float32))
    cases = [
        (["verify", paths["base"], paths["adapter"], "--onnx", tmp_path / "x.onnx"], "needs --module"),
        (["verify", paths["base"], paths["adapter"], "--module", paths["spec"]], "nothing to verify"),
        (["verify", paths["base"], paths["adapter"], "--module", paths["spec"], "--merged", paths["merged"],
          "--inputs", tmp_path / "wrong.npz"], "missing input 'proprio'"),
        (["verify", paths["base"], paths["adapter"], "--module", "lora_deploy.examples.robot:build_vla",
          "--merged", paths["merged"]], "does not fit the module"),
    ]  # fmt: skip
    for args, phrase in cases:
        result = run_cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert phrase in result.output and len(result.output.strip().splitlines()) == 1, (args, result.output)
