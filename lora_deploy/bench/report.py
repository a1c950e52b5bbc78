"""The bench report: JSON schema "lora-deploy.bench/1", Markdown and a plot.

A report keeps the raw per-round samples next to every summary, so any
number in it (and any later regression check against it) can be recomputed
from the file alone. Writes are atomic (temp file + os.replace): an
interrupted bench never leaves a half-written report that a later
`--baseline` would trip over.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from lora_deploy import __version__
from lora_deploy.bench.stats import (
    GateResult,
    bootstrap_median_ci,
    overhead_gate,
    paired_ratios,
    percentiles,
    regression_gate,
)
from lora_deploy.errors import BadInputError
from lora_deploy.io.staging import write_file_atomic
from lora_deploy.modeling.samples import check_input_size
from lora_deploy.util import library_versions

SCHEMA = "lora-deploy.bench/1"

Shape = tuple[int, int]

# Distribution names tried for each library; the first installed one wins.
_LIBRARIES = {
    "numpy": ("numpy",),
    "torch": ("torch",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "transformers": ("transformers",),
}
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


# ---------------------------------------------------------------- shapes

_SHAPE_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def shape_key(shape: Shape) -> str:
    """(8, 128) -> '8x128', the key used in the report."""
    return f"{shape[0]}x{shape[1]}"


def _parse_one_shape(item: str) -> Shape:
    match = _SHAPE_RE.match(item)
    if not match:
        raise BadInputError(f"bad shape {item!r}: expected BATCHxSEQ, e.g. 8x128")
    batch, seq = int(match.group(1)), int(match.group(2))
    if batch < 1 or seq < 1:
        raise BadInputError(f"bad shape {item!r}: batch and sequence length must be >= 1")
    return batch, seq


def parse_shapes(text: str) -> list[Shape]:
    """'1x1,1x128,8x128' -> [(1, 1), (1, 128), (8, 128)]; garbage -> BadInputError."""
    if not isinstance(text, str) or not text.strip():
        raise BadInputError("no shapes given: expected e.g. 1x1,1x128,8x128")
    shapes = [_parse_one_shape(item) for item in text.split(",")]
    # Results are keyed by shape, so a repeat would silently overwrite one.
    seen: set[Shape] = set()
    for shape in shapes:
        if shape in seen:
            raise BadInputError(f"shape {shape_key(shape)} is listed twice")
        seen.add(shape)
        # Refused now with an estimate, not by a MemoryError (or the OOM killer) after loading.
        check_input_size(*shape, what=f"shape {shape_key(shape)}")
    return shapes


def _as_shape(key: Shape | str) -> Shape:
    return _parse_one_shape(key) if isinstance(key, str) else (int(key[0]), int(key[1]))


# ---------------------------------------------------------------- machine


def _cpu_model() -> str:
    """CPU model from /proc/cpuinfo (Linux), else whatever platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Processor") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _library_versions() -> dict[str, str | None]:
    """Installed version per library: its first installed distribution, else None."""
    found = library_versions(dist for dists in _LIBRARIES.values() for dist in dists)
    return {lib: next((found[d] for d in dists if d in found), None) for lib, dists in _LIBRARIES.items()}


def _torch_facts() -> dict[str, Any]:
    """GPU name and torch thread counts; empty when torch is absent or broken."""
    try:
        import torch  # lazy: torch is heavy and optional for the report itself
    except Exception:  # ImportError, or a broken install raising anything
        return {}
    facts: dict[str, Any] = {
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }
    try:
        if torch.cuda.is_available():
            facts["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # a driver problem must not cost us the whole report
        pass
    return facts


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """Where the bench ran: CPU, cores, GPU, thread settings, library versions."""
    torch_facts = _torch_facts()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": torch_facts.get("gpu"),
        "threads": {
            "requested": threads,
            "torch": torch_facts.get("torch_threads"),
            "torch_interop": torch_facts.get("torch_interop_threads"),
            "env": {name: os.environ.get(name) for name in _THREAD_ENV},
        },
        "libraries": _library_versions(),
    }


# ---------------------------------------------------------------- building


def _ms(seconds: float) -> float:
    return seconds * 1000.0


