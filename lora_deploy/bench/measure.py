"""Timing every shape of a run: `timing.measure_interleaved` per shape with the garbage
collector paused, and torch's thread count set for the run. The adaptive, repeated and
control-loop modes build on these (`adaptive`, `noise`, `control`)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator, Mapping

from lora_deploy.bench.timing import measure_interleaved

# progress(shape key, rounds done, rounds in total), called after every round.
BenchProgress = Callable[[str, int, int], None]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No garbage-collector pauses inside timed rounds (as timeit does)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch.set_num_threads for the run, restored afterwards (it is process-global)."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_shapes(
    calls: Mapping[str, Mapping[str, Callable[[], None]]],
    *,
    rounds: int,
    warmup: int,
    inner: int,
    progress: BenchProgress | None = None,
) -> dict[str, dict[str, list[float]]]:
    """{shape key: {variant: seconds per round}}, each shape interleaved across variants."""
    results = {}
    for key, shape_calls in calls.items():
        tick = None if progress is None else (lambda i, n, key=key: progress(key, i + 1, n))
        with gc_paused():
            results[key] = measure_interleaved(shape_calls, warmup=warmup, rounds=rounds, inner=inner, progress=tick)
    return results
