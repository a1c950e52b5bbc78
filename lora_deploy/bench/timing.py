"""The measurement loop of `lora-deploy bench`, independent of any backend.

Each variant is a zero-argument callable that runs one forward pass and
returns only when the work is done (a CUDA callable synchronises inside
itself). Variants are interleaved round by round and their order rotates
every round, so clock-frequency drift, thermal throttling, a neighbour's job
or a warm cache hits every variant alike instead of whichever ran last.
"""

from __future__ import annotations

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
) -> dict[str, list[float]]:
    """Time every variant once per round; return seconds per call per round.

    Warmup calls (`warmup` per variant, interleaved too, never timed: the
    clock is not even read) let lazy initialisation, autotuning and caches
    settle. `progress(round_index, rounds)` is called after each round with
    the 0-based index of the round just finished. The result keeps the
    variants' order, and list i of every variant comes from the same round,
    ready for `stats.paired_ratios`.
    """
    _check_args(variants, warmup, rounds, inner)
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        for name in round_order(names, round_index):
            samples[name].append(_time_once(variants[name], inner, clock))
        if progress is not None:
            progress(round_index, rounds)
    return samples
