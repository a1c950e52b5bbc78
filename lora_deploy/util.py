"""Small helpers shared by several modules (kept free of heavy imports)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterable, Iterator


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first non-blank line of an error's message (its type name when it has none).

    Library errors often carry pages of context; our errors are one line each.
    `limit` cuts the line to that many characters.
    """
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if limit is None else line[:limit]


def library_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed version of each distribution in `names`; ones not installed are left out.

    Read from package metadata, so nothing heavy (torch) is imported; importlib.metadata
    itself is imported here, on first use, as most commands never need it.
    """
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@contextlib.contextmanager
def signal_handlers(handlers: dict[int, Callable]) -> Iterator[None]:
    """Signal handlers set for the block, then put back. ExitStack runs every restore even
    when one raises, so a signal arriving while they are swapped back cannot leave a
    temporary handler installed.

    Outside the main thread, where handlers cannot be set, the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with contextlib.ExitStack() as restore:
        for signum, handler in handlers.items():
            restore.callback(signal.signal, signum, signal.signal(signum, handler))
        yield
