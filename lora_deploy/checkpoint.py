"""Lazy, sharded access to a Hugging Face safetensors checkpoint, and a streaming writer.

The reader parses only the safetensors headers up front; tensor data is read on demand
from one shard at a time, so a 70B checkpoint costs a few kilobytes
until a tensor is asked for. The writer knows every output tensor's dtype and shape
before it starts (the merge plans them), so it writes each shard's header first and then
streams tensor bytes straight to disk: peak memory is one tensor, not one shard.

Tensors are numpy arrays (ml_dtypes supplies bfloat16 and float8): the merge path never
imports torch, whose import alone costs seconds per CLI call.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import queue
import threading
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from .errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Header sizes beyond this are not a real checkpoint; refuse before allocating.
MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype names -> numpy dtypes (the subset checkpoints use), little-endian.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(t).newbyteorder("<") if np.dtype(t).itemsize > 1 else np.dtype(t)
    for name, t in {
        "F64": np.float64,
        "F32": np.float32,
        "F16": np.float16,
        "BF16": ml_dtypes.bfloat16,
        "I64": np.int64,
        "I32": np.int32,
        "I16": np.int16,
        "I8": np.int8,
        "U8": np.uint8,
        "BOOL": np.bool_,
        "F8_E4M3": ml_dtypes.float8_e4m3fn,
        "F8_E5M2": ml_dtypes.float8_e5m2,
    }.items()
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its shard, dtype, shape and absolute byte range."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors file's header; returns tensors and metadata."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header")
            header = json.loads(f.read(header_len))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_start, size)
    return tensors, metadata


def _tensor_info(path: Path, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        valid = all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end)) and isinstance(dtype, str)
    except (TypeError, KeyError, ValueError):
        valid = False
    if not valid:
        raise CheckpointError(f"{path}: corrupt header entry for {name!r}")
    if dtype not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
    expected = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
    if end - begin != expected or begin < 0:
        raise CheckpointError(f"{path}: tensor {name!r} has a byte range that does not match its shape")
    if data_start + end > size:
        raise CheckpointError(f"{path}: truncated (tensor {name!r} runs past the end of the file)")
    return TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end)


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in index order."""
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory")
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"{index}: corrupt index (no weight_map)") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and "/" not in v for v in weight_map.values()):
            raise CheckpointError(f"{index}: corrupt index (weight_map must map tensor names to shard file names)")
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise CheckpointError(f"{model_dir}: shard {missing[0]} named in the index is missing")
        return [model_dir / n for n in names]
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise CheckpointError(
            f"{model_dir}: only pickle weights found; lora-deploy reads safetensors checkpoints "
            "(convert with transformers' save_pretrained(safe_serialization=True))"
        )
    raise CheckpointError(f"{model_dir}: no model.safetensors or {INDEX_FILE}")


class Checkpoint:
    """A lazy index over a checkpoint's tensors; keeps at most one shard open."""

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        self.files = weight_files(self.dir)
        self.tensors: dict[str, TensorInfo] = {}
        for path in self.files:
            tensors, _ = read_header(path)
            for name, info in tensors.items():
                if name in self.tensors:
                    raise CheckpointError(f"{self.dir}: tensor {name!r} appears in two shards")
                self.tensors[name] = info
        self._open_file: tuple[Path, int] | None = None  # one shard open at a time

    @property
    def config(self) -> dict:
        path = self.dir / "config.json"
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except ValueError:
            raise CheckpointError(f"{path}: not valid JSON") from None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str) -> np.ndarray:
        """One tensor, as a writable array that owns a private copy of its bytes."""
        info = self.tensors[name]
        return as_array(bytearray(self.read_bytes(info)), info)

    def read_bytes(self, info: TensorInfo) -> bytes:
        # pread rather than mmap: mapped pages of a multi-GB shard would count towards
        # this process's resident memory, while the page cache does not.
        fd = self._open(info.file)
        data = os.pread(fd, info.nbytes, info.start)
        if len(data) != info.nbytes:
            raise CheckpointError(f"{info.file}: truncated while reading {info.name}")
        return data

    def _open(self, path: Path) -> int:
        if self._open_file is None or self._open_file[0] != path:
            self.close()
            try:
                self._open_file = (path, os.open(path, os.O_RDONLY))
            except OSError as exc:
                raise CheckpointError(f"{path}: cannot open ({exc.strerror})") from None
        return self._open_file[1]

    def close(self) -> None:
        if self._open_file is not None:
            os.close(self._open_file[1])
            self._open_file = None

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '200KiB' -> 204_800 (the units transformers accepts)."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper().replace(" ", "")
    digits = s.rstrip("KMGTIB")
    unit = s[len(digits):]
    try:
        value = float(digits)
    except ValueError:
        raise CheckpointError(f"cannot parse size {text!r} (use e.g. 5GB, 500MB, 200KiB)") from None
    if unit not in units or not 0 < value < 1e15:
        raise CheckpointError(f"cannot parse size {text!r} (use e.g. 5GB, 500MB, 200KiB)")
    return int(value * units[unit])


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
# write and the hash. The kernel is asked to read READAHEAD ahead of the merge.
CHUNK = 8 * 1024 * 1024
WRITE_PIECE = 1024 * 1024
READAHEAD = 64 * 1024 * 1024
# Shards are mapped a window at a time, so resident memory stays a few windows, not a shard.
WINDOW = 64 * 1024 * 1024


