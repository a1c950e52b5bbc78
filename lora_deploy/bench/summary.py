"""A bench report from raw samples: per shape and variant the percentiles, the median's
bootstrap interval, throughput and the paired ratio to the reference; the gates asked
for (overhead, in-run regression, control-loop budgets, regressions against a saved
baseline); the configuration and the machine. `build_report` returns it validated
(schema.validate_report)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from lora_deploy import __version__
from lora_deploy.bench.control import loop_gates, loop_summary
from lora_deploy.bench.gates import add_gates, baseline_summary, configured_margin, regression_gates
from lora_deploy.bench.machine import machine_info
from lora_deploy.bench.schema import SCHEMA, ms, validate_report
from lora_deploy.bench.shapes import Shape, as_shape, shape_key
from lora_deploy.bench.stats import (
    FLAT_BOOTSTRAP,
    RATIO_STATISTIC,
    TWO_LEVEL_BOOTSTRAP,
    GateResult,
    bootstrap_median_ci,
    overhead_gate,
    p99_ratio,
    paired_ratios,
    per_session,
    percentiles,
    session_ratio_ci,
)
from lora_deploy.errors import BadInputError


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
    sessions: Sequence[int] | None = None,
    per_session_ratios: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Summary of one variant at one shape; `ratio` is (median, low, high) vs reference.

    `fed` ({"batch", "seq", "tokens", "inputs"}) is what the variant was really given:
    throughput counts its batch, and tokens only when it takes token inputs. Without it
    the requested shape is assumed to be a token shape. `loop` ({"rate_hz", "lag_s",
    "miss"}) adds the control-loop figures. `sessions` is the session (epoch) of every
    sample (`sample_sessions`); `per_session_ratios` the ratio each session measured.
    """
    stats = percentiles(samples)
    _, ci_low, ci_high = bootstrap_median_ci(samples, confidence=confidence, resamples=resamples, seed=seed)
    fed = dict(fed) if fed is not None else {"batch": shape[0], "seq": shape[1], "tokens": True}
    batch, seq = fed["batch"], fed.get("seq")
    p50 = stats["p50"]
    entry: dict[str, Any] = {
        "samples_s": [float(x) for x in samples],
        "n": len(samples),
        **{f"{name}_ms": None if value is None else ms(value) for name, value in stats.items()},
        "p50_ci_ms": [ms(ci_low), ms(ci_high)],
        "fed": fed,
        # Throughput from the median, not the mean: one stall should not
        # move the headline number.
        "throughput": {
            "samples_per_s": batch / p50 if p50 > 0 else None,
            # A generation (bench --generate) counts the tokens it generates, not its prompt.
            "tokens_per_s": batch * (fed.get("generated") or seq) / p50
            if p50 > 0 and fed.get("tokens") and seq
            else None,
        },
        "ratio": None,
    }
    if ratio is not None:
        median, low, high = ratio
        entry["ratio"] = {"vs": reference, "median": median, "low": low, "high": high}
        if per_session_ratios is not None:
            entry["ratio"]["per_session"] = [float(r) for r in per_session_ratios]
    if sessions is not None:
        entry["sample_sessions"] = [int(s) for s in sessions]
    if loop is not None:
        entry["loop"] = loop_summary(samples, loop)
    return entry


def _shape_results(
    shape: Shape,
    variants: Mapping[str, Sequence[float]],
    reference: str,
    ci: dict[str, Any],
    fed: Mapping[str, Any] | None = None,
    loop: Mapping[str, Any] | None = None,
    sessions: Sequence[int] | None = None,
) -> tuple[dict[str, Any], list[tuple[str, tuple[float, float, float]]]]:
    """Report block for one shape, plus (variant, ratio CI) for the gates. With `sessions`
    (the epoch of every round) the ratios are `stats.session_ratio_ci`'s: the session is the
    unit when there are several; in control-loop mode the p99 ratio too."""
    fed = fed or {}
    if reference not in variants:
        raise BadInputError(
            f"shape {shape_key(shape)}: reference variant {reference!r} was not measured (have {', '.join(variants)})"
        )
    entries: dict[str, Any] = {}
    ratios: list[tuple[str, tuple[float, float, float]]] = []
    labels = [0] * len(variants[reference]) if sessions is None else list(sessions)
    several = len(set(labels)) > 1
    for name, samples in variants.items():
        ratio = by_session = None
        if name != reference:
            pairs = [paired_ratios(variants[reference], samples)]
            ratio = session_ratio_ci(pairs, labels, **ci)
            by_session = per_session(pairs, labels) if several else None
            ratios.append((name, ratio))
        entries[name] = variant_entry(
            samples,
            shape,
            ratio=ratio,
            reference=reference,
            fed=fed.get(name),
            loop=None if loop is None else {"rate_hz": loop["rate_hz"], **loop["variants"][name]},
            sessions=None if sessions is None else labels,
            per_session_ratios=by_session,
            **ci,
        )
        if ratio is not None:
            entries[name]["ratio"]["statistic"] = RATIO_STATISTIC[several]["ratio"]
        if loop is not None and name != reference:
            median, low, high = session_ratio_ci([variants[reference], samples], labels, p99_ratio, **ci)
            entries[name]["p99_ratio"] = {
                "vs": reference,
                "median": median,
                "low": low,
                "high": high,
                "statistic": RATIO_STATISTIC[several]["p99_ratio"],
            }
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
    sessions: Mapping[str, Sequence[int]] | None = None,
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
    why the run stopped adding them) goes into the config; `noise` (`noise.noise_summary`:
    the medians of N repeated runs) is stored for a later comparison's margin. `sessions`
    ({shape key: the session of every round}, `sessions.concat_sessions`) makes the session
    the unit of the ratios' intervals (config `sessions`, `bootstrap`); without it every
    variant ran in one session and the intervals exclude session-to-session variation.

    The between-run margin against `baseline`: `run_margin` when given; else, when the
    baseline recorded a noise floor, per shape the larger of DEFAULT_RUN_MARGIN and the
    floor's margin (config `run_margin` null, `baseline.run_margins` per shape); else
    DEFAULT_RUN_MARGIN (gates.run_margins).
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
        shape = as_shape(key)
        k = shape_key(shape)
        shape_loop = None
        if loop is not None:
            shape_loop = {"rate_hz": loop["rate_hz"], "variants": loop["shapes"][k]}
        labels = (sessions or {}).get(k)
        block, ratios = _shape_results(shape, variants, reference, ci, (fed or {}).get(k), shape_loop, labels)
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
        gates += loop_gates(block, k, max_p99, max_misses, on_inconclusive)
    if not blocks:
        raise BadInputError("no results to report")
    if rounds is None:
        rounds = len(next(iter(results.values()))[reference])
    count = max((len(set(labels)) for labels in (sessions or {}).values()), default=1)
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
        "run_margin": configured_margin(run_margin, baseline),
        "rate_hz": None if loop is None else loop["rate_hz"],
        "max_p99_ms": None if max_p99 is None else ms(max_p99),
        "max_misses": max_misses,
        "adaptive": None if adaptive is None else dict(adaptive),
        "noise_runs": None if noise is None else noise["runs"],
        "sessions": count,
        "bootstrap": TWO_LEVEL_BOOTSTRAP if count > 1 else FLAT_BOOTSTRAP,
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
