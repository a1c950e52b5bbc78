"""`analyze`: the spectrum of every module's update, what rank it needs, how it relates to
the base weight it changes (with a base) and to another adapter (with --compare).

The math is adapter.spectrum; this module reads the inputs (the adapter whole, the base
one tensor at a time through io.checkpoint's lazy reader), builds the JSON-ready report,
the one-screen summary and the optional plot.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
from threadpoolctl import ThreadpoolController

from lora_deploy.adapter.plan import plan_merge
from lora_deploy.adapter.read import Adapter, LoraModule, load_adapter
from lora_deploy.adapter.spectrum import (
    Spectrum,
    amplification,
    cumulative_energy,
    effective_rank,
    module_spectrum,
    numerical_rank,
    rank_for_energy,
    subspace_similarity,
    to_product_layout,
)
from lora_deploy.errors import BadInputError
from lora_deploy.io.checkpoint import Checkpoint

SCHEMA = "lora-deploy.analyze/1"
# The energy the summary sizes every module for (what `compress --energy` defaults to in the README).
SUMMARY_ENERGY = 0.99


def module_group(name: str) -> str:
    """A module's name with its layer numbers as '*': model.layers.*.self_attn.q_proj."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def factor_bytes(module: LoraModule, rank: int) -> int:
    """Bytes of A and B at `rank`, in the adapter's dtype."""
    b, a = module.b, module.a
    per_rank = b.shape[0] + int(np.prod(a.shape[1:], dtype=np.int64))
    return per_rank * rank * a.dtype.itemsize


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BadInputError(
            "--plot needs the matplotlib package, which is not installed (pip install matplotlib)"
        ) from None


def analyze_adapter(
    adapter_dir: str | os.PathLike,
    base_dir: str | os.PathLike | None = None,
    compare_dir: str | os.PathLike | None = None,
) -> dict:
    """The analysis report (JSON-ready); raises BadInputError on an unusable input.

    One pass over the modules: each spectrum is used (base measures, comparison) and
    dropped, so memory stays the adapter's size plus one module's work.
    """
    adapter = load_adapter(adapter_dir)
    other = load_adapter(compare_dir) if compare_dir is not None else None
    if other is not None and not set(adapter.modules) & set(other.modules):
        raise BadInputError(f"{compare_dir}: shares no module with {adapter.path}; nothing to compare")
    modules, compared = [], []
    # The spectra are r×r SVDs and rank-r thin products: BLAS threads gain nothing there and,
    # spinning between small calls on a busy machine, cost up to 10x (a 64×64 SVD: 2.4 ms vs
    # 30 ms). The base measures' Uᵀ W0 products are large: they keep the threads.
    blas = ThreadpoolController()
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(Checkpoint(base_dir)) if base_dir is not None else None
        targets = {}
        if base is not None:
            targets = {t.module.name: (key, t.kind) for key, t in plan_merge(adapter, base).targets.items()}
        vectors = base is not None or other is not None  # the singular values alone are cheaper
        for name, module in adapter.modules.items():
            with blas.limit(limits=1, user_api="blas"):
                spectrum = module_spectrum(module, vectors)
                entry = module_report(module, spectrum)
                if other is not None and name in other.modules:
                    theirs = module_spectrum(other.modules[name])
                    compared.append(compare_module(name, spectrum, theirs, compare_dir))
            if base is not None:
                entry.update(base_measures(spectrum, base, *targets[name]))
            modules.append(entry)
    report = {
        "schema": SCHEMA,
        "adapter": str(Path(adapter_dir)),
        "variant": adapter.variant,
        "energy": SUMMARY_ENERGY,
        "modules": modules,
    }
    if adapter.config.use_dora:
        report["note"] = "DoRA: the spectra are of the directional update s·B·A; the magnitude vector is not analysed"
    if base_dir is not None:
        report["base"] = str(Path(base_dir))
    if other is not None:
        report["compare"] = {
            "other": str(Path(compare_dir)),
            "subspace": "right singular vectors of s·B·A (input side)",
            "only_here": sorted(set(adapter.modules) - set(other.modules)),
            "only_there": sorted(set(other.modules) - set(adapter.modules)),
            "modules": compared,
        }
    report["summary"] = summarize(adapter, modules)
    return report


