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

The output policy of every command is here too (check_output): an output is never an
input, and an existing output is replaced only when asked (overwrite=True, the CLI's
--overwrite). Without it the final step is an atomic create-if-absent (place_new), so of
two runs racing for one new output exactly one succeeds.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import re
import shutil
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

from lora_deploy.errors import (
    BadInputError,
    InternalError,
    LoraDeployError,
    OutputError,
)
from lora_deploy.io.onnx_proto import external_locations
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
# The longest name a directory entry may have, in bytes (Linux and macOS file systems).
# A target name too long to fit in a sibling's name with the rest is shortened there
# (sibling_stem).
NAME_MAX = 255
SIBLING_STEM_MAX = NAME_MAX - len(f"..{max(STAGING, SWAPPED_OUT, CREATING, key=len)}-{HOST}-{0:08x}")
# A "new" directory is unlocked for the instant between mkdir and flock: only older ones
# are taken for leftovers.
CREATING_GRACE_S = 60.0
# How long to wait for another run that holds the lock on an output it has just renamed
# into place (it releases it right after).
LOCK_WAIT_S = 5.0
# What an OSError says about the user's path rather than about the disk.
PATH_SHAPE_ERRNOS = (errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOENT)
# renameat2(2) flag: fail with EEXIST instead of replacing the target.
RENAME_NOREPLACE = 1
AT_FDCWD = -100


# ----------------------------------------------------------- output policy ----


def check_output(
    out: str | os.PathLike,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    *,
    directory: bool = False,
) -> Path:
    """The one output policy: an input is never an output; an output that exists is
    replaced only with overwrite. Raises BadInputError (one line, naming both paths).

    `out` must not be, contain or lie inside an input directory, nor be or contain an
    input file or the directory it lives in, whatever `overwrite` says. Every path is
    resolved through symlinks, and so is every file of an input directory (a Hugging Face
    cache snapshot links its shards into a blob directory: that directory is protected
    too). `out` is checked both as the path given and as what it points to.

    directory=True: `out` is a directory output, where an empty directory counts as absent.
    """
    out = Path(out)
    refuse_input_overlap(out, inputs)
    try:
        os.lstat(out)  # a name too long, a loop, a parent that cannot be searched: no output can be there
    except (FileNotFoundError, NotADirectoryError):
        pass  # absent, or under a file (refused as bad input when it is created)
    except OSError as exc:
        raise cannot_be_output(out, exc) from exc
    try:
        if directory:
            if os.path.lexists(out) and not out.is_dir():
                raise BadInputError(f"{out}: exists and is not a directory")
            exists = os.path.lexists(out) and not is_empty_dir(out)
        else:
            if out.is_dir():
                raise BadInputError(f"{out}: is a directory; give a file path")
            exists = os.path.lexists(out)
    except OSError as exc:  # a symlink to such a path
        raise cannot_be_output(out, exc) from exc
    if exists and not overwrite:
        raise exists_error(out)
    if os.path.lexists(out) and holds_cwd(out):  # even empty: the rename would unlink it
        raise BadInputError(
            f"{out}: is or contains the current directory; replacing it would pull it out from under you"
        )
    return out


def cannot_be_output(out: Path, exc: OSError) -> BadInputError:
    return BadInputError(f"{out}: cannot be an output ({exc.strerror or exc})")


