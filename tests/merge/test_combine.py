"""compress and combine against PEFT: the updates of the written adapters, as PEFT loads
and computes them (get_delta_weight), equal the dense formula computed here in float64
from PEFT's updates of the inputs; where PEFT's add_weighted_adapter is exact (cat, svd,
ties_svd) it agrees with ours, and where it is not (linear) the difference is shown."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from lora_deploy.cli import main
from lora_deploy.examples import models as ref
from tests.lora_factory import lora_layers, peft_deltas, random_adapter, read_factors
from tests.oracle import load_model, logits_of, peft_model, token_batch

WEIGHTS = (0.7, 0.3)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A tiny llama base and random adapters: different ranks, alphas, rsLoRA, patterns, targets."""
    root = tmp_path_factory.mktemp("combine")
    base = ref.build_base("llama", root / "base")
    adapters = {
        "a1": random_adapter(base, root / "a1", 1, r=8, lora_alpha=16),
        "a2": random_adapter(base, root / "a2", 2, targets=("q_proj", "k_proj"), r=4, lora_alpha=8, use_rslora=True),
        "a3": random_adapter(base, root / "a3", 3, r=8, lora_alpha=32),
        "pat": random_adapter(
            base,
            root / "pat",
            4,
            r=8,
            lora_alpha=16,
            rank_pattern={"v_proj": 4},
            alpha_pattern={"layers.1.self_attn.q_proj": 32},
        ),
    }
    deltas = {name: peft_deltas(base, path) for name, path in adapters.items()}
    return base, adapters, deltas


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args) -> dict:
    result = run_cli(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_bad_input(result, out: Path, *words):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def rel(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def with_deltas(base: Path, deltas: dict[str, np.ndarray]):
    """The base model with W0 + ΔW written into the named Linear weights."""
    model = load_model(base)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = modules[name].weight
            weight.copy_((weight.double() + torch.from_numpy(delta)).float())
    return model


def best_rank(delta: np.ndarray, rank: int) -> tuple[np.ndarray, float]:
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank], float(np.sqrt(np.sum(s[rank:] ** 2)))


# ----------------------------------------------------------------------- compress


@pytest.mark.parametrize("name", ["a1", "a2", "pat"])
def test_compress_error_is_the_discarded_singular_values(lab, tmp_path, name):
    base, adapters, deltas = lab
    report = ok("compress", adapters[name], "-o", tmp_path / "out", "--rank", 3)
    after = peft_deltas(base, tmp_path / "out")
    rows = {m["module"]: m for m in report["modules"]}
    assert set(after) == set(deltas[name])
    for module, before in deltas[name].items():
        _, bound = best_rank(before, 3)
        actual = float(np.linalg.norm(before - after[module]))
        scale = np.linalg.norm(before)
        assert abs(rows[module]["error"] - bound) <= 1e-6 * scale
        assert abs(actual - bound) <= 2e-6 * scale, (module, actual, bound)
        assert abs(rows[module]["measured_error"] - actual) <= 2e-6 * scale
    factors = read_factors(tmp_path / "out")
    assert {t.shape[0] for k, t in factors.items() if "lora_A" in k} == {3}


def test_compressed_adapter_in_peft_computes_base_plus_best_rank_update(lab, tmp_path):
    base, adapters, deltas = lab
    ok("compress", adapters["pat"], "-o", tmp_path / "out", "--rank", 2)
    truncated = {m: best_rank(d, 2)[0] for m, d in deltas["pat"].items()}
    batch = token_batch(ref.VOCAB_SIZE)
    got = logits_of(peft_model(base, tmp_path / "out"), batch)
    want = logits_of(with_deltas(base, truncated), batch)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("per_module", [True, False])
def test_compress_energy_keeps_the_smallest_rank_holding_it(lab, tmp_path, per_module):
    base, adapters, deltas = lab
    flags = ["--per-module"] if per_module else []
    report = ok("compress", adapters["a1"], "-o", tmp_path / "out", "--energy", 0.9, *flags)
    needed = {}
    for module, delta in deltas["a1"].items():
        energy = np.cumsum(np.linalg.svd(delta, compute_uv=False) ** 2)
        needed[module] = int(np.argmax(energy / energy[-1] >= 0.9)) + 1
    ranks = {m["module"]: m["rank"] for m in report["modules"]}
    assert ranks == (needed if per_module else dict.fromkeys(needed, max(needed.values())))
    if per_module:  # per-module ranks go through rank_pattern, as PEFT reads it
        factors = read_factors(tmp_path / "out")
        peft = lora_layers(peft_model(base, tmp_path / "out"))
        for module, r in ranks.items():
            assert factors[f"base_model.model.{module}.lora_A.weight"].shape[0] == r
            assert peft[module].r["default"] == r and peft[module].scaling["default"] == 1.0


def test_compress_carries_modules_to_save_unchanged(lab, tmp_path):
    base, _, _ = lab
    src = random_adapter(base, tmp_path / "src", 5, r=4, lora_alpha=4, modules_to_save=["lm_head"])
    report = ok("compress", src, "-o", tmp_path / "out", "--rank", 2)
    before, after = read_factors(src), read_factors(tmp_path / "out")
    kept = [k for k in before if "lora_" not in k]
    assert kept and report["carried"] == sorted(kept)
    for key in kept:
        np.testing.assert_array_equal(after[key], before[key])
    batch = token_batch(ref.VOCAB_SIZE)
    peft_model(base, tmp_path / "out")(**batch)  # PEFT loads it


# ----------------------------------------------------------------------- combine


def exact_sum(deltas: dict, names: tuple[str, ...], weights=WEIGHTS) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, w in zip(names, weights):
        for module, delta in deltas[name].items():
            out[module] = out.get(module, 0) + w * delta
    return out


@pytest.mark.parametrize("method", ["linear", "cat"])
def test_linear_and_cat_are_the_exact_weighted_sum(lab, tmp_path, method):
    base, adapters, deltas = lab
    # Different ranks (8, 4), alphas, rsLoRA on one, and targets (q,v vs q,k).
    out = tmp_path / "out"
    report = ok("combine", adapters["a1"], adapters["a2"], "-o", out, "--weights", "0.7,0.3", "--method", method)
    want = exact_sum(deltas, ("a1", "a2"))
    got = peft_deltas(base, out)
    assert set(got) == set(want)
    for module in want:
        assert rel(got[module], want[module]) < 1e-6, module
    ranks = {m["module"]: m["rank"] for m in report["modules"]}
    assert ranks["model.layers.0.self_attn.q_proj"] == 12 and ranks["model.layers.0.self_attn.v_proj"] == 8
    assert report["exact"] and report["max_relative_error"] == 0
    batch = token_batch(ref.VOCAB_SIZE)
    torch.testing.assert_close(
        logits_of(peft_model(base, out), batch), logits_of(with_deltas(base, want), batch), atol=1e-4, rtol=1e-4
    )


@pytest.fixture(scope="module")
def peft_weighted(lab):
    """PEFT's add_weighted_adapter of a1 and a3 (same rank and targets, alphas 16 and 32)."""
    base, adapters, _ = lab
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base), adapters["a1"], adapter_name="a1")
    model.load_adapter(adapters["a3"], adapter_name="a3")
    for kind, extra in (("cat", {}), ("linear", {}), ("svd", {"svd_rank": 6}), ("ties_svd", {"svd_rank": 8})):
        if kind == "ties_svd":
            extra["density"] = 0.3
        model.add_weighted_adapter(["a1", "a3"], list(WEIGHTS), kind, combination_type=kind, **extra)
    with torch.no_grad():
        return {
            kind: {n: layer.get_delta_weight(kind).double().numpy() for n, layer in lora_layers(model).items()}
            for kind in ("cat", "linear", "svd", "ties_svd")
        }


