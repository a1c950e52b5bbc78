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
  is a few copies of the largest changed initializer whatever the model's size. The copy
  is most of the command's time, so it starts as soon as the graph is read and the output
  checked, and everything else runs meanwhile on the other core: importing numpy and the
  merge's math (export/initializers.py), the checks, the merged tensors (io/fileio.py's
  FileCopy leaves their ranges as holes once they are known). Bad input found meanwhile
  stops the copy; the output, staged, is never half-written.
* An onnxruntime-genai folder (its genai_config.json) as the base graph gives a whole
  folder: the merged decoder and every other file of the folder but its
  genai-manifest.json (which describes the base's build), staged and renamed into place.
  An entry the copy cannot read (a dangling symlink, a symlink loop, a pipe, socket or
  device) is refused as bad input before anything is copied.
* BASE is a checkpoint directory or, as for `merge`, a single file (merge/plain.py).
* Refused (exit 2, nothing written): another model's graph, names that map in no layout,
  shapes that differ, a quantized graph (int4 MatMulNBits blocks), a builder graph with an
  adapter baked in, an adapter that changes the graph itself (an embedding LoRA on tied
  embeddings unties them), a graph with more than one external data file.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from lora_deploy.backends.onnxrt.genai_folder import GENAI_CONFIG, GENAI_MANIFEST, read_genai_config
from lora_deploy.errors import BadInputError, CheckpointError, LoraDeployError, OutputError
from lora_deploy.export import files as onnx_files
from lora_deploy.io.fileio import FileCopy
from lora_deploy.io.onnx_proto import onnx_protos
from lora_deploy.io.staging import check_output, output_error, rename_in_message, staging_dir, sync_path

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

    ``base_dir`` is a checkpoint directory or a file base (checkpoint_dir).
    ``base_graph`` is an ONNX graph of ``base_dir`` in a known layout (export/layouts.py:
    ``export onnx``'s, or onnxruntime-genai's builder's), or an onnxruntime-genai folder:
    then ``out`` is a folder too (the merged decoder and the folder's other files).
    ``out`` (and ``<out>.data``) follow the output policy: never an input, replaced only
    with ``overwrite``.
    """
    start = time.perf_counter()
    base_dir, adapter_dir, base_graph, out = Path(base_dir), Path(adapter_dir), Path(base_graph), Path(out)
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
    data_file = external_data_file(model, base_graph)
    inputs = [base_dir, adapter_dir, folder, base_graph, data_file]
    if folder is None:
        onnx_files.check_output(out, inputs, overwrite)
    else:  # the folder's other files are checked before anything is written or copied
        entries = folder_entries(folder, skip={base_graph, data_file, folder / GENAI_MANIFEST})
        check_output(out, inputs, overwrite, directory=True)
    with checkpoint_dir(base_dir) as read_dir:
        job = (model, read_dir, adapter_dir, base_graph, data_file, base_check, durable)
        if folder is None:
            with staging_dir(out, rename=False, overwrite=overwrite) as tmp_dir:
                fields = write_graph(*job, tmp_dir / out.name)
                try:
                    onnx_files.move_into_place(tmp_dir / out.name, out, data_file is not None, overwrite)
                except OSError as exc:
                    raise output_error(out, exc, "cannot move the output into place") from exc
        else:
            with staging_dir(out, overwrite=overwrite, inputs=inputs) as tmp_dir:
                fields = write_graph(*job, tmp_dir / base_graph.name)
                copy_folder(folder, entries, tmp_dir, durable=durable)
    if folder is not None and durable:
        sync_path(Path(os.path.abspath(out)).parent)
    return MergedGraph(
        path=out,
        base_graph=base_graph,
        external_data=data_file is not None,
        seconds=time.perf_counter() - start,
        folder=folder is not None,
        **fields,
    )


@contextmanager
def checkpoint_dir(base: Path) -> Iterator[Path]:
    """BASE as the checkpoint directory the merge's math reads: a directory as it is, a
    file base (a .safetensors file, a .pt/.pth/.bin state dict) as plain `merge` presents
    it (merge/plain.py's base_source), with messages naming the file."""
    if base.is_dir():
        yield base
        return
    # Here, not at the top: io.checkpoint imports numpy, which a directory base imports
    # only once the copy has started (write_graph).
    from lora_deploy.io.checkpoint import SINGLE_FILE
    from lora_deploy.merge.plain import base_source

    with base_source(base) as source:
        try:
            yield source.read_dir
        except LoraDeployError as exc:
            rename_in_message(exc, source.read_dir / SINGLE_FILE, base)
            rename_in_message(exc, source.read_dir, base)
            raise


def write_graph(
    model: Any,
    base_dir: Path,
    adapter_dir: Path,
    base_graph: Path,
    data_file: Path | None,
    base_check: str,
    durable: bool,
    path: Path,
) -> dict:
    """The merged graph at `path` (its data, if any, at `<path>.data`); returns
    MergedGraph's fields about the initializers (export/initializers.py)."""
    data_out = path.with_name(f"{path.name}.data") if data_file is not None else None
    # The kernel copies the data while everything else runs: it starts before numpy is
    # imported, and learns which ranges the merged tensors fill once they are known.
    copier = FileCopy(data_file, data_out) if data_file is not None else None
    try:
        from lora_deploy.export import initializers  # numpy and the merge's math: ~0.1 s the copy hides

        fields = initializers.merge_initializers(
            model,
            base_graph,
            data_file,
            base_dir,
            adapter_dir,
            data_out,
            base_check,
            holes=copier.set_holes if copier is not None else None,
            before_write=copier.writable if copier is not None else None,
        )
        if data_out is not None:
            relocate(model, data_out.name)
        write_proto(model, path, durable)
    except BaseException:
        if copier is not None:
            copier.stop()  # the output is discarded: no need to finish the copy
        raise
    finally:
        if copier is not None:
            copier.join()
    if durable and data_out is not None:
        sync_path(data_out)
    return fields


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


def folder_entries(source: Path, skip: set[Path | None]) -> list[tuple[Path, bool]]:
    """What copy_folder copies of `source`: (path, is a directory) for every entry at any
    depth but `skip`, parents before children, symlinks followed as the copy follows them.

    Whatever the copy could not read is refused here, before any copying (BadInputError,
    naming the entry): a dangling symlink, a symlink loop, a named pipe, socket or device,
    an entry that cannot be read."""
    entries: list[tuple[Path, bool]] = []

    def walk(directory: Path, ancestors: dict[tuple[int, int], Path]) -> None:
        try:
            children = sorted(directory.iterdir())
        except OSError as exc:
            raise BadInputError(f"{directory}: cannot read ({exc.strerror or exc})") from exc
        for path in children:
            if path in skip:
                continue
            info = entry_stat(path)
            if stat.S_ISDIR(info.st_mode):
                key = (info.st_dev, info.st_ino)
                if key in ancestors:
                    raise BadInputError(f"{path}: a symlink loop (it leads back to {ancestors[key]})")
                entries.append((path, True))
                walk(path, {**ancestors, key: path})
            else:
                check_readable(path)
                entries.append((path, False))

    root = entry_stat(source)
    walk(source, {(root.st_dev, root.st_ino): source})
    return entries


# File types a folder copy cannot take: what each is called in the refusal.
SPECIAL_FILES = (
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def entry_stat(path: Path) -> os.stat_result:
    """stat() of an input entry, through symlinks; a dangling or looping symlink, a special
    file or an entry that cannot be read is bad input (one line naming it)."""
    try:
        info = path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BadInputError(f"{path}: a symlink loop") from None
        if exc.errno == errno.ENOENT and path.is_symlink():
            try:
                target = f" (to {os.readlink(path)})"
            except OSError:
                target = ""
            raise BadInputError(f"{path}: a dangling symlink{target}") from None
        raise BadInputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    for test, kind in SPECIAL_FILES:
        if test(info.st_mode):
            raise BadInputError(f"{path}: {kind}, not a file or directory (the folder's files are copied)")
    return info


def check_readable(path: Path) -> None:
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read ({exc.strerror or exc})") from None


def copy_folder(source: Path, entries: list[tuple[Path, bool]], dest: Path, durable: bool) -> None:
    """`entries` of `source` (folder_entries: checked already) copied into `dest`, files by
    the kernel, but those under a name `dest` already holds (the merged decoder and its
    data). A failure names the first file or directory that could not be made."""
    taken = {path.name for path in dest.iterdir()}
    for path, is_dir in entries:
        relative = path.relative_to(source)
        if relative.parts[0] in taken:
            continue
        target = dest / relative
        if not is_dir:
            copy_data(path, target)
            continue
        try:
            target.mkdir()
        except OSError as exc:
            raise OutputError(f"{target}: cannot create the directory ({exc.strerror or exc})") from exc
    if durable:
        for path in sorted(dest.rglob("*")):
            if path.is_file():
                sync_path(path)
        sync_path(dest)


def external_data_file(model: Any, path: Path) -> Path | None:
    """The one external data file the graph's initializers are stored in (None: all in the
    graph); one that leaves the graph's directory, is missing, or is one of several is
    refused."""
    external = onnx_protos().TensorProto.EXTERNAL
    locations = set()
    for proto in model.graph.initializer:
        if proto.data_location == external:
            location = next((e.value for e in proto.external_data if e.key == "location"), None)
            if location is None:
                raise BadInputError(f"{path}: initializer {proto.name} has malformed external data")
            locations.add(location)
    if len(locations) > 1:
        raise BadInputError(f"{path}: initializers are spread over {len(locations)} external data files (one is read)")
    if not locations:
        return None
    (location,) = locations
    rel = PurePosixPath(location)
    if rel.is_absolute() or ".." in rel.parts:
        raise BadInputError(f"{path}: external data location {location!r} leaves the model's directory")
    data_file = path.parent / rel
    if not data_file.is_file():
        raise BadInputError(f"{path}: external data file {data_file} is missing")
    return data_file


def copy_data(source: Path, dest: Path) -> None:
    """The external data, copied by the kernel (copy_file_range / sendfile)."""
    try:
        shutil.copyfile(source, dest)
    except shutil.SpecialFileError as exc:  # a named pipe or socket: an input, not the output, is wrong
        raise BadInputError(f"{source}: not a regular file (a named pipe or socket)") from exc
    except OSError as exc:
        if exc.filename == str(source):
            raise CheckpointError(f"{source}: cannot read ({exc.strerror or exc})") from exc
        raise OutputError(f"{dest}: cannot write ({exc.strerror or exc})") from exc


def relocate(model: Any, location: str) -> None:
    """Point every external initializer at the output's data file (offsets are unchanged)."""
    for proto in model.graph.initializer:
        for entry in proto.external_data:
            if entry.key == "location":
                entry.value = location


def write_proto(model: Any, path: Path, durable: bool) -> None:
    try:
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
            if durable:
                f.flush()
                os.fsync(f.fileno())
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
