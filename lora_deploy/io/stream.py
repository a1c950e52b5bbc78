"""Streaming a checkpoint through the merge: every base shard read once, output written
shard by shard, both hashed on the way.

Base shards are seen through memory mappings, in on-disk order; a tensor copied
unchanged goes from the base shard to the output by the kernel (copy_file_range), and the
digests of both files (lora_deploy.io.digests: BLAKE3, and SHA-256 when asked) are
computed from the same mapped bytes on helper threads; a base shard the digest memo
knows unchanged is not hashed again. A prefetcher keeps the disk reading ahead. The
writer knows every output tensor's dtype and shape before it starts (the merge plans
them), so it writes each shard's header first and then streams tensor bytes: peak memory
is about one tensor, not one shard.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import mmap
import os
import queue
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from lora_deploy.errors import CheckpointError, InternalError, OutputError
from lora_deploy.io.checkpoint import DTYPES, INDEX_FILE, SINGLE_FILE, Checkpoint, TensorInfo, as_array
from lora_deploy.io.digests import DEFAULT_ALGORITHMS, DigestMemo, Digests, MultiHash, file_digests
from lora_deploy.io.fileio import pread_all


@dataclass(frozen=True)
class OutputTensor:
    """A tensor the writer will emit: its name, dtype, shape and how to produce its bytes.

    `produce` writes the tensor's bytes to an open binary file; it is called exactly once.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[["BinaryFile"], None]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPES[self.dtype].itemsize


# Mapped bytes go to the kernel copy and the hashing threads in chunks of CHUNK (larger
# chunks cut per-chunk overhead: 8 MB took ~15% less CPU than 1 MB). Bytes written from
# memory go in pieces of WRITE_PIECE, small enough to stay in the CPU cache between the
# write and the hash.
CHUNK = 8 * 1024 * 1024
WRITE_PIECE = 1024 * 1024
# The prefetcher keeps the kernel reading up to READAHEAD bytes ahead of the merge, in
# requests of PREFETCH_STEP. (64 MB ahead left the disk idle while the CPUs hashed: a cold
# merge took 6.3-7.2 s; a whole shard ahead, 5.2-5.7 s.)
READAHEAD = 1024 * 1024 * 1024
PREFETCH_STEP = 32 * 1024 * 1024
# Shards are mapped a window at a time, so resident memory stays a few windows, not a shard.
WINDOW = 64 * 1024 * 1024
# Pieces the writer thread may have queued: up to WRITE_AHEAD * CHUNK bytes of copies
# (views of the mapped shards, not memory) or WRITE_AHEAD * WRITE_PIECE of computed bytes.
# Deep enough that the kernel copies a layer's untouched tensors while the merge computes
# the next adapted one, rather than each waiting for the other.
WRITE_AHEAD = 16


