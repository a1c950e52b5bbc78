"""The measurement loop of `lora-deploy bench`, independent of any backend.

Each variant is a zero-argument callable that runs one forward pass and
returns only when the work is done (a CUDA callable synchronises inside
itself). Variants are interleaved round by round and their order rotates
every round, so clock-frequency drift, thermal throttling, a neighbour's job
or a warm cache hits every variant alike instead of whichever ran last.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping

from lora_deploy.errors import BadInputError

Progress = Callable[[int, int], None]


def round_order(names: list[str], round_index: int) -> list[str]:
    """Order of the variants in a round: the list rotated by the round index.

    Two variants alternate A B, B A, ...; with more, each variant takes every
    position equally often over len(names) rounds.
    """
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def _check_args(variants: Mapping[str, Callable[[], None]], warmup: int, rounds: int, inner: int) -> None:
    if not variants:
        raise BadInputError("nothing to measure: no variants given")
    check_counts(warmup, rounds, inner)


def check_counts(warmup: int, rounds: int, inner: int) -> None:
    """Fail on nonsense counts (callers check early, before minutes of loading)."""
    if warmup < 0:
        raise BadInputError(f"warmup must be >= 0, got {warmup}")
    if rounds < 1:
        raise BadInputError(f"rounds must be >= 1, got {rounds}")
    if inner < 1:
        raise BadInputError(f"inner must be >= 1, got {inner}")


def _time_once(fn: Callable[[], None], inner: int, clock: Callable[[], float]) -> float:
    """Seconds per call, averaged over `inner` back-to-back calls."""
    start = clock()
    for _ in range(inner):
        fn()
    return (clock() - start) / inner


def measure_interleaved(
    variants: Mapping[str, Callable[[], None]],
    *,
    warmup: int = 5,
    rounds: int = 50,
    inner: int = 1,
    clock: Callable[[], float] = time.perf_counter,
    progress: Progress | None = None,
    first_round: int = 0,
) -> dict[str, list[float]]:
    """Time every variant once per round; return seconds per call per round.

    Warmup calls (`warmup` per variant, interleaved too, never timed: the
    clock is not even read) let lazy initialisation, autotuning and caches
    settle. `progress(round_index, rounds)` is called after each round with
    the 0-based index of the round just finished. The result keeps the
    variants' order, and list i of every variant comes from the same round,
    ready for `stats.paired_ratios`. `first_round` continues an earlier call's rounds
    (the rotation of the order goes on from there), so added rounds keep the balance.
    """
    _check_args(variants, warmup, rounds, inner)
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        for name in round_order(names, first_round + round_index):
            samples[name].append(_time_once(variants[name], inner, clock))
        if progress is not None:
            progress(round_index, rounds)
    return samples


# ---------------------------------------------------------------- control-loop mode


def _sleep_until(deadline: float, clock: Callable[[], float], sleep: Callable[[float], None]) -> None:
    """Sleep most of the way, then spin: time.sleep alone overshoots by ~0.1 ms or more."""
    while True:
        left = deadline - clock()
        if left <= 0:
            return
        if left > 0.002:
            sleep(left - 0.001)
        elif sleep is not time.sleep:
            sleep(left)  # a synthetic clock: no spinning on a clock that only sleep advances


def measure_paced(
    variants: Mapping[str, Callable[[], None]],
    *,
    rate_hz: float,
    ticks: int,
    warmup: int = 5,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
    progress: Progress | None = None,
) -> dict[str, dict[str, list]]:
    """A control loop: one call per tick at `rate_hz`, ticks alternating between variants.

    Tick k is scheduled at t0 + k / rate_hz and runs variant k % n (the order rotated
    every n ticks, as in `round_order`), so every variant runs under the same pacing and
    the variants' i-th calls form a pair. A call that overruns delays the next tick: it
    starts late, never early, and the schedule is not shifted (as a fixed-rate
    controller behaves). For every timed call the result holds `latency_s` (call start
    to end), `lag_s` (start minus scheduled start) and `miss` (the call ended after its
    deadline, the next tick's scheduled start). `warmup` paced ticks per variant come
    first and are not recorded. `ticks` counts timed ticks per variant.
    """
    _check_args(variants, warmup, ticks, 1)
    if not (isinstance(rate_hz, (int, float)) and math.isfinite(rate_hz) and rate_hz > 0):
        raise BadInputError(f"rate must be a positive number of Hz, got {rate_hz}")
    names = list(variants)
    n = len(names)
    period = 1.0 / rate_hz
    out: dict[str, dict[str, list]] = {name: {"latency_s": [], "lag_s": [], "miss": []} for name in names}
    total = (warmup + ticks) * n
    start = clock()
    for k in range(total):
        scheduled = start + k * period
        _sleep_until(scheduled, clock, sleep)
        name = round_order(names, k // n)[k % n]
        begin = clock()
        variants[name]()
        end = clock()
        if k >= warmup * n:
            record = out[name]
            record["latency_s"].append(end - begin)
            record["lag_s"].append(begin - scheduled)
            record["miss"].append(end > scheduled + period)
            if progress is not None and (k + 1) % n == 0:
                progress((k + 1) // n - warmup - 1, ticks)
    return out


def longest_run(flags: list[bool]) -> int:
    """Length of the longest stretch of consecutive True values."""
    best = current = 0
    for flag in flags:
        current = current + 1 if flag else 0
        best = max(best, current)
    return best


_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(hz|khz)?\s*$", re.IGNORECASE)
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|min)?\s*$", re.IGNORECASE)


def parse_rate(text: str | float) -> float:
    """'100hz' / '100' / '1khz' -> Hz."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = _RATE_RE.match(str(text))
        if not match:
            raise BadInputError(f"bad rate {text!r}: expected e.g. 100hz")
        value = float(match.group(1)) * (1000.0 if (match.group(2) or "").lower() == "khz" else 1.0)
    if not math.isfinite(value) or value <= 0:
        raise BadInputError(f"bad rate {text!r}: must be above 0 Hz")
    return value


def parse_duration(text: str | float, what: str = "duration") -> float:
    """'30s' / '8ms' / '2min' / '30' (seconds) -> seconds."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = _DURATION_RE.match(str(text))
        if not match:
            raise BadInputError(f"bad {what} {text!r}: expected e.g. 30s or 8ms")
        unit = (match.group(2) or "s").lower()
        value = float(match.group(1)) * {"ms": 1e-3, "s": 1.0, "min": 60.0}[unit]
    if not math.isfinite(value) or value <= 0:
        raise BadInputError(f"bad {what} {text!r}: must be above 0")
    return value