def check_cache_dir(cache: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """The output policy for a directory that a library writes into and reads back, such
    as ONNX Runtime's TensorRT engine cache (--trt-cache): never an input, nor containing
    or inside one (as check_output). It is reused, never replaced, so an existing one
    needs no overwrite, but it must be a directory."""
    cache = Path(cache)
    refuse_input_overlap(cache, inputs)
    if os.path.lexists(cache) and not cache.is_dir():
        raise BadInputError(f"{cache}: exists and is not a directory")
    return cache


def holds_cwd(path: Path) -> bool:
    try:
        cwd = Path.cwd()
    except OSError:
        return False
    real = path.resolve()
    return real == cwd or real in cwd.parents


def exists_error(out: Path) -> BadInputError:
    return BadInputError(f"{out}: exists; pass --overwrite to replace it")


def is_empty_dir(path: Path) -> bool:
    """A real (not symlinked) directory with nothing in it."""
    try:
        return not path.is_symlink() and path.is_dir() and not any(path.iterdir())
    except OSError:
        return False


def refuse_input_overlap(out: Path, inputs: Iterable[str | os.PathLike | None]) -> None:
    absolute = Path(os.path.abspath(out))
    given = absolute.parent.resolve() / absolute.name if absolute.name else absolute
    candidates = dict.fromkeys([given, out.resolve()])
    for protected, tree, what in protected_paths(inputs):
        for candidate in candidates:
            if candidate == protected:
                relation = "is"
            elif candidate in protected.parents:
                relation = "contains"
            elif tree and protected in candidate.parents:
                relation = "lies inside"
            else:
                continue
            raise BadInputError(
                f"{out}: output must not be or contain an input, nor lie inside one: it {relation} {what}"
            )


def protected_paths(inputs: Iterable[str | os.PathLike | None]) -> Iterator[tuple[Path, bool, str]]:
    """(resolved path, whether nothing may be written inside it either, description) for
    every path an output must keep clear of. (An output that is the directory a file lives
    in contains that file: no entry of its own is needed.)"""
    for given in inputs:
        if given is None:
            continue
        real = Path(given).resolve()
        if not real.is_dir():
            yield real, False, f"input {given}"
            for data in onnx_external_data(real):
                yield data, False, f"{data}, the external data of input {given}"
            continue
        yield real, True, f"input {given}"
        for link in links_under(real):
            try:
                target = link.resolve()
            except (RuntimeError, OSError):  # a symlink loop leads to no file: nothing to keep clear of
                continue
            yield target, target.is_dir(), f"{target}, linked from input {given} ({link})"
            if target.is_file():  # a Hugging Face cache's blob directory: nothing goes inside it
                yield target.parent, True, f"{target.parent}, holding {target.name} linked from input {given}"


# An ONNX file this large keeps its weights inline (protobuf's limit is 2 GB): parsing it
# only to find external data would read it all. Such files get the conventional names only.
ONNX_PARSE_LIMIT = 256 * 1024 * 1024


def onnx_external_data(path: Path) -> list[Path]:
    """The files an ONNX model reads its weights from (resolved), which are inputs as much as
    the model itself; [] for anything that is not an .onnx file."""
    if path.suffix != ".onnx" or not path.is_file():
        return []
    names = {f"{path.name}.data", f"{path.name}_data", f"{path.stem}.data"}
    if path.stat().st_size <= ONNX_PARSE_LIMIT:
        names |= onnx_locations(path)
    return [(path.parent / name).resolve() for name in sorted(names) if (path.parent / name).exists()]


def onnx_locations(path: Path) -> set[str]:
    try:
        return set(external_locations(path))
    except Exception:  # not readable as ONNX: the command reading it will say so
        return set()


def links_under(root: Path) -> Iterator[Path]:
    """Every symlink under `root`, following linked directories once each."""
    seen = {root}
    pending = [root]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:  # unreadable: whatever is in it cannot be an input we read either
            continue
        for entry in entries:
            path = Path(entry.path)
            if entry.is_symlink():
                yield path
            try:
                is_dir = entry.is_dir()  # follows a link
            except OSError:
                continue
            if is_dir:
                real = path.resolve()
                if real not in seen:
                    seen.add(real)
                    pending.append(path)


def place_new(src: Path, target: Path) -> None:
    """Move `src` onto `target` only if nothing is there (for a directory: nothing, or an
    empty directory), atomically: of two runs racing for one new output, exactly one
    succeeds and the other gets "exists". The same file system is assumed (a sibling).
    """
    if src.is_dir() and not src.is_symlink():
        if rename_noreplace(src, target):
            return
        # No renameat2 here, or the target exists. POSIX rename() moves a directory onto
        # nothing or onto an empty directory only (a full one: ENOTEMPTY; a file or link:
        # ENOTDIR); on Windows onto nothing only.
        try:
            os.rename(src, target)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise exists_error(target) from None
            raise
        return
    try:
        os.link(src, target)  # fails with EEXIST, atomically, if anything is there
    except FileExistsError:
        raise exists_error(target) from None
    except OSError as exc:  # no hard links on this file system
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS, errno.EXDEV):
            raise
        if not rename_noreplace(src, target):
            try:  # last resort: claim the name exclusively, then replace the claim
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                raise exists_error(target) from None
            os.replace(src, target)
        return
    os.unlink(src)


def rename_noreplace(src: Path, target: Path) -> bool:
    """rename(2) that fails with EEXIST rather than replace `target` (Linux renameat2).

    False where the system or the file system has no such call; raises BadInputError
    when `target` exists.
    """
    renameat2 = libc_renameat2()
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(target), RENAME_NOREPLACE) == 0:
        return True
    code = ctypes.get_errno()
    if code == errno.EEXIST:
        if is_empty_dir(target):  # counts as absent: the caller's rename() takes it atomically
            return False
        raise exists_error(target)
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # an old kernel, or a file system without the flag
    raise OSError(code, os.strerror(code), str(target))


