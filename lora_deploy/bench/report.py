"""The bench report: JSON schema "lora-deploy.bench/2", Markdown and a plot.

A report keeps the raw per-round samples next to every summary, so any
number in it (and any later regression check against it) can be recomputed
from the file alone. Writes are atomic (temp file + os.replace): an
interrupted bench never leaves a half-written report that a later
`--baseline` would trip over.
"""

from __future__ import annotations

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
    absolute_gate,
    bootstrap_median_ci,
    noise_margin,
    overhead_gate,
    paired_ratios,
    percentiles,
    regression_gate,
    yardstick_note,
)
from lora_deploy.bench.timing import longest_run
from lora_deploy.errors import BadInputError
from lora_deploy.io.staging import write_file_atomic
from lora_deploy.modeling.samples import check_input_size
from lora_deploy.util import library_versions

SCHEMA = "lora-deploy.bench/2"
# Reports a baseline may come from: /1 lacks fed shapes, conclusive flags and the baseline block.
READABLE_SCHEMAS = ("lora-deploy.bench/1", SCHEMA)
# The between-run allowance of a regression gate against a saved report, measured by
# benchmarks/gate_calibration.py (README, "Calibration of the gates"). A baseline that
# recorded its own noise floor (--noise-runs) widens it where its runs disagreed more;
# never narrows it: runs inside one process agree better than separate processes do.
DEFAULT_RUN_MARGIN = 0.03

# (batch, seq), or (batch, seq, past) for a decode step of a KV-cache graph: seq new tokens
# per row after past cached ones ("8x1+512"). A plain shape on a KV-cache graph is a prefill.
Shape = tuple[int, ...]

