"""Adaptive rounds (`bench --until-width 1%`): more interleaved rounds until every
interval the gates decide on is narrow enough, or the time budget (--max-time) is spent."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from lora_deploy.bench.measure import BenchProgress, gc_paused, measure_shapes
from lora_deploy.bench.stats import fraction, more_rounds, widest_interval
from lora_deploy.bench.timing import measure_interleaved, parse_duration
from lora_deploy.errors import BadInputError

# The time budget when no --max-time is given, the most rounds one shape may reach, and
# the bootstrap resamples of each width check (the report's own intervals use the full count).
DEFAULT_MAX_TIME_S = 120.0
MAX_ADAPTIVE_ROUNDS = 10_000
WIDTH_CHECK_RESAMPLES = 1000


def adaptive_settings(
    until_width: float | str | None, max_time: str | float | None, rate_hz: float | None, noise_runs: int | None
) -> tuple[float | None, float]:
    """(target width or None, time budget in seconds) of --until-width / --max-time."""
    if until_width is None:
        if max_time is not None:
            raise BadInputError("--max-time is the budget of --until-width: add --until-width (e.g. 1%)")
        return None, DEFAULT_MAX_TIME_S
    width = fraction(until_width)
    if not width:
        raise BadInputError("--until-width must be above 0, e.g. 1%")
    if rate_hz is not None:
        raise BadInputError("--until-width adds rounds; the control-loop mode (--rate) runs for --duration instead")
    if noise_runs is not None:
        raise BadInputError("--noise-runs records fixed rounds per run, to compare their medians: drop --until-width")
    return width, DEFAULT_MAX_TIME_S if max_time is None else parse_duration(max_time, "time budget")


def measure_adaptive(
    calls: Mapping[str, Mapping[str, Callable[[], None]]],
    *,
    rounds: int,
    warmup: int,
    inner: int,
    reference: str,
    until_width: float,
    max_time_s: float,
    own: bool = False,
    progress: BenchProgress | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, Any]]:
    """`measure_shapes`, then more rounds for every shape whose widest interval
    (`stats.widest_interval`; `own`: each variant's own median counts too) is wider than
    `until_width`, until none is or `max_time_s` (counted from the start, warm-up included)
    is spent. Added rounds are whole interleaved rounds continuing the rotation, after one
    untimed call per variant (the shape was cold while the others ran), so pairing and
    balance are those of one long run. Returns (results, what happened: per shape its
    rounds and final width, and why the run stopped)."""
    start = clock()
    results = measure_shapes(calls, rounds=rounds, warmup=warmup, inner=inner, progress=progress)
    stopped = "narrow"
    with gc_paused():  # once for all the added rounds: a collection can take a second in a big process
        while True:
            widths = {
                key: widest_interval(samples, reference, own=own, resamples=WIDTH_CHECK_RESAMPLES)
                for key, samples in results.items()
            }
            wide = [key for key, (width, _) in widths.items() if width > until_width]
            if not wide:
                stopped = "narrow"
                break
            added = 0
            for key in wide:
                done = len(next(iter(results[key].values())))
                # What one more round costs, from this shape's own samples.
                per_round = inner * sum(float(np.mean(v)) for v in results[key].values())
                left = max_time_s - (clock() - start)
                fits = int(left // per_round) if per_round > 0 else MAX_ADAPTIVE_ROUNDS
                step = min(more_rounds(done, widths[key][0], until_width), fits, MAX_ADAPTIVE_ROUNDS - done)
                if step < 1:
                    stopped = "time" if done < MAX_ADAPTIVE_ROUNDS else "rounds"
                    continue
                tick = None
                if progress is not None:
                    tick = lambda i, n, key=key, done=done: progress(key, done + i + 1, done + n)
                more = measure_interleaved(
                    calls[key], warmup=min(warmup, 1), rounds=step, inner=inner, progress=tick, first_round=done
                )
                for name, values in more.items():
                    results[key][name].extend(values)
                added += step
            if not added:
                break
    elapsed = clock() - start
    widest_key = max(widths, key=lambda k: widths[k][0])
    width, what = widths[widest_key]
    reason = {
        "narrow": f"every interval at most {until_width:.1%} wide",
        "time": f"the {max_time_s:g} s budget ran out with {widest_key}: {what} {width:.1%} wide",
        "rounds": f"{MAX_ADAPTIVE_ROUNDS} rounds reached with {widest_key}: {what} {width:.1%} wide",
    }[stopped]
    return results, {
        "until_width": until_width,
        "max_time_s": max_time_s,
        "initial_rounds": rounds,
        "stopped": stopped,
        "reason": reason,
        "elapsed_s": elapsed,
        "shapes": {
            key: {"rounds": len(next(iter(results[key].values()))), "width": w, "widest": what}
            for key, (w, what) in widths.items()
        },
    }
