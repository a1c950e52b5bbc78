"""An adapter's merged ONNX, made from the base model's graph at copy speed.

A merged model has exactly its base's graph: only the values of the adapter's target
tensors change. So instead of loading, tracing and exporting the merged checkpoint, this
copies BASE.onnx and its external data and rewrites the few initializers the adapter
changes, computed by the merge's math (lora_deploy.merge.delta) from the checkpoint.

* The graph must come from BASE: every initializer named like a checkpoint tensor must
  have that tensor's shape and, converted to the graph's dtype, its exact values (all are
  compared, a block at a time), and every tensor the adapter changes must be an
  initializer of the graph. Our exporter keeps checkpoint names (optimize=False);
  a graph whose names do not map (optimize=True, other exporters) is refused.
* Each merged tensor is what `merge` (dtype auto) then `export onnx` gives: W0 + s·B·A
  in float32, rounded once to the checkpoint's dtype, then converted to the graph's
  (tests/export/test_like.py compares with a fresh export, byte for byte).
* The external data file is copied by the kernel and the changed tensors are written in
  place, at their offsets; small tensors stored in the graph are replaced there. Memory
  is about one tensor whatever the model's size.
* Refused (exit 2, nothing written): another model's graph, names that do not map,
  shapes that differ, an adapter that changes the graph itself (an embedding LoRA on tied
  embeddings unties them), a graph with more than one external data file.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from lora_deploy.adapter.plan import MergePlan, plan_merge
from lora_deploy.adapter.read import load_adapter
from lora_deploy.arrays import all_finite
from lora_deploy.dtypes import BY_ONNX, BY_SAFETENSORS
from lora_deploy.errors import BadInputError, CheckpointError, NonFiniteError, OutputError
from lora_deploy.export import graph as onnx_graph
from lora_deploy.io.checkpoint import DTYPES, Checkpoint, TensorInfo, pread_all
from lora_deploy.io.staging import output_error, staging_dir, sync_path
from lora_deploy.io.stream import write_at
from lora_deploy.merge.delta import merged_bias, merged_weight

# Tensors are compared with the checkpoint this many bytes at a time.
COMPARE_BLOCK = 16 * 1024 * 1024


@dataclass
class MergedGraph:
    """What merge_onnx wrote."""

    path: Path
    base_graph: Path
    merged: list[str]  # initializers rewritten
    copied: int  # initializers copied unchanged
    checked: int  # initializers compared with the checkpoint
    graph_dtypes: list[str]  # float dtypes of the graph's initializers
    checkpoint_dtypes: list[str]
    external_data: bool
    total_bytes: int
    seconds: float = 0.0
    unmapped: list[str] = field(default_factory=list)  # initializers not in the checkpoint (buffers, constants)

    def summary(self) -> str:
        return (
            f"merged {len(self.merged)} initializers of {self.base_graph.name} into {self.path} "
            f"({self.total_bytes / 1e6:.1f} MB, graph dtype {'/'.join(self.graph_dtypes) or '-'}, "
            f"checkpoint {'/'.join(self.checkpoint_dtypes)}; {self.copied} copied, "
            f"{self.checked} checked against the base) in {self.seconds:.1f}s"
        )

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "base_graph": str(self.base_graph),
            "merged": self.merged,
            "copied": self.copied,
            "checked": self.checked,
            "unmapped": self.unmapped,
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
) -> MergedGraph:
    """Write ADAPTER merged into BASE as an ONNX model with ``base_graph``'s graph.

    ``base_graph`` is an ONNX export of ``base_dir`` whose initializers keep the
    checkpoint's names (``export onnx``). ``out`` (and ``<out>.data``) follow the output
    policy: never an input, replaced only with ``overwrite``.
    """
    import onnx

    start = time.perf_counter()
    base_dir, base_graph, out = Path(base_dir), Path(base_graph), Path(out)
    if not base_graph.is_file():
        raise BadInputError(f"{base_graph}: no such ONNX file")
    if out.suffix != ".onnx":
        raise BadInputError(f"{out}: the merged graph's name must end in .onnx")
    try:
        model = onnx.load(str(base_graph), load_external_data=False)
    except Exception as err:  # protobuf raises DecodeError and others
        raise BadInputError(f"{base_graph}: not an ONNX model ({type(err).__name__})") from err
    data_file, inits = read_initializers(model, base_graph)
    inputs = [base_dir, Path(adapter_dir), base_graph, data_file]
    onnx_graph.check_output(out, inputs, overwrite)
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
        unmapped = check_graph(inits, ckpt, changed, base_graph, base_dir)
        with staging_dir(out, rename=False, overwrite=overwrite) as tmp_dir:
            tmp_path = tmp_dir / out.name
            data_out = tmp_path.with_name(f"{out.name}.data")
            if data_file is not None:
                copy_data(data_file, data_out)
            merged = write_merged(inits, ckpt, plan, changed, data_out if data_file is not None else None)
            if data_file is not None:
                relocate(inits, data_out.name)
            write_proto(model, tmp_path, data_out if data_file is not None else None, durable)
            try:
                onnx_graph.move_into_place(tmp_path, out, data_file is not None, overwrite)
            except OSError as exc:
                raise output_error(out, exc, "cannot move the output into place") from exc
    graph_dtypes = sorted({BY_ONNX[i.proto.data_type].name for i in inits.values() if is_float(i.dtype)})
    ckpt_dtypes = sorted({BY_SAFETENSORS[info.dtype].name for info in ckpt.tensors.values()})
    return MergedGraph(
        path=out,
        base_graph=base_graph,
        merged=sorted(merged),
        copied=len(inits) - len(merged),
        checked=len(inits) - len(unmapped),
        graph_dtypes=graph_dtypes,
        checkpoint_dtypes=ckpt_dtypes,
        external_data=data_file is not None,
        total_bytes=sum(int(np.prod(i.shape, dtype=np.int64)) * i.dtype.itemsize for i in inits.values()),
        seconds=time.perf_counter() - start,
        unmapped=sorted(unmapped),
    )


def is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype.name in ("bfloat16",)


# ----------------------------------------------------------- base graph ----


def read_initializers(model: Any, path: Path) -> tuple[Path | None, dict[str, Initializer]]:
    """The graph's initializers by name and the one external data file they use (if any)."""
    from onnx import TensorProto

    inits: dict[str, Initializer] = {}
    locations: set[str] = set()
    for proto in model.graph.initializer:
        if proto.data_type not in BY_ONNX:
            raise BadInputError(f"{path}: initializer {proto.name} has an unsupported type {proto.data_type}")
        if proto.name in inits:
            raise BadInputError(f"{path}: initializer {proto.name} appears twice")
        init = Initializer(proto, BY_ONNX[proto.data_type].numpy, tuple(int(d) for d in proto.dims))
        if proto.data_location == TensorProto.EXTERNAL:
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
    inits: dict[str, Initializer], ckpt: Checkpoint, changed: dict[str, str], graph_path: Path, base_dir: Path
) -> list[str]:
    """Refuse a graph that is not BASE's; returns the initializers the checkpoint lacks."""
    mapped = [name for name in inits if name in ckpt.tensors]
    if not mapped:
        raise BadInputError(
            f"{graph_path}: no initializer name maps onto a tensor of {base_dir} "
            "(export it with `lora-deploy export onnx`, which keeps checkpoint names)"
        )
    for key in sorted(changed):
        if key not in inits:
            raise BadInputError(
                f"{graph_path}: the adapter changes {key}, but no initializer of the graph has that name "
                "(its initializer names do not map onto the checkpoint, or the graph does not compute it)"
            )
    for name in mapped:
        init, info = inits[name], ckpt.tensors[name]
        if init.shape != info.shape:
            raise BadInputError(
                f"{graph_path}: initializer {name} has shape {list(init.shape)} but {base_dir} has {list(info.shape)}"
            )
        if is_float(init.dtype) != is_float(info.np_dtype):
            raise BadInputError(
                f"{graph_path}: initializer {name} is {init.dtype}, the checkpoint's is {info.np_dtype}"
            )
    for name in mapped:
        if not same_values(inits[name], ckpt, ckpt.tensors[name], graph_path):
            raise BadInputError(
                f"{graph_path}: initializer {name} differs from {base_dir}'s: the graph is not an export of this base"
            )
    return [name for name in inits if name not in ckpt.tensors]