# Distribution names tried for each library; the first installed one wins.
_LIBRARIES = {
    "numpy": ("numpy",),
    "torch": ("torch",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "transformers": ("transformers",),
}
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


# ---------------------------------------------------------------- shapes

_SHAPE_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*(?:\+\s*(\d+)\s*)?$")


def shape_key(shape: Shape) -> str:
    """(8, 128) -> '8x128', (8, 1, 512) -> '8x1+512': the key used in the report."""
    return f"{shape[0]}x{shape[1]}" + (f"+{shape[2]}" if len(shape) > 2 and shape[2] else "")


def _parse_one_shape(item: str) -> Shape:
    match = _SHAPE_RE.match(item)
    if not match:
        raise BadInputError(f"bad shape {item!r}: expected BATCHxSEQ (8x128) or BATCHxSEQ+PAST (8x1+512)")
    batch, seq = int(match.group(1)), int(match.group(2))
    if batch < 1 or seq < 1:
        raise BadInputError(f"bad shape {item!r}: batch and sequence length must be >= 1")
    past = int(match.group(3) or 0)
    return (batch, seq, past) if past else (batch, seq)


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
        check_input_size(shape[0], sum(shape[1:]), what=f"shape {shape_key(shape)}")
    return shapes


def _as_shape(key: Shape | str) -> Shape:
    return _parse_one_shape(key) if isinstance(key, str) else _parse_one_shape(shape_key(tuple(map(int, key))))


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
    fed: Mapping[str, Any] | None = None,
    loop: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Summary of one variant at one shape; `ratio` is (median, low, high) vs reference.

    `fed` ({"batch", "seq", "tokens", "inputs"}) is what the variant was really given:
    throughput counts its batch, and tokens only when it takes token inputs. Without it
    the requested shape is assumed to be a token shape. `loop` ({"rate_hz", "lag_s",
    "miss"}) adds the control-loop figures.
    """
    stats = percentiles(samples)
    _, ci_low, ci_high = bootstrap_median_ci(samples, confidence=confidence, resamples=resamples, seed=seed)
    fed = dict(fed) if fed is not None else {"batch": shape[0], "seq": shape[1], "tokens": True}
    batch, seq = fed["batch"], fed.get("seq")
    p50 = stats["p50"]
    entry: dict[str, Any] = {
        "samples_s": [float(x) for x in samples],
        "n": len(samples),
        **{f"{name}_ms": _ms(value) for name, value in stats.items()},
        "p50_ci_ms": [_ms(ci_low), _ms(ci_high)],
        "fed": fed,
        # Throughput from the median, not the mean: one stall should not
        # move the headline number.
        "throughput": {
            "samples_per_s": batch / p50 if p50 > 0 else None,
            "tokens_per_s": batch * seq / p50 if p50 > 0 and fed.get("tokens") and seq else None,
        },
        "ratio": None,
    }
    if ratio is not None:
        median, low, high = ratio
        entry["ratio"] = {"vs": reference, "median": median, "low": low, "high": high}
    if loop is not None:
        entry["loop"] = loop_summary(samples, loop)
    return entry


def loop_summary(latencies: Sequence[float], loop: Mapping[str, Any]) -> dict[str, Any]:
    """Control-loop figures of one variant: misses, the longest run of them, jitter, lag.

    `jitter_ms` is the standard deviation of the time from each tick's scheduled start to
    the end of its call (start lag + latency): how unevenly the outputs arrive.
    """
    lag = np.asarray(loop["lag_s"], dtype=float)
    done = lag + np.asarray(latencies, dtype=float)
    misses = [bool(m) for m in loop["miss"]]
    rate = float(loop["rate_hz"])
    return {
        "rate_hz": rate,
        "period_ms": 1000.0 / rate,
        "ticks": len(misses),
        "misses": int(sum(misses)),
        "miss_rate": sum(misses) / len(misses) if misses else 0.0,
        "longest_miss_run": longest_run(misses),
        "jitter_ms": _ms(float(done.std())),
        "lag_p99_ms": _ms(float(np.percentile(lag, 99))),
        "lag_max_ms": _ms(float(lag.max())),
        "lag_s": [float(x) for x in lag],
        "miss": misses,
    }


def _shape_results(
    shape: Shape,
    variants: Mapping[str, Sequence[float]],
    reference: str,
    ci: dict[str, Any],
    fed: Mapping[str, Any] | None = None,
    loop: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], list[tuple[str, tuple[float, float, float]]]]:
    """Report block for one shape, plus (variant, ratio CI) for the gates."""
    fed = fed or {}
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
        entries[name] = variant_entry(
            samples,
            shape,
            ratio=ratio,
            reference=reference,
            fed=fed.get(name),
            loop=None if loop is None else {"rate_hz": loop["rate_hz"], **loop["variants"][name]},
            **ci,
        )
    # A requested sequence length no variant takes (no token or sequence input): the
    # report says so instead of quoting tokens it never fed.
    seq_used = any((f or {}).get("seq") for f in fed.values()) if fed else True
    block = {"batch": shape[0], "seq": shape[1], "seq_used": seq_used, "variants": entries}
    if len(shape) > 2:
        block["past"] = shape[2]
    return block, ratios


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
    fed: Mapping[str, Mapping[str, Any]] | None = None,
    loop: Mapping[str, Any] | None = None,
    on_inconclusive: str = "warn",
    run_margin: float | None = None,
    baseline_path: str | os.PathLike | None = None,
    baseline_model: str | None = None,
    max_p99: float | None = None,
    max_misses: int | None = None,
    adaptive: Mapping[str, Any] | None = None,
    noise: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble a schema-valid report from raw samples.

    `results` maps a shape ((batch, seq) or 'BxS') to {variant: seconds per
    round}, as returned by `timing.measure_interleaved`. With `max_overhead`
    every non-reference variant gets an overhead gate. With `baseline_model`
    (the name of the variant timed from the previous artifact, which is then the
    reference) and `max_regression`, every other variant gets an in-run regression
    gate. With `baseline` (a loaded report) and `max_regression` every (shape,
    variant) present in both gets a regression gate with the between-run
    `run_margin`. `fed` maps shape key -> variant -> what it was really fed;
    `loop` ({"rate_hz", "shapes": {key: {variant: {"lag_s", "miss"}}}}) marks a
    control-loop run, gated by `max_p99` (seconds) and `max_misses`. `machine`
    defaults to `machine_info(threads)`. `adaptive` (how many rounds each shape ran and
    why the run stopped adding them) goes into the config; `noise` (`noise_summary`: the
    medians of N repeated runs) is stored for a later comparison's margin.

    The between-run margin against `baseline`: `run_margin` when given; else, when the
    baseline recorded a noise floor, per shape the larger of DEFAULT_RUN_MARGIN and the
    floor's margin (config `run_margin` null, `baseline.run_margins` per shape); else
    DEFAULT_RUN_MARGIN.
    """
    if baseline is not None and max_regression is None:
        raise BadInputError("a baseline report and a max regression go together")
    if max_regression is not None and baseline is None and baseline_model is None:
        raise BadInputError("a max regression needs a baseline report or a baseline model")
    ci = {"confidence": confidence, "resamples": resamples, "seed": seed}
    policy = {"on_inconclusive": on_inconclusive}
    blocks: dict[str, Any] = {}
    gates: list[GateResult] = []
    for key, variants in results.items():
        shape = _as_shape(key)
        k = shape_key(shape)
        shape_loop = None
        if loop is not None:
            shape_loop = {"rate_hz": loop["rate_hz"], "variants": loop["shapes"][k]}
        block, ratios = _shape_results(shape, variants, reference, ci, (fed or {}).get(k), shape_loop)
        blocks[k] = block
        for name, ratio in ratios:
            subject = f"{k}/{name}"
            if max_overhead is not None:
                gates.append(overhead_gate(ratio, max_overhead, subject=subject, confidence=confidence, **policy))
            if baseline_model is not None and max_regression is not None:
                gates.append(
                    overhead_gate(
                        ratio, max_regression, subject=f"{subject} vs {reference}", gate="regression", **policy
                    )
                )
        gates += _loop_gates(block, k, max_p99, max_misses, on_inconclusive)
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
        "baseline_model": baseline_model,
        "on_inconclusive": on_inconclusive,
        "run_margin": _configured_margin(run_margin, baseline),
        "rate_hz": None if loop is None else loop["rate_hz"],
        "max_p99_ms": None if max_p99 is None else _ms(max_p99),
        "max_misses": max_misses,
        "adaptive": None if adaptive is None else dict(adaptive),
        "noise_runs": None if noise is None else noise["runs"],
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
        "baseline": None,
        "noise": None if noise is None else dict(noise),
    }
    if baseline is not None:
        report["baseline"] = baseline_summary(report, baseline, baseline_path)
        add_gates(report, regression_gates(report, baseline, max_regression))
    return validate_report(report)


