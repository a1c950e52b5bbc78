"""The base graph's initializers against the checkpoint, for `merge --onnx-like`
(lora_deploy.export.like, whose docstring tells the whole method): reading them, mapping
them onto checkpoint tensors (export/layouts.py), comparing their values, and writing the
merged values where the base's were.

like.py imports this module once the kernel copy of the graph's data has started: numpy
and the merge's math take a tenth of a second to import, which the copy hides.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
from threadpoolctl import threadpool_limits

from lora_deploy.adapter.plan import MergePlan, plan_merge
from lora_deploy.adapter.read import load_adapter
from lora_deploy.arrays import all_finite
from lora_deploy.dtypes import BY_ONNX, BY_SAFETENSORS
from lora_deploy.errors import BadInputError, CheckpointError, NonFiniteError, OutputError
from lora_deploy.export.layouts import Layout, Mapping, detect
from lora_deploy.io.checkpoint import DTYPES, Checkpoint, TensorInfo, as_array
from lora_deploy.io.fileio import pread_all, write_at
from lora_deploy.io.onnx_proto import onnx_protos
from lora_deploy.merge.blocks import on_this_thread
from lora_deploy.merge.delta import merged_bias, merged_weight

# Tensors are compared with the checkpoint this many bytes at a time; blocks of MAP_BLOCK
# bytes or more are mapped rather than read.
COMPARE_BLOCK = 16 * 1024 * 1024
MAP_BLOCK = 1024 * 1024
# base_check="sampled": blocks of SAMPLE_VALUES values compared per untouched tensor.
SAMPLE_BLOCKS = 8
SAMPLE_VALUES = 4096


def merge_initializers(
    model: Any,
    graph_path: Path,
    data_file: Path | None,
    base_dir: Path,
    adapter_dir: Path,
    data_out: Path | None,
    base_check: str,
    holes: Callable[[list[tuple[int, int]]], None] | None = None,
    before_write: Callable[[int, int], None] | None = None,
) -> dict:
    """Check that the graph is BASE's and write the adapter's merged initializers: into
    the graph (`model`, those stored in it) or at their offsets of `data_out` (whose other
    bytes the caller copies meanwhile). `holes(ranges)` is told the (offset, length) ranges
    about to be written, as soon as they are known; `before_write(offset, length)` is
    called before each write. Returns MergedGraph's fields about the initializers."""
    inits = read_initializers(model, graph_path, data_file)
    # The merge's math stays on this thread while the caller's kernel copy has the other core.
    serial = on_this_thread() if data_out is not None else contextlib.nullcontext()
    with Checkpoint(base_dir) as ckpt, threadpool_limits(limits=1, user_api="blas"), serial:
        adapter = load_adapter(adapter_dir)
        plan = plan_merge(adapter, ckpt)
        if plan.untie:
            tied = ", ".join(sorted(plan.untie))
            raise BadInputError(
                f"{adapter_dir}: the merge unties {tied}, which changes the graph itself; "
                "export the merged checkpoint instead"
            )
        changed = changed_tensors(plan)
        layout, mapped, unmapped = check_graph(inits, ckpt, changed, graph_path, base_dir)
        if holes is not None:
            rewritten = (inits[name] for name in rewritten_names(mapped, changed))
            holes([(init.offset, init.length) for init in rewritten if init.offset is not None])
        check_values(inits, ckpt, mapped, graph_path, base_dir, full=base_check == "full")
        merged = write_merged(inits, ckpt, plan, changed, mapped, data_out, before_write)
        ckpt_dtypes = sorted({BY_SAFETENSORS[info.dtype].name for info in ckpt.tensors.values()})
    return {
        "merged": sorted(merged),
        "copied": len(inits) - len(merged),
        "checked": len(mapped),
        "base_check": base_check,
        "graph_dtypes": sorted({BY_ONNX[i.proto.data_type].name for i in inits.values() if is_float(i.dtype)}),
        "checkpoint_dtypes": ckpt_dtypes,
        "total_bytes": sum(int(np.prod(i.shape, dtype=np.int64)) * i.dtype.itemsize for i in inits.values()),
        "unmapped": sorted(unmapped),
        "layout": layout.name,
    }


