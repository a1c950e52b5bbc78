"""merge with a base that is one file: a torch.save state dict or a safetensors file, and
side files carried into the output and hashed. PEFT's merge_and_unload is the oracle."""

from __future__ import annotations

import json

import blake3
import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from safetensors.torch import save_file

from lora_deploy.cli import main
from lora_deploy.examples import robot as robots
from lora_deploy.merge.streaming import MANIFEST_FILE
from tests.oracle import read_checkpoint


class Marker:
    """An object a weights-only load must refuse to rebuild."""


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def peft_merged(paths):
    model = robots.build_policy()
    model.load_state_dict(torch.load(paths["base"], weights_only=True))
    merged = PeftModel.from_pretrained(model, paths["adapter"]).merge_and_unload()
    return merged.state_dict()


@pytest.mark.parametrize("kind", ["pt", "safetensors"])
def test_a_file_base_merges_like_peft(robot, tmp_path, kind):
    paths = robot("policy")
    base = paths["base"]
    if kind == "safetensors":
        base = tmp_path / "policy.safetensors"
        save_file(torch.load(paths["base"], weights_only=True), base)
    out = tmp_path / "out"
    result = run_cli("merge", base, paths["adapter"], "-o", out, "--json")
    assert result.exit_code == 0, result.output
    ours = read_checkpoint(out)
    want = peft_merged(paths)
    assert set(ours) == set(want)
    for key, tensor in want.items():
        torch.testing.assert_close(ours[key], tensor, atol=1e-6, rtol=1e-5, msg=key)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["inputs"]["base"] == str(base.resolve())  # the file given, not a temporary view
    digest = blake3.blake3(base.read_bytes()).hexdigest()
    assert manifest["inputs"]["blake3"]["base"] == {base.name: digest}


def test_side_files_travel_with_the_output_and_are_hashed(robot, tmp_path):
    paths = robot("vla")
    head = tmp_path / "action_head.pt"
    torch.save({"weight": torch.ones(3)}, head)
    out = tmp_path / "out"
    args = ["merge", paths["base"], paths["adapter"], "-o", out, "--side-file", paths["statistics"]]
    result = run_cli(*args, "--side-file", head)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    for path in (paths["statistics"], head):
        assert (out / path.name).read_bytes() == path.read_bytes()
        digest = blake3.blake3(path.read_bytes()).hexdigest()
        assert manifest["inputs"]["blake3"]["side_files"][path.name] == digest
        assert manifest["output"]["blake3"][path.name] == digest


def test_the_fixture_merge_carries_the_statistics(robot):
    paths = robot("vla")
    assert (paths["merged"] / robots.STATISTICS_FILE).read_bytes() == paths["statistics"].read_bytes()


@pytest.mark.parametrize(
    "make, phrase",
    [
        (lambda p: torch.save({"w": torch.zeros(2), "meta": {"lr": 0.1}}, p), "not a mapping of tensor names"),
        (lambda p: torch.save({"w": torch.zeros(2), "f": Marker()}, p), "refused to load pickle"),
        (lambda p: p.write_bytes(b"not a pickle"), "refused to load pickle"),
    ],
    ids=["nested", "object", "garbage"],
)
def test_a_state_dict_holding_objects_is_one_line_and_nothing_is_written(robot, tmp_path, make, phrase):
    bad = tmp_path / "bad.pt"
    make(bad)
    out = tmp_path / "out"
    result = run_cli("merge", bad, robot("policy")["adapter"], "-o", out)
    assert result.exit_code == 2, result.output
    assert phrase in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("name", ["base.onnx", "missing.pt"])
def test_other_files_are_refused(robot, tmp_path, name):
    base = tmp_path / name
    if name.endswith(".onnx"):
        base.write_bytes(b"x")
    result = run_cli("merge", base, robot("policy")["adapter"], "-o", tmp_path / "out")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()


def test_a_side_file_may_not_take_a_name_the_merge_writes(robot, tmp_path):
    clash = tmp_path / MANIFEST_FILE
    clash.write_text("{}")
    paths = robot("policy")
    result = run_cli("merge", paths["base"], paths["adapter"], "-o", tmp_path / "out", "--side-file", clash)
    assert result.exit_code == 2 and "uses itself" in result.output
    assert not (tmp_path / "out").exists()