def _configured_margin(run_margin: float | None, baseline: Mapping[str, Any] | None) -> float | None:
    """config.run_margin: the given one; null without a baseline, and when the baseline's
    own noise floor sets it per shape; else the default."""
    if baseline is None:
        return None
    if run_margin is not None:
        return run_margin
    return None if baseline.get("noise") else DEFAULT_RUN_MARGIN


def noise_summary(runs: Sequence[Mapping[str, Mapping[str, Sequence[float]]]], rounds: int) -> dict[str, Any]:
    """The noise floor of a run made of N repeats ({shape: {variant: samples}} each, every
    model reopened in between): each repeat's median per variant, and the between-run
    margin they call for (`stats.noise_margin`), per variant and per shape (the largest)."""
    shapes: dict[str, Any] = {}
    for key in runs[0]:
        k = shape_key(_as_shape(key))
        variants = {}
        for name in runs[0][key]:
            medians = [float(np.median(run[key][name])) for run in runs]
            variants[name] = {
                "medians_ms": [_ms(m) for m in medians],
                "spread": max(medians) / min(medians) - 1.0,
                "margin": noise_margin(medians),
            }
        shapes[k] = {"margin": max(v["margin"] for v in variants.values()), "variants": variants}
    return {
        "runs": len(runs),
        "rounds_per_run": rounds,
        "method": "the whole measurement repeated, every model closed and reopened between repeats; margin = "
        "upper end of a 95% prediction interval for one later run's median (log scale, Student's t)",
        "shapes": shapes,
    }


def run_margins(config: Mapping[str, Any], baseline: Mapping[str, Any], max_regression: float) -> dict[str, Any]:
    """{shape key: (margin, note or None)} for the gates against `baseline`: the configured
    margin, or the baseline's noise floor (never below DEFAULT_RUN_MARGIN). A floor wider
    than the regression the gate is asked to catch makes that shape's gates inconclusive."""
    given = config.get("run_margin")
    noise = baseline.get("noise") or {}
    out = {}
    for key in baseline["results"]:
        floor = ((noise.get("shapes") or {}).get(key) or {}).get("margin")
        if given is not None or floor is None:
            out[key] = (DEFAULT_RUN_MARGIN if given is None else given, None)
            continue
        note = None
        if floor > max_regression:
            note = (
                f"the baseline's own {noise.get('runs')} runs call for a {floor:.1%} between-run margin (its noise "
                f"floor), more than the {max_regression:.1%} regression to catch: re-record it on a quieter machine "
                "or with more runs"
            )
        out[key] = (max(DEFAULT_RUN_MARGIN, floor), note)
    return out


