"""Directory outputs built in a hidden sibling and renamed into place when complete.

A run killed outright (SIGKILL, a power cut, an out-of-memory kill) cannot remove its
own staging directory, and a merge's is gigabytes. So each staging directory is locked
(flock) while its run is alive, and the next run writing the same target removes the
siblings whose lock is free: the kernel drops a lock when its process dies, whatever
killed it, so a free lock means a dead run, never a slow one.
"""

from __future__ import annotations

import glob
import os
import shutil
import uuid
from pathlib import Path

from .errors import CheckpointError

try:
    import fcntl
except ImportError:  # no flock (Windows): leftovers cannot be told from live runs, so none are removed
    fcntl = None

# Hidden sibling names: `.{target}.{kind}-{8 hex}`. A directory is created as "new",
# locked, then renamed to "partial", so every "partial" one is locked while its run lives.
STAGING, SWAPPED_OUT, CREATING = "partial", "old", "new"


class staging_dir:
    """A hidden sibling directory renamed onto `target` only if the block succeeds.

    Errors (Ctrl-C included) remove it; CheckpointErrors are re-raised naming the file
    under `target`, not under the hidden directory. With rename=False it is a scratch
    directory the caller moves files out of, removed either way.
    """

    def __init__(self, target: Path, rename: bool = True):
        self.target = target
        self.rename = rename
        self.tmp = sibling(target, STAGING)
        self._lock: int | None = None

    def __enter__(self) -> Path:
        remove_dead_siblings(self.target)
        creating = sibling(self.target, CREATING)
        creating.mkdir()
        self._lock = lock(creating)
        os.replace(creating, self.tmp)  # the lock is on the directory itself: it moves with it
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self.rename:
                replace_dir(self.tmp, self.target)
                return
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, CheckpointError):
                raise CheckpointError(str(exc).replace(str(self.tmp), str(self.target))) from None
        finally:
            unlock(self._lock)


def sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:8]}"


def replace_dir(src: Path, target: Path) -> None:
    """Move src onto target; an existing target is swapped out first, then removed.

    The swapped-out directory stays locked until it is gone, so a concurrent run never
    mistakes it for a leftover while it may still have to be moved back.
    """
    if not target.exists():
        os.replace(src, target)
        return
    held = lock(target)
    trash = sibling(target, SWAPPED_OUT)
    try:
        os.replace(target, trash)
        try:
            os.replace(src, target)
        except OSError:
            os.replace(trash, target)
            raise
        shutil.rmtree(trash, ignore_errors=True)
    finally:
        unlock(held)


def remove_dead_siblings(target: Path) -> list[Path]:
    """Remove staging and swapped-out siblings of `target` left by runs that died."""
    if fcntl is None:
        return []
    removed = []
    for kind in (STAGING, SWAPPED_OUT):
        pattern = f".{glob.escape(target.name)}.{kind}-*"
        for path in target.parent.glob(pattern):
            if path.is_dir() and not path.is_symlink() and is_abandoned(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def is_abandoned(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:  # held: its run is alive
        return False
    finally:
        os.close(fd)  # also releases the lock just taken


def lock(path: Path) -> int | None:
    """Hold an exclusive flock on a directory until unlock() or this process ends."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass  # a file system without flock: leftovers there are not removed, nothing else changes
    return fd


def unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)
