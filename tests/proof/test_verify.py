"""verify: equivalent artifacts pass, tampered ones fail naming the culprit, bad input exits 2."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lora_deploy.cli import main
from lora_deploy.export.model import export_checkpoint
from lora_deploy.merge.streaming import merge
from lora_deploy.proof.verify import verify


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def merged_llama(reference, tmp_path_factory):
    base, adapter = reference("llama", "plain")
    out = tmp_path_factory.mktemp("verify") / "merged"
    merge(base, adapter, out)
    onnx_path = out.parent / "merged.onnx"
    export_checkpoint(out, onnx_path)
    return base, adapter, out, onnx_path


def test_equivalent_artifacts_pass_with_a_report(merged_llama, tmp_path):
    base, adapter, merged, onnx_path = merged_llama
    result = cli("verify", base, adapter, "--merged", merged, "--onnx", onnx_path, "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["equivalent"] is True
    names = [c["name"] for c in report["checks"]]
    assert any(n.startswith("weights:") for n in names)
    assert any("merged (torch)" in n for n in names) and any("onnx" in n for n in names)
    outputs = [c for c in report["checks"] if c["name"].startswith("outputs") and c["cosine"] is not None]
    assert outputs and all(c["top1"] == 1.0 and c["cosine"] > 0.99999 for c in outputs)
    assert any("polygraphy comparator" in c["name"] and c["passed"] for c in report["checks"])


def test_tampered_weight_is_named(merged_llama, tmp_path):
    base, adapter, merged, _ = merged_llama
    bad = tmp_path / "bad"
    shutil.copytree(merged, bad)
    tensors = load_file(bad / "model.safetensors")
    key = "model.layers.1.self_attn.v_proj.weight"
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    result = cli("verify", base, adapter, "--merged", bad)
    assert result.exit_code == 1
    assert key in result.stderr and result.stderr.startswith("error: not equivalent")


def test_merge_without_adapter_is_not_equivalent(reference, tmp_path):
    """A model that is just the base must fail the output check: the adapter changed outputs."""
    base, adapter = reference("gpt2", "plain")
    onnx_path = tmp_path / "base.onnx"
    export_checkpoint(base, onnx_path)
    report = verify(base, adapter, onnx_path=onnx_path)
    assert not report.equivalent
    assert report.failures()[0].max_abs > 1e-3


def test_half_precision_merge_passes_with_dtype_tolerances(reference, tmp_path):
    base, adapter = reference("bert", "dora", dtype="float16")
    merge(base, adapter, tmp_path / "out")
    report = verify(base, adapter, merged_dir=tmp_path / "out")
    assert report.equivalent, [c for c in report.checks if not c.passed]
    weight_summary = report.checks[0]
    assert weight_summary.passed and weight_summary.max_abs > 0


def test_untouched_tensor_change_is_caught(merged_llama, tmp_path):
    base, adapter, merged, _ = merged_llama
    bad = tmp_path / "bad"
    shutil.copytree(merged, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].clone()
    tensors["model.norm.weight"][0] = torch.nextafter(tensors["model.norm.weight"][0], torch.tensor(9.0))
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    report = verify(base, adapter, merged_dir=bad)
    assert any("model.norm.weight" in c.name for c in report.failures())


def test_verify_bad_input(merged_llama, tmp_path):
    base, adapter, merged, _ = merged_llama
    for args, word in [
        (("verify", base, adapter), "nothing to verify"),
        (("verify", base, adapter, "--onnx", tmp_path / "missing.onnx"), "not found"),
        (("verify", base, tmp_path / "nope", "--merged", merged), "nope"),
    ]:
        result = cli(*args)
        assert result.exit_code == 2, result.output
        assert result.stderr.count("\n") == 1 and word in result.stderr


def test_cli_basics(reference, tmp_path):
    from lora_deploy import __version__

    assert __version__ in cli("--version").output
    for command in ("inspect", "merge", "verify", "export", "bench", "demo"):
        assert cli(command, "--help").exit_code == 0
    base, adapter = reference("llama", "patterns")
    info = json.loads(cli("inspect", adapter, "--base", base, "--json").output)
    v_proj = [m for m in info["modules"] if m["module"].endswith("v_proj")]
    assert v_proj and all(m["r"] == 4 and m["scaling"] == pytest.approx(16 / 4) for m in v_proj)
    assert 0 < info["trainable_fraction"] < 1
    manifest = json.loads(cli("merge", base, adapter, "-o", tmp_path / "m", "--json").output)
    assert manifest["output"]["blake3"]


def test_modules_to_save_on_a_tied_embedding(tmp_path):
    """GPT-2 with modules_to_save=["wte"]: PEFT swaps the input embedding only; the tied
    lm_head keeps W0. Our merge writes lm_head untied; verify's reference must agree."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.oracle import load_model, logits_of, peft_model, token_batch

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0))
    model.save_pretrained(tmp_path / "base")
    lora = get_peft_model(
        model,
        LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=["c_attn"],
            fan_in_fan_out=True,
            modules_to_save=["wte"],
            init_lora_weights=False,
        ),
    )
    with torch.no_grad():
        lora.base_model.model.transformer.wte.modules_to_save["default"].weight.add_(0.5)
    lora.save_pretrained(tmp_path / "adapter")

    merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    batch = token_batch(64)
    torch.testing.assert_close(
        logits_of(load_model(tmp_path / "out"), batch),
        logits_of(peft_model(tmp_path / "base", tmp_path / "adapter"), batch),
        atol=1e-5,
        rtol=1e-4,
    )
    report = verify(tmp_path / "base", tmp_path / "adapter", merged_dir=tmp_path / "out")
    assert report.equivalent, [c for c in report.checks if not c.passed]


def test_float16_onnx_is_checked_with_half_precision_tolerances(merged_llama, tmp_path):
    base, adapter, merged, _ = merged_llama
    half = tmp_path / "half.onnx"
    export_checkpoint(merged, half, dtype="float16")
    report = verify(base, adapter, onnx_path=half)
    assert report.equivalent, [c for c in report.checks if not c.passed]
    assert report.checks[-1].atol == pytest.approx(2e-2)


def test_a_file_that_is_not_onnx_is_bad_input(merged_llama):
    base, adapter, merged, _ = merged_llama
    result = cli("verify", base, adapter, "--onnx", merged / "config.json")
    assert result.exit_code == 2 and "not an ONNX model" in result.stderr


def test_a_merged_graph_given_as_dynamic_names_the_cli_export(merged_llama):
    """A graph without LoRA inputs is not a dynamic-adapter graph: the one line names the
    command that makes one, not a Python function."""
    base, adapter, _, onnx_path = merged_llama
    result = cli("verify", base, adapter, "--dynamic", onnx_path)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "not a dynamic-adapter graph (export one with lora-deploy export onnx --dynamic-adapters)" in result.stderr


def test_an_ort_error_without_a_message_is_still_one_line(monkeypatch, tmp_path):
    """ONNX Runtime errors reach the user as their first line; one with no message at all
    is named by its type (not an IndexError from an empty list of lines)."""
    from lora_deploy.backends.onnxrt import gpu
    from lora_deploy.errors import BadInputError
    from lora_deploy.proof.verify import run_onnx_with_polygraphy

    def failing(choice, path):
        raise RuntimeError()

    monkeypatch.setattr(gpu, "open_session", failing)
    with pytest.raises(BadInputError, match=r"cannot run it on the sample inputs \(RuntimeError\)$"):
        run_onnx_with_polygraphy(tmp_path / "model.onnx", [{}])