@functools.cache
def libc_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without it
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def place_file(src: Path, target: Path, overwrite: bool) -> None:
    """The final step of a file output: replace `target` if overwrite, else create it only
    if it does not exist."""
    if overwrite:
        os.replace(src, target)
    else:
        place_new(src, target)


def discard(path: Path) -> str | None:
    """Remove a swapped-out output (directory, file or symlink); the reason if it stays."""
    if path.is_symlink() or not path.is_dir():
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            return exc.strerror or str(exc)
        return None
    shutil.rmtree(path, ignore_errors=True)  # as much as it can
    if not os.path.lexists(path):
        return None
    try:
        shutil.rmtree(path)  # again, for the reason
    except OSError as exc:
        return f"{exc.filename}: {exc.strerror or exc}"
    return None


class staging_dir:
    """A hidden sibling directory renamed onto `target` only if the block succeeds.

    Errors (Ctrl-C included) remove it; our errors are re-raised naming the file under
    `target`, not under the hidden directory. With rename=False it is a scratch
    directory the caller moves a file out of (with place_file), removed either way.

    The output policy (check_output) is applied before anything is created: `target`
    must keep clear of `inputs`, and an existing `target` is refused unless overwrite.
    Without overwrite the final rename is a create-if-absent, so a target that appeared
    meanwhile (another run's) is refused too, never replaced.
    """

    def __init__(
        self,
        target: Path,
        rename: bool = True,
        *,
        overwrite: bool = False,
        inputs: Iterable[str | os.PathLike | None] = (),
    ):
        # Absolute (not resolved: a symlinked target stays one), so that "." or "out/" has a
        # parent and a name and the hidden siblings land beside it, not inside it.
        self.target = Path(os.path.abspath(target))
        self.rename = rename
        self.overwrite = overwrite
        self.inputs = inputs
        self.tmp = sibling(self.target, STAGING)
        self._lock: int | None = None

    def __enter__(self) -> Path:
        check_output(self.target, self.inputs, self.overwrite, directory=self.rename)
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
                if not self.rename:  # a scratch directory: its files are named for their places beside target
                    rename_in_message(exc, os.path.join(self.tmp, ""), os.path.join(self.target.parent, ""))
                rename_in_message(exc, self.tmp, self.target)
        finally:
            unlock(self._lock)

    def _commit(self) -> None:
        try:
            if self.overwrite:
                replace_dir(self.tmp, self.target)
            else:
                place_new(self.tmp, self.target)
        except BaseException as exc:
            shutil.rmtree(self.tmp, ignore_errors=True)  # gone already if the rename was done
            if isinstance(exc, OSError):
                raise output_error(self.target, exc, "cannot move the output into place") from None
            raise


