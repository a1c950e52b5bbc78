"""`lora-deploy analyze` against dense numpy on PEFT's own updates (get_delta_weight) and the
base weights transformers loads: singular values, energy, ‖ΔW‖/‖W0‖, the amplification
factor, and φ between two adapters."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from lora_deploy.cli import main
from lora_deploy.examples import models as ref
from tests.lora_factory import peft_deltas, random_adapter
from tests.oracle import load_model


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    llama = ref.build_base("llama", root / "llama")
    gpt2 = ref.build_base("gpt2", root / "gpt2")
    adapters = {
        "r8": random_adapter(llama, root / "r8", 1, r=8, lora_alpha=16, rank_pattern={"v_proj": 4}),
        "r4": random_adapter(llama, root / "r4", 2, targets=("q_proj", "k_proj"), r=4, lora_alpha=8, use_rslora=True),
        # GPT-2's Conv1D stores weights [in, out]: the layout the spectra must not depend on.
        "gpt2": random_adapter(gpt2, root / "g", 3, targets=("c_attn",), r=6, lora_alpha=12, fan_in_fan_out=True),
    }
    return {"llama": llama, "gpt2": gpt2}, adapters


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def analyze(*args) -> dict:
    result = run_cli("analyze", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def dense_svd(delta: np.ndarray):
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    return u, s, vt.T


@pytest.mark.parametrize("base_name, adapter_name", [("llama", "r8"), ("llama", "r4"), ("gpt2", "gpt2")])
def test_spectra_and_base_measures_match_dense(lab, base_name, adapter_name):
    bases, adapters = lab
    base, adapter = bases[base_name], adapters[adapter_name]
    report = analyze(adapter, "--base", base)
    deltas = peft_deltas(base, adapter)
    weights = {k: v.double().numpy() for k, v in load_model(base).state_dict().items()}
    assert {m["module"] for m in report["modules"]} == set(deltas)
    for m in report["modules"]:
        delta = deltas[m["module"]]  # the base weight's layout, as PEFT computes it
        w0 = weights[m["module"] + ".weight"]
        u, s, v = dense_svd(delta)
        q = len(m["singular_values"])
        np.testing.assert_allclose(m["singular_values"], s[:q], rtol=1e-5, atol=1e-6 * s[0])
        assert m["norm"] == pytest.approx(np.linalg.norm(delta), rel=1e-6)
        energy = np.cumsum(s[:q] ** 2) / np.sum(s**2)
        np.testing.assert_allclose(m["energy"], energy, rtol=1e-5)
        assert m["rank_for_energy"] == int(np.argmax(energy >= 0.99 - 1e-9)) + 1
        assert m["base_norm"] == pytest.approx(np.linalg.norm(w0), rel=1e-6)
        assert m["relative_norm"] == pytest.approx(np.linalg.norm(delta) / np.linalg.norm(w0), rel=1e-5)
        projected = np.linalg.norm(u[:, :q].T @ w0 @ v[:, :q])
        assert m["projected_base_norm"] == pytest.approx(projected, rel=1e-4)
        assert m["amplification"] == pytest.approx(np.linalg.norm(delta) / projected, rel=1e-4)
    summary = report["summary"]
    # float32 factors: A [r, in] and B [out, r]
    assert summary["factor_bytes"] == sum(4 * m["r"] * sum(deltas[m["module"]].shape) for m in report["modules"])
    assert summary["uniform_rank"] == max(m["rank_for_energy"] for m in report["modules"])


def test_compare_gives_phi_of_the_dense_singular_vectors(lab):
    bases, adapters = lab
    report = analyze(adapters["r8"], "--compare", adapters["r4"])
    mine, theirs = peft_deltas(bases["llama"], adapters["r8"]), peft_deltas(bases["llama"], adapters["r4"])
    compared = report["compare"]
    assert sorted(m["module"] for m in compared["modules"]) == sorted(set(mine) & set(theirs))  # the q_proj ones
    assert compared["only_here"] and compared["only_there"]  # v_proj here, k_proj there
    for m in compared["modules"]:
        v1, v2 = dense_svd(mine[m["module"]])[2][:, :8], dense_svd(theirs[m["module"]])[2][:, :4]
        phi = np.asarray(m["phi"])
        assert phi.shape == (8, 4)
        for i, j in [(1, 1), (3, 2), (8, 4)]:
            want = np.linalg.norm(v1[:, :i].T @ v2[:, :j]) ** 2 / min(i, j)
            assert phi[i - 1, j - 1] == pytest.approx(want, abs=1e-5)
        assert m["phi_full"] == pytest.approx(phi[-1, -1], abs=1e-6)  # phi is rounded to 6 digits


def test_text_summary_fits_a_screen_and_names_the_savings(lab):
    bases, adapters = lab
    result = run_cli("analyze", adapters["r8"], "--base", bases["llama"], "--compare", adapters["r4"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) < 25
    assert any("model.layers.*.self_attn.q_proj" in line for line in lines)
    assert any(line.startswith("at 99% energy") and "saves" in line for line in lines)
    assert any("subspace similarity" in line for line in lines)


def test_plot_is_written(lab, tmp_path):
    pytest.importorskip("matplotlib")
    bases, adapters = lab
    out = tmp_path / "spectra.png"
    result = run_cli("analyze", adapters["r8"], "--compare", adapters["r4"], "--plot", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = run_cli("analyze", adapters["r8"], "--plot", out)
    assert again.exit_code == 2 and "--overwrite" in again.stderr


def test_plot_without_matplotlib_is_one_line_naming_it(lab, tmp_path, monkeypatch):
    _, adapters = lab
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = tmp_path / "spectra.png"
    result = run_cli("analyze", adapters["r8"], "--plot", out)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "matplotlib" in lines[0]
    assert not out.exists()


def test_compare_with_nothing_in_common_is_refused(lab, tmp_path):
    _, adapters = lab
    result = run_cli("analyze", adapters["r8"], "--compare", adapters["gpt2"])
    assert result.exit_code == 2 and "no module" in result.stderr, result.output
