"""A float16 merge by the compiled float16 kernels (lora_deploy/_native/f16.c) and by the
numpy passes (LORA_DEPLOY_NATIVE=0) writes the same bytes."""

from __future__ import annotations

import json

import pytest

from lora_deploy._native import kernel
from lora_deploy.arrays import float16_kernel
from lora_deploy.merge.streaming import MANIFEST_FILE, merge


@pytest.mark.parametrize("family,variant", [("llama", "plain"), ("gpt2", "embedding"), ("bert", "all_linear")])
def test_native_and_numpy_float16_merges_are_byte_identical(reference, tmp_path, monkeypatch, family, variant):
    if kernel("_f16") is None:
        pytest.skip("lora_deploy._native._f16 is not built (no C compiler at install)")
    base, adapter = reference(family, variant, dtype="float16")
    outputs = {}
    for path, env in (("native", "1"), ("numpy", "0")):
        monkeypatch.setenv("LORA_DEPLOY_NATIVE", env)
        assert float16_kernel().startswith(path)
        merge(base, adapter, tmp_path / path)
        outputs[path] = tmp_path / path
    native, numpy_ = (sorted(p.name for p in outputs[k].iterdir()) for k in ("native", "numpy"))
    assert native == numpy_ and any(name.endswith(".safetensors") for name in native)
    for name in native:
        if name.endswith(".safetensors"):
            assert (outputs["native"] / name).read_bytes() == (outputs["numpy"] / name).read_bytes(), name
    digests = [json.loads((outputs[k] / MANIFEST_FILE).read_text())["output"]["blake3"] for k in ("native", "numpy")]
    assert digests[0] == digests[1]
