"""Small helpers shared by several modules (kept free of heavy imports)."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import IO


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

    Read from package metadata, so nothing heavy (torch) is imported.
    """
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_file_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write via a temp file in the same directory, then os.replace it into place.

    A reader sees the old file or the whole new one, never a half-written file; an error
    (or Ctrl-C) leaves no temp file behind. Unwritable destinations are bad input.
    """
    from lora_deploy.errors import BadInputError

    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as e:
        raise BadInputError(f"cannot write {target}: {e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; reports are for sharing
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


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