@dataclass
class Initializer:
    """One initializer of the base graph: its proto and where its bytes are."""

    proto: Any  # onnx.TensorProto
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int | None = None  # in the external data file; None: stored in the graph
    length: int = 0

    @property
    def name(self) -> str:
        return self.proto.name


def is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype.name in ("bfloat16",)


def read_initializers(model: Any, path: Path, data_file: Path | None) -> dict[str, Initializer]:
    """The graph's initializers by name; `data_file` is the external data file they use
    (like.external_data_file), whose size their offsets are checked against."""
    external = onnx_protos().TensorProto.EXTERNAL
    inits: dict[str, Initializer] = {}
    size = data_file.stat().st_size if data_file is not None else 0
    for proto in model.graph.initializer:
        if proto.data_type not in BY_ONNX:
            raise BadInputError(f"{path}: initializer {proto.name} has an unsupported type {proto.data_type}")
        if proto.name in inits:
            raise BadInputError(f"{path}: initializer {proto.name} appears twice")
        init = Initializer(proto, BY_ONNX[proto.data_type].numpy, tuple(int(d) for d in proto.dims))
        if proto.data_location == external:
            entries = {e.key: e.value for e in proto.external_data}
            try:
                init.offset = int(entries.get("offset", 0))
                init.length = int(entries["length"])
            except (KeyError, ValueError):
                raise BadInputError(f"{path}: initializer {proto.name} has malformed external data") from None
            expected = int(np.prod(init.shape, dtype=np.int64)) * init.dtype.itemsize
            if init.length != expected:
                raise BadInputError(f"{path}: initializer {proto.name} holds {init.length} bytes, not {expected}")
            if init.offset < 0 or init.offset + init.length > size:
                raise BadInputError(f"{data_file}: truncated (initializer {proto.name} runs past the end)")
        inits[proto.name] = init
    return inits


def changed_tensors(plan: MergePlan) -> dict[str, str]:
    """Checkpoint key -> what the merge does to it ("weight", "bias", "replaced")."""
    changed = {key: "weight" for key in plan.targets}
    changed.update({t.bias_key: "bias" for t in plan.targets.values() if t.bias_key})
    changed.update({key: "replaced" for key in plan.replacements if key not in plan.targets})
    return changed


def check_graph(
    inits: dict[str, Initializer], ckpt: Checkpoint, changed: dict[str, str], graph_path: Path, base_dir: Path
) -> tuple[Layout, dict[str, Mapping], list[str]]:
    """Refuse a graph that is not BASE's by its names, shapes and dtype kinds (its values:
    check_values); returns its layout, its mapped initializers and the unmapped ones."""
    found = detect(list(inits), ckpt.tensors)
    if found is None:
        raise BadInputError(
            f"{graph_path}: no initializer name maps onto a tensor of {base_dir} in a known layout "
            "(lora-deploy export onnx keeps checkpoint names; onnxruntime-genai's builder, float builds of "
            "LLaMA-family decoders, its MatMul names)"
        )
    layout, mapped = found.layout, found.mapped
    baked = [name for name in inits if layout.baked_lora and re.search(layout.baked_lora, name)]
    if baked:
        raise BadInputError(
            f"{graph_path}: the graph carries LoRA weights of its own ({baked[0]}: built with an adapter); "
            "merge into a graph of the base built without one"
        )
    sources = {key for mapping in mapped.values() for key in mapping.sources}
    for key in sorted(changed):
        if key not in sources:
            raise BadInputError(
                f"{graph_path}: the adapter changes {key}, but no initializer of the graph has that name or holds it "
                f"({layout.name} layout: its names do not map onto the checkpoint, or the graph does not compute it)"
            )
    for name, mapping in mapped.items():
        init, infos = inits[name], [ckpt.tensors[key] for key in mapping.sources]
        shape = mapping.shape([info.shape for info in infos])
        if init.shape != shape:
            made = f"{base_dir}'s {mapping.describe()} make" if mapping != Mapping((name,)) else f"{base_dir} has"
            raise BadInputError(
                f"{graph_path}: initializer {name} has shape {list(init.shape)} but {made} "
                f"{list(shape) if shape is not None else 'no single tensor'}"
            )
        for info in infos:
            if is_float(init.dtype) != is_float(info.np_dtype):
                raise BadInputError(
                    f"{graph_path}: initializer {name} is {init.dtype}, the checkpoint's {info.name} is {info.np_dtype}"
                )
    return layout, mapped, found.unmapped


