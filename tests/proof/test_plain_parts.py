"""Models with parts: `export onnx --module ... --part NAME` exports one submodule on the
inputs it receives in the whole forward; `verify --part NAME=FILE` checks each part graph
alone and the chain of part graphs (ONNX Runtime) at the level of actions."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from lora_deploy.cli import main
from lora_deploy.examples import robot as robots
from lora_deploy.modeling.factory import load_module

POLICY_PARTS = ("patch_embed", "blocks.0", "blocks.1", "action_head")
VLA_PARTS = ("patch_embed", "llm.model", "llm.lm_head")


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def export_parts(paths, checkpoint, names, out_dir, *extra):
    out = {}
    for name in names:
        out[name] = out_dir / f"{name}.onnx"
        args = ["export", "onnx", checkpoint, "-o", out[name], "--module", paths["spec"], "--part", name, *extra]
        result = run_cli(*args)
        assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def policy_parts(robot, tmp_path_factory):
    """float16 graphs of the merged policy's parts (dynamic batch), exported once."""
    paths = robot("policy")
    return export_parts(paths, paths["merged"], POLICY_PARTS, tmp_path_factory.mktemp("parts"), "--dtype", "float16")


def verify_json(paths, parts, *extra):
    args = ["verify", paths["base"], paths["adapter"], "--module", paths["spec"], "--json", *extra]
    for name, path in parts.items():
        args += ["--part", f"{name}={path}"]
    result = run_cli(*args)
    return result, (json.loads(result.stdout) if result.stdout.startswith("{") else None)


def peft_actions(paths, feed):
    """The unmerged float32 reference as PEFT computes it."""
    from peft import PeftModel

    base = load_module(paths["spec"], paths["base"])
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(paths["adapter"])).eval()
    with torch.inference_mode():
        return model(**{k: torch.from_numpy(v) for k, v in feed.items()}).numpy()


def chained_by_hand(parts, merged, feed):
    """The policy's forward written out here, every part an ONNX Runtime session (float16)."""

    def run(name, x):
        session = ort.InferenceSession(str(parts[name]), providers=["CPUExecutionProvider"])
        (value,) = session.run(None, {session.get_inputs()[0].name: x.astype(np.float16)})
        return value.astype(np.float32)

    image, proprio = torch.from_numpy(feed["image"]), torch.from_numpy(feed["proprio"])
    batch = image.shape[0]
    with torch.inference_mode():
        tokens = torch.cat(
            [
                torch.from_numpy(run("patch_embed", robots.patchify(image).numpy())),
                merged.proprio_embed(proprio)[:, None],
                merged.action_queries.expand(batch, -1, -1),
            ],
            dim=1,
        )
        x = (tokens + merged.position).numpy()
    x = run("blocks.1", run("blocks.0", x))
    with torch.inference_mode():
        x = merged.norm(torch.from_numpy(x))[:, -robots.CHUNK :].numpy()
    return run("action_head", x)


def test_policy_parts_chain_matches_peft_at_the_action_level(robot, policy_parts):
    paths = robot("policy")
    result, report = verify_json(paths, policy_parts, "--merged", paths["merged"], "--inputs", paths["observations"])
    assert result.exit_code == 0, result.output
    checks = {c["name"]: c for c in report["checks"]}
    chain = checks["actions [observations.npz]: parts chain (onnx; glue: merged, torch) vs unmerged"]
    assert chain["status"] == "passed" and 0 < chain["max_abs"] < 2e-2  # float16 rounding, in action units
    for name in POLICY_PARTS:
        part = checks[f"outputs [observations.npz]: part {name} (onnx) output vs unmerged"]
        assert part["status"] == "passed" and 0 < part["max_abs"] < 2e-2
    assert report["inputs"]["parts"] == {name: str(path) for name, path in policy_parts.items()}
    assert set(report["artifacts"]) >= {f"part {name}" for name in POLICY_PARTS}

    # Independently: the part graphs chained by hand in ONNX Runtime vs PEFT's unmerged model.
    with np.load(paths["observations"]) as data:
        feed = {k: data[k][:16] for k in data.files}
    want = peft_actions(paths, feed)
    got = chained_by_hand(policy_parts, load_module(paths["spec"], paths["merged"]), feed)
    assert np.abs(got - want).max() < 2e-2
    assert np.abs(got - want).max() <= chain["max_abs"] + 1e-6  # the same graphs, so the same rounding