def module_report(module: LoraModule, spectrum: Spectrum) -> dict:
    return {
        "module": module.name,
        "shape": list(spectrum.shape),
        "r": module.r,
        "scaling": module.scaling,
        "norm": spectrum.norm,
        "singular_values": spectrum.sigma.tolist(),
        "energy": cumulative_energy(spectrum.sigma).tolist(),
        "effective_rank": effective_rank(spectrum.sigma),
        "numerical_rank": numerical_rank(spectrum),
        "rank_for_energy": rank_for_energy(spectrum.sigma, SUMMARY_ENERGY),
    }


def base_measures(spectrum: Spectrum, base: Checkpoint, key: str, kind: str) -> dict:
    """‖W0‖_F, ‖ΔW‖/‖W0‖ and the amplification factor, from the one base tensor `key`."""
    w0 = to_product_layout(base.read(key), kind)
    if w0.dtype != np.float32:
        w0 = w0.astype(np.float32)
    base_norm = float(np.linalg.norm(w0.astype(np.float64, copy=False)))
    projected, factor = amplification(spectrum, w0)
    return {
        "weight": key,
        "base_norm": base_norm,
        "relative_norm": spectrum.norm / base_norm if base_norm > 0 else None,
        "projected_base_norm": projected,
        "amplification": factor,
    }


def compare_module(name: str, mine: Spectrum, theirs: Spectrum, other_dir) -> dict:
    """φ(i, j) on the right singular vectors of ΔW (the input-side subspace, as the paper's
    A matrices) over each update's nonzero directions."""
    if mine.shape != theirs.shape:
        raise BadInputError(f"{other_dir}: module {name} is {list(theirs.shape)} there but {list(mine.shape)} here")
    q1, q2 = max(1, numerical_rank(mine)), max(1, numerical_rank(theirs))
    phi = subspace_similarity(mine.v[:, :q1], theirs.v[:, :q2])
    return {
        "module": name,
        "ranks": [q1, q2],
        "phi_top1": float(phi[0, 0]),
        "phi_full": float(phi[-1, -1]),
        "phi": np.round(phi, 6).tolist(),
    }


