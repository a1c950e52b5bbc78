"""verify against independent oracles: a checkpoint merged by PEFT passes its weight check
(its expected weights are not only the merge's own math); it decides element by element
(--atol/--rtol), not on the cosine alone; it runs the task it is told to; it passes a
bfloat16 merge with bfloat16 tolerances.

Each premise ("these outputs differ by more than atol at a few positions while the cosine
stays ~1") is established with PEFT and transformers, not with lora_deploy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, get_peft_model

from lora_deploy.cli import main
from lora_deploy.compare import TOLERANCES
from lora_deploy.merge.streaming import merge
from lora_deploy.modeling.samples import sample_inputs
from lora_deploy.proof.verify import verify
from tests.oracle import load_model, peft_model

# README, verify: default output tolerances by the loosest dtype involved.
README_TOLERANCES = {"float32": (1e-4, 1e-3), "float16": (2e-2, 2e-2), "bfloat16": (0.15, 0.1)}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def merged_output_checks(report):
    checks = [c for c in report.checks if c.name.startswith("outputs") and "merged (torch)" in c.name]
    assert checks, [c.name for c in report.checks]
    return checks


def verify_feed(model_dir) -> dict[str, torch.Tensor]:
    """The inputs verify runs on by default (batch 2, seq 16, seed 0)."""
    return {k: torch.from_numpy(v) for k, v in sample_inputs(model_dir, batch=2, seq=16, seed=0).items()}


def real_logits(model, feed) -> np.ndarray:
    """Logits at the real (unpadded) positions, float64."""
    with torch.no_grad():
        logits = model(**feed).logits.double().numpy()
    return logits[feed["attention_mask"].bool().numpy()]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))


def one_logit_adapter(base, out, change: float):
    """A PEFT LoRA on lm_head that moves the logit of one vocabulary entry only, by at
    most `change` on verify's inputs: a difference at few positions, in one direction."""
    torch.manual_seed(0)
    model = get_peft_model(
        load_model(base), LoraConfig(r=2, lora_alpha=2, target_modules=["lm_head"], init_lora_weights=False)
    )
    feed = verify_feed(base)
    lora_b = model.base_model.model.lm_head.lora_B["default"].weight
    with torch.no_grad():
        with model.disable_adapter():
            plain = real_logits(model, feed)
        row = lora_b[7].clone()
        lora_b.zero_()
        lora_b[7] = row
        # The logits are linear in B: rescale so the largest change is exactly `change`.
        lora_b.mul_(change / np.abs(real_logits(model, feed) - plain).max())
    model.save_pretrained(out, save_embedding_layers=False)  # lm_head counts as one for PEFT
    return out


@pytest.mark.parametrize("dtype,change", [("float32", 1e-3), ("float16", 0.1)])
def test_a_few_outputs_beyond_atol_fail_though_the_cosine_is_near_one(reference, tmp_path, dtype, change):
    """The base passed off as the merged model, for an adapter that moves one logit: only an
    element tolerance can see it (10x atol float32, 5x float16), the cosine cannot."""
    base, _ = reference("llama", "plain")
    candidate, _ = reference("llama", "plain", dtype=dtype)  # the base itself, in `dtype`
    adapter = one_logit_adapter(base, tmp_path / "adapter", change)
    feed = verify_feed(base)
    want = real_logits(peft_model(base, adapter), feed)  # base + adapter, by PEFT
    got = real_logits(load_model(candidate), feed)
    atol, rtol = README_TOLERANCES[dtype]
    beyond = np.abs(got - want) > atol + rtol * np.abs(want)
    assert 0 < beyond.sum() <= beyond.shape[0]  # a few positions, all in one logit column
    assert len(set(np.nonzero(beyond)[1])) == 1
    assert cosine(got, want) >= TOLERANCES[dtype].min_cosine  # the cosine alone would pass it

    report = verify(base, adapter, merged_dir=candidate)
    [outputs] = merged_output_checks(report)
    assert outputs.failed, outputs
    assert outputs.atol == pytest.approx(atol) and outputs.rtol == pytest.approx(rtol)
    assert outputs.max_abs == pytest.approx(np.abs(got - want).max(), rel=1e-3)

    # --atol/--rtol are honoured: loose enough, the same outputs pass
    report = verify(base, adapter, merged_dir=candidate, atol=2 * change, rtol=0.0)
    [outputs] = merged_output_checks(report)
    assert outputs.passed, outputs
    assert outputs.atol == pytest.approx(2 * change) and outputs.rtol == 0.0