def check_values(
    inits: dict[str, Initializer],
    ckpt: Checkpoint,
    mapped: dict[str, Mapping],
    graph_path: Path,
    base_dir: Path,
    full: bool = False,
) -> None:
    """Refuse a graph whose mapped initializers do not hold BASE's values, every value or
    sampled (the module docstring says why the adapter's targets are sampled too)."""
    for name, mapping in mapped.items():
        if not same_values(inits[name], mapping, ckpt, graph_path, None if full else SAMPLE_BLOCKS):
            raise BadInputError(
                f"{graph_path}: initializer {name} differs from {base_dir}'s {mapping.describe()}: "
                "the graph is not an export of this base"
            )


def same_values(
    init: Initializer, mapping: Mapping, ckpt: Checkpoint, graph_path: Path, samples: int | None = None
) -> bool:
    """Whether the initializer holds its sources through the mapping's transform, converted
    to the graph's dtype, bit for bit (NaN bit patterns included): every value, a block at a
    time, or with `samples`, that many evenly spaced blocks of SAMPLE_VALUES values of each
    source (square tiles of them where the mapping transposes)."""
    infos = [ckpt.tensors[key] for key in mapping.sources]
    if init.offset is None:
        expected = mapping.apply([converted(ckpt.read(info.name), init.dtype) for info in infos])
        graph_values = inline_array(init)
        return bool(np.array_equal(as_bits(np.ascontiguousarray(expected)), as_bits(graph_values)))
    data_file = graph_path.parent / location_of(init)
    fd = os.open(data_file, os.O_RDONLY)

    def graph(start: int, length: int) -> bytes | memoryview:
        return read_block(fd, init.offset + start, length, data_file)

    try:
        first = 0  # where the source starts: in values, or in the transposed graph's columns
        for info in infos:
            if mapping.transpose:
                if not same_transposed(graph, init, ckpt, info, first, samples):
                    return False
                first += info.shape[0]
            else:
                if not same_flat(graph, init, ckpt, info, first, samples):
                    return False
                first += int(np.prod(info.shape, dtype=np.int64))
    finally:
        os.close(fd)
    return True


def same_flat(graph, init: Initializer, ckpt: Checkpoint, info: TensorInfo, first: int, samples: int | None) -> bool:
    """The source's values are the graph's from value `first` on, in the same order."""
    count = int(np.prod(info.shape, dtype=np.int64))
    size_c, size_g = info.np_dtype.itemsize, init.dtype.itemsize
    for start, n in compared_blocks(count, max(size_c, size_g), samples):
        raw = ckpt_block(ckpt, info, start * size_c, n * size_c)
        theirs = graph((first + start) * size_g, n * size_g)
        if info.np_dtype == init.dtype:
            # Same dtype (--dtype auto): the bytes must be equal.
            if not same_bytes(raw, theirs):
                return False
            continue
        ours = converted(np.frombuffer(raw, info.np_dtype), init.dtype)
        if not np.array_equal(as_bits(ours), np.frombuffer(theirs, init.dtype).view(as_bits(ours).dtype)):
            return False
    return True


def same_bytes(a: bytes | memoryview, b: bytes | memoryview) -> bool:
    """Byte for byte, vectorized (a memoryview's == compares element by element)."""
    return len(a) == len(b) and bool(np.array_equal(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)))


def same_transposed(
    graph, init: Initializer, ckpt: Checkpoint, info: TensorInfo, column: int, samples: int | None
) -> bool:
    """The source [rows, cols], transposed, is the graph's [cols, width] from `column` on."""
    rows, cols = info.shape
    width = init.shape[1]
    size_c, size_g = info.np_dtype.itemsize, init.dtype.itemsize

    def source(start: int, length: int) -> bytes:
        return ckpt_block(ckpt, info, start, length)

    for (r0, r1), (c0, c1) in transposed_windows(rows, cols, max(size_c, size_g), samples):
        ours = converted(window(source, cols, info.np_dtype, r0, r1, c0, c1), init.dtype).T
        theirs = window(graph, width, init.dtype, c0, c1, column + r0, column + r1)
        if not np.array_equal(as_bits(np.ascontiguousarray(ours)), as_bits(theirs)):
            return False
    return True


