"""Directory outputs built in a hidden sibling and renamed into place when complete.

A run killed outright (SIGKILL, a power cut, an out-of-memory kill) cannot remove its
own staging directory, and a merge's is gigabytes. So each staging directory is locked
(flock) while its run is alive, and the next run writing the same target removes the
siblings whose lock is free: the kernel drops a lock when its process dies, whatever
killed it, so a free lock means a dead run, never a slow one.

Only this machine's siblings are removed (the host is part of the name): on shared
storage where flock is local to each machine (NFS with local_lock, some parallel file
systems), another machine's live run would look dead.

Single files go the same way (write_file_atomic, write_path_atomic): written inside a
locked staging directory and renamed out of it, so a killed write is cleaned up alike.

A failure to write is an OutputError (exit 3), not bad input, except where the path the
user gave has the wrong shape (a file where a directory belongs, a directory where a
file belongs, a missing parent): that they can fix on the command line.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from lora_deploy.errors import (
    BadInputError,
    InternalError,
    LoraDeployError,
    OutputError,
)
from lora_deploy.util import signal_handlers

try:
    import fcntl
except ImportError:  # no flock (Windows): leftovers cannot be told from live runs, so none are removed
    fcntl = None

# Hidden sibling names: `.{target}.{kind}-{host}-{8 hex}`. A directory is created as
# "new", locked, then renamed to "partial", so every "partial" one is locked while its run
# lives; "old" is a replaced output on its way out, locked until removed.
STAGING, SWAPPED_OUT, CREATING = "partial", "old", "new"
HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
# A "new" directory is unlocked for the instant between mkdir and flock: only older ones
# are taken for leftovers.
CREATING_GRACE_S = 60.0
# How long to wait for another run that holds the lock on an output it has just renamed
# into place (it releases it right after).
LOCK_WAIT_S = 5.0
# What an OSError says about the user's path rather than about the disk.
PATH_SHAPE_ERRNOS = (errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOENT)


class staging_dir:
    """A hidden sibling directory renamed onto `target` only if the block succeeds.

    Errors (Ctrl-C included) remove it; our errors are re-raised naming the file under
    `target`, not under the hidden directory. With rename=False it is a scratch
    directory the caller moves files out of, removed either way.
    """

    def __init__(self, target: Path, rename: bool = True):
        self.target = target
        self.rename = rename
        self.tmp = sibling(target, STAGING)
        self._lock: int | None = None

    def __enter__(self) -> Path:
        creating = sibling(self.target, CREATING)
        try:
            remove_dead_siblings(self.target)
            creating.mkdir()
        except OSError as exc:
            raise output_error(self.target, exc, "cannot create the output") from exc
        try:
            self._lock = lock(creating)
            os.replace(creating, self.tmp)  # the lock is on the directory itself: it moves with it
        except BaseException:
            unlock(self._lock)
            shutil.rmtree(creating, ignore_errors=True)
            raise
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self.rename:
                self._commit()
                return
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, LoraDeployError):
                rename_in_message(exc, self.tmp, self.target)
        finally:
            unlock(self._lock)

    def _commit(self) -> None:
        try:
            replace_dir(self.tmp, self.target)
        except BaseException as exc:
            shutil.rmtree(self.tmp, ignore_errors=True)  # gone already if the rename was done
            if isinstance(exc, OSError):
                raise output_error(self.target, exc, "cannot move the output into place") from None
            raise


def write_file_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None], *, durable: bool = False) -> Path:
    """Write a file through `write(stream)`; readers see the old file or the whole new one.

    durable=True also fsyncs the file and then its directory (survives a power cut).
    """

    def to_file(staged: Path) -> None:
        with open(staged, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())

    target = write_path_atomic(path, to_file)
    if durable:
        sync_dir(target.parent)
    return target


def write_path_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a file through `write(path)`, for libraries that open the file themselves.

    `write` gets a path in a locked staging directory beside the target; the file is
    renamed onto the target only if `write` returns. On an error (Ctrl-C included) the
    old file is untouched and nothing is left; after a kill, the next write of the same
    target removes the leftover.
    """
    target = Path(path)
    make_parent(target)
    with staging_dir(target, rename=False) as tmp:
        staged = tmp / target.name
        try:
            write(staged)
        except OSError as exc:  # inside our own staging directory: the disk, not the path, failed
            raise OutputError(f"{target}: cannot write ({exc.strerror or exc})") from exc
        except LoraDeployError as exc:
            rename_in_message(exc, staged, target)
            raise
        move_file(staged, target)
    return target


