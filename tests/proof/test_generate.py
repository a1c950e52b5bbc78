"""Token-exact generation checks: the comparison on hand-made generations, and
`verify --generate` end to end on KV-cache graphs against PEFT."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from lora_deploy.cli import main
from lora_deploy.compare import tolerance
from lora_deploy.proof.generate import Divergence, Generation, compare_generation, first_divergence

VOCAB = 6


def generation(tokens, margin=1.0):
    """Logits whose argmax is `tokens`, the runner-up `margin` below it."""
    tokens = np.asarray(tokens, dtype=np.int64)
    logits = np.zeros((*tokens.shape, VOCAB), np.float32)
    for index in np.ndindex(tokens.shape):
        logits[index][tokens[index]] = 1.0
        logits[index][(tokens[index] + 1) % VOCAB] = 1.0 - margin
    return Generation(tokens, logits)


def test_equal_generations_pass():
    want = generation([[1, 2, 3], [4, 0, 5]])
    check = compare_generation("x", want, generation([[1, 2, 3], [4, 0, 5]]), "float32")
    assert check.passed and check.name == "generate: x" and check.top1 == 1.0 and check.max_abs == 0.0


def test_first_divergence_names_prompt_step_tokens_and_margin():
    want = generation([[1, 2, 3, 4], [4, 0, 5, 5]], margin=0.5)
    got = generation([[1, 2, 3, 4], [4, 3, 1, 1]])
    check = compare_generation("g", got, want, "float32")
    assert check.failed
    assert "prompt 1, step 1: token 3 instead of 0" in check.detail
    assert "margin 1" in check.detail and "not a near-tie" in check.detail  # the reference has 1.0 vs 0.0 for token 3
    found = first_divergence(got, want, tolerance("float32"))
    assert (found.prompt, found.step, found.got, found.want, found.rows) == (1, 1, 3, 0, 1)
    assert check.top1 == pytest.approx(5 / 8)  # 3 of 8 steps differ


def test_a_near_tie_is_flagged_as_such():
    want = generation([[2, 2]], margin=0.01)  # runner-up (token 3) 0.01 below
    got = generation([[2, 3]])
    check = compare_generation("fp16 graph", got, want, "float16")
    assert check.failed and "step 1: token 3 instead of 2" in check.detail and "near-tie: within" in check.detail
    assert "not a near-tie" in compare_generation("fp32 graph", got, want, "float32").detail


@pytest.mark.parametrize(
    "margin,near",
    [(0.01, True), (-0.01, True), (0.02, True), (-0.02, True), (1.0, False), (-1.0, False), (float("nan"), False)],
)
def test_near_tie_needs_the_margin_within_tolerance_either_way_round(margin, near):
    found = Divergence(prompt=0, step=1, got=3, want=2, margin=margin, allowed=0.02, rows=1)
    assert found.near_tie is near
    text = found.describe()
    assert ("near-tie: within" in text) is near and ("not a near-tie" in text) is not near
    if margin == 1.0:
        assert "token 3 is clearly wrong" in text
    if margin == -1.0:  # the reference's own logits put token 3 ahead: not called a tie
        assert "favour token 3" in text and "token 2 was not its top-1" in text


def test_a_reference_token_clearly_behind_the_candidates_is_not_a_near_tie():
    want = generation([[2, 2]])
    want.logits[0, 1, 3] = 5.0  # the reference chose 2 although its logit for 3 is 4 higher
    got = generation([[2, 3]])
    found = first_divergence(got, want, tolerance("float16"))
    assert found.margin == pytest.approx(-4.0) and not found.near_tie
    assert "not a near-tie" in compare_generation("fp16 graph", got, want, "float16").detail


def test_equal_tokens_with_logits_beyond_tolerance_fail():
    want = generation([[1, 2]])
    got = Generation(want.tokens, want.logits + 0.01)
    check = compare_generation("x", got, want, "float32")
    assert check.failed and "logits: max abs error 0.01" in check.detail
    assert compare_generation("x", got, want, "float16").passed


def test_shape_mismatch_fails_without_figures():
    check = compare_generation("x", generation([[1, 2]]), generation([[1, 2, 3]]), "float32")
    assert check.failed and check.max_abs is None and "shape" in check.detail


# ---------------------------------------------------------------- verify --generate


def verify(*args):
    return CliRunner().invoke(main, ["verify", *map(str, args)])


def test_verify_generate_passes_for_a_dynamic_kv_graph_with_and_without_the_adapter(reference, kv_graph, tmp_path):
    base_dir, adapter_dir = reference("llama")
    report = tmp_path / "report.json"
    result = verify(
        base_dir, adapter_dir, "--onnx", kv_graph("llama", "dynamic"), "--generate", 8, "--batch", 3, "--report", report
    )
    assert result.exit_code == 0, result.output + result.stderr
    data = json.loads(report.read_text())
    assert data["equivalent"] and data["schema"] == "lora-deploy.verify/1"
    names = [c["name"] for c in data["checks"]]
    for label in ("prompt", "padded batch"):
        assert f"generate: [{label}] kv-cache onnx, dynamic (adapter active) vs peft (unmerged)" in names
        assert f"generate: [{label}] kv-cache onnx, dynamic (no adapter) vs base" in names
        assert data["effect"][label]["tokens_changed"] > 0  # the adapter changes what is generated
    assert len(data["inputs"]["prompts"]["padded batch"]) == 3
    assert len({len(p) for p in data["inputs"]["prompts"]["padded batch"]}) == 3  # padding exercised


def test_verify_generate_fails_for_a_graph_of_the_base_naming_step_and_tokens(reference, kv_graph):
    base_dir, adapter_dir = reference("llama")
    result = verify(base_dir, adapter_dir, "--onnx", kv_graph("llama"), "--generate", 8)
    assert result.exit_code == 1, result.output + result.stderr
    line = result.stderr.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("error: not equivalent: generate: [prompt] kv-cache onnx vs peft")
    assert "first divergence: prompt 0, step 0: token" in line[0] and "instead of" in line[0]


def test_verify_generate_refuses_a_prompt_longer_than_the_context(reference, kv_graph, tmp_path):
    base_dir, adapter_dir = reference("llama")
    report = tmp_path / "report.json"
    result = verify(
        base_dir, adapter_dir, "--onnx", kv_graph("llama"), "--generate", 8, "--seq", 121, "--report", report
    )
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "121 tokens plus 8 new tokens is longer than the model's 128 positions" in lines[0]
    assert not report.exists()


def test_verify_generate_refuses_a_graph_without_cache(reference, tmp_path):
    from tests.bench.test_bench import tiny_graph

    base_dir, adapter_dir = reference("llama")
    result = verify(base_dir, adapter_dir, "--onnx", tiny_graph(tmp_path / "t.onnx"), "--generate", 2)
    assert result.exit_code == 2 and "not a KV-cache graph" in result.stderr


def test_plain_verify_of_a_kv_graph_points_to_generate(reference, kv_graph):
    base_dir, adapter_dir = reference("llama")
    result = verify(base_dir, adapter_dir, "--onnx", kv_graph("llama"))
    assert result.exit_code == 2
    assert "a KV-cache graph (past_key_values.* inputs): check it with --generate N" in result.stderr


def test_reference_generation_runs_past_the_models_end_of_sequence(reference):
    """hf_generate gives n_new greedy tokens even where the model's own generation_config
    would stop the row at its eos token (transformers fills unset settings from it)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lora_deploy.proof.generate import hf_generate

    base, _ = reference("llama")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    prompt = [5, 17, 42, 9]
    ids, want = torch.tensor([prompt]), []
    with torch.no_grad():  # greedy by hand: argmax of the forward's last logits
        for _ in range(4):
            want.append(int(model(ids).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[want[-1]]])], dim=1)
    model.generation_config.eos_token_id = want[0]  # the very first token ends the sequence
    got = hf_generate(model, [prompt, prompt[:2]], 4)
    assert got.tokens[0].tolist() == want
    assert got.tokens.shape == (2, 4)
    assert model.generation_config.eos_token_id == want[0]  # the model's own config is left as it was