def _loop_gates(
    block: Mapping[str, Any], key: str, max_p99: float | None, max_misses: int | None, on_inconclusive: str
) -> list[GateResult]:
    """Absolute budgets of the control-loop mode, one per variant."""
    gates = []
    for name, entry in block["variants"].items():
        subject = f"{key}/{name}"
        if max_p99 is not None:
            n = entry["n"]
            gates.append(
                absolute_gate(
                    "p99",
                    round(entry["p99_ms"], 4),
                    _ms(max_p99),
                    subject=subject,
                    unit="ms",
                    conclusive=n >= MIN_P99_SAMPLES,
                    why=f"{n} calls; a p99 needs >= {MIN_P99_SAMPLES} (10 beyond it) to mean much",
                    on_inconclusive=on_inconclusive,
                )
            )
        if max_misses is not None and "loop" in entry:
            gates.append(
                absolute_gate(
                    "misses", entry["loop"]["misses"], max_misses, subject=subject, unit="", **_policy(on_inconclusive)
                )
            )
    return gates


def _policy(on_inconclusive: str) -> dict[str, str]:
    return {"on_inconclusive": on_inconclusive}


# A p99 budget is conclusive only with 10 calls or more beyond the 99th percentile.
MIN_P99_SAMPLES = 1000

# What must match between a saved baseline and this run for their latencies to be
# comparable: (label, getter on (config, machine)).
_COMPARED = (
    ("backend", lambda c, m: c.get("backend")),
    ("device", lambda c, m: c.get("device")),
    ("threads", lambda c, m: c.get("threads")),
    ("inner", lambda c, m: c.get("inner")),
    ("rate_hz", lambda c, m: c.get("rate_hz")),
    ("cpu", lambda c, m: m.get("cpu")),
    ("gpu", lambda c, m: m.get("gpu")),
    ("usable cores", lambda c, m: m.get("usable_cores")),
    ("thread variables", lambda c, m: (m.get("threads") or {}).get("env")),
)


def config_mismatches(config: Mapping[str, Any], machine: Mapping[str, Any], baseline: Mapping[str, Any]) -> list[str]:
    """What differs between this run's configuration and a baseline report's, one
    phrase each ("threads 1 in the baseline, None here"): settings, machine, library
    versions (lora-deploy's own excepted: it is what a regression run tests)."""
    there_c, there_m = baseline.get("config", {}), baseline.get("machine", {})
    diffs = []
    for label, get in _COMPARED:
        a, b = get(there_c, there_m), get(config, machine)
        if a != b:
            diffs.append(f"{label} {a!r} in the baseline, {b!r} here")
    libs_a, libs_b = there_m.get("libraries") or {}, machine.get("libraries") or {}
    for lib in sorted(set(libs_a) | set(libs_b)):
        if libs_a.get(lib) != libs_b.get(lib):
            diffs.append(f"{lib} {libs_a.get(lib)} in the baseline, {libs_b.get(lib)} here")
    return diffs


def _fed_mismatches(report: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, str]:
    """{'key/variant': phrase} where a shared shape fed different inputs in the two runs."""
    out = {}
    for key, block in report["results"].items():
        base_block = baseline["results"].get(key) or {"variants": {}}
        for name, entry in block["variants"].items():
            there = base_block["variants"].get(name, {}).get("fed")
            here = entry.get("fed")
            if there is not None and here is not None and there.get("inputs") != here.get("inputs"):
                out[f"{key}/{name}"] = f"inputs {there.get('inputs')} in the baseline, {here.get('inputs')} here"
    return out


