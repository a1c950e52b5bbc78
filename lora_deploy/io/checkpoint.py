"""Lazy, sharded access to a Hugging Face safetensors checkpoint.

Only the safetensors headers are parsed up front (and validated: offsets, shapes, sizes);
tensor data is read on demand from one shard at a time, so a 70B checkpoint costs a few
kilobytes until a tensor is asked for. stream.py reads and writes whole checkpoints.

Tensors are numpy arrays (ml_dtypes supplies bfloat16 and float8): the merge path never
imports torch, whose import alone costs seconds per CLI call.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_deploy.dtypes import BY_NAME, BY_SAFETENSORS, FLOATS
from lora_deploy.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Header sizes beyond this are not a real checkpoint; refuse before allocating.
MAX_HEADER_BYTES = 100 * 1024 * 1024

# Views of lora_deploy.dtypes by safetensors code: the numpy dtype (little-endian) of each,
# and the codes of the float dtypes an adapter can be merged into (float8 is storage only).
DTYPES: dict[str, np.dtype] = {code: row.numpy for code, row in BY_SAFETENSORS.items()}
FLOAT_DTYPES = {BY_NAME[name].safetensors for name in FLOATS}


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
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and "/" not in v for v in weight_map.values()
        ):
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
        return pread_all(self._open(info.file), info.nbytes, info.start, info.file)

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
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    s = text.strip().upper().replace(" ", "")
    digits = s.rstrip("KMGTIB")
    unit = s[len(digits) :]
    try:
        value = float(digits)
    except ValueError:
        raise CheckpointError(f"cannot parse size {text!r} (use e.g. 5GB, 500MB, 200KiB)") from None
    if unit not in units or not 0 < value < 1e15:
        raise CheckpointError(f"cannot parse size {text!r} (use e.g. 5GB, 500MB, 200KiB)")
    return int(value * units[unit])


def as_array(data: bytes | bytearray | memoryview, info: TensorInfo) -> np.ndarray:
    """A tensor's bytes as an array (writable only over a writable buffer)."""
    return np.frombuffer(data, dtype=info.np_dtype).reshape(info.shape)


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
