"""Several sessions per variant (`bench --sessions K`): the run split into K epochs, each
with a fresh session (runner) of every variant, the rounds (or the control loop's duration)
divided between them, and every sample labelled with its epoch.

One ONNX Runtime session of a graph runs at its own speed, a few percent off another
session of the same graph (measured: the same graph in two sessions 0.983 [0.975, 0.991]),
so one session per variant puts that difference into every ratio, where the bootstrap of
rounds cannot see it. With K sessions `stats.session_ratio_ci` makes the session the unit.
Memory stays that of one session per variant: an epoch's sessions are closed before the
next epoch's are opened.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from lora_deploy.bench.measure import BenchProgress
from lora_deploy.bench.noise import concat_runs
from lora_deploy.errors import BadInputError

# Sessions per variant when --sessions is not given (fewer when there are fewer rounds; one
# with --until-width or --noise-runs). README "Sessions": the fewest that estimate the
# spread between sessions at all (2 leave t = 12.7), at three opens of every model.
DEFAULT_SESSIONS = 3

Calls = Mapping[str, Mapping[str, Callable[[], None]]]
Part = TypeVar("Part")


def check_sessions(sessions: int | None) -> int | None:
    """A --sessions value: None (the default) or an integer >= 1."""
    if sessions is not None and (isinstance(sessions, bool) or not isinstance(sessions, int) or sessions < 1):
        raise BadInputError(f"--sessions must be an integer >= 1, got {sessions!r}")
    return sessions


def session_count(
    sessions: int | None,
    rounds: int,
    *,
    until_width: Any = None,
    noise_runs: int | None = None,
    rate: Any = None,
    ticks: float | None = None,
) -> int:
    """Sessions per variant for a run: the given number, checked against the other options,
    or the default (DEFAULT_SESSIONS, at most one per round, or per tick of the control
    loop: `ticks` is --duration x --rate / variants; one with --until-width or
    --noise-runs, which keep their own single session per run)."""
    check_sessions(sessions)
    if sessions is None:
        if until_width is not None or noise_runs is not None:
            return 1
        most = rounds if rate is None else (DEFAULT_SESSIONS if ticks is None else int(ticks))
        return max(1, min(DEFAULT_SESSIONS, most))
    if rate is not None and ticks is not None and 1 < sessions and ticks < sessions:
        raise BadInputError(
            f"--sessions {sessions} splits --duration between them: it holds {ticks:g} tick(s) per variant at that "
            "rate, fewer than one per session; lengthen --duration or lower --sessions"
        )
    if sessions > 1 and until_width is not None:
        raise BadInputError(
            "--until-width adds rounds to one session per variant; with several sessions the interval is bounded "
            "by the spread between sessions, which rounds cannot narrow: drop --until-width or pass --sessions 1"
        )
    if sessions > 1 and noise_runs is not None:
        raise BadInputError("--noise-runs already reopens every model between its runs: pass --sessions 1 with it")
    if rate is None and sessions > rounds:
        raise BadInputError(f"--sessions {sessions} splits --rounds {rounds} between them: need rounds >= sessions")
    return sessions


def split_rounds(total: int, sessions: int) -> list[int]:
    """`total` rounds shared by `sessions` epochs as evenly as possible, the first ones taking the rest."""
    share, rest = divmod(total, sessions)
    return [share + (1 if i < rest else 0) for i in range(sessions)]


def in_sessions(
    calls: Calls,
    sessions: int,
    reopen: Callable[[], Calls],
    measure: Callable[[Calls, int, BenchProgress | None], Part],
    progress: BenchProgress | None = None,
) -> list[Part]:
    """`measure(calls, epoch, progress)` once per epoch, `reopen()` (every variant closed, then
    opened afresh, and checked again) giving the calls of every epoch after the first.
    Progress counts on across the epochs; the epochs still to come are taken to be as long
    as the current one, so the total is exact at the end."""
    parts: list[Part] = []
    offset: dict[str, int] = {}
    last: dict[str, int] = {}

    epoch = 0

    def tick(key: str, done: int, total: int) -> None:
        last[key] = total
        if progress is not None:
            progress(key, offset.get(key, 0) + done, offset.get(key, 0) + total * (sessions - epoch))

    for epoch in range(sessions):
        if epoch:
            calls = reopen()
        parts.append(measure(calls, epoch, tick))
        for key, total in last.items():
            offset[key] = offset.get(key, 0) + total
        last.clear()
    return parts


def concat_sessions(
    parts: Sequence[Mapping[str, Mapping[str, Sequence[Any]]]],
) -> tuple[dict[str, dict[str, list[Any]]], dict[str, list[int]]]:
    """The epochs' {shape: {variant: samples}} one after another (each round stays a pair),
    and per shape the epoch of every round."""
    results = concat_runs(parts)
    labels = {}
    for key, variants in parts[0].items():
        first = next(iter(variants))
        labels[key] = [epoch for epoch, part in enumerate(parts) for _ in part[key][first]]
    return results, labels


def concat_loops(
    parts: Sequence[Mapping[str, Mapping[str, Mapping[str, Sequence[Any]]]]],
) -> dict[str, dict[str, dict[str, list[Any]]]]:
    """The control loop's per-call records ({shape: {variant: {lag_s, miss}}}) of the epochs, joined."""
    return {
        key: {
            name: {field: [x for part in parts for x in part[key][name][field]] for field in record}
            for name, record in variants.items()
        }
        for key, variants in parts[0].items()
    }
