"""The merge never writes a NaN or Inf its input does not hold: a --dtype conversion that
overflows is refused naming the tensor; a base tensor's own NaN/Inf is copied as it is
when the tensor is only copied or converted, and refused, as the base's, when a merged or
quantized weight would be computed from it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from lora_deploy.cli import main

Q, U, NORM = "model.layers.0.q_proj.weight", "model.layers.0.u_proj.weight", "model.norm.weight"


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tiny(tmp_path, edit):
    """A base with a targeted Linear (q_proj), an untargeted one (u_proj) and a norm, all
    float32, edited by `edit(tensors)`; and a rank-2 LoRA adapter on q_proj."""
    rng = np.random.default_rng(0)
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    tensors = {
        Q: (rng.standard_normal((8, 64)) * 0.05).astype(np.float32),
        U: (rng.standard_normal((8, 64)) * 0.05).astype(np.float32),
        NORM: np.ones(7, np.float32),
    }
    edit(tensors)
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    prefix = "base_model.model.model.layers.0.q_proj"
    lora = {
        f"{prefix}.lora_A.weight": (rng.standard_normal((2, 64)) * 0.1).astype(np.float32),
        f"{prefix}.lora_B.weight": (rng.standard_normal((8, 2)) * 0.1).astype(np.float32),
    }
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return base, adapter


def set_value(name, value, index=(1, 1)):
    def edit(tensors):
        tensors[name][index[: tensors[name].ndim]] = value

    return edit


def assert_refused(result, out, *words):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists()


@pytest.mark.parametrize("onto", [(), ("--onto", "nf4")])
@pytest.mark.parametrize("name", [NORM, U])
def test_a_dtype_conversion_that_overflows_is_refused_naming_the_tensor(tmp_path, name, onto):
    """1e6 is beyond float16's range: converting an untargeted tensor made it Inf, written
    with exit 0 (the targeted path was already refused)."""
    base, adapter = tiny(tmp_path, set_value(name, 1e6))
    out = tmp_path / "out"
    result = run_cli("merge", base, adapter, "-o", out, "--dtype", "float16", *onto)
    assert_refused(result, out, name, "float16")
    if not onto:
        assert "range" in result.stderr


def test_a_base_tensors_own_nan_and_inf_are_copied_as_they_are(tmp_path):
    """Not made up by the merge: kept at their places through the conversion to float16."""

    def edit(tensors):
        tensors[NORM][1] = np.nan
        tensors[NORM][2] = -np.inf
        tensors[U][3, 4] = np.inf

    base, adapter = tiny(tmp_path, edit)
    source = load_file(str(base / "model.safetensors"))
    out = tmp_path / "out"
    result = run_cli("merge", base, adapter, "-o", out, "--dtype", "float16")
    assert result.exit_code == 0, result.output
    written = load_file(str(out / "model.safetensors"))
    for name in (NORM, U):
        assert written[name].dtype == np.float16
        np.testing.assert_array_equal(written[name], source[name].astype(np.float16))  # NaN equal to NaN


@pytest.mark.parametrize(
    ("name", "value", "options"),
    [
        (Q, np.nan, ()),
        (Q, np.inf, ("--dtype", "float16")),
        (Q, np.nan, ("--onto", "nf4")),
        (U, np.nan, ("--onto", "nf4")),  # untargeted, but quantized with --onto
    ],
)
def test_a_weight_computed_from_a_non_finite_base_tensor_is_refused_as_the_bases(tmp_path, name, value, options):
    """It was said to be a merged tensor's overflow in the output dtype."""
    base, adapter = tiny(tmp_path, set_value(name, value))
    out = tmp_path / "out"
    result = run_cli("merge", base, adapter, "-o", out, *options)
    assert_refused(result, out, f"base tensor {name} already holds NaN or Inf")
    assert "overflow" not in result.stderr