def shared_and_unshared(report: Mapping[str, Any], baseline: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """('key/variant' timed in both runs, 'key/variant (where)' timed in only one)."""
    shared, unshared = [], []
    for key, block in report["results"].items():
        base_variants = (baseline["results"].get(key) or {}).get("variants", {})
        for name in block["variants"]:
            (shared if name in base_variants else unshared).append(f"{key}/{name}")
    unshared = [f"{s} (this run only)" for s in unshared]
    for key, block in baseline["results"].items():
        mine = (report["results"].get(key) or {}).get("variants", {})
        unshared += [f"{key}/{name} (baseline only)" for name in block["variants"] if name not in mine]
    return shared, unshared


def baseline_summary(
    report: Mapping[str, Any], baseline: Mapping[str, Any], path: str | os.PathLike | None = None
) -> dict[str, Any]:
    """The baseline as the JSON report records it: where it came from, its configuration,
    its figures, what differs and which shapes and variants only one run has."""
    config, machine = baseline.get("config", {}), baseline.get("machine", {})
    _, unshared = shared_and_unshared(report, baseline)
    here = report["config"]
    return {
        "path": None if path is None else str(path),
        "schema": baseline.get("schema"),
        "created": baseline.get("created"),
        "config": {k: config.get(k) for k in ("backend", "device", "threads", "inner", "rounds", "shapes", "rate_hz")},
        "machine": {k: machine.get(k) for k in ("cpu", "gpu", "usable_cores", "libraries")},
        "run_margin": here.get("run_margin"),
        "run_margins": {k: m for k, (m, _) in run_margins(here, baseline, here.get("max_regression") or 0).items()},
        "noise_runs": (baseline.get("noise") or {}).get("runs"),
        "mismatches": config_mismatches(here, report["machine"], baseline)
        + [f"{k}: {v}" for k, v in _fed_mismatches(report, baseline).items()],
        "unshared": unshared,
        "results": {
            key: {
                name: {k: e.get(k) for k in ("p50_ms", "p90_ms", "p99_ms", "p50_ci_ms", "n")}
                for name, e in block["variants"].items()
            }
            for key, block in baseline["results"].items()
        },
    }


def regression_gates(
    report: Mapping[str, Any],
    baseline: Mapping[str, Any],
    max_regression: float,
) -> list[GateResult]:
    """A regression gate for every (shape, variant) present in both reports.

    Each allows the configured between-run margin; a configuration mismatch (settings,
    machine, libraries, the inputs fed) makes every gate it touches inconclusive, with
    the differences named (run_bench refuses such a baseline unless told to allow it).
    """
    validate_report(baseline)
    config = report["config"]
    ci = {k: config.get(k, d) for k, d in (("confidence", 0.95), ("resamples", 10_000), ("seed", 0))}
    margins = run_margins(config, baseline, max_regression)
    common = config_mismatches(config, report["machine"], baseline)
    fed = _fed_mismatches(report, baseline)
    policy = config.get("on_inconclusive") or "warn"
    gates = []
    for key, block in report["results"].items():
        base_block = baseline["results"].get(key)
        if base_block is None:
            continue
        margin, floor_note = margins[key]
        for name, entry in block["variants"].items():
            if name not in base_block["variants"]:
                continue
            subject = f"{key}/{name}"
            notes = [f"configuration differs: {d}" for d in common] + ([floor_note] if floor_note else [])
            ref = config["reference"]
            if ref in block["variants"] and ref in base_block["variants"]:
                note = yardstick_note(
                    block["variants"][ref]["samples_s"], base_block["variants"][ref]["samples_s"], margin, ref
                )
                notes += [note] if note else []
            if subject in fed:
                notes.append(f"the runs fed different inputs: {fed[subject]}")
            gates.append(
                regression_gate(
                    entry,
                    base_block["variants"][name],
                    max_regression,
                    subject=subject,
                    margin=margin,
                    notes=notes,
                    on_inconclusive=policy,
                    **ci,
                )
            )
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
        _need(_SHAPE_RE.match(key) is not None, where, "key must be BATCHxSEQ or BATCHxSEQ+PAST")
        shape = (block.get("batch"), block.get("seq")) + ((block["past"],) if block.get("past") else ())
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
    """Return `report` if it follows schema lora-deploy.bench/2 (or /1, for baselines), else BadInputError."""
    _need(isinstance(report, dict), "top level", "expected a JSON object")
    _need(report.get("schema") in READABLE_SCHEMAS, "schema", f"expected {SCHEMA!r}, got {report.get('schema')!r}")
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
        if report["schema"] == SCHEMA:
            _need(isinstance(gate.get("conclusive"), bool), f"gates[{i}].conclusive", "expected true or false")
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
        *_adaptive_lines(config.get("adaptive")),
        *_noise_lines(report.get("noise")),
        "",
    ]


def _adaptive_lines(adaptive: Mapping[str, Any] | None) -> list[str]:
    """How many rounds each shape ran with --until-width, and why the run stopped."""
    if not adaptive:
        return []
    ran = ", ".join(f"{k} {v['rounds']} ({v['width']:.1%} wide)" for k, v in adaptive["shapes"].items())
    return [
        f"- Adaptive rounds (until every interval is at most {adaptive['until_width']:.1%} wide, budget "
        f"{adaptive['max_time_s']:g} s): {ran}; stopped: {adaptive['reason']}"
    ]


def _noise_lines(noise: Mapping[str, Any] | None) -> list[str]:
    """The noise floor this report records for a later --baseline comparison."""
    if not noise:
        return []
    floors = ", ".join(f"{k} {v['margin']:.1%}" for k, v in noise["shapes"].items())
    return [
        f"- Noise floor: {noise['runs']} runs of {noise['rounds_per_run']} rounds, every model reopened between "
        f"them; margin for a later --baseline comparison (never below {DEFAULT_RUN_MARGIN:.0%}): {floors}"
    ]