def test_without_merged_the_glue_is_base_plus_adapter_unmerged(robot, policy_parts):
    """A part that is itself an adapted layer (action_head) must not get the LoRA hook again."""
    paths = robot("policy")
    result, report = verify_json(paths, policy_parts)
    assert result.exit_code == 0, result.output
    chain = next(c for c in report["checks"] if c["name"].startswith("actions [generated]: parts chain"))
    assert "glue: base + adapter unmerged" in chain["name"] and chain["max_abs"] < 2e-2


def test_a_part_exported_from_the_base_fails_at_the_action_level(robot, policy_parts, tmp_path):
    paths = robot("policy")
    stale = export_parts(paths, paths["base"], ["action_head"], tmp_path, "--dtype", "float16")
    result, report = verify_json(paths, {**policy_parts, **stale}, "--merged", paths["merged"])
    assert result.exit_code == 1, result.output
    failed = {c["name"] for c in report["checks"] if c["status"] == "failed"}
    assert "actions [generated]: parts chain (onnx; glue: merged, torch) vs unmerged" in failed
    assert "outputs [generated]: part action_head (onnx) output vs unmerged" in failed
    assert "outputs [generated]: part blocks.0 (onnx) output vs unmerged" not in failed


def test_vla_vision_language_model_and_head_decode_the_reference_bins(robot, tmp_path):
    paths = robot("vla")
    parts = export_parts(paths, paths["merged"], VLA_PARTS, tmp_path, "--dtype", "float16")
    result, report = verify_json(paths, parts, "--merged", paths["merged"], "--inputs", paths["observations"])
    assert result.exit_code == 0, result.output
    chain = {c["name"]: c for c in report["checks"]}[
        "actions [observations.npz]: parts chain (onnx; glue: merged, torch) vs unmerged"
    ]
    assert chain["status"] == "passed" and chain["top1"] >= 0.99  # share of action bins equal
    assert "NOT a near-tie" not in chain["detail"]  # any mismatch must be a reported near-tie


def test_part_bad_input_is_one_line(robot, policy_parts, tmp_path):
    paths = robot("policy")
    export = ["export", "onnx", paths["merged"], "--module", paths["spec"]]
    cases = [
        ([*export, "-o", tmp_path / "a.onnx", "--part", "nope"], "has no part 'nope'"),
        ([*export, "-o", tmp_path / "b.onnx", "--part", "blocks"], "returns no tensors|never calls it"),
        (
            [*export, "-o", tmp_path / "c.onnx", "--part", "blocks.0", "--dynamic-adapters"]
            + ["--adapter", paths["adapter"]],
            "adapter graphs take the whole module",
        ),
        (["export", "onnx", paths["merged"], "-o", tmp_path / "d.onnx", "--part", "blocks.0"], "give --module"),
        (["verify", paths["base"], paths["adapter"], "--module", paths["spec"], "--part", "blocks.0"], "NAME=FILE"),
        (
            ["verify", paths["base"], paths["adapter"], "--module", paths["spec"]]
            + ["--part", f"patch_embed={policy_parts['blocks.0']}"],
            "takes x; the part receives input",
        ),
        (  # same input name, another shape: polygraphy refuses it, reported as one line
            ["verify", paths["base"], paths["adapter"], "--module", paths["spec"]]
            + ["--part", f"patch_embed={policy_parts['action_head']}"],
            "cannot run it on the sample inputs .*incompatible shape",
        ),
    ]
    for args, message in cases:
        result = run_cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert re.search(message, result.output), result.output
    assert not any(tmp_path.iterdir())