class HashThread:
    """SHA-256 of a byte stream, computed on a helper thread.

    hashlib releases the GIL on large buffers, so hashing runs on another core while the
    merge reads, computes and writes. The queue is bounded: a few chunks wait at most.
    """

    def __init__(self):
        self._sha = hashlib.sha256()
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._digest: str | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            data = self._queue.get()
            if data is None:
                return
            try:
                self._sha.update(data)
            except BaseException as exc:  # reported by hexdigest(); keep draining so producers never block
                self._error = exc
            del data  # a chunk may be a view of a mapping: let it be unmapped now

    def update(self, data: bytes | memoryview) -> None:
        self._queue.put(data)

    def hexdigest(self) -> str:
        self.stop()
        if self._error is not None:
            raise CheckpointError(f"hashing failed ({self._error})")
        if self._digest is None:
            self._digest = self._sha.hexdigest()
        return self._digest

    def stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


class ShardReader:
    """One shard read front to back, exactly once, every byte hashed on the way.

    The merge visits tensors in on-disk order, so the pass that feeds it also feeds the
    manifest's SHA-256 of the input: no shard is read twice. Bytes are seen through
    memory mappings (no copy into Python); a copied tensor goes from this file to the
    output by the kernel, and both files' hashes read it from the same mapping.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot open ({exc.strerror})") from None
        self.size = os.fstat(self.fd).st_size
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        self.pos = 0
        self.advised = 0
        self.window: tuple[int, int, memoryview] | None = None  # (start, end, view)
        self.sha = HashThread()

    def copy_to(self, out: "BinaryFile", start: int, end: int) -> None:
        """Append bytes [start, end) of this shard to `out`."""
        self.skip_to(start)
        for offset, piece in self._pieces(end):
            out.copy_from(self.fd, offset, piece)

    def read(self, start: int, end: int) -> memoryview:
        """Bytes [start, end) as one read-only view, hashed a chunk at a time."""
        self.skip_to(start)
        view = self._map(start, end)
        for offset in range(0, len(view), CHUNK):
            self._consume(view[offset:offset + CHUNK])
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
                # The old window is unmapped once the hashing threads drop their chunks of it.
                self.window = (self.pos, window_end, self._map(self.pos, window_end))
            w_start, w_end, view = self.window
            n = min(CHUNK, end - self.pos, w_end - self.pos)
            offset = self.pos
            yield offset, self._consume(view[offset - w_start:offset - w_start + n])

    def _consume(self, piece: memoryview) -> memoryview:
        self._advise(self.pos + len(piece))
        self.sha.update(piece)
        self.pos += len(piece)
        return piece

    def _map(self, start: int, end: int) -> memoryview:
        """A read-only mapping of bytes [start, end); unmapped when its last view is gone."""
        if end <= start:
            return memoryview(b"")
        base = start - start % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(self.fd, end - base, prot=mmap.PROT_READ, offset=base)
        return memoryview(mapping)[start - base:]

    def _advise(self, upto: int) -> None:
        # Without this the disk idles whenever the merge computes or writes.
        if upto + READAHEAD // 2 > self.advised:
            end = upto + READAHEAD
            os.posix_fadvise(self.fd, self.advised, end - self.advised, os.POSIX_FADV_WILLNEED)
            self.advised = end

    def finish(self) -> HashThread:
        """Read (and hash) whatever is left, close the file; the digest follows."""
        self.skip_to(self.size)
        self.close()
        return self.sha

    def close(self) -> None:
        self.window = None
        if self.fd >= 0:
            os.close(self.fd)  # live mappings stay valid after the file is closed
            self.fd = -1

    def abort(self) -> None:
        self.close()
        self.sha.stop()


class CheckpointStream:
    """A checkpoint read once in on-disk order, shard by shard, hashing as it goes.

    Reads that go back (a tied tensor written a second time) are served by plain reads
    from the checkpoint; they were hashed when the stream passed them.
    """

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.reader: ShardReader | None = None
        self.done: dict[Path, HashThread] = {}

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
            self.reader = ShardReader(info.file)
        return self.reader

    def digests(self) -> dict[Path, str]:
        """SHA-256 of every shard, reading the ones (or the tails) the merge never touched."""
        if self.reader is not None:
            self.done[self.reader.path] = self.reader.finish()
            self.reader = None
        for path in self.ckpt.files:
            if path not in self.done:
                self.done[path] = ShardReader(path).finish()
        return {path: self.done[path].hexdigest() for path in self.ckpt.files}

    def abort(self) -> None:
        if self.reader is not None:
            self.reader.abort()
        for sha in self.done.values():
            sha.stop()


class BinaryFile:
    """A write-only file whose SHA-256 (for the manifest) is computed on a helper thread."""

    def __init__(self, path: Path, durable: bool = False):
        self.path = path
        self.durable = durable
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._sha = HashThread()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        for offset in range(0, len(view), WRITE_PIECE):  # each piece hashed while still in cache
            piece = view[offset:offset + WRITE_PIECE]
            write_all(self.fd, piece)
            self._sha.update(piece)
        self.size += len(view)

    def copy_from(self, src_fd: int, offset: int, piece: memoryview) -> None:
        """Append `piece`, which is bytes [offset, offset + len(piece)) of file `src_fd`.

        The kernel copies it (page cache to page cache, nothing through Python); where it
        can't (another file system on an old kernel), the bytes are written from `piece`.
        """
        done = 0
        while done < len(piece):
            try:
                n = os.copy_file_range(src_fd, self.fd, len(piece) - done, offset + done)
            except OSError:
                n = 0
            if n == 0:
                write_all(self.fd, piece[done:])
                break
            done += n
        self._sha.update(piece)
        self.size += len(piece)

    def abort(self) -> None:
        self._sha.stop()
        os.close(self.fd)

    def close(self) -> str:
        if self.durable:
            os.fsync(self.fd)
        os.close(self.fd)
        try:
            return self._sha.hexdigest()
        except CheckpointError as exc:
            raise CheckpointError(f"{self.path}: {exc}") from None


def write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]


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
) -> dict[str, str]:
    """Write tensors as safetensors shards (+ index when sharded); returns {file: sha256}.

    durable=True fsyncs every shard before returning (survives power loss, costs the
    disk's write time)."""
    shards = plan_shards(tensors, max_shard_size)
    names = shard_names(len(shards))
    hashes = {}
    for name, shard in zip(names, shards):
        hashes[name] = _write_shard(out_dir / name, shard, on_tensor, durable)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors)},
            "weight_map": {t.name: n for n, shard in zip(names, shards) for t in shard},
        }
        path = out_dir / INDEX_FILE
        path.write_text(json.dumps(index, indent=2) + "\n")
        hashes[INDEX_FILE] = file_sha256(path)
    return hashes


def _write_shard(path: Path, shard: list[OutputTensor], on_tensor, durable: bool) -> str:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in shard:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns tensor data to 8 bytes
    out = BinaryFile(path, durable)
    try:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for t in shard:
            before = out.size
            t.produce(out)
            if out.size - before != t.nbytes:
                raise CheckpointError(f"internal error: {t.name} wrote {out.size - before} bytes, expected {t.nbytes}")
            if on_tensor:
                on_tensor(t)
    except BaseException:
        out.abort()  # stop the hashing thread; the original error is what matters
        raise
    return out.close()


def as_array(data: bytes | bytearray | memoryview, info: TensorInfo) -> np.ndarray:
    """A tensor's bytes as an array (writable only over a writable buffer)."""
    return np.frombuffer(data, dtype=info.np_dtype).reshape(info.shape)


def tensor_bytes(array: np.ndarray) -> memoryview:
    """Raw little-endian bytes of an array (bfloat16 and float8 included)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    return memoryview(flat.view(np.uint8))


def file_sha256(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
    return sha.hexdigest()

