"""The README's main command: the whole deploy path on a built-in reference model."""

from __future__ import annotations

from click.testing import CliRunner

from lora_deploy.cli import main


def test_demo_runs_every_stage(tmp_path):
    result = CliRunner().invoke(
        main, ["demo", "-o", str(tmp_path / "demo"), "--family", "gpt2", "--variant", "embedding"]
    )
    assert result.exit_code == 0, result.output + str(result.exception)
    for stage in ("merge", "verify merged", "export ONNX", "verify ONNX in ONNX Runtime"):
        assert stage in result.output
    assert (tmp_path / "demo" / "merged" / "merge-manifest.json").exists()
    assert (tmp_path / "demo" / "merged.onnx").exists()
