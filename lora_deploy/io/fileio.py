"""Positioned reads and writes, and a kernel copy of a file whose holes the caller fills.

Nothing here imports numpy: `merge --onnx-like` starts its copy (FileCopy) before it
imports the merge's math, so that the copy, the command's longest part, runs meanwhile.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from lora_deploy.errors import CheckpointError, InternalError, OutputError

# FileCopy copies at most this much per call, so that it can be stopped in between.
COPY_STEP = 256 * 1024 * 1024


def pread_all(fd: int, n: int, offset: int, path: Path) -> bytes:
    """n bytes at offset (one pread returns at most ~2 GiB on Linux, a large tensor more)."""
    parts = []
    while n > 0:
        try:
            data = os.pread(fd, min(n, 1 << 30), offset)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
        if not data:
            raise CheckpointError(f"{path}: truncated while reading")
        parts.append(data)
        n -= len(data)
        offset += len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def write_at(fd: int, path: Path, data, offset: int) -> None:
    """Write all of `data` (bytes, a memoryview or a C-contiguous array: its raw bytes) at
    `offset` of an open file, short writes retried; a failure is an OutputError naming `path`."""
    view = memoryview(data).cast("B")
    try:
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc


class FileCopy(threading.Thread):
    """`source` copied into a new file `dest` (created here, at the source's size) by the
    kernel (copy_file_range; through a buffer where the file system refuses that), on its
    own thread, but for the holes: byte ranges the caller writes itself.

    The holes may be named after the copy has started (set_holes): finding which tensors
    change takes longer than starting the copy, and the copy is most of the time. Bytes
    the copy reached before then are copied anyway, so the caller asks writable() before
    writing a hole: it returns once the copy can no longer write there.

    stop() makes the copy return within a COPY_STEP, `dest` unfinished (the caller is
    discarding it); join() re-raises what the copy raised.
    """

    def __init__(self, source: Path, dest: Path, holes: Iterable[tuple[int, int]] | None = None) -> None:
        super().__init__(daemon=True, name="lora-deploy-copy")
        self.source, self.dest = Path(source), Path(dest)
        self.error: BaseException | None = None
        self._stopping = threading.Event()
        self._state = threading.Condition()
        self._holes: list[tuple[int, int]] | None = None  # sorted (start, end)
        self._claimed = 0  # the end of the step in flight: the copy may still write below it
        self._done = 0  # every byte below it is copied (or in a hole)
        self._unsafe = 0  # holes below it were named late, and the copy may cover them up to here
        self._finished = False
        self._fd_in, self._fd_out, self.size = open_pair(self.source, self.dest)
        if holes is not None:
            self.set_holes(holes)
        try:
            self.start()
        except BaseException:
            os.close(self._fd_in)
            os.close(self._fd_out)
            raise

    def set_holes(self, holes: Iterable[tuple[int, int]]) -> None:
        """The (offset, length) ranges the caller writes; named once."""
        ranges = sorted((offset, offset + length) for offset, length in holes if length > 0)
        with self._state:
            if self._holes is not None:
                raise InternalError("FileCopy: the holes were already named")
            self._holes = ranges
            self._unsafe = self._claimed

    def writable(self, offset: int, length: int) -> None:
        """Wait until the copy cannot write into [offset, offset + length) any more (a
        hole, named with set_holes)."""
        with self._state:
            if self._holes is None:
                raise InternalError("FileCopy.writable before set_holes")
            if offset < self._unsafe:
                self._state.wait_for(lambda: self._done >= self._unsafe or self._finished)

    def stop(self) -> None:
        self._stopping.set()

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.error is not None:
            raise self.error

    def run(self) -> None:
        try:
            position = 0
            while position < self.size and not self._stopping.is_set():
                with self._state:
                    start, end = next_segment(position, self._holes, self.size)
                    self._claimed = end
                if start < end:
                    copy_range(self._fd_in, self._fd_out, start, end - start, self.source, self.dest)
                with self._state:
                    self._done = end
                    self._state.notify_all()
                position = end
        except OSError as exc:
            self.error = OutputError(f"{self.dest}: cannot write ({exc.strerror or exc})")
        except BaseException as exc:  # handed to join()
            self.error = exc
        finally:
            os.close(self._fd_in)
            os.close(self._fd_out)
            with self._state:
                self._finished = True
                self._state.notify_all()


def open_pair(source: Path, dest: Path) -> tuple[int, int, int]:
    """(source's descriptor, dest's, source's size); dest is created (never an existing
    file) at that size."""
    try:
        fd_in = os.open(source, os.O_RDONLY)
        size = os.fstat(fd_in).st_size
    except OSError as exc:
        raise CheckpointError(f"{source}: cannot read ({exc.strerror})") from None
    try:
        fd_out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        os.close(fd_in)
        raise OutputError(f"{dest}: cannot write ({exc.strerror})") from None
    try:
        os.ftruncate(fd_out, size)
    except OSError as exc:
        os.close(fd_in)
        os.close(fd_out)
        raise OutputError(f"{dest}: cannot write ({exc.strerror})") from None
    return fd_in, fd_out, size


def next_segment(position: int, holes: list[tuple[int, int]] | None, size: int) -> tuple[int, int]:
    """(start, end) of the next bytes to copy from `position` on: at most COPY_STEP, not
    into a hole (holes None: not named yet, so every byte is copied). A position inside a
    hole gives an empty segment ending where the hole ends."""
    end = min(size, position + COPY_STEP)
    for hole_start, hole_end in holes or ():
        if hole_end <= position:
            continue
        if hole_start <= position:
            skipped = min(hole_end, size)
            return skipped, skipped
        return position, min(end, hole_start)
    return position, end


def copy_range(fd_in: int, fd_out: int, offset: int, count: int, source: Path, dest: Path) -> None:
    """[offset, offset + count) of one file into the same place of another."""
    end = offset + count
    while offset < end:
        try:
            done = os.copy_file_range(fd_in, fd_out, end - offset, offset, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            done = 0
        if done == 0:  # refused, or nothing copied: through a buffer
            block = pread_all(fd_in, min(end - offset, 16 << 20), offset, source)
            write_at(fd_out, dest, block, offset)
            done = len(block)
        offset += done