def same_values(init: Initializer, ckpt: Checkpoint, info: TensorInfo, graph_path: Path) -> bool:
    """Whether the initializer holds the checkpoint tensor, converted to the graph's dtype,
    bit for bit; compared a block at a time (NaN bit patterns included)."""
    count = int(np.prod(info.shape, dtype=np.int64))
    if init.offset is None:
        graph_values = inline_array(init).reshape(-1)
        return bool(
            np.array_equal(as_bits(converted(ckpt.read(info.name).reshape(-1), init.dtype)), as_bits(graph_values))
        )
    step = max(1, COMPARE_BLOCK // max(info.np_dtype.itemsize, init.dtype.itemsize))
    data_file = graph_path.parent / location_of(init)
    fd = os.open(data_file, os.O_RDONLY)
    try:
        for first in range(0, count, step):
            n = min(step, count - first)
            size_c, size_g = info.np_dtype.itemsize, init.dtype.itemsize
            raw = ckpt_block(ckpt, info, first * size_c, n * size_c)
            ours = converted(np.frombuffer(raw, info.np_dtype), init.dtype)
            theirs = np.frombuffer(pread_all(fd, n * size_g, init.offset + first * size_g, data_file), init.dtype)
            if not np.array_equal(as_bits(ours), as_bits(theirs)):
                return False
    finally:
        os.close(fd)
    return True


def ckpt_block(ckpt: Checkpoint, info: TensorInfo, start: int, length: int) -> bytes:
    return ckpt.read_bytes(replace(info, start=info.start + start, end=info.start + start + length))


def location_of(init: Initializer) -> str:
    return next(e.value for e in init.proto.external_data if e.key == "location")


def converted(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Checkpoint values in the graph's dtype, as the exporter converts them (torch's
    .to() rounds to nearest even, as numpy does)."""
    return values if values.dtype == dtype else values.astype(dtype)


def as_bits(values: np.ndarray) -> np.ndarray:
    return values.view(f"u{values.dtype.itemsize}") if values.dtype.itemsize in (1, 2, 4, 8) else values


def inline_array(init: Initializer) -> np.ndarray:
    from onnx import numpy_helper

    return np.asarray(numpy_helper.to_array(init.proto)).astype(init.dtype, copy=False)


# ---------------------------------------------------------------- write ----


def copy_data(source: Path, dest: Path) -> None:
    """The external data, copied by the kernel (copy_file_range / sendfile)."""
    try:
        shutil.copyfile(source, dest)
    except OSError as exc:
        if exc.filename == str(source):
            raise CheckpointError(f"{source}: cannot read ({exc.strerror or exc})") from exc
        raise OutputError(f"{dest}: cannot write ({exc.strerror or exc})") from exc


def write_merged(
    inits: dict[str, Initializer],
    ckpt: Checkpoint,
    plan: MergePlan,
    changed: dict[str, str],
    data_out: Path | None,
) -> list[str]:
    """Compute every changed tensor, in the graph's dtype, and put it where the base's was."""
    from onnx import numpy_helper

    bias_of = {t.bias_key: t for t in plan.targets.values() if t.bias_key}
    fd = os.open(data_out, os.O_WRONLY) if data_out is not None else None
    try:
        for key, what in changed.items():
            init, info = inits[key], ckpt.tensors[key]
            values = merged_tensor(ckpt, info, plan, bias_of, what)
            values = finite(converted(values, init.dtype), key)
            if init.offset is None:
                init.proto.CopyFrom(numpy_helper.from_array(values, key))
            else:
                write_at(fd, data_out, np.ascontiguousarray(values).reshape(-1).view(np.uint8), init.offset)
    finally:
        if fd is not None:
            os.close(fd)
    return list(changed)


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
    base_weight = ckpt.read(info.name) if w0 is None else w0
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
