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


def test_demo_without_peft_says_how_to_install_it(tmp_path):
    """peft is imported lazily by the reference models, so only an explicit check can catch
    its absence before the run; simulated here by blocking the import in a fresh process."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['peft'] = None\n"
        "from lora_deploy.cli import main\n"
        f"main(['demo', '-o', {str(tmp_path / 'demo')!r}])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "pip install 'lora-deploy[reference]'" in result.stderr
    assert "unexpected" not in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "demo").exists()  # refused before any work
