"""verify's ONNX Runtime GPU options (--device, --provider, --trt-fp16, --trt-cache) are
VerifyOptions fields that every verify entry point takes: the output check uses them, and
--generate, --genai and --module, which run on the CPU, refuse them in one line before
reading anything (they used to drop --provider and the --trt-* flags silently)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from lora_deploy.cli import main
from lora_deploy.errors import BadInputError
from lora_deploy.proof.genai import verify_genai
from lora_deploy.proof.generate import verify_generation
from lora_deploy.proof.plain import verify_module

GPU_OPTIONS = [["--device", "cuda"], ["--provider", "tensorrt"], ["--trt-fp16"], ["--trt-cache", "cache"]]


@pytest.mark.parametrize("gpu", GPU_OPTIONS, ids=lambda flags: flags[0])
@pytest.mark.parametrize(
    "mode, what",
    [
        (["--generate", "2"], "--generate"),
        (["--generate", "2", "--genai", "g"], "--genai"),
        (["--module", "m:f"], "--module"),
    ],
    ids=["generate", "genai", "module"],
)
def test_cpu_only_checks_refuse_the_gpu_options(mode, what, gpu, tmp_path):
    (tmp_path / "adapter").mkdir()
    args = ["verify", str(tmp_path / "base"), str(tmp_path / "adapter"), "--merged", str(tmp_path / "merged")]
    result = CliRunner().invoke(main, [*args, *mode, *gpu], catch_exceptions=False)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert f"{what} runs on the CPU: drop --device, --provider, --trt-fp16 and --trt-cache" in result.stderr
    assert not (tmp_path / "cache").exists()


def test_the_api_refuses_them_before_reading_anything(tmp_path):
    missing = tmp_path / "missing"  # nothing exists: the refusal comes first
    for call in [
        lambda: verify_generation(missing, missing, 2, device="cuda"),
        lambda: verify_genai(missing, missing, missing, 2, trt_fp16=True),
        lambda: verify_module(missing, missing, module="m:f", onnx_path=missing, provider="cuda"),
    ]:
        with pytest.raises(BadInputError, match="runs on the CPU"):
            call()