def make_parent(target: Path) -> None:
    if target.is_dir():
        raise BadInputError(f"{target}: is a directory; give a file path")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(target.parent, exc, "cannot create the directory") from exc


def move_file(staged: Path, target: Path) -> None:
    if not staged.is_file():  # `write` returned without writing the file it promised
        raise InternalError(f"{target}: nothing was written")
    try:
        os.replace(staged, target)
    except OSError as exc:
        raise output_error(target, exc, "cannot move the output into place") from exc


def sync_dir(directory: Path) -> None:
    """fsync a directory, so a rename into it survives a power cut."""
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise OutputError(f"{directory}: cannot sync ({exc.strerror or exc})") from exc


def output_error(path: Path, exc: OSError, doing: str) -> LoraDeployError:
    """An OSError on a path the user gave: bad input if the path has the wrong shape,
    else a failed write."""
    kind = BadInputError if exc.errno in PATH_SHAPE_ERRNOS else OutputError
    return kind(f"{path}: {doing} ({exc.strerror or exc})")


def rename_in_message(exc: LoraDeployError, hidden: Path, shown: Path) -> None:
    """Name `shown` instead of the hidden staging path in an error on its way out.

    The message is edited in place, so the error keeps its type and traceback.
    """
    if len(exc.args) == 1 and isinstance(exc.args[0], str):
        exc.args = (exc.args[0].replace(str(hidden), str(shown)),)


def sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{HOST}-{uuid.uuid4().hex[:8]}"


def replace_dir(src: Path, target: Path) -> None:
    """Move src onto target; an existing target is swapped out first, then removed.

    Runs with Ctrl-C and SIGTERM held back (they are delivered when it returns), so target
    is always either the old output or the new one, and no swapped-out copy is left. The
    swapped-out directory stays locked until it is gone, so a concurrent run never takes
    it for a leftover while it may still be moved back.
    """
    with signals_deferred():
        try:
            os.replace(src, target)
            return
        except OSError as exc:  # target exists (or another run's output has just appeared)
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR, errno.EACCES):
                raise
        held = lock(target, wait=LOCK_WAIT_S)
        try:
            trash = sibling(target, SWAPPED_OUT)
            os.replace(target, trash)
            try:
                os.replace(src, target)
            except BaseException:
                os.replace(trash, target)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        finally:
            unlock(held)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the block, then deliver them to their handlers."""
    pending: list[int] = []

    def defer(signum, frame) -> None:
        pending.append(signum)

    with signal_handlers({signal.SIGINT: defer, signal.SIGTERM: defer}):
        yield
    for signum in dict.fromkeys(pending):
        signal.raise_signal(signum)


def remove_dead_siblings(target: Path) -> list[Path]:
    """Remove staging and swapped-out siblings of `target` left by this machine's dead runs."""
    if fcntl is None or not target.parent.is_dir():
        return []
    name = re.compile(rf"\.{re.escape(target.name)}\.({STAGING}|{SWAPPED_OUT}|{CREATING})-{HOST}-[0-9a-f]{{8}}")
    removed = []
    for path in target.parent.iterdir():
        found = name.fullmatch(path.name)
        if not found or path.is_symlink() or not path.is_dir():
            continue
        try:
            if found.group(1) == CREATING and time.time() - path.stat().st_mtime < CREATING_GRACE_S:
                continue
        except OSError:  # removed meanwhile
            continue
        if not is_abandoned(path):
            continue
        if found.group(1) == SWAPPED_OUT and not target.exists():
            # killed between swapping the old output out and the new one in: put it back
            with contextlib.suppress(OSError):
                os.replace(path, target)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def is_abandoned(path: Path) -> bool:
    """True when nobody holds the directory's lock (so its run has died)."""
    try:
        held = lock(path)
    except (OSError, OutputError):  # gone, or held: its run is alive
        return False
    unlock(held)
    return held is not None  # a file system without flock: keep it


def lock(path: Path, wait: float = 0.0) -> int | None:
    """Hold an exclusive flock on a directory until unlock() or this process ends.

    Returns None where the file system has no flock (nothing is then ever removed as
    abandoned there, since is_abandoned cannot take the lock either).
    """
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:  # another run holds it
            if time.monotonic() >= deadline:
                os.close(fd)
                raise OutputError(f"{path}: locked by another run") from None
            time.sleep(0.05)
        except OSError:  # no flock on this file system
            os.close(fd)
            return None


def unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)
