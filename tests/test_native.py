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