class Worker:
    """Applies `work` to queued items, in order, on a helper thread.

    The queue is bounded, so a producer never runs more than a few items ahead. The
    first error is kept for the owner to raise; later items are dropped unprocessed, so
    the producer is never left blocked on a full queue.
    """

    def __init__(self, work: Callable[[object], None], depth: int = 4, dropped: Callable[[object], None] | None = None):
        self.work = work
        self.dropped = dropped  # told of each item dropped after an error
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def put(self, item: object) -> None:
        self._queue.put(item)

    def stop(self) -> None:
        """Finish the queued items and end the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.work(item)
                except BaseException as exc:
                    self.error = exc
            elif self.dropped is not None:
                self.dropped(item)
            del item  # an item may hold a view of a mapping: let it be unmapped now


class HashThread:
    """Digests of a byte stream, computed on a helper thread.

    hashlib and blake3 release the GIL on large buffers, so hashing runs on other cores
    while the merge reads, computes and writes. Each thread hashes on its own core only:
    BLAKE3's pool would take the core the kernel copy runs on (a warm 2 GB merge on 2 cores,
    8 paired runs: median 1.44 s single-threaded, 1.51 s with the pool).
    """

    def __init__(self, algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS):
        self._hash = MultiHash(algorithms, parallel=False)
        self._worker = Worker(self._update, dropped=_set_event)
        self._digests: Digests | None = None

    def update(self, data: bytes | memoryview | threading.Event) -> None:
        """Hash `data`; an Event is set once everything before it is hashed."""
        self._worker.put(data)

    def _update(self, data: bytes | memoryview | threading.Event) -> None:
        if isinstance(data, threading.Event):
            data.set()
        else:
            self._hash.update(data)

    def stop(self) -> None:
        self._worker.stop()

    def hexdigests(self) -> Digests:
        self.stop()
        if self._worker.error is not None:
            raise InternalError(f"hashing failed ({self._worker.error})")
        if self._digests is None:
            self._digests = self._hash.hexdigests()
        return self._digests


def _set_event(item: object) -> None:
    if isinstance(item, threading.Event):
        item.set()


class ShardReader:
    """One shard read front to back, exactly once, every byte hashed on the way.

    The merge visits tensors in on-disk order, so the pass that feeds it also feeds the
    manifest's digests of the input: no shard is read twice, and one the memo knows
    unchanged is not hashed at all. Bytes are seen through memory mappings (no copy into
    Python); a copied tensor goes from this file to the output by the kernel, and both
    files' hashes read it from the same mapping.
    """

    def __init__(
        self,
        path: Path,
        progress: Callable[[int], None] | None = None,
        algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS,
        memo: DigestMemo | None = None,
    ):
        self.path = path
        try:
            # A file object, not a bare descriptor: queued copies hold it, and it closes
            # only when the last of them is done with it.
            self.file: io.FileIO | None = open(path, "rb", buffering=0)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot open ({exc.strerror})") from None
        self.opened, self.opened_ns = os.fstat(self.file.fileno()), time.time_ns()
        self.size = self.opened.st_size
        self.pos = 0
        self.progress = progress  # told how far the stream has read
        self.window: tuple[int, int, memoryview] | None = None  # (start, end, view)
        self.memo = memo
        self.remembered = memo.lookup(self.opened, algorithms) if memo is not None else None
        self.sha = HashThread(algorithms) if self.remembered is None else None

    def copy_to(self, out: "BinaryFile", start: int, end: int) -> None:
        """Append bytes [start, end) of this shard to `out`."""
        self.skip_to(start)
        for offset, piece in self._pieces(end):
            out.copy_from(self.file, offset, piece)

    def read(self, start: int, end: int) -> memoryview:
        """Bytes [start, end) as one read-only view, hashed a chunk at a time."""
        self.skip_to(start)
        view = self._map(start, end)
        for offset in range(0, len(view), CHUNK):
            self._consume(view[offset : offset + CHUNK])
        return view

    def skip_to(self, offset: int) -> None:
        if offset < self.pos:
            raise ValueError(f"{self.path}: read at {offset} is behind the stream ({self.pos})")
        for _ in self._pieces(offset):
            pass

    def _pieces(self, end: int) -> Iterator[tuple[int, memoryview]]:
        """(offset, view) chunks from the current position to `end`, each hashed."""
        while self.pos < end:
            if self.window is None or self.pos >= self.window[1]:
                window_end = min(self.size, self.pos + WINDOW)
                if window_end <= self.pos:  # shorter than its header said: changed since it was opened
                    raise CheckpointError(f"{self.path}: truncated while reading")
                # The old window is unmapped once the hashing threads drop their chunks of it.
                self.window = (self.pos, window_end, self._map(self.pos, window_end))
            w_start, w_end, view = self.window
            n = min(CHUNK, end - self.pos, w_end - self.pos)
            offset = self.pos
            yield offset, self._consume(view[offset - w_start : offset - w_start + n])

    def _consume(self, piece: memoryview) -> memoryview:
        if self.sha is not None:
            self.sha.update(piece)
        self.pos += len(piece)
        if self.progress is not None:
            self.progress(self.pos)
        return piece

    def _map(self, start: int, end: int) -> memoryview:
        """A read-only mapping of bytes [start, end); unmapped when its last view is gone."""
        if end <= start:
            return memoryview(b"")
        base = start - start % mmap.ALLOCATIONGRANULARITY
        try:
            mapping = mmap.mmap(self.file.fileno(), end - base, prot=mmap.PROT_READ, offset=base)
        except (OSError, ValueError):  # a file system that cannot map files: read instead
            return memoryview(pread_all(self.file.fileno(), end - start, start, self.path))
        return memoryview(mapping)[start - base :]

    def finish(self) -> ShardReader:
        """Read (and hash) whatever is left, close the file; digests() follows."""
        if self.sha is not None:
            self.skip_to(self.size)
        self.close()
        return self

    def digests(self) -> Digests:
        """The shard's digests (waits for its hashing thread); remembered for the next run
        if the file is still the one that was opened."""
        if self.remembered is not None:
            return self.remembered
        assert self.sha is not None
        digests = self.sha.hexdigests()
        if self.memo is not None:
            with contextlib.suppress(OSError):
                self.memo.store(self.path, self.opened, self.opened_ns, os.stat(self.path), digests)
        return digests

    def close(self) -> None:
        self.window = None
        self.file = None  # closed once queued copies are done; mappings outlive it

    def abort(self) -> None:
        self.close()
        if self.sha is not None:
            self.sha.stop()


class CheckpointStream:
    """A checkpoint read once in on-disk order, shard by shard, hashing as it goes.

    Reads that go back (a tied tensor written a second time) are served by plain reads
    from the checkpoint; they were hashed when the stream passed them.
    """

    def __init__(
        self, ckpt: Checkpoint, algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS, memo: DigestMemo | None = None
    ):
        self.ckpt = ckpt
        self.algorithms = algorithms
        self.memo = memo
        self.reader: ShardReader | None = None
        self.done: dict[Path, ShardReader] = {}
        self.prefetch = Prefetcher(ckpt.files)

    def copy_to(self, out: "BinaryFile", info: TensorInfo) -> None:
        reader = self._reader(info)
        if reader is None:
            out.write(self.ckpt.read_bytes(info))
        else:
            reader.copy_to(out, info.start, info.end)

    def read(self, info: TensorInfo) -> np.ndarray:
        """A tensor as a read-only array over the mapped shard."""
        reader = self._reader(info)
        if reader is None:
            return self.ckpt.read(info.name)
        return as_array(reader.read(info.start, info.end), info)

    def _reader(self, info: TensorInfo) -> ShardReader | None:
        if self.reader is not None and self.reader.path != info.file:
            self.done[self.reader.path] = self.reader.finish()
            self.reader = None
        if info.file in self.done or (self.reader is not None and info.start < self.reader.pos):
            return None
        if self.reader is None:
            before = self.prefetch.offset_of(info.file)
            progress = lambda pos: self.prefetch.consumed(before + pos)
            self.reader = ShardReader(info.file, progress, self.algorithms, self.memo)
        return self.reader

    def digests(self) -> dict[Path, Digests]:
        """Digests of every shard, reading the ones (or the tails) the merge never touched."""
        if self.reader is not None:
            self.done[self.reader.path] = self.reader.finish()
            self.reader = None
        self.prefetch.stop()
        for path in self.ckpt.files:
            if path not in self.done:
                reader = ShardReader(path, None, self.algorithms, self.memo)
                self.done[path] = reader  # registered first, so abort() stops it on failure
                reader.finish()
        return {path: self.done[path].digests() for path in self.ckpt.files}

    def abort(self) -> None:
        self.prefetch.stop()
        if self.reader is not None:
            self.reader.abort()
        for reader in self.done.values():
            reader.abort()


class Prefetcher:
    """Asks the kernel to read the shards ahead of the merge, from a helper thread.

    The disk then stays busy while the merge computes and hashes. A large WILLNEED can
    block until its reads are queued, which is why it runs here and not in the merge.
    """

    def __init__(self, files: list[Path]):
        self.files = files
        self.sizes = [path.stat().st_size for path in files]
        self._read = 0  # bytes the merge has consumed, over all shards in order
        self._stopped = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def offset_of(self, path: Path) -> int:
        """Bytes in the shards before `path`."""
        return sum(self.sizes[: self.files.index(path)])

    def consumed(self, total: int) -> None:
        with self._cond:
            self._read = max(self._read, total)
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        issued = 0
        for path, size in zip(self.files, self.sizes):
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                return  # the merge itself reports unreadable shards
            try:
                for start in range(0, size, PREFETCH_STEP):
                    if not self._wait_for_room(issued):
                        return
                    os.posix_fadvise(fd, start, min(PREFETCH_STEP, size - start), os.POSIX_FADV_WILLNEED)
                    issued += min(PREFETCH_STEP, size - start)
            except (OSError, AttributeError):
                return  # only a hint: without it the merge is slower, not wrong
            finally:
                os.close(fd)

    def _wait_for_room(self, issued: int) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: self._stopped or issued - self._read < READAHEAD)
            return not self._stopped


class BinaryFile:
    """A write-only file, written and hashed (for the manifest) on helper threads.

    The merge only queues pieces: bytes to write, or ranges of a base shard to copy. A
    writer thread puts them in the file in order (a copy goes through the kernel, page
    cache to page cache) and hands each piece to the hashing thread. A write error is
    raised at the next queued piece, or at close().
    """

    def __init__(
        self,
        path: Path,
        durable: bool = False,
        algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS,
    ):
        self.path = path
        self.durable = durable
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({exc.strerror})") from None
        self.size = 0
        self._sha = HashThread(algorithms)
        self._writer = Worker(self._write_and_hash, depth=WRITE_AHEAD, dropped=self._pass_on)

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        for offset in range(0, len(view), WRITE_PIECE):  # each piece hashed while still in cache
            self._put((None, 0, view[offset : offset + WRITE_PIECE]))
        self.size += len(view)

    def copy_from(self, src: io.FileIO, offset: int, piece: memoryview) -> None:
        """Append `piece`, which is bytes [offset, offset + len(piece)) of file `src`."""
        self._put((src, offset, piece))
        self.size += len(piece)

    def done(self) -> threading.Event:
        """An event set once every piece queued so far is written and hashed (or dropped
        after an error): the memory they came from may then be reused."""
        event = threading.Event()
        self._put(event)
        return event

    def _put(self, item: tuple | threading.Event) -> None:
        self._check()
        self._writer.put(item)

    def _write_and_hash(self, item: tuple | threading.Event) -> None:
        if isinstance(item, threading.Event):
            self._sha.update(item)  # set by the hashing thread, after the pieces before it
            return
        self._write(*item)
        self._sha.update(item[2])

    def _pass_on(self, item: object) -> None:
        """After a write error: pieces are dropped, events still go through the hashing
        thread (which may hold earlier pieces)."""
        if isinstance(item, threading.Event):
            self._sha.update(item)

    def _write(self, src: io.FileIO | None, offset: int, piece: memoryview) -> None:
        done = 0
        while src is not None and done < len(piece):
            try:
                n = os.copy_file_range(src.fileno(), self.fd, len(piece) - done, offset + done)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                n = 0  # another file system on an old kernel: write the mapped bytes instead
            if n == 0:
                break
            done += n
        write_all(self.fd, piece[done:])

    def _check(self) -> None:
        error = self._writer.error
        if error is not None:
            # only an OSError is the disk's doing; anything else on the writer thread is a bug
            kind = OutputError if isinstance(error, OSError) else InternalError
            raise kind(f"{self.path}: cannot write ({getattr(error, 'strerror', None) or error})")

    def abort(self) -> None:
        self._writer.stop()
        self._sha.stop()
        os.close(self.fd)

    def close(self) -> Digests:
        """Digests of what was written."""
        self._writer.stop()
        try:
            self._check()
            if self.durable:
                os.fsync(self.fd)
            os.close(self.fd)  # may report a delayed write error (NFS, quotas)
        except OSError as exc:
            self._sha.stop()
            raise OutputError(f"{self.path}: cannot write ({exc.strerror})") from None
        except BaseException:
            self._sha.stop()
            raise
        try:
            return self._sha.hexdigests()
        except InternalError as exc:
            raise InternalError(f"{self.path}: {exc}") from None


def write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def plan_shards(tensors: list[OutputTensor], max_shard_size: int) -> list[list[OutputTensor]]:
    """Group tensors into shards in order, starting a new shard when one would overflow."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_checkpoint(
    out_dir: Path,
    tensors: list[OutputTensor],
    max_shard_size: int,
    on_tensor: Callable[[OutputTensor], None] | None = None,
    durable: bool = False,
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS,
) -> dict[str, Digests]:
    """Write tensors as safetensors shards (+ index when sharded); returns {file: digests}.

    durable=True fsyncs every shard before returning (survives power loss, costs the
    disk's write time)."""
    shards = plan_shards(tensors, max_shard_size)
    names = shard_names(len(shards))
    hashes = {}
    for name, shard in zip(names, shards):
        hashes[name] = _write_shard(shard, on_tensor, BinaryFile(out_dir / name, durable, algorithms))
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors)},
            "weight_map": {t.name: n for n, shard in zip(names, shards) for t in shard},
        }
        path = out_dir / INDEX_FILE
        try:
            path.write_text(json.dumps(index, indent=2) + "\n")
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({exc.strerror})") from None
        hashes[INDEX_FILE] = file_digests(path, algorithms)
    return hashes