def test_peft_cat_matches_ours_and_peft_linear_carries_cross_terms(lab, tmp_path, peft_weighted):
    base, adapters, deltas = lab
    ok("combine", adapters["a1"], adapters["a3"], "-o", tmp_path / "out", "--weights", "0.7,0.3", "--method", "linear")
    ours = peft_deltas(base, tmp_path / "out")
    want = exact_sum(deltas, ("a1", "a3"))
    for module in want:
        assert rel(ours[module], want[module]) < 1e-6
        assert rel(peft_weighted["cat"][module], want[module]) < 1e-6
        # PEFT's linear weights A and B separately: (Σ√c A)(Σ√c B) has cross terms B1 A2, B2 A1.
        assert rel(peft_weighted["linear"][module], want[module]) > 0.3, module


def test_svd_matches_peft_svd(lab, tmp_path, peft_weighted):
    base, adapters, deltas = lab
    report = ok(
        "combine", adapters["a1"], adapters["a3"], "-o", tmp_path / "out", "--weights", "0.7,0.3", "--method", "svd",
        "--rank", 6,
    )  # fmt: skip
    ours = peft_deltas(base, tmp_path / "out")
    rows = {m["module"]: m for m in report["modules"]}
    for module, exact in exact_sum(deltas, ("a1", "a3")).items():
        best, bound = best_rank(exact, 6)
        assert rel(ours[module], best) < 1e-5
        assert rel(peft_weighted["svd"][module], best) < 1e-4
        assert abs(rows[module]["error"] - bound) <= 1e-6 * np.linalg.norm(exact)
        assert abs(np.linalg.norm(exact - ours[module]) - bound) <= 2e-6 * np.linalg.norm(exact)


