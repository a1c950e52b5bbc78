"""Task switching from the command line: export --dynamic-adapters / --multi-adapter, pack,
and verify both graphs against the unmerged reference (transformers + the adapter)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lora_deploy.cli import main


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def graphs(reference, tmp_path_factory):
    base, plain = reference("llama", "plain")
    _, rslora = reference("llama", "patterns")  # other ranks per module, same targets
    work = tmp_path_factory.mktemp("graphs")
    result = cli(
        "export",
        "onnx",
        base,
        "-o",
        work / "dynamic.onnx",
        "--dynamic-adapters",
        "--adapter",
        plain,
        "--adapter",
        rslora,
        "--json",
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    result = cli(
        "export", "onnx", base, "-o", work / "multi.onnx", "--multi-adapter", "--adapter", plain, "--adapter", rslora
    )
    assert result.exit_code == 0, result.output
    return base, plain, rslora, work, info


def test_dynamic_graph_names_follow_onnxruntime_convention(graphs):
    import onnxruntime as ort

    _, _, _, work, info = graphs
    session = ort.InferenceSession(str(work / "dynamic.onnx"), providers=["CPUExecutionProvider"])
    overridable = {i.name for i in session.get_overridable_initializers()}
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in overridable
    assert set(info["lora_inputs"]) <= overridable
    assert {i.name for i in session.get_inputs()} == {"input_ids", "attention_mask"}


@pytest.mark.parametrize("which", ["plain", "rslora"])
def test_pack_and_verify_each_adapter(graphs, which, tmp_path):
    base, plain, rslora, work, _ = graphs
    adapter = plain if which == "plain" else rslora
    packed = tmp_path / f"{which}.onnx_adapter"
    result = cli("pack", adapter, "-o", packed, "--onnx", work / "dynamic.onnx")
    assert result.exit_code == 0, result.output
    result = cli(
        "verify",
        base,
        adapter,
        "--dynamic",
        work / "dynamic.onnx",
        "--packed",
        packed,
        "--multi",
        work / "multi.onnx",
        "--batch",
        "3",
        "--report",
        tmp_path / "r.json",
    )
    assert result.exit_code == 0, result.output
    checks = json.loads((tmp_path / "r.json").read_text())["checks"]
    names = " ".join(c["name"] for c in checks)
    for part in ("dynamic (adapter active)", "dynamic (no adapter)", "multi (adapter_ids", "mixed batch row 2"):
        assert part in names


def test_wrong_adapter_file_is_not_equivalent(graphs, tmp_path):
    base, plain, rslora, work, _ = graphs
    packed = tmp_path / "other.onnx_adapter"
    assert cli("pack", rslora, "-o", packed, "--onnx", work / "dynamic.onnx").exit_code == 0
    result = cli("verify", base, plain, "--dynamic", work / "dynamic.onnx", "--packed", packed)
    assert result.exit_code == 1
    assert "dynamic (adapter active)" in result.stderr


def test_pack_refuses_adapter_for_another_base(graphs, reference, tmp_path):
    _, _, _, work, _ = graphs
    _, gpt2_adapter = reference("gpt2", "plain")
    out = tmp_path / "x.onnx_adapter"
    result = cli("pack", gpt2_adapter, "-o", out, "--onnx", work / "dynamic.onnx")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {gpt2_adapter}: module transformer.h.0.attn.c_attn has no LoRA input")
    assert "adapter for another base" in result.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_dynamic_export_refuses_dora_and_bad_flags(reference, tmp_path):
    base, dora = reference("llama", "dora")
    out = tmp_path / "d.onnx"
    result = cli("export", "onnx", base, "-o", out, "--dynamic-adapters", "--adapter", dora)
    assert result.exit_code == 2 and "additive low-rank" in result.stderr
    for flags, message in [
        (["--dynamic-adapters"], "error: --dynamic-adapters needs --adapter ADAPTER or --targets"),
        (["--multi-adapter"], "error: --multi-adapter needs at least one --adapter"),
        (["--targets", "q_proj"], "error: --adapter and --targets need --dynamic-adapters or --multi-adapter"),
    ]:
        result = cli("export", "onnx", base, "-o", out, *flags)
        assert result.exit_code == 2 and result.stderr.startswith(message), (flags, result.stderr)
        assert result.stderr.count("\n") == 1
    assert not list(tmp_path.iterdir())
