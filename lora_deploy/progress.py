"""Progress reporting: a bar on a terminal, nothing (then one summary line) in CI logs.

`byte_progress` drives the merge's bar, `bench_progress` one bar per benchmark shape.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def byte_progress(label: str, enabled: bool = True) -> Iterator[Callable[[int, int], None] | None]:
    """Yield a (done, total) callback driving a rich progress bar, or None off a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress(
        f"[bold]{label}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@contextlib.contextmanager
def bench_progress(enabled: bool = True) -> Iterator[Callable[[str, int, int], None] | None]:
    """A rich bar per shape on a terminal; None (no output) otherwise, e.g. in CI logs."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[bold]bench {task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        tasks: dict[str, Any] = {}

        def update(key: str, done: int, total: int) -> None:
            if key not in tasks:
                tasks[key] = bar.add_task(key, total=total)
            bar.update(tasks[key], completed=done, total=total)  # adaptive rounds and repeats raise the total

        yield update
