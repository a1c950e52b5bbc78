"""The switch for the compiled kernels (lora_deploy._native): LORA_DEPLOY_NATIVE=0 and the
words users write for "off" all run the numpy code (only "0" did: false/off ran native)."""

from __future__ import annotations

import pytest

from lora_deploy._native import enabled


@pytest.mark.parametrize("value", ["0", "false", "False", "no", "OFF", " off "])
def test_off_words_switch_the_kernels_off(value, monkeypatch):
    monkeypatch.setenv("LORA_DEPLOY_NATIVE", value)
    assert not enabled()


@pytest.mark.parametrize("value", ["1", "true", "yes", "on", ""])
def test_other_values_leave_them_on(value, monkeypatch):
    monkeypatch.setenv("LORA_DEPLOY_NATIVE", value)
    assert enabled()
    monkeypatch.delenv("LORA_DEPLOY_NATIVE")
    assert enabled()


def test_version_names_both_kernels_and_follows_the_switch(monkeypatch):
    from click.testing import CliRunner

    from lora_deploy._native import kernel
    from lora_deploy.cli import main

    monkeypatch.setenv("LORA_DEPLOY_NATIVE", "0")
    off = CliRunner().invoke(main, ["--version"]).output
    assert "float16 kernels: numpy" in off and "NF4/FP4 kernel (merge --onto): numpy" in off
    monkeypatch.setenv("LORA_DEPLOY_NATIVE", "1")
    on = CliRunner().invoke(main, ["--version"]).output
    q4 = kernel("_quant4")
    expected = f"native ({q4.ISA})" if q4 is not None and q4.BEST_ISA > 0 else "numpy"
    assert f"NF4/FP4 kernel (merge --onto): {expected}" in on
    assert ("float16 kernels: native" in on) == (kernel("_f16") is not None)