def variant_entry(
    samples: Sequence[float],
    shape: Shape,
    *,
    ratio: tuple[float, float, float] | None = None,
    reference: str = "",
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Summary of one variant at one shape; `ratio` is (median, low, high) vs reference."""
    stats = percentiles(samples)
    _, ci_low, ci_high = bootstrap_median_ci(samples, confidence=confidence, resamples=resamples, seed=seed)
    batch, seq = shape
    p50 = stats["p50"]
    entry: dict[str, Any] = {
        "samples_s": [float(x) for x in samples],
        "n": len(samples),
        **{f"{name}_ms": _ms(value) for name, value in stats.items()},
        "p50_ci_ms": [_ms(ci_low), _ms(ci_high)],
        # Throughput from the median, not the mean: one stall should not
        # move the headline number.
        "throughput": {
            "samples_per_s": batch / p50 if p50 > 0 else None,
            "tokens_per_s": batch * seq / p50 if p50 > 0 else None,
        },
        "ratio": None,
    }
    if ratio is not None:
        median, low, high = ratio
        entry["ratio"] = {"vs": reference, "median": median, "low": low, "high": high}
    return entry


def _shape_results(
    shape: Shape,
    variants: Mapping[str, Sequence[float]],
    reference: str,
    ci: dict[str, Any],
) -> tuple[dict[str, Any], list[tuple[str, tuple[float, float, float]]]]:
    """Report block for one shape, plus (variant, ratio CI) for the gates."""
    if reference not in variants:
        raise BadInputError(
            f"shape {shape_key(shape)}: reference variant {reference!r} was not measured (have {', '.join(variants)})"
        )
    entries: dict[str, Any] = {}
    ratios: list[tuple[str, tuple[float, float, float]]] = []
    for name, samples in variants.items():
        ratio = None
        if name != reference:
            ratio = bootstrap_median_ci(paired_ratios(variants[reference], samples), **ci)
            ratios.append((name, ratio))
        entries[name] = variant_entry(samples, shape, ratio=ratio, reference=reference, **ci)
    return {"batch": shape[0], "seq": shape[1], "variants": entries}, ratios


def build_report(
    results: Mapping[Shape | str, Mapping[str, Sequence[float]]],
    *,
    backend: str,
    device: str,
    reference: str,
    rounds: int | None = None,
    warmup: int | None = None,
    inner: int | None = None,
    threads: int | None = None,
    max_overhead: float | None = None,
    baseline: Mapping[str, Any] | None = None,
    max_regression: float | None = None,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
    machine: Mapping[str, Any] | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble a schema-valid report from raw samples.

    `results` maps a shape ((batch, seq) or 'BxS') to {variant: seconds per
    round}, as returned by `timing.measure_interleaved`. With `max_overhead`
    every non-reference variant gets an overhead gate; with `baseline` (a
    loaded report) and `max_regression` every variant present in both gets a
    regression gate. `machine` defaults to `machine_info(threads)`.
    """
    if (baseline is None) != (max_regression is None):
        raise BadInputError("a baseline report and a max regression go together")
    ci = {"confidence": confidence, "resamples": resamples, "seed": seed}
    blocks: dict[str, Any] = {}
    gates: list[GateResult] = []
    for key, variants in results.items():
        shape = _as_shape(key)
        block, ratios = _shape_results(shape, variants, reference, ci)
        blocks[shape_key(shape)] = block
        if max_overhead is not None:
            for name, ratio in ratios:
                subject = f"{shape_key(shape)}/{name}"
                gates.append(overhead_gate(ratio, max_overhead, subject=subject, confidence=confidence))
    if not blocks:
        raise BadInputError("no results to report")
    if rounds is None:
        rounds = len(next(iter(results.values()))[reference])
    config = {
        "backend": backend,
        "device": device,
        "shapes": list(blocks),
        "rounds": rounds,
        "warmup": warmup,
        "inner": inner,
        "threads": threads,
        "reference": reference,
        "max_overhead": max_overhead,
        "max_regression": max_regression,
        **ci,
        **(extra_config or {}),
    }
    report = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lora_deploy_version": __version__,
        "machine": dict(machine) if machine is not None else machine_info(threads),
        "config": config,
        "results": blocks,
        "gates": [g.to_dict() for g in gates],
    }
    if baseline is not None:
        add_gates(report, regression_gates(report, baseline, max_regression))
    return validate_report(report)


def _machine_note(report: Mapping[str, Any], baseline: Mapping[str, Any]) -> str:
    """A warning when the baseline came from other hardware."""
    here, there = report.get("machine", {}), baseline.get("machine", {})
    diffs = [k for k in ("cpu", "gpu") if here.get(k) != there.get(k)]
    if not diffs:
        return ""
    what = ", ".join(f"{k} {there.get(k)!r} vs {here.get(k)!r}" for k in diffs)
    return f" Note: the baseline ran on different hardware ({what})."


def regression_gates(
    report: Mapping[str, Any],
    baseline: Mapping[str, Any],
    max_regression: float,
) -> list[GateResult]:
    """A regression gate for every (shape, variant) present in both reports."""
    validate_report(baseline)
    config = report["config"]
    ci = {k: config.get(k, d) for k, d in (("confidence", 0.95), ("resamples", 10_000), ("seed", 0))}
    note = _machine_note(report, baseline)
    gates = []
    for key, block in report["results"].items():
        base_block = baseline["results"].get(key)
        if base_block is None:
            continue
        for name, entry in block["variants"].items():
            if name not in base_block["variants"]:
                continue
            gate = regression_gate(entry, base_block["variants"][name], max_regression, subject=f"{key}/{name}", **ci)
            gates.append(dataclasses.replace(gate, message=gate.message + note))
    if not gates:
        raise BadInputError("the baseline report shares no shape and variant with this run")
    return gates