def write_file_atomic(
    path: str | os.PathLike,
    write: Callable[[IO[bytes]], None],
    *,
    durable: bool = False,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Write a file through `write(stream)`; readers see the old file or the whole new one.

    durable=True also fsyncs the file and then its directory (survives a power cut).
    overwrite and inputs: the output policy (check_output).
    """

    def to_file(staged: Path) -> None:
        with open(staged, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())

    target = write_path_atomic(path, to_file, overwrite=overwrite, inputs=inputs)
    if durable:
        sync_path(target.parent)
    return target


def write_path_atomic(
    path: str | os.PathLike,
    write: Callable[[Path], None],
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Write a file through `write(path)`, for libraries that open the file themselves.

    `write` gets a path in a locked staging directory beside the target; the file is
    renamed onto the target only if `write` returns. On an error (Ctrl-C included) the
    old file is untouched and nothing is left; after a kill, the next write of the same
    target removes the leftover. overwrite and inputs: the output policy (check_output).
    """
    target = Path(os.path.abspath(check_output(path, inputs, overwrite)))
    make_parent(target)
    with staging_dir(target, rename=False, overwrite=overwrite) as tmp:
        staged = tmp / target.name
        try:
            write(staged)
        except OSError as exc:  # inside our own staging directory: the disk, not the path, failed
            raise OutputError(f"{target}: cannot write ({exc.strerror or exc})") from exc
        except LoraDeployError as exc:
            rename_in_message(exc, staged, target)
            raise
        move_file(staged, target, overwrite)
    return target


def check_parent(path: str | os.PathLike) -> None:
    """Refuse, before the work, an output whose missing parent directories could not be
    made (make_parent makes them once the output is ready): a file in the way, or a
    directory where nothing can be created."""
    path = Path(path)
    ancestor = path.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise BadInputError(f"{ancestor}: not a directory (the output {path} would be inside it)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{ancestor}: cannot create the output in it (permission denied)")


def make_parent(target: Path) -> None:
    if target.is_dir():
        raise BadInputError(f"{target}: is a directory; give a file path")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(target.parent, exc, "cannot create the directory") from exc


def move_file(staged: Path, target: Path, overwrite: bool = False) -> None:
    if not staged.is_file():  # `write` returned without writing the file it promised
        raise InternalError(f"{target}: nothing was written")
    try:
        place_file(staged, target, overwrite)
    except OSError as exc:
        raise output_error(target, exc, "cannot move the output into place") from exc


def sync_path(path: Path) -> None:
    """fsync a file, or a directory so a rename into it survives a power cut."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise OutputError(f"{path}: cannot sync ({exc.strerror or exc})") from exc


def output_error(path: Path, exc: OSError, doing: str) -> LoraDeployError:
    """An OSError on a path the user gave: bad input if the path has the wrong shape,
    else a failed write."""
    kind = BadInputError if exc.errno in PATH_SHAPE_ERRNOS else OutputError
    return kind(f"{path}: {doing} ({exc.strerror or exc})")


def rename_in_message(exc: LoraDeployError, hidden: str | Path, shown: str | Path) -> None:
    """Name `shown` instead of the hidden staging path in an error on its way out.

    The message is edited in place, so the error keeps its type and traceback.
    """
    if len(exc.args) == 1 and isinstance(exc.args[0], str):
        exc.args = (exc.args[0].replace(str(hidden), str(shown)),)


def sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{sibling_stem(target.name)}.{kind}-{HOST}-{uuid.uuid4().hex[:8]}"


def sibling_stem(name: str) -> str:
    """The part of a hidden sibling's name that says whose it is: the target's name, or,
    where that would make the sibling's name too long (NAME_MAX) for a target whose own
    name fits, the name's start and a hash of all of it (`{start}~{16 hex}`)."""
    if len(os.fsencode(name)) <= SIBLING_STEM_MAX:
        return name
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    start = name
    while len(os.fsencode(f"{start}~{digest}")) > SIBLING_STEM_MAX:
        start = start[:-1]
    return f"{start}~{digest}"


def replace_dir(src: Path, target: Path) -> None:
    """Move src onto target; an existing target is swapped out first, then removed.

    Runs with Ctrl-C and SIGTERM held back (they are delivered when it returns), so target
    is always either the old output or the new one, and no swapped-out copy is left. The
    swapped-out directory stays locked until it is gone, so a concurrent run never takes
    it for a leftover while it may still be moved back. A target that is a symlink is
    replaced itself (what it points to is left alone). An old output that cannot be
    removed is an OutputError naming what is left, raised with the new output in place
    (the next run writing target retries the removal).
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
            reason = discard(trash)
        finally:
            unlock(held)
    if reason is not None:
        raise OutputError(
            f"{target}: written, but the output it replaced could not be removed ({reason}); "
            f"delete {trash} (the next run writing {target.name} here tries again)"
        )


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
    stem = re.escape(sibling_stem(target.name))
    name = re.compile(rf"\.{stem}\.({STAGING}|{SWAPPED_OUT}|{CREATING})-{HOST}-[0-9a-f]{{8}}")
    removed = []
    for path in target.parent.iterdir():
        found = name.fullmatch(path.name)
        if found and found.group(1) == SWAPPED_OUT and (path.is_symlink() or not path.is_dir()):
            if remove_swapped_out_link(path, target):
                removed.append(path)
            continue
        if not found or path.is_symlink() or not path.is_dir():
            continue
        try:
            if found.group(1) == CREATING and time.time() - path.stat().st_mtime < CREATING_GRACE_S:
                continue
        except OSError:  # removed meanwhile
            continue
        if not is_abandoned(path):
            continue
        if found.group(1) == SWAPPED_OUT and not os.path.lexists(target):
            # killed between swapping the old output out and the new one in: put it back
            with contextlib.suppress(OSError):
                os.replace(path, target)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def remove_swapped_out_link(path: Path, target: Path) -> bool:
    """A swapped-out symlink (or file) left by a killed run: it cannot be locked, so one
    older than the grace period is taken as dead; put back if the target is missing."""
    try:
        if time.time() - path.lstat().st_ctime < CREATING_GRACE_S:  # a rename sets ctime
            return False
        if not os.path.lexists(target):
            os.replace(path, target)
            return False
        path.unlink()
    except OSError:
        return False
    return True


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
