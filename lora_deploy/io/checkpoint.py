"""Lazy, sharded access to a Hugging Face safetensors checkpoint.

Only the safetensors headers are parsed up front (and validated: offsets, shapes, sizes);
tensor data is read on demand from one shard at a time, so a 70B checkpoint costs a few
kilobytes until a tensor is asked for. stream.py reads and writes whole checkpoints.

This is the one checkpoint validator: merge reads through `Checkpoint`, and every command
that hands a checkpoint to another library (transformers, for export, verify and bench)
calls `check_checkpoint` first. A header is refused as the safetensors library refuses
it (overlapping or gapped data_offsets, sizes that overflow) and more strictly (duplicate
tensor names); an index is refused when it names a tensor no shard holds or a shard
outside the checkpoint directory.

Tensors are numpy arrays (ml_dtypes supplies bfloat16 and float8): the merge path never
imports torch, whose import alone costs seconds per CLI call.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_deploy.dtypes import BY_NAME, FLOATS, NUMPY_BY_SAFETENSORS
from lora_deploy.errors import CheckpointError
from lora_deploy.io.fileio import pread_all

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_INDEX_FILE = "pytorch_model.bin.index.json"
# Header sizes beyond this are not a real checkpoint; refuse before allocating.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Element counts and byte sizes are int64 in numpy, torch and ONNX.
INT64_MAX = 2**63 - 1
# Smallest --max-shard-size: below it a checkpoint becomes thousands of files (0.5B used to
# round to 0 and write one shard per tensor). The tests split tiny models at 100KB.
MIN_SHARD_BYTES = 64 * 1024

# Views of lora_deploy.dtypes by safetensors code: the numpy dtype (little-endian) of each,
# and the codes of the float dtypes an adapter can be merged into (float8 is storage only).
DTYPES = NUMPY_BY_SAFETENSORS  # resolved on lookup: a float16 checkpoint never imports ml_dtypes
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


class JSONObject(dict):
    """A parsed JSON object that remembers the first key it was given twice (JSON allows
    it and Python's json keeps the last value: a second tensor entry would silently win)."""

    duplicate: str | None = None


def _json_object(pairs: list[tuple[str, object]]) -> JSONObject:
    obj = JSONObject()
    for key, value in pairs:
        if key in obj and obj.duplicate is None:
            obj.duplicate = key
        obj[key] = value
    return obj


def parse_json(data: str | bytes, path: Path, what: str) -> object:
    """JSON from a file we were given, with one-line errors naming `path`; objects are
    JSONObject (duplicate keys recorded). Nesting too deep for Python's parser is refused."""
    try:
        return json.loads(data, object_pairs_hook=_json_object)
    except RecursionError:
        raise CheckpointError(f"{path}: corrupt {what} (JSON nested too deeply)") from None
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: corrupt {what} (not JSON)") from None


def short(value: object, limit: int = 160) -> str:
    """repr of a value from a file, cut to `limit` characters (a shape may hold 400-digit numbers)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors file's header; returns tensors and metadata.

    Refused, in one line naming the file and the tensor: a malformed entry, a shape whose
    size overflows int64, a byte range that does not match the shape or runs past the end,
    a tensor name given twice, and data_offsets that overlap, leave gaps or stop short of
    the end of the file (the safetensors library refuses those files too).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header")
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    header = parse_json(raw, path, "safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    if header.duplicate is not None:
        raise CheckpointError(f"{path}: tensor {short(header.duplicate)} appears twice in the header")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_start, size)
    _check_layout(path, tensors, data_start, size)
    return tensors, metadata


def _tensor_info(path: Path, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        valid = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (*shape, begin, end))
        valid = valid and isinstance(dtype, str) and getattr(entry, "duplicate", None) is None
    except (TypeError, KeyError, ValueError):
        valid = False
    if not valid:
        raise CheckpointError(f"{path}: corrupt header entry for {short(name)}")
    if dtype not in DTYPES:
        raise CheckpointError(f"{path}: tensor {short(name)} has unsupported dtype {short(dtype)}")
    count = math.prod(shape)  # Python ints: no silent wrap-around (np.prod wrapped [2^32, 2^32] to 0)
    if max(shape, default=0) > INT64_MAX or count * DTYPES[dtype].itemsize > INT64_MAX:
        raise CheckpointError(
            f"{path}: tensor {short(name)} has shape {short(list(shape))}, whose size overflows int64"
        )
    if end - begin != count * DTYPES[dtype].itemsize:
        raise CheckpointError(f"{path}: tensor {short(name)} has a byte range that does not match its shape")
    if data_start + end > size:
        raise CheckpointError(f"{path}: truncated (tensor {short(name)} runs past the end of the file)")
    return TensorInfo(name, path, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_layout(path: Path, tensors: dict[str, TensorInfo], data_start: int, size: int) -> None:
    """The byte ranges must tile the data section: in order, no overlap, no gap, no tail.

    Overlapping ranges would let one tensor be read from another's bytes (a merge of
    q_proj computed from o_proj's weights).
    """
    pos, previous = data_start, None
    for info in sorted(tensors.values(), key=lambda i: (i.start, i.end)):
        if info.start < pos:
            raise CheckpointError(
                f"{path}: tensor {short(info.name)} overlaps tensor {short(previous)} (corrupt data_offsets)"
            )
        if info.start > pos:
            raise CheckpointError(
                f"{path}: {info.start - pos} bytes before tensor {short(info.name)} belong to no tensor "
                "(corrupt data_offsets)"
            )
        pos, previous = info.end, info.name
    if pos != size:
        raise CheckpointError(f"{path}: {size - pos} bytes after the last tensor belong to no tensor (corrupt file)")


def read_index(index: Path) -> dict[str, str]:
    """An index's weight_map (tensor name -> shard name), every shard name checked to stay
    inside the checkpoint directory."""
    try:
        text = index.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{index}: cannot read ({exc.strerror})") from None
    raw = parse_json(text, index, "index")
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: corrupt index (no weight_map)")
    if weight_map.duplicate is not None:
        raise CheckpointError(f"{index}: tensor {short(weight_map.duplicate)} appears twice in the weight_map")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or "\x00" in shard:
            raise CheckpointError(
                f"{index}: corrupt index (tensor {short(tensor)} maps to {short(shard)}, not a file name)"
            )
        check_shard_name(index, tensor, shard)
    return dict(weight_map)


def check_shard_name(index: Path, tensor: str, shard: str) -> None:
    """A shard name must be a relative path inside the checkpoint directory.

    Checked lexically: an absolute path or a '..' component is refused (transformers would
    follow it out of the directory), while a shard that is a symlink (a Hugging Face cache
    snapshot links every file into its blob directory) is the user's own layout and fine.
    """
    if os.path.isabs(shard) or shard.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", shard):
        raise CheckpointError(
            f"{index}: shard {short(shard)} of tensor {short(tensor)} lies outside the checkpoint directory "
            "(absolute path or '..'); shard names must be relative to the directory"
        )


def checkpoint_files(model_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a checkpoint directory, in index order, and its weight_map
    (None without an index)."""
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory")
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = read_index(index)
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise CheckpointError(f"{model_dir}: shard {missing[0]} named in the index is missing")
        return [model_dir / n for n in names], weight_map
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE], None
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise CheckpointError(
            f"{model_dir}: only pickle weights found; lora-deploy reads safetensors checkpoints "
            "(convert with transformers' save_pretrained(safe_serialization=True))"
        )
    raise CheckpointError(f"{model_dir}: no model.safetensors or {INDEX_FILE}")