def _fed_cell(block: Mapping[str, Any], entry: Mapping[str, Any]) -> str:
    """What the variant was really fed, e.g. '8x128 tokens', 'batch 1 (static)'."""
    fed = entry.get("fed")
    if not fed:
        return f"{block['batch']}x{block['seq']}"
    text = f"{fed['batch']}x{fed['seq']}" if fed.get("seq") else f"batch {fed['batch']}"
    source = {"file": " (file)", "example": " (example_inputs)"}.get(fed.get("source"), "")
    cached = f", {fed['past']} cached" if fed.get("past") else ""
    return text + (" tokens" if fed.get("tokens") else "") + cached + source


def _gate_index(report: Mapping[str, Any], kind: str) -> dict[str, Mapping[str, Any]]:
    return {g["subject"]: g for g in report["gates"] if g.get("gate") == kind}


def _verdict(gate: Mapping[str, Any] | None) -> str:
    if gate is None:
        return ""
    verdict = gate.get("verdict") or ("pass" if gate["passed"] else "fail")
    return {"pass": "pass", "fail": "**FAIL**", "inconclusive": "*inconclusive*"}[verdict]


def _table_lines(report: Mapping[str, Any]) -> list[str]:
    conf = report["config"].get("confidence", 0.95)
    baseline = report.get("baseline")
    regressions = _gate_index(report, "regression")
    head = f"| shape | variant | fed | p50 ms | p90 ms | p99 ms | samples/s | tok/s | ratio [{conf:.0%} CI] |"
    rule = "|---|---|---|---:|---:|---:|---:|---:|---|"
    if baseline:
        head += " baseline p50 ms | vs baseline [CI] | gate |"
        rule += "---:|---|---|"
    lines = [head, rule]
    for key, block in report["results"].items():
        base_block = (baseline or {}).get("results", {}).get(key, {})
        for name, entry in block["variants"].items():
            tp = entry["throughput"]
            row = (
                f"| {key} | {_cell(name)} | {_fed_cell(block, entry)} | {entry['p50_ms']:.4g} | {entry['p90_ms']:.4g} "
                f"| {entry['p99_ms']:.4g} | {_num(tp.get('samples_per_s'), ',.1f')} "
                f"| {_num(tp.get('tokens_per_s'), ',.0f')} | {_ratio_cell(entry)} |"
            )
            if baseline:
                there = base_block.get(name)
                gate = regressions.get(f"{key}/{name}")
                vs = "" if gate is None else f"{gate['median']:.3f} [{gate['low']:.3f}, {gate['high']:.3f}]"
                then = "not in baseline" if there is None else format(there["p50_ms"], ".4g")
                row += f" {then} | {vs} | {_verdict(gate)} |"
            lines.append(row)
    return lines