def window(read, n_cols: int, dtype: np.dtype, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """Rows r0:r1, columns c0:c1 of a row-major [*, n_cols] tensor that `read(start, length)`
    reads bytes of: one read for whole rows, else one per row."""
    size = dtype.itemsize
    if c0 == 0 and c1 == n_cols:
        raw = read(r0 * n_cols * size, (r1 - r0) * n_cols * size)
    else:
        raw = b"".join(read((r * n_cols + c0) * size, (c1 - c0) * size) for r in range(r0, r1))
    return np.frombuffer(raw, dtype).reshape(r1 - r0, c1 - c0)


def transposed_windows(
    rows: int, cols: int, itemsize: int, samples: int | None
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """((first row, end), (first column, end)) of each window of a [rows, cols] source to
    compare: bands of whole rows, or `samples` square tiles of about SAMPLE_VALUES values
    spaced evenly along the diagonal, first and last corners included."""
    if samples is None or rows * cols <= samples * SAMPLE_VALUES:
        step = max(1, COMPARE_BLOCK // max(1, cols * itemsize))
        return [((r, min(r + step, rows)), (0, cols)) for r in range(0, rows, step)]
    side = max(1, math.isqrt(SAMPLE_VALUES))
    height, width = min(rows, side), min(cols, side)
    spaces = max(1, samples - 1)
    corners = sorted(
        {(round(i * (rows - height) / spaces), round(i * (cols - width) / spaces)) for i in range(samples)}
    )
    return [((r, r + height), (c, c + width)) for r, c in corners]


def compared_blocks(count: int, itemsize: int, samples: int | None) -> list[tuple[int, int]]:
    """(first value, number of values) of each block to compare."""
    if samples is None or count <= samples * SAMPLE_VALUES:
        step = max(1, COMPARE_BLOCK // itemsize)
        return [(first, min(step, count - first)) for first in range(0, count, step)]
    last = count - SAMPLE_VALUES
    starts = sorted({round(i * last / (samples - 1)) for i in range(samples)})
    return [(first, SAMPLE_VALUES) for first in starts]


def ckpt_block(ckpt: Checkpoint, info: TensorInfo, start: int, length: int) -> bytes | memoryview:
    if length < MAP_BLOCK:
        return ckpt.read_bytes(replace(info, start=info.start + start, end=info.start + start + length))
    try:
        fd = os.open(info.file, os.O_RDONLY)
    except OSError as exc:
        raise CheckpointError(f"{info.file}: cannot open ({exc.strerror})") from None
    try:
        return read_block(fd, info.start + start, length, info.file)
    finally:
        os.close(fd)  # a mapping outlives its descriptor


def read_block(fd: int, offset: int, length: int, path: Path) -> bytes | memoryview:
    """Bytes [offset, offset + length) of an open file: a large block mapped read-only (no
    copy into fresh memory: 5x less CPU than a pread here), a small one read; a file
    system that cannot map files is read too."""
    if length >= MAP_BLOCK:
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            mapping = mmap.mmap(fd, offset + length - base, prot=mmap.PROT_READ, offset=base)
        except (OSError, ValueError):  # cannot map, or shorter than that: pread says which
            pass
        else:
            return memoryview(mapping)[offset - base :]
    return pread_all(fd, length, offset, path)


def location_of(init: Initializer) -> str:
    return next(e.value for e in init.proto.external_data if e.key == "location")


def converted(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Checkpoint values in the graph's dtype, as the exporter converts them (torch's
    .to() rounds to nearest even, as numpy does)."""
    return values if values.dtype == dtype else values.astype(dtype)


def as_bits(values: np.ndarray) -> np.ndarray:
    return values.view(f"u{values.dtype.itemsize}") if values.dtype.itemsize in (1, 2, 4, 8) else values


def inline_array(init: Initializer) -> np.ndarray:
    """An initializer stored in the graph, as an array. Its raw bytes are read directly
    (what onnx.numpy_helper.to_array does for them); other storage goes through onnx."""
    proto = init.proto
    count = int(np.prod(init.shape, dtype=np.int64))
    if proto.HasField("raw_data") and len(proto.raw_data) == count * init.dtype.itemsize:
        return np.frombuffer(proto.raw_data, init.dtype.newbyteorder("<")).reshape(init.shape)
    from onnx import numpy_helper

    return np.asarray(numpy_helper.to_array(proto)).astype(init.dtype, copy=False)


def inline_tensor(values: np.ndarray, name: str, proto: Any) -> Any:
    """A TensorProto of `proto`'s type holding `values` (of its dtype) as raw little-endian
    bytes, as onnx.numpy_helper.from_array makes one."""
    return type(proto)(
        name=name,
        dims=values.shape,
        data_type=proto.data_type,
        raw_data=values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes(),
    )


def rewritten_names(mapped: dict[str, Mapping], changed: dict[str, str]) -> list[str]:
    """The initializers write_merged rewrites: those a changed checkpoint tensor maps to."""
    return [name for name, mapping in mapped.items() if any(key in changed for key in mapping.sources)]


def write_merged(
    inits: dict[str, Initializer],
    ckpt: Checkpoint,
    plan: MergePlan,
    changed: dict[str, str],
    mapped: dict[str, Mapping],
    data_out: Path | None,
    before_write: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Compute every initializer a changed tensor maps to, in the graph's dtype, and put it
    where the base's was; returns their names. A packed one is the transform of its merged
    and untouched sources. `before_write(offset, length)` is called before each write to
    `data_out`."""
    bias_of = {t.bias_key: t for t in plan.targets.values() if t.bias_key}
    fd = None
    written = []
    try:
        for name in rewritten_names(mapped, changed):
            mapping = mapped[name]
            init = inits[name]
            parts = []
            for key in mapping.sources:
                info = ckpt.tensors[key]
                if key in changed:
                    merged = merged_tensor(ckpt, info, plan, bias_of, changed[key])
                    parts.append(finite(converted(merged, init.dtype), key))
                else:
                    parts.append(converted(ckpt.read(key), init.dtype))
            values = np.ascontiguousarray(mapping.apply(parts))
            written.append(name)
            if init.offset is None:
                init.proto.CopyFrom(inline_tensor(values, name, init.proto))
                continue
            if fd is None:
                fd = open_output(data_out)
            if before_write is not None:
                before_write(init.offset, init.length)
            write_at(fd, data_out, values.reshape(-1).view(np.uint8), init.offset)
    finally:
        if fd is not None:
            os.close(fd)
    return written


def open_output(path: Path) -> int:
    try:
        return os.open(path, os.O_WRONLY)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror})") from None


def merged_tensor(ckpt: Checkpoint, info: TensorInfo, plan: MergePlan, bias_of: dict, what: str) -> np.ndarray:
    """The tensor as `merge` (dtype auto) writes it: in the checkpoint's dtype, rounded once
    (the same steps as merge/streaming.py's producers)."""
    dtype = DTYPES[info.dtype]
    if what == "replaced":
        return plan.replacements[info.name].astype(dtype)
    if what == "bias":
        return merged_bias(bias_of[info.name].module, ckpt.read(info.name)).astype(dtype, copy=False)
    target = plan.targets[info.name]
    w0 = plan.replacements.get(info.name)
    # Read-only over the mapped bytes (a pread into fresh memory costs page faults and a
    # copy; Checkpoint.read would copy them once more).
    base_weight = as_array(ckpt_block(ckpt, info, 0, info.nbytes), info) if w0 is None else w0
    module = target.module
    if module.magnitude is None:
        return merged_weight(module, target.kind, base_weight, dtype)
    return merged_weight(module, target.kind, base_weight).astype(dtype, copy=False)


def finite(values: np.ndarray, name: str) -> np.ndarray:
    if not all_finite(values):
        raise NonFiniteError(f"merged tensor {name} has NaN or Inf values (overflow in the graph's dtype?)")
    return values