def _write_shard(shard: list[OutputTensor], on_tensor, out: BinaryFile) -> Digests:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in shard:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns tensor data to 8 bytes
    try:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for t in shard:
            before = out.size
            t.produce(out)
            if out.size - before != t.nbytes:
                raise InternalError(f"internal error: {t.name} wrote {out.size - before} bytes, expected {t.nbytes}")
            if on_tensor:
                on_tensor(t)
    except BaseException:
        out.abort()  # stop the hashing thread; the original error is what matters
        raise
    return out.close()


class OutputBuffers:
    """Arrays for computed output tensors, reused from tensor to tensor: a fresh array per
    tensor costs the kernel zeroing (and THP compacting) fresh pages, about as much CPU as
    writing them. A buffer is handed out again only once the writer and the hashing thread
    are done with what was queued from it (BinaryFile.done)."""

    def __init__(self, count: int = 2):
        self._slots: list[tuple[np.ndarray, threading.Event | None]] = [(np.empty(0, np.uint8), None)] * count
        self._next = 0

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, np.ndarray]:
        """(slot, an uninitialized C-contiguous array of this shape and dtype)."""
        slot = self._next
        self._next = (slot + 1) % len(self._slots)
        raw, busy = self._slots[slot]
        if busy is not None:
            busy.wait()
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if raw.size < nbytes:
            raw = np.empty(nbytes, np.uint8)
        self._slots[slot] = (raw, None)
        return slot, raw[:nbytes].view(dtype).reshape(shape)

    def written(self, slot: int, out: BinaryFile) -> None:
        """The array of `slot` has been queued on `out`: reusable once that is written."""
        raw, _ = self._slots[slot]
        self._slots[slot] = (raw, out.done())


def tensor_bytes(array: np.ndarray) -> memoryview:
    """Raw little-endian bytes of an array (bfloat16 and float8 included)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    return memoryview(flat.view(np.uint8))
