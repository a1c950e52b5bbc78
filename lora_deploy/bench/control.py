"""The control-loop mode (`bench --rate 100hz`): every shape paced at a fixed rate for
--duration, ticks alternating between variants; its figures (misses, jitter, start lag)
and its absolute gates (--max-p99, --max-misses)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lora_deploy.bench.measure import BenchProgress, gc_paused
from lora_deploy.bench.schema import ms
from lora_deploy.bench.stats import GateResult, absolute_gate, tail_percentile
from lora_deploy.bench.timing import longest_run, measure_paced, parse_duration, parse_rate
from lora_deploy.errors import BadInputError

# How long each shape runs when no --duration is given.
DEFAULT_DURATION_S = 30.0
# A p99 budget is conclusive only with 10 calls or more beyond the 99th percentile.
MIN_P99_SAMPLES = 1000


def loop_settings(
    rate: str | float | None, duration: str | float | None, max_p99: str | float | None, max_misses: int | None
) -> tuple[float | None, float, float | None]:
    """(rate in Hz or None, seconds per shape, p99 budget in seconds or None) of --rate,
    --duration, --max-p99 and --max-misses; the last three need --rate."""
    rate_hz = None if rate is None else parse_rate(rate)
    if rate_hz is None and (duration is not None or max_p99 is not None or max_misses is not None):
        raise BadInputError("--duration, --max-p99 and --max-misses belong to the control-loop mode: add --rate")
    duration_s = DEFAULT_DURATION_S if duration is None else parse_duration(duration)
    max_p99_s = None if max_p99 is None else parse_duration(max_p99, "p99 budget")
    if max_misses is not None and max_misses < 0:
        raise BadInputError(f"max misses must be >= 0, got {max_misses}")
    return rate_hz, duration_s, max_p99_s


def measure_loop(
    calls: Mapping[str, Mapping[str, Callable[[], None]]],
    *,
    rate_hz: float,
    duration_s: float,
    warmup: int,
    progress: BenchProgress | None = None,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, dict[str, list]]]]:
    """Every shape paced for `duration_s` at `rate_hz`, ticks alternating between variants;
    returns ({shape: {variant: latencies}}, {shape: {variant: lag, misses}})."""
    results, loops = {}, {}
    for key, shape_calls in calls.items():
        ticks = max(1, int(round(duration_s * rate_hz / len(shape_calls))))
        tick = None if progress is None else (lambda i, n, key=key: progress(key, i + 1, n))
        with gc_paused():
            paced = measure_paced(shape_calls, rate_hz=rate_hz, ticks=ticks, warmup=warmup, progress=tick)
        results[key] = {name: r["latency_s"] for name, r in paced.items()}
        loops[key] = {name: {"lag_s": r["lag_s"], "miss": r["miss"]} for name, r in paced.items()}
    return results, loops


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
        "jitter_ms": ms(float(done.std())),
        "lag_p99_ms": None if (lag_p99 := tail_percentile(lag, "p99")) is None else ms(lag_p99),
        "lag_max_ms": ms(float(lag.max())),
        "lag_s": [float(x) for x in lag],
        "miss": misses,
    }


def loop_gates(
    block: Mapping[str, Any], key: str, max_p99: float | None, max_misses: int | None, on_inconclusive: str
) -> list[GateResult]:
    """Absolute budgets of the control-loop mode, one per variant of a shape's report block."""
    gates = []
    for name, entry in block["variants"].items():
        subject = f"{key}/{name}"
        if max_p99 is not None:
            n, p99 = entry["n"], entry.get("p99_ms")
            gates.append(
                absolute_gate(
                    "p99",
                    float("nan") if p99 is None else round(p99, 4),
                    ms(max_p99),
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
                    "misses",
                    entry["loop"]["misses"],
                    max_misses,
                    subject=subject,
                    unit="",
                    on_inconclusive=on_inconclusive,
                )
            )
    return gates