def check_checkpoint(model_dir: str | os.PathLike) -> None:
    """Validate a checkpoint directory before another library (transformers) reads it,
    exactly as the merge would: every safetensors header and the index.

    Both model.safetensors and an index are checked when both exist (loaders disagree on
    which wins). A directory without safetensors weights (pytorch_model.bin) is left to
    the loader, except that a pickle index's shard names must stay inside the directory.
    """
    model_dir = Path(model_dir)
    single, index = model_dir / SINGLE_FILE, model_dir / INDEX_FILE
    if index.is_file() or single.is_file():
        with Checkpoint(model_dir):
            pass
        if index.is_file() and single.is_file():
            read_header(single)
    elif (model_dir / PICKLE_INDEX_FILE).is_file():
        read_index(model_dir / PICKLE_INDEX_FILE)


class Checkpoint:
    """A lazy index over a checkpoint's tensors; keeps at most one shard open."""

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        self.files, weight_map = checkpoint_files(self.dir)
        self.tensors: dict[str, TensorInfo] = {}
        for path in self.files:
            tensors, _ = read_header(path)
            for name, info in tensors.items():
                if name in self.tensors:
                    raise CheckpointError(f"{self.dir}: tensor {short(name)} appears in two shards")
                self.tensors[name] = info
        for name, shard in (weight_map or {}).items():
            if name not in self.tensors:  # it would silently be missing from every output
                raise CheckpointError(
                    f"{self.dir / INDEX_FILE}: tensor {short(name)} is mapped to {shard} but no shard holds it"
                )
        self._open_file: tuple[Path, int] | None = None  # one shard open at a time

    @property
    def config(self) -> dict:
        path = self.dir / "config.json"
        if not path.is_file():
            return {}
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
        config = parse_json(text, path, "config")
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: not a JSON object")
        return config

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


def parse_size(text: str | int, minimum: int = MIN_SHARD_BYTES, what: str = "shard size") -> int:
    """'5GB' -> 5_000_000_000, '200KiB' -> 204_800 (the units transformers accepts).

    Sizes below `minimum` (a shard size: MIN_SHARD_BYTES) are refused, naming `what`.
    """
    size = text if isinstance(text, int) and not isinstance(text, bool) else _size_in_bytes(text)
    if size < minimum:
        smallest = f"{minimum // 1024}KiB" if minimum >= 1024 else f"{minimum} bytes"
        raise CheckpointError(f"{what} {text!r} is {size} bytes; the smallest allowed is {smallest}")
    return size


def _size_in_bytes(text: str) -> int:
    if not isinstance(text, str):
        raise CheckpointError(f"cannot parse size {text!r} (use e.g. 5GB, 500MB, 200KiB)")
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