def _loop_lines(report: Mapping[str, Any]) -> list[str]:
    rate = report["config"].get("rate_hz")
    if not rate:
        return []
    lines = [
        "",
        f"Control loop at {rate:g} Hz (period {1000 / rate:.3g} ms), ticks alternating between variants:",
        "",
        "| shape | variant | ticks | p50 ms | p99 ms | p99.9 ms | max ms | jitter ms | start lag p99 ms "
        "| misses | longest miss run |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, block in report["results"].items():
        for name, entry in block["variants"].items():
            loop = entry.get("loop")
            if loop is None:
                continue
            lines.append(
                f"| {key} | {_cell(name)} | {loop['ticks']} | {entry['p50_ms']:.4g} | {entry['p99_ms']:.4g} "
                f"| {entry.get('p999_ms', float('nan')):.4g} | {entry.get('max_ms', float('nan')):.4g} "
                f"| {loop['jitter_ms']:.3g} | {loop['lag_p99_ms']:.3g} | {loop['misses']} "
                f"| {loop['longest_miss_run']} |"
            )
    return lines


def _baseline_lines(report: Mapping[str, Any]) -> list[str]:
    baseline = report.get("baseline")
    config = report["config"]
    if config.get("baseline_model"):
        return [
            "",
            f"- Baseline: the previous artifact {config['baseline_model']} timed as {config['reference']!r} "
            "in this same interleaved run (the recommended gate).",
        ]
    if not baseline:
        return []
    margins = baseline.get("run_margins") or {}
    if baseline.get("run_margin") is None and margins:
        margin = ", ".join(f"{m:.1%} ({k})" for k, m in margins.items())
        margin += f", from the baseline's noise floor over {baseline.get('noise_runs')} runs"
    else:
        margin = f"{(baseline.get('run_margin') or 0):.1%}"
    lines = [
        "",
        f"- Baseline: {baseline.get('path') or 'a saved report'} (created {baseline.get('created')}), "
        f"between-run margin {margin}",
    ]
    for what in baseline.get("mismatches") or []:
        lines.append(f"- Configuration differs: {_cell(what)}")
    if baseline.get("unshared"):
        lines.append(f"- Not gated (in one run only): {_cell(', '.join(baseline['unshared']))}")
    return lines


def to_markdown(report: Mapping[str, Any]) -> str:
    """A human summary: header, one table row per shape and variant (baseline side by
    side when there is one), control-loop figures, gate verdicts."""
    lines = _header_lines(report) + _table_lines(report) + _loop_lines(report) + _baseline_lines(report)
    if report["gates"]:
        lines += ["", "Gates:", ""]
        for gate in report["gates"]:
            verdict = (gate.get("verdict") or ("pass" if gate["passed"] else "fail")).upper()
            outcome = "" if verdict != "INCONCLUSIVE" else (" (passes)" if gate["passed"] else " (fails)")
            lines.append(f"- **{verdict}**{outcome} {_cell(gate['message'])}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plot


def _variant_names(report: Mapping[str, Any]) -> list[str]:
    """Every variant in the report, in first-seen order."""
    names: list[str] = []
    for block in report["results"].values():
        names += [n for n in block["variants"] if n not in names]
    return names


_MARKS = {"pass": ("pass", "tab:green"), "fail": ("FAIL", "tab:red"), "inconclusive": ("?", "tab:orange")}


def _gate_marks(report: Mapping[str, Any]) -> dict[str, str]:
    """{'key/variant': worst verdict of its gates}: fail > inconclusive > pass."""
    order = {"pass": 0, "inconclusive": 1, "fail": 2}
    marks: dict[str, str] = {}
    for gate in report["gates"]:
        subject = str(gate.get("subject", "")).split(" vs ")[0]
        verdict = gate.get("verdict") or ("pass" if gate["passed"] else "fail")
        if order[verdict] >= order.get(marks.get(subject, "pass"), 0):
            marks[subject] = verdict
    return marks


def _draw_variant(
    ax: Any,
    xs: np.ndarray,
    entries: list[Mapping[str, Any] | None],
    name: str,
    width: float,
    first: bool,
    marks: Sequence[str | None] = (),
    colour: Any = None,
) -> None:
    """One variant's bars (p50, CI error bars), p90 ticks, ratio labels and gate marks."""
    nan = float("nan")
    p50 = np.array([e["p50_ms"] if e else nan for e in entries])
    lo = np.array([e["p50_ci_ms"][0] if e and "p50_ci_ms" in e else nan for e in entries])
    hi = np.array([e["p50_ci_ms"][1] if e and "p50_ci_ms" in e else nan for e in entries])
    p90 = np.array([e["p90_ms"] if e else nan for e in entries])
    yerr = np.nan_to_num(np.vstack([p50 - lo, hi - p50]), nan=0.0).clip(min=0.0)
    ax.bar(xs, p50, width, yerr=yerr, capsize=3, label=name, color=colour)
    ax.plot(xs, p90, linestyle="none", marker="_", markersize=12, color="black", label="p90" if first else None)
    marks = list(marks) or [None] * len(entries)
    for x, top, e, mark in zip(xs, np.fmax(p90, p50), entries, marks):
        label = f"x{e['ratio']['median']:.3f}" if e and e.get("ratio") else ""
        if label:
            ax.annotate(label, (x, top), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
        if e and mark:
            text, col = _MARKS[mark]
            ax.annotate(
                text,
                (x, top),
                textcoords="offset points",
                xytext=(0, 12 if label else 3),
                ha="center",
                fontsize=7,
                fontweight="bold",
                color=col,
            )


def _draw_baseline(
    ax: Any, xs: np.ndarray, entries: list[Mapping[str, Any] | None], width: float, colour: Any, first: bool
) -> None:
    """The saved baseline's p50 bars (hatched, pale) beside the current ones."""
    p50 = np.array([e["p50_ms"] if e and e.get("p50_ms") is not None else np.nan for e in entries])
    ax.bar(
        xs,
        p50,
        width,
        color=colour,
        alpha=0.35,
        hatch="//",
        edgecolor="black",
        linewidth=0.5,
        label="baseline (saved run)" if first else None,
    )


def _draw_histogram(ax: Any, report: Mapping[str, Any]) -> None:
    """Control-loop mode: latency histograms per variant, the period as a red line."""
    period = 1000.0 / report["config"]["rate_hz"]
    every = [np.asarray(e["samples_s"]) * 1000.0 for b in report["results"].values() for e in b["variants"].values()]
    top = max(float(np.concatenate(every).max()), period) * 1.05
    bins = np.linspace(0.0, top, 80)  # shared bins: variants side by side, none hidden by its own binning
    for key, block in report["results"].items():
        for name, entry in block["variants"].items():
            ms = np.asarray(entry["samples_s"]) * 1000.0
            ax.hist(
                ms, bins=bins, histtype="step", linewidth=1.5, label=f"{key}/{name} (misses {entry['loop']['misses']})"
            )
    ax.axvline(period, color="tab:red", linestyle="--", label=f"period {period:.3g} ms")
    budget = report["config"].get("max_p99_ms")
    if budget:
        ax.axvline(budget, color="tab:orange", linestyle=":", label=f"p99 budget {budget:.3g} ms")
    ax.set_yscale("log")
    ax.set_xlabel("latency per call (ms)")
    ax.set_ylabel("calls")
    ax.set_title(f"control loop at {report['config']['rate_hz']:g} Hz: latency histogram", fontsize=9)
    ax.legend(fontsize=7)


def plot(
    report: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Grouped bars of p50 latency by shape and variant, written as PNG atomically (an
    existing file is replaced only with overwrite; never one of `inputs`).

    Error bars are the bootstrap CI of each p50, the black tick is p90, the label over a
    bar is its median ratio to the reference and the coloured mark its gates' verdict
    (pass, FAIL, ? = inconclusive). With a saved baseline its p50 bars stand hatched
    beside the current ones; in control-loop mode a latency histogram follows.
    """
    # The Agg canvas directly, not pyplot: no global backend switch, no GUI,
    # safe to call from a CLI or a test without a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shapes = list(report["results"])
    names = _variant_names(report)
    baseline = (report.get("baseline") or {}).get("results")
    slots = len(names) * (2 if baseline else 1)
    width = 0.8 / slots
    loop = bool(report["config"].get("rate_hz"))
    fig = Figure(figsize=(max(6.0, 1.0 + 0.6 * len(shapes) * slots), 8.0 if loop else 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(2, 1, 1) if loop else fig.add_subplot()
    base = np.arange(len(shapes), dtype=float)
    marks = _gate_marks(report)
    colours = [f"C{j % 10}" for j in range(len(names))]
    for j, name in enumerate(names):
        entries = [report["results"][s]["variants"].get(name) for s in shapes]
        variant_marks = [marks.get(f"{s}/{name}") for s in shapes]
        if baseline:
            xs = base + (2 * j - (slots - 1) / 2) * width
            _draw_baseline(ax, xs, [baseline.get(s, {}).get(name) for s in shapes], width, colours[j], j == 0)
            xs = xs + width
        else:
            xs = base + (j - (slots - 1) / 2) * width
        _draw_variant(ax, xs, entries, name, width, j == 0, variant_marks, colours[j])
    p50s = [e["p50_ms"] for b in report["results"].values() for e in b["variants"].values()]
    if baseline:
        p50s += [e["p50_ms"] for b in baseline.values() for e in b.values() if e.get("p50_ms")]
    if min(p50s) > 0 and max(p50s) / min(p50s) > 10:
        ax.set_yscale("log")  # 1x1 and 8x512 on one linear axis would hide the small shapes
    config = report["config"]
    ax.set_xticks(base, shapes)
    ax.set_xlabel("shape (batch x seq)")
    ax.set_ylabel("p50 latency (ms)")
    title = f"{config['backend']} on {config['device']}: p50 (bars: CI of p50; tick: p90; marks: gates)"
    if baseline:
        title += "\nhatched: saved baseline"
    elif config.get("baseline_model"):
        title += f"\nbaseline: {config['reference']} (previous artifact, same run)"
    ax.set_title(title, fontsize=9)
    ax.margins(y=0.15)
    ax.legend(fontsize=8)
    if loop:
        _draw_histogram(fig.add_subplot(2, 1, 2), report)
    fig.tight_layout()
    return write_file_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120), overwrite=overwrite, inputs=inputs)