def test_a_float16_base_passed_off_as_merged_fails(reference, tmp_path):
    base, adapter = reference("llama", "plain")
    base16, _ = reference("llama", "plain", dtype="float16")
    result = cli("verify", base, adapter, "--merged", base16, "--report", tmp_path / "r.json")
    assert result.exit_code == 1, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    failed = {c["name"] for c in report["checks"] if c["passed"] is False}
    for module in ("q_proj", "v_proj"):
        for layer in (0, 1):
            assert any(f"layers.{layer}.self_attn.{module}.weight" in name for name in failed), failed
    assert any(name.startswith("outputs") and "merged (torch)" in name for name in failed), failed


def test_tight_atol_fails_a_correct_merge(reference, tmp_path):
    """--atol/--rtol reach the comparison: a correct float32 merge differs from the unmerged
    PEFT forward by summation order only, which a zero tolerance still refuses."""
    base, adapter = reference("llama", "plain")
    merged = tmp_path / "merged"
    merge(base, adapter, merged)
    feed = verify_feed(base)
    difference = np.abs(real_logits(load_model(merged), feed) - real_logits(peft_model(base, adapter), feed))
    assert 0 < difference.max() < 1e-4  # premise: tiny, but not zero

    assert cli("verify", base, adapter, "--merged", merged).exit_code == 0
    result = cli("verify", base, adapter, "--merged", merged, "--atol", 0, "--rtol", 0, "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    [outputs] = [c for c in report["checks"] if c["name"].startswith("outputs") and "merged (torch)" in c["name"]]
    assert outputs["passed"] is False and outputs["atol"] == 0 and outputs["rtol"] == 0
    weights = [c for c in report["checks"] if c["name"].startswith("weights")]
    assert weights and all(c["passed"] for c in weights)  # the weights still pass: only --atol decided


def test_task_option_picks_the_model_head(reference, tmp_path):
    """--task feature-extraction checks the backbone's last_hidden_state, not the logits."""
    from transformers import AutoModel

    base, adapter = reference("llama", "plain")
    merged = tmp_path / "merged"
    merge(base, adapter, merged)
    result = cli("verify", base, adapter, "--merged", merged, "--task", "feature-extraction", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    names = [c["name"] for c in report["checks"] if c["name"].startswith("outputs") and "merged (torch)" in c["name"]]
    assert names and all("last_hidden_state" in n and "logits" not in n for n in names), names
    # the premise: the backbone's output, merged, really is base + adapter (PEFT)
    feed = verify_feed(base)
    backbone = AutoModel.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        got = backbone(**feed).last_hidden_state
        want = peft_model(base, adapter).get_base_model().model(**feed).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


def test_bfloat16_merge_passes_with_bfloat16_tolerances(reference, tmp_path):
    base, adapter = reference("llama", "plain", dtype="bfloat16")
    merged = tmp_path / "merged"
    merge(base, adapter, merged)
    report = verify(base, adapter, merged_dir=merged)
    assert report.equivalent, report.failures()
    for check in merged_output_checks(report):
        assert (check.atol, check.rtol) == pytest.approx(README_TOLERANCES["bfloat16"])
        assert check.max_abs > 0  # bfloat16 weights run in float32: not the reference's bits
    # and those tolerances still refuse the bfloat16 base passed off as merged
    report = verify(base, adapter, merged_dir=base)
    assert all(c.failed for c in merged_output_checks(report))


# Every variant at least once, every family; not gpt2 + embedding, where PEFT's merge also
# changes the tied output layer (see tests/merge/test_merge.py).
PEFT_MERGED_CASES = [
    ("llama", "plain"),
    ("gpt2", "rslora"),
    ("bert", "patterns"),
    ("gpt2", "lora_bias"),
    ("llama", "dora"),
    ("gpt2", "dora"),
    ("bert", "modules_to_save"),
    ("llama", "embedding"),
    ("bert", "all_linear"),
]


@pytest.mark.parametrize("family,variant", PEFT_MERGED_CASES)
def test_a_checkpoint_merged_by_peft_passes(reference, tmp_path, family, variant):
    """verify recomputes W0 + dW with the merge's own math; PEFT's merge_and_unload, saved by
    transformers, is the independent answer it must accept."""
    base, adapter = reference(family, variant)
    peft_merged = tmp_path / "peft-merged"
    peft_model(base, adapter).merge_and_unload().save_pretrained(peft_merged)
    report = verify(base, adapter, merged_dir=peft_merged)
    assert report.equivalent, report.failures()
    weights = [c for c in report.checks if c.name.startswith("weights")]
    assert weights and all(c.passed for c in weights)
