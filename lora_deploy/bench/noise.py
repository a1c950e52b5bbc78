"""Repeated runs (`bench --noise-runs N`): the whole measurement N times, every model
reopened in between, and the noise floor their medians show (report["noise"]), which a
later comparison against this report as a baseline is calibrated by (`gates.run_margins`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lora_deploy.bench.measure import BenchProgress, measure_shapes
from lora_deploy.bench.schema import ms
from lora_deploy.bench.shapes import as_shape, shape_key
from lora_deploy.bench.stats import noise_margin
from lora_deploy.errors import BadInputError

# Fewer runs leave the prediction bound too wide to be of use (t = 12.7 for 2).
MIN_NOISE_RUNS = 3

Calls = Mapping[str, Mapping[str, Callable[[], None]]]


def check_noise_runs(noise_runs: int | None, rate_hz: float | None) -> None:
    """--noise-runs: at least MIN_NOISE_RUNS, and never with the control-loop mode."""
    if noise_runs is not None and (noise_runs < MIN_NOISE_RUNS or rate_hz is not None):
        raise BadInputError(
            f"--noise-runs must be >= {MIN_NOISE_RUNS}, got {noise_runs}"
            if rate_hz is None
            else "--noise-runs records a baseline's rounds; the control-loop mode (--rate) has none"
        )


def measure_repeated(
    calls: Calls,
    runs: int,
    reopen: Callable[[], Calls],
    *,
    rounds: int,
    warmup: int,
    inner: int,
    progress: BenchProgress | None = None,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, Any]]:
    """`measure_shapes` `runs` times, `reopen()` giving fresh calls before every repeat but
    the first; returns (every round of every run, `noise_summary`)."""
    done = []
    for run in range(runs):
        if run:  # a fresh open of every model: new sessions, new allocations, a later moment
            calls = reopen()
        tick = _offset(progress, run, rounds, runs)
        done.append(measure_shapes(calls, rounds=rounds, warmup=warmup, inner=inner, progress=tick))
    return concat_runs(done), noise_summary(done, rounds)


def _offset(progress: BenchProgress | None, run: int, rounds: int, runs: int) -> BenchProgress | None:
    """Progress of repeat `run` as part of all `runs` repeats."""
    if progress is None:
        return None
    return lambda key, done, total: progress(key, run * rounds + done, runs * rounds)


def concat_runs(runs: Sequence[Mapping[str, Mapping[str, Sequence[float]]]]) -> dict[str, dict[str, list[float]]]:
    """The rounds of repeated runs one after another (each round stays a pair)."""
    return {key: {name: [x for run in runs for x in run[key][name]] for name in runs[0][key]} for key in runs[0]}


def noise_summary(runs: Sequence[Mapping[str, Mapping[str, Sequence[float]]]], rounds: int) -> dict[str, Any]:
    """The noise floor of a run made of N repeats ({shape: {variant: samples}} each, every
    model reopened in between): each repeat's median per variant, and the between-run
    margin they call for (`stats.noise_margin`), per variant and per shape (the largest)."""
    shapes: dict[str, Any] = {}
    for key in runs[0]:
        k = shape_key(as_shape(key))
        variants = {}
        for name in runs[0][key]:
            medians = [float(np.median(run[key][name])) for run in runs]
            variants[name] = {
                "medians_ms": [ms(m) for m in medians],
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