def dense_ties(deltas: list[np.ndarray], weights, density: float) -> np.ndarray:
    """TIES as the paper states it, entry by entry in plain numpy."""
    trimmed = []
    for d in deltas:
        keep = int(density * d.size)
        threshold = np.sort(np.abs(d).ravel())[::-1][keep - 1]
        trimmed.append(np.where(np.abs(d) >= threshold, d, 0.0))
    sign = np.where(sum(trimmed) >= 0, 1.0, -1.0)
    total, count = np.zeros_like(deltas[0]), np.zeros_like(deltas[0])
    for t, w in zip(trimmed, weights):
        agree = np.sign(t) == sign
        total += np.where(agree, w * t, 0.0)
        count += agree
    return total / np.maximum(count, 1)


def test_ties_matches_the_paper_and_peft_ties_svd(lab, tmp_path, peft_weighted):
    base, adapters, deltas = lab
    report = ok(
        "combine", adapters["a1"], adapters["a3"], "-o", tmp_path / "out", "--weights", "0.7,0.3", "--method", "ties",
        "--density", 0.3, "--rank", 8,
    )  # fmt: skip
    ours = peft_deltas(base, tmp_path / "out")
    rows = {m["module"]: m for m in report["modules"]}
    for module in deltas["a1"]:
        merged = dense_ties([deltas["a1"][module], deltas["a3"][module]], WEIGHTS, 0.3)
        best, bound = best_rank(merged, 8)
        assert rel(ours[module], best) < 1e-5, module
        assert rel(peft_weighted["ties_svd"][module], best) < 1e-4, module
        assert abs(rows[module]["error"] - bound) <= 1e-6 * np.linalg.norm(merged)


def test_dare_is_seeded_and_exact_at_full_rank(lab, tmp_path):
    base, adapters, deltas = lab
    runs = {}
    for label, seed in (("x", 1), ("y", 1), ("z", 2)):
        out = tmp_path / label
        runs[label] = ok(
            "combine", adapters["a1"], adapters["a3"], "-o", out, "--weights", "0.7,0.3", "--method", "dare",
            "--density", 0.5, "--seed", seed, "--rank", 64,
        )  # fmt: skip
    x, y, z = (read_factors(tmp_path / label) for label in "xyz")
    assert all(np.array_equal(x[k], y[k]) for k in x)
    assert any(not np.array_equal(x[k], z[k]) for k in x)
    # At full rank nothing is discarded: each entry is 0 or a kept (rescaled) sum of terms.
    got = peft_deltas(base, tmp_path / "x")
    errors = {m["module"]: m["error"] for m in runs["x"]["modules"]}
    for module, d in got.items():
        assert errors[module] < 1e-9 * np.linalg.norm(d)
        terms = [w * deltas[n][module] / 0.5 for n, w in zip(("a1", "a3"), WEIGHTS)]
        candidates = np.stack([np.zeros_like(d), terms[0], terms[1], terms[0] + terms[1]])
        nearest = np.min(np.abs(candidates - d), axis=0)
        assert np.all(nearest <= 1e-5 * np.abs(d).max() + 1e-6), module


# ----------------------------------------------------------------------- bad input


def edit_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def copy(adapter: Path, to: Path) -> Path:
    shutil.copytree(adapter, to)
    return to


def test_adapters_for_different_bases_are_refused(lab, tmp_path):
    _, adapters, _ = lab
    other = copy(adapters["a3"], tmp_path / "other")
    edit_config(other, base_model_name_or_path="someone/another-model")
    result = run_cli("combine", adapters["a1"], other, "-o", tmp_path / "out")
    assert_bad_input(result, tmp_path / "out", "share a base", "another-model")