def summarize(adapter: Adapter, modules: list[dict]) -> dict:
    """Per group of modules (layer numbers as '*'): the rank each needs for SUMMARY_ENERGY,
    and the bytes per-module and uniform truncation would save."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for m in modules:
        groups[module_group(m["module"])].append(m)
    rows = []
    for group, members in groups.items():
        needed = [m["rank_for_energy"] for m in members]
        row = {
            "group": group,
            "modules": len(members),
            "r": sorted({m["r"] for m in members}),
            "rank_for_energy_median": float(np.median(needed)),
            "rank_for_energy_max": max(needed),
            "norm_mean": float(np.mean([m["norm"] for m in members])),
        }
        factors = [m["amplification"] for m in members if m.get("amplification") is not None]
        if factors:
            row["amplification_mean"] = float(np.mean(factors))
        rows.append(row)
    now = sum(factor_bytes(adapter.modules[m["module"]], m["r"]) for m in modules)
    per_module = sum(factor_bytes(adapter.modules[m["module"]], m["rank_for_energy"]) for m in modules)
    uniform_rank = max(m["rank_for_energy"] for m in modules)
    uniform = sum(factor_bytes(adapter.modules[m["module"]], min(uniform_rank, m["r"])) for m in modules)
    return {
        "groups": rows,
        "factor_bytes": now,
        "per_module_bytes": per_module,
        "per_module_saved": now - per_module,
        "uniform_rank": uniform_rank,
        "uniform_bytes": uniform,
        "uniform_saved": now - uniform,
    }


def summary_lines(report: dict) -> list[str]:
    """The one-screen text summary."""
    s = report["summary"]
    pct = f"{100 * report['energy']:g}%"
    lines = [f"{report['adapter']}  variant={report['variant']}  modules={len(report['modules'])}"]
    if "note" in report:
        lines.append(f"note: {report['note']}")
    with_base = any("amplification_mean" in g for g in s["groups"])
    header = f"{'modules':<48} {'n':>4} {'r':>7} {'r@' + pct:>10} {'max':>5} {'|dW|':>10}"
    lines.append(header + (f" {'amplif.':>8}" if with_base else ""))
    for g in s["groups"]:
        r = "/".join(str(x) for x in g["r"])
        line = (
            f"{g['group'][-48:]:<48} {g['modules']:>4} {r:>7} {g['rank_for_energy_median']:>10g} "
            f"{g['rank_for_energy_max']:>5} {g['norm_mean']:>10.4g}"
        )
        if with_base:
            line += f" {g['amplification_mean']:>8.3g}" if "amplification_mean" in g else f" {'-':>8}"
        lines.append(line)
    lines.append(
        f"at {pct} energy: per-module ranks keep {mb(s['per_module_bytes'])} of {mb(s['factor_bytes'])} "
        f"(saves {mb(s['per_module_saved'])}); one rank {s['uniform_rank']} for all keeps "
        f"{mb(s['uniform_bytes'])} (saves {mb(s['uniform_saved'])})"
    )
    if "compare" in report:
        c = report["compare"]
        full = [m["phi_full"] for m in c["modules"]]
        top1 = [m["phi_top1"] for m in c["modules"]]
        lines.append(
            f"subspace similarity with {c['other']} over {len(full)} modules: "
            f"phi(1,1) mean {np.mean(top1):.3f}, phi(all) mean {np.mean(full):.3f}"
        )
    return lines


def mb(n: int) -> str:
    """Bytes in the largest unit that keeps the number at least 1."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def plot_analysis(report: dict, path: str | os.PathLike, *, overwrite: bool = False, inputs=()) -> Path:
    """PNG: cumulative energy per module; with a comparison, φ heat maps of the first
    modules and of the mean over the modules of the most common rank pair."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lora_deploy.io.staging import write_path_atomic

    compared = report.get("compare", {}).get("modules", [])
    maps = heat_maps(compared)
    fig = Figure(figsize=(4.2 * (1 + len(maps)), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1 + len(maps), 1)
    for m in report["modules"]:
        energy = m["energy"]
        ax.plot(range(1, len(energy) + 1), energy, color="C0", alpha=0.3, linewidth=0.8)
    ax.axhline(report["energy"], color="k", linestyle=":", linewidth=0.8)
    ax.set_xlabel("rank k")
    ax.set_ylabel("energy in top k")
    ax.set_title("cumulative energy per module", fontsize=9)
    for i, (title, phi) in enumerate(maps, start=2):
        ax = fig.add_subplot(1, 1 + len(maps), i)
        rows, cols = phi.shape
        extent = (0.5, cols + 0.5, rows + 0.5, 0.5)  # ticks at i, j = 1, 2, ...
        image = ax.imshow(phi, vmin=0, vmax=1, cmap="viridis", aspect="auto", extent=extent)
        ax.set_xlabel("j (other)")
        ax.set_ylabel("i (this)")
        ax.set_title(title, fontsize=8)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return write_path_atomic(path, lambda p: fig.savefig(p, format="png", dpi=100), overwrite=overwrite, inputs=inputs)


def heat_maps(compared: list[dict], first: int = 2) -> list[tuple[str, np.ndarray]]:
    if not compared:
        return []
    shapes: dict[tuple, list[np.ndarray]] = defaultdict(list)
    for m in compared:
        shapes[tuple(m["ranks"])].append(np.asarray(m["phi"]))
    ranks, phis = max(shapes.items(), key=lambda item: len(item[1]))
    maps = [(f"phi, mean of {len(phis)} modules (r {ranks[0]} vs {ranks[1]})", np.mean(phis, axis=0))]
    maps += [(f"phi {m['module'][-40:]}", np.asarray(m["phi"])) for m in compared[:first]]
    return maps