def add_gates(report: dict[str, Any], gates: Sequence[GateResult]) -> dict[str, Any]:
    """Append gate results to a report (in place) and return it."""
    report["gates"].extend(g.to_dict() for g in gates)
    return report


def report_gates(report: Mapping[str, Any]) -> list[GateResult]:
    """The report's gates as GateResult objects (e.g. for stats.enforce_gates)."""
    return [GateResult.from_dict(g) for g in report["gates"]]


# ---------------------------------------------------------------- validation


def _need(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise BadInputError(f"invalid bench report: {where}: {what}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_entry(entry: Any, where: str) -> None:
    _need(isinstance(entry, dict), where, "expected an object")
    samples = entry.get("samples_s")
    _need(
        isinstance(samples, list) and bool(samples) and all(_is_number(s) and s >= 0 for s in samples),
        f"{where}.samples_s",
        "expected a non-empty list of non-negative seconds",
    )
    for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms"):
        _need(_is_number(entry.get(key)), f"{where}.{key}", "expected a number")
    _need(isinstance(entry.get("throughput"), dict), f"{where}.throughput", "expected an object")
    ratio = entry.get("ratio")
    if ratio is not None:
        _need(
            isinstance(ratio, dict) and all(_is_number(ratio.get(k)) for k in ("median", "low", "high")),
            f"{where}.ratio",
            "expected null or {median, low, high}",
        )


def _check_results(results: Any, reference: str) -> None:
    _need(isinstance(results, dict) and bool(results), "results", "expected a non-empty object")
    for key, block in results.items():
        where = f"results[{key!r}]"
        _need(isinstance(block, dict), where, "expected an object")
        _need(_SHAPE_RE.match(key) is not None, where, "key must be BATCHxSEQ")
        shape = (block.get("batch"), block.get("seq"))
        _need(_as_shape(key) == shape, where, "batch/seq do not match the key")
        variants = block.get("variants")
        _need(
            isinstance(variants, dict) and reference in variants,
            f"{where}.variants",
            f"expected an object including the reference {reference!r}",
        )
        for name, entry in variants.items():
            _check_entry(entry, f"{where}.variants[{name!r}]")


def validate_report(report: Any) -> Any:
    """Return `report` if it follows schema lora-deploy.bench/1, else BadInputError."""
    _need(isinstance(report, dict), "top level", "expected a JSON object")
    _need(report.get("schema") == SCHEMA, "schema", f"expected {SCHEMA!r}, got {report.get('schema')!r}")
    for key in ("machine", "config", "results"):
        _need(isinstance(report.get(key), dict), key, "expected an object")
    config = report["config"]
    for key in ("backend", "device", "reference"):
        _need(isinstance(config.get(key), str), f"config.{key}", "expected a string")
    _need(isinstance(config.get("shapes"), list), "config.shapes", "expected a list")
    _need(isinstance(config.get("rounds"), int), "config.rounds", "expected an integer")
    _check_results(report["results"], config["reference"])
    gates = report.get("gates")
    _need(isinstance(gates, list), "gates", "expected a list")
    for i, gate in enumerate(gates):
        ok = isinstance(gate, dict) and isinstance(gate.get("passed"), bool)
        ok = ok and isinstance(gate.get("message"), str)
        _need(ok, f"gates[{i}]", "expected {passed: bool, message: str, ...}")
    return report


# ---------------------------------------------------------------- files


def write_json(
    report: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Validate and write `report` as JSON, atomically (an existing file is replaced only
    with overwrite; never one of `inputs`)."""
    validate_report(report)
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    return write_file_atomic(path, lambda f: f.write(text.encode("utf-8")), overwrite=overwrite, inputs=inputs)


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a bench report; anything unusable -> BadInputError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"cannot read bench report {path}: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInputError(f"bench report {path} is not valid JSON: {e}") from e
    return validate_report(data)


# ---------------------------------------------------------------- markdown


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def _ratio_cell(entry: Mapping[str, Any]) -> str:
    ratio = entry.get("ratio")
    if ratio is None:
        return "reference"
    return f"{ratio['median']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}]"


def _header_lines(report: Mapping[str, Any]) -> list[str]:
    config, machine = report["config"], report["machine"]
    libs = ", ".join(f"{k} {v}" for k, v in machine.get("libraries", {}).items() if v)
    conf = config.get("confidence", 0.95)
    return [
        f"## lora-deploy bench: {config['backend']} on {config['device']}",
        "",
        f"- Machine: {machine.get('cpu', 'unknown')} ({machine.get('cores', '?')} cores), "
        f"GPU: {machine.get('gpu') or 'none'}, threads: {config.get('threads') or 'default'}",
        f"- Libraries: {libs or 'unknown'}",
        f"- {config['rounds']} interleaved rounds (warmup {config.get('warmup')}, "
        f"inner {config.get('inner')}); ratio = per-round variant / {config['reference']}, "
        f"median with {conf:.0%} bootstrap CI",
        "",
    ]


def _table_lines(report: Mapping[str, Any]) -> list[str]:
    conf = report["config"].get("confidence", 0.95)
    lines = [
        f"| shape | variant | p50 ms | p90 ms | throughput tok/s | ratio [{conf:.0%} CI] |",
        "|---|---|---:|---:|---:|---|",
    ]
    for key, block in report["results"].items():
        for name, entry in block["variants"].items():
            tokens = entry["throughput"].get("tokens_per_s")
            lines.append(
                f"| {key} | {_cell(name)} | {entry['p50_ms']:.4g} | {entry['p90_ms']:.4g} "
                f"| {_num(tokens, ',.0f')} | {_ratio_cell(entry)} |"
            )
    return lines


def to_markdown(report: Mapping[str, Any]) -> str:
    """A human summary: header, one table row per shape and variant, gate verdicts."""
    lines = _header_lines(report) + _table_lines(report)
    if report["gates"]:
        lines += ["", "Gates:", ""]
        for gate in report["gates"]:
            verdict = "PASS" if gate["passed"] else "FAIL"
            lines.append(f"- **{verdict}** {_cell(gate['message'])}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plot


def _variant_names(report: Mapping[str, Any]) -> list[str]:
    """Every variant in the report, in first-seen order."""
    names: list[str] = []
    for block in report["results"].values():
        names += [n for n in block["variants"] if n not in names]
    return names


def _draw_variant(
    ax: Any, xs: np.ndarray, entries: list[Mapping[str, Any] | None], name: str, width: float, first: bool
) -> None:
    """One variant's bars (p50, CI error bars), p90 ticks and ratio labels."""
    nan = float("nan")
    p50 = np.array([e["p50_ms"] if e else nan for e in entries])
    lo = np.array([e["p50_ci_ms"][0] if e and "p50_ci_ms" in e else nan for e in entries])
    hi = np.array([e["p50_ci_ms"][1] if e and "p50_ci_ms" in e else nan for e in entries])
    p90 = np.array([e["p90_ms"] if e else nan for e in entries])
    yerr = np.nan_to_num(np.vstack([p50 - lo, hi - p50]), nan=0.0).clip(min=0.0)
    ax.bar(xs, p50, width, yerr=yerr, capsize=3, label=name)
    ax.plot(xs, p90, linestyle="none", marker="_", markersize=12, color="black", label="p90" if first else None)
    for x, top, e in zip(xs, np.fmax(p90, p50), entries):
        if e and e.get("ratio"):
            ax.annotate(
                f"x{e['ratio']['median']:.3f}",
                (x, top),
                textcoords="offset points",
                xytext=(0, 3),
                ha="center",
                fontsize=7,
            )


def plot(
    report: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Grouped bars of p50 latency by shape and variant, written as PNG atomically (an
    existing file is replaced only with overwrite; never one of `inputs`).

    Error bars are the bootstrap CI of each p50, the black tick is p90, and
    the label over a bar is its median ratio to the reference.
    """
    # The Agg canvas directly, not pyplot: no global backend switch, no GUI,
    # safe to call from a CLI or a test without a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shapes = list(report["results"])
    names = _variant_names(report)
    width = 0.8 / len(names)
    fig = Figure(figsize=(max(6.0, 1.0 + 0.6 * len(shapes) * len(names)), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    base = np.arange(len(shapes), dtype=float)
    for j, name in enumerate(names):
        entries = [report["results"][s]["variants"].get(name) for s in shapes]
        _draw_variant(ax, base + (j - (len(names) - 1) / 2) * width, entries, name, width, j == 0)
    p50s = [e["p50_ms"] for b in report["results"].values() for e in b["variants"].values()]
    if min(p50s) > 0 and max(p50s) / min(p50s) > 10:
        ax.set_yscale("log")  # 1x1 and 8x512 on one linear axis would hide the small shapes
    config = report["config"]
    ax.set_xticks(base, shapes)
    ax.set_xlabel("shape (batch x seq)")
    ax.set_ylabel("p50 latency (ms)")
    ax.set_title(f"{config['backend']} on {config['device']}: p50 (bars: CI of p50; tick: p90)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return write_file_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120), overwrite=overwrite, inputs=inputs)