def test_incompatible_module_shapes_are_refused_naming_the_module(lab, tmp_path):
    _, adapters, _ = lab
    other = copy(adapters["a3"], tmp_path / "other")
    tensors = load_file(other / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    tensors[key] = tensors[key][:, :32].copy()
    save_file(tensors, other / "adapter_model.safetensors")
    result = run_cli("combine", adapters["a1"], other, "-o", tmp_path / "out")
    assert_bad_input(result, tmp_path / "out", "model.layers.1.self_attn.v_proj")


@pytest.mark.parametrize(
    "args, words",
    [
        (["--weights", "0.7"], ["1 weights for 2 adapters"]),
        (["--weights", "0.7,nope"], ["--weights"]),
        (["--method", "svd", "--rank", 17], ["combined rank 16"]),
        (["--method", "cat", "--rank", 4], ["exact"]),
        (["--method", "ties"], ["--density"]),
        (["--method", "dare", "--density", 1.5], ["--density"]),
    ],
)
def test_bad_combine_options(lab, tmp_path, args, words):
    _, adapters, _ = lab
    result = run_cli("combine", adapters["a1"], adapters["a3"], "-o", tmp_path / "out", *args)
    assert_bad_input(result, tmp_path / "out", *words)


@pytest.mark.parametrize(
    "args, words",
    [
        ([], ["exactly one of --rank and --energy"]),
        (["--rank", 2, "--energy", 0.9], ["exactly one"]),
        (["--rank", 2, "--per-module"], ["--per-module"]),
        (["--energy", 0], ["--energy"]),
        (["--rank", 0], ["--rank"]),
    ],
)
def test_bad_compress_options(lab, tmp_path, args, words):
    _, adapters, _ = lab
    result = run_cli("compress", adapters["a1"], "-o", tmp_path / "out", *args)
    assert_bad_input(result, tmp_path / "out", *words)


def test_non_lora_and_dora_adapters_are_refused(lab, tmp_path):
    base, adapters, _ = lab
    ia3 = copy(adapters["a1"], tmp_path / "ia3")
    edit_config(ia3, peft_type="IA3")
    assert_bad_input(run_cli("compress", ia3, "-o", tmp_path / "out", "--rank", 2), tmp_path / "out", "not LoRA")
    dora = random_adapter(base, tmp_path / "dora", 6, r=4, lora_alpha=8, use_dora=True)
    assert_bad_input(run_cli("compress", dora, "-o", tmp_path / "out", "--rank", 2), tmp_path / "out", "DoRA")
    assert_bad_input(run_cli("combine", adapters["a1"], dora, "-o", tmp_path / "out"), tmp_path / "out", "DoRA")


def test_outputs_never_replace_inputs(lab, tmp_path):
    _, adapters, _ = lab
    a1 = copy(adapters["a1"], tmp_path / "a1")
    before = (a1 / "adapter_model.safetensors").read_bytes()
    for args in (["compress", a1, "-o", a1, "--rank", 2], ["combine", a1, adapters["a3"], "-o", a1, "--overwrite"]):
        result = run_cli(*args)
        assert result.exit_code == 2 and "input" in result.stderr, result.output
    assert (a1 / "adapter_model.safetensors").read_bytes() == before


def test_gpt2_conv1d_embedding_and_rslora_modules(tmp_path):
    """GPT-2's Conv1D (fan_in_fan_out) and an embedding LoRA, rsLoRA on one adapter: the
    factors' layouts survive compress and cat, as PEFT reads them back."""
    base = ref.build_base("gpt2", tmp_path / "base")
    common = {"r": 6, "fan_in_fan_out": True}
    a = random_adapter(base, tmp_path / "a", 1, ("wte", "c_attn", "c_proj"), lora_alpha=12, use_rslora=True, **common)
    b = random_adapter(base, tmp_path / "b", 2, ("wte", "c_attn"), lora_alpha=5, **common)
    ok("compress", a, "-o", tmp_path / "c", "--rank", 2)
    ok("combine", a, b, "-o", tmp_path / "s", "--weights", "0.5,2", "--method", "cat")
    da, db, dc, ds = (peft_deltas(base, tmp_path / n) for n in ("a", "b", "c", "s"))
    assert "transformer.wte" in dc and set(ds) == set(da) | set(db)
    for name, delta in da.items():
        assert rel(dc[name], best_rank(delta, 2)[0]) < 1e-6, name
    for name, got in ds.items():
        assert rel(got, 0.5 * da.get(name, 0) + 2.0 * db.get(name, 0)) < 1e-6, name
