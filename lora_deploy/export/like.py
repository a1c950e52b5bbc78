"""An adapter's merged ONNX, made from the base model's graph at copy speed.

A merged model has exactly its base's graph: only the values of the adapter's target
tensors change. So instead of loading, tracing and exporting the merged checkpoint, this
copies BASE.onnx and its external data and rewrites the few initializers the adapter
changes, computed by the merge's math (lora_deploy.merge.delta) from the checkpoint.

* Each initializer is tied to the checkpoint tensors it was made from by its exporter's
  layout (lora_deploy.export.layouts): our exporter keeps checkpoint names (identity);
  onnxruntime-genai's model builder stores Wᵀ under its MatMul names, q/k/v packed into
  one. The graph's layout is the one that maps most of its initializers; the others are
  unmapped (buffers, rotary caches: reported, not checked).
* The graph must come from BASE: every mapped initializer must have the shape its
  sources make through the transform and, converted to the graph's dtype, their exact
  values, and every tensor the adapter changes must be a source of a mapped initializer.
  How many values are compared is `base_check`: "sampled" (the default) compares, of
  every mapped initializer, SAMPLE_BLOCKS evenly spaced blocks of SAMPLE_VALUES values
  (first and last included; square tiles where the layout transposes), which reads a few
  MB whatever the model's size and catches another model's or another revision's
  weights; "full" compares every value (reads the graph's data and the checkpoint once
  more: 2-4x the time of the copy) and also catches an edit of a single value outside
  the samples. The adapter's targets are sampled like the rest: they are rewritten from
  the checkpoint, so the graph's values there never reach the output, and a graph that
  already has an adapter merged in differs from W0 at almost every value of them, which
  the samples see. (Comparing them in full cost a third of the command's time.)
* Each merged tensor is what `merge` (dtype auto) then the exporter gives: W0 + s·B·A in
  float32, rounded once to the checkpoint's dtype, then converted to the graph's; a packed
  initializer is the transform of its merged and untouched sources (tests/export/
  test_like.py compares with a fresh `export onnx`, test_like_genai.py with a fresh
  `export genai`, byte for byte).
* The external data file is copied by the kernel and the changed initializers are written
  in place, at their offsets; small tensors stored in the graph are replaced there. Memory
  is a few copies of the largest changed initializer whatever the model's size.
* An onnxruntime-genai folder (its genai_config.json) as the base graph gives a whole
  folder: the merged decoder and every other file of the folder but its
  genai-manifest.json (which describes the base's build), staged and renamed into place.
* Refused (exit 2, nothing written): another model's graph, names that map in no layout,
  shapes that differ, a quantized graph (int4 MatMulNBits blocks), a builder graph with an
  adapter baked in, an adapter that changes the graph itself (an embedding LoRA on tied
  embeddings unties them), a graph with more than one external data file.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np
from threadpoolctl import threadpool_limits

from lora_deploy.adapter.plan import MergePlan, plan_merge
from lora_deploy.adapter.read import load_adapter
from lora_deploy.arrays import all_finite
from lora_deploy.backends.onnxrt.genai import GENAI_CONFIG, GENAI_MANIFEST, read_genai_config
from lora_deploy.dtypes import BY_ONNX, BY_SAFETENSORS
from lora_deploy.errors import BadInputError, CheckpointError, NonFiniteError, OutputError
from lora_deploy.export import files as onnx_files
from lora_deploy.export.layouts import Layout, Mapping, detect
from lora_deploy.io.checkpoint import DTYPES, Checkpoint, TensorInfo, as_array, pread_all
from lora_deploy.io.onnx_proto import onnx_protos
from lora_deploy.io.staging import check_output, output_error, staging_dir, sync_path
from lora_deploy.io.stream import copy_except, write_at
from lora_deploy.merge.delta import merged_bias, merged_weight

# Tensors are compared with the checkpoint this many bytes at a time; blocks of MAP_BLOCK
# bytes or more are mapped rather than read.
COMPARE_BLOCK = 16 * 1024 * 1024
MAP_BLOCK = 1024 * 1024
# base_check="sampled": blocks of SAMPLE_VALUES values compared per untouched tensor.
SAMPLE_BLOCKS = 8
SAMPLE_VALUES = 4096
BASE_CHECKS = ("sampled", "full")
# Nodes of graphs whose weights are stored quantized: a merge cannot rewrite them exactly.
QUANTIZED_OPS = frozenset(
    {"MatMulNBits", "GatherBlockQuantized", "DequantizeLinear", "QuantizeLinear", "MatMulInteger", "QLinearMatMul"}
)


@dataclass
class MergedGraph:
    """What merge_onnx wrote."""

    path: Path
    base_graph: Path
    merged: list[str]  # initializers rewritten
    copied: int  # initializers copied unchanged
    checked: int  # initializers compared with the checkpoint
    base_check: str  # "sampled" or "full": how many of their values (module docstring)
    graph_dtypes: list[str]  # float dtypes of the graph's initializers
    checkpoint_dtypes: list[str]
    external_data: bool
    total_bytes: int
    seconds: float = 0.0
    unmapped: list[str] = field(default_factory=list)  # initializers no checkpoint tensor maps to (buffers, constants)
    layout: str = "lora-deploy export onnx"  # whose names and layout the graph has (export/layouts.py)
    folder: bool = False  # a whole onnxruntime-genai folder was written (path is the folder)

    def summary(self) -> str:
        unmapped = ""
        if self.unmapped:
            shown = ", ".join(self.unmapped[:3]) + (", ..." if len(self.unmapped) > 3 else "")
            unmapped = f"; {len(self.unmapped)} not from the checkpoint, unchecked: {shown}"
        return (
            f"merged {len(self.merged)} initializers of {self.base_graph.name} ({self.layout} layout) into "
            f"{'the folder ' if self.folder else ''}{self.path} "
            f"({self.total_bytes / 1e6:.1f} MB, graph dtype {'/'.join(self.graph_dtypes) or '-'}, "
            f"checkpoint {'/'.join(self.checkpoint_dtypes)}; {self.copied} copied, "
            f"{self.checked} checked against the base, {self.base_check}{unmapped}) in {self.seconds:.1f}s"
        )

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "base_graph": str(self.base_graph),
            "merged": self.merged,
            "copied": self.copied,
            "checked": self.checked,
            "base_check": self.base_check,
            "unmapped": self.unmapped,
            "layout": self.layout,
            "folder": self.folder,
            "graph_dtypes": self.graph_dtypes,
            "checkpoint_dtypes": self.checkpoint_dtypes,
            "external_data": self.external_data,
            "total_bytes": self.total_bytes,
            "seconds": self.seconds,
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


def merge_onnx(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    base_graph: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    durable: bool = False,
    base_check: str = "sampled",
) -> MergedGraph:
    """Write ADAPTER merged into BASE as an ONNX model with ``base_graph``'s graph.

    ``base_graph`` is an ONNX graph of ``base_dir`` in a known layout (export/layouts.py:
    ``export onnx``'s, or onnxruntime-genai's builder's), or an onnxruntime-genai folder:
    then ``out`` is a folder too (the merged decoder and the folder's other files).
    ``out`` (and ``<out>.data``) follow the output policy: never an input, replaced only
    with ``overwrite``.
    """
    start = time.perf_counter()
    base_dir, base_graph, out = Path(base_dir), Path(base_graph), Path(out)
    if base_check not in BASE_CHECKS:
        raise BadInputError(f"base_check must be one of {', '.join(BASE_CHECKS)}, not {base_check!r}")
    folder = base_graph if base_graph.is_dir() else None
    if folder is not None:
        base_graph = decoder_file(folder)
        if out.suffix == ".onnx":
            raise BadInputError(
                f"{out}: {folder} is an onnxruntime-genai folder, so the output is one: name a directory"
            )
    elif not base_graph.is_file():
        raise BadInputError(f"{base_graph}: no such ONNX file or onnxruntime-genai folder")
    elif out.suffix != ".onnx":
        raise BadInputError(f"{out}: the merged graph's name must end in .onnx")
    model = onnx_files.load_model(base_graph)
    refuse_quantized(model, base_graph)
    data_file, inits = read_initializers(model, base_graph)
    inputs = [base_dir, Path(adapter_dir), folder, base_graph, data_file]
    if folder is None:
        onnx_files.check_output(out, inputs, overwrite)
    else:
        check_output(out, inputs, overwrite, directory=True)
    with Checkpoint(base_dir) as ckpt, threadpool_limits(limits=1, user_api="blas"):
        adapter = load_adapter(adapter_dir)
        plan = plan_merge(adapter, ckpt)
        if plan.untie:
            tied = ", ".join(sorted(plan.untie))
            raise BadInputError(
                f"{adapter_dir}: the merge unties {tied}, which changes the graph itself; "
                "export the merged checkpoint instead"
            )
        changed = changed_tensors(plan)
        layout, mapped, unmapped = check_graph(inits, ckpt, changed, base_graph, base_dir, values=False)

        def check() -> None:  # the values, compared while the kernel copies the data (write_graph)
            check_values(inits, ckpt, mapped, base_graph, base_dir, full=base_check == "full")

        if folder is None:
            with staging_dir(out, rename=False, overwrite=overwrite) as tmp_dir:
                tmp_path = tmp_dir / out.name
                merged = write_graph(model, inits, ckpt, plan, changed, mapped, data_file, tmp_path, durable, check)
                try:
                    onnx_files.move_into_place(tmp_path, out, data_file is not None, overwrite)
                except OSError as exc:
                    raise output_error(out, exc, "cannot move the output into place") from exc
        else:
            with staging_dir(out, overwrite=overwrite, inputs=inputs) as tmp_dir:
                tmp_path = tmp_dir / base_graph.name
                merged = write_graph(model, inits, ckpt, plan, changed, mapped, data_file, tmp_path, durable, check)
                copy_folder(folder, tmp_dir, skip={base_graph, data_file, folder / GENAI_MANIFEST}, durable=durable)
            if durable:
                sync_path(Path(os.path.abspath(out)).parent)
    graph_dtypes = sorted({BY_ONNX[i.proto.data_type].name for i in inits.values() if is_float(i.dtype)})
    ckpt_dtypes = sorted({BY_SAFETENSORS[info.dtype].name for info in ckpt.tensors.values()})
    return MergedGraph(
        path=out,
        base_graph=base_graph,
        merged=sorted(merged),
        copied=len(inits) - len(merged),
        checked=len(mapped),
        base_check=base_check,
        graph_dtypes=graph_dtypes,
        checkpoint_dtypes=ckpt_dtypes,
        external_data=data_file is not None,
        total_bytes=sum(int(np.prod(i.shape, dtype=np.int64)) * i.dtype.itemsize for i in inits.values()),
        seconds=time.perf_counter() - start,
        unmapped=sorted(unmapped),
        layout=layout.name,
        folder=folder is not None,
    )


def write_graph(
    model: Any,
    inits: dict[str, Initializer],
    ckpt: Checkpoint,
    plan: MergePlan,
    changed: dict[str, str],
    mapped: dict[str, Mapping],
    data_file: Path | None,
    path: Path,
    durable: bool,
    check: Callable[[], None] | None = None,
) -> list[str]:
    """The merged graph at `path` (its data, if any, at `<path>.data`); returns the
    initializers rewritten. `check()` (the base's values) runs first, while the kernel
    copies the data; if it raises, the copy is stopped and nothing is merged."""
    data_out = None
    if data_file is None:
        if check is not None:
            check()
        merged = write_merged(inits, ckpt, plan, changed, mapped, None)
    else:
        # The kernel copies every byte but the rewritten tensors' while they are computed
        # (copy_file_range and numpy both release the GIL): about the time of the copy.
        data_out = path.with_name(f"{path.name}.data")
        rewritten = [(inits[n].offset, inits[n].length) for n in rewritten_names(mapped, changed)]
        copier = Worker(copy_except, data_file, data_out, [r for r in rewritten if r[0] is not None])
        try:
            if check is not None:
                check()
            merged = write_merged(inits, ckpt, plan, changed, mapped, data_out, wait=copier.started)
        except BaseException:
            copier.stop.set()  # the output is discarded: no need to finish the copy
            raise
        finally:
            copier.join()
        relocate(inits, data_out.name)
    write_proto(model, path, data_out, durable)
    return merged


def decoder_file(folder: Path) -> Path:
    """An onnxruntime-genai folder's decoder graph, as its genai_config.json names it."""
    config = read_genai_config(folder)
    try:
        name = config["model"]["decoder"]["filename"]
    except (KeyError, TypeError):
        raise BadInputError(f"{folder / GENAI_CONFIG}: no model.decoder.filename") from None
    if not isinstance(name, str) or PurePosixPath(name).name != name or name in ("", ".", ".."):
        raise BadInputError(f"{folder / GENAI_CONFIG}: decoder filename {name!r} is not a file name in the folder")
    path = folder / name
    if not path.is_file():
        raise BadInputError(f"{path}: missing (the decoder {folder / GENAI_CONFIG} names)")
    return path


def refuse_quantized(model: Any, path: Path) -> None:
    """A graph with quantized weights (int4 MatMulNBits blocks, Q/DQ pairs) is refused."""
    ops = sorted({node.op_type for node in model.graph.node} & QUANTIZED_OPS)
    if ops:
        raise BadInputError(
            f"{path}: a quantized graph ({', '.join(ops)} nodes): its weights are quantized blocks, which a merge "
            "cannot rewrite exactly; merge into a float (fp32/fp16) build, or quantize the merged one"
        )


def copy_folder(source: Path, dest: Path, skip: set[Path | None], durable: bool) -> None:
    """Every file and directory of `source` but `skip` (and but what `dest` already holds:
    the merged decoder and its data), copied (by the kernel) into `dest`."""
    for entry in sorted(source.iterdir()):
        if entry in skip or os.path.lexists(dest / entry.name):
            continue
        if not entry.is_dir():
            copy_data(entry, dest / entry.name)
            continue
        try:
            shutil.copytree(entry, dest / entry.name)
        except OSError as exc:
            raise OutputError(f"{dest / entry.name}: cannot copy {entry} ({exc.strerror or exc})") from exc
    if durable:
        for path in sorted(dest.rglob("*")):
            if path.is_file():
                sync_path(path)
        sync_path(dest)


def is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype.name in ("bfloat16",)


# ----------------------------------------------------------- base graph ----


def read_initializers(model: Any, path: Path) -> tuple[Path | None, dict[str, Initializer]]:
    """The graph's initializers by name and the one external data file they use (if any)."""
    external = onnx_protos().TensorProto.EXTERNAL
    inits: dict[str, Initializer] = {}
    locations: set[str] = set()
    for proto in model.graph.initializer:
        if proto.data_type not in BY_ONNX:
            raise BadInputError(f"{path}: initializer {proto.name} has an unsupported type {proto.data_type}")
        if proto.name in inits:
            raise BadInputError(f"{path}: initializer {proto.name} appears twice")
        init = Initializer(proto, BY_ONNX[proto.data_type].numpy, tuple(int(d) for d in proto.dims))
        if proto.data_location == external:
            entries = {e.key: e.value for e in proto.external_data}
            try:
                locations.add(entries["location"])
                init.offset = int(entries.get("offset", 0))
                init.length = int(entries["length"])
            except (KeyError, ValueError):
                raise BadInputError(f"{path}: initializer {proto.name} has malformed external data") from None
            expected = int(np.prod(init.shape, dtype=np.int64)) * init.dtype.itemsize
            if init.length != expected:
                raise BadInputError(f"{path}: initializer {proto.name} holds {init.length} bytes, not {expected}")
        inits[proto.name] = init
    if len(locations) > 1:
        raise BadInputError(f"{path}: initializers are spread over {len(locations)} external data files (one is read)")
    if not locations:
        return None, inits
    (location,) = locations
    rel = PurePosixPath(location)
    if rel.is_absolute() or ".." in rel.parts:
        raise BadInputError(f"{path}: external data location {location!r} leaves the model's directory")
    data_file = path.parent / rel
    if not data_file.is_file():
        raise BadInputError(f"{path}: external data file {data_file} is missing")
    size = data_file.stat().st_size
    for init in inits.values():
        if init.offset is not None and init.offset + init.length > size:
            raise BadInputError(f"{data_file}: truncated (initializer {init.name} runs past the end)")
    return data_file, inits


def changed_tensors(plan: MergePlan) -> dict[str, str]:
    """Checkpoint key -> what the merge does to it ("weight", "bias", "replaced")."""
    changed = {key: "weight" for key in plan.targets}
    changed.update({t.bias_key: "bias" for t in plan.targets.values() if t.bias_key})
    changed.update({key: "replaced" for key in plan.replacements if key not in plan.targets})
    return changed


def check_graph(
    inits: dict[str, Initializer],
    ckpt: Checkpoint,
    changed: dict[str, str],
    graph_path: Path,
    base_dir: Path,
    full: bool = False,
    values: bool = True,
) -> tuple[Layout, dict[str, Mapping], list[str]]:
    """Refuse a graph that is not BASE's; returns its layout, its mapped initializers and
    the unmapped ones. With `values` (else: check_values, later), the values too."""
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
    if values:
        check_values(inits, ckpt, mapped, graph_path, base_dir, full)
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


# ---------------------------------------------------------------- write ----


def copy_data(source: Path, dest: Path) -> None:
    """The external data, copied by the kernel (copy_file_range / sendfile)."""
    try:
        shutil.copyfile(source, dest)
    except OSError as exc:
        if exc.filename == str(source):
            raise CheckpointError(f"{source}: cannot read ({exc.strerror or exc})") from exc
        raise OutputError(f"{dest}: cannot write ({exc.strerror or exc})") from exc


class Worker(threading.Thread):
    """fn(*args) in a thread; join() re-raises what it raised. `started` is set once the
    thread runs (so a file it creates exists)."""

    def __init__(self, fn, *args) -> None:
        super().__init__(daemon=True)
        self.fn, self.args, self.error = fn, args, None
        self.started = threading.Event()
        self.stop = threading.Event()  # handed to fn: set, it returns early
        self.start()

    def run(self) -> None:
        try:
            self.fn(*self.args, on_open=self.started.set, stop=self.stop)
        except BaseException as exc:  # handed to join()
            self.error = exc
        finally:
            self.started.set()

    def join(self, timeout=None) -> None:
        super().join(timeout)
        if self.error is not None:
            raise self.error


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
    wait: threading.Event | None = None,
) -> list[str]:
    """Compute every initializer a changed tensor maps to, in the graph's dtype, and put it
    where the base's was; returns their names. A packed one is the transform of its merged
    and untouched sources. `wait`: set once `data_out` exists."""
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
                if wait is not None:
                    wait.wait()
                fd = open_output(data_out)
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


def relocate(inits: dict[str, Initializer], location: str) -> None:
    """Point every external initializer at the output's data file (offsets are unchanged)."""
    for init in inits.values():
        if init.offset is None:
            continue
        for entry in init.proto.external_data:
            if entry.key == "location":
                entry.value = location


def write_proto(model: Any, path: Path, data_file: Path | None, durable: bool) -> None:
    try:
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
            if durable:
                f.flush()
                os.fsync(f.fileno())
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    if durable and data_file is not None:
        sync_path(data_file)
