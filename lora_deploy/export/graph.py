"""What every ONNX export here shares: run the exporter, fix names, save atomically.

Used by export.py (one checkpoint -> one graph) and dynamic.py / multi.py (graphs
with LoRA inputs). Facts about the torch 2.13 dynamo exporter these rely on are
listed in export.py's module docstring.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_deploy.errors import BadInputError, ExportError
from lora_deploy.export.files import check_output, move_into_place
from lora_deploy.io import staging
from lora_deploy.io.staging import staging_dir
from lora_deploy.util import first_line

# ONNX files are protobufs, capped at 2 GiB including the graph. Switch to
# external data a little before the cap so the graph itself always fits.
EXTERNAL_DATA_BYTES = 1800 * 1024**2


# Exporter errors can be pages long; one line of this many characters is kept.
MESSAGE_LIMIT = 300


# ------------------------------------------------------------- exporter ----

# torch 2.13's dynamo exporter implements opset 18 and up (torchlib's TORCHLIB_OPSET); a
# lower one goes through a version converter that fails on real models (Llama: Squeeze /
# Unsqueeze axes) after the whole trace, leaving opset 18. Up: what the onnx package knows.
MIN_OPSET = 18


def check_opset(opset: int | None) -> None:
    """Refuse an opset the exporter cannot write, before any model is loaded or traced."""
    if opset is None:
        return
    import onnx

    top = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        raise BadInputError(f"opset {opset} is not supported: the exporter writes opsets {MIN_OPSET}..{top}")


def run_exporter(
    module: nn.Module,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    dynamic_shapes: Any = None,
    output_names: Sequence[str] | None = None,
    opset: int | None = None,
    optimize: bool = False,
) -> Any:
    """torch.onnx.export with the dynamo exporter, quietly; returns the ONNXProgram.

    Any exporter failure becomes an ExportError with one line: the exporter raises
    many exception types, and the user needs the reason, not the traceback (which
    stays chained).
    """
    check_opset(opset)
    options: dict[str, Any] = {}
    if opset is not None:
        options["opset_version"] = opset
    if output_names is not None:
        options["output_names"] = list(output_names)
    try:
        with quiet_exporter():
            program = torch.onnx.export(
                module,
                tuple(args),
                kwargs=dict(kwargs) if kwargs is not None else None,
                dynamic_shapes=dynamic_shapes,
                dynamo=True,
                optimize=optimize,
                verbose=False,
                **options,
            )
    except Exception as err:
        raise ExportError(f"torch.onnx.export failed: {exporter_summary(err)}") from err
    drop_stack_traces(program.model)
    return program


# The exporter records on every node the Python stack that made it: absolute paths of the
# exporting machine (its home directory, virtualenv, source tree) in every shipped graph.
# The module names (namespace, class hierarchy, fx node) stay; without the stacks, the
# same export gives the same bytes on any machine, and a LLaMA graph is 40% smaller to
# read (8.3 -> 4.8 MB at 18 layers: `merge --onnx-like` parses it before its copy starts).
STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def drop_stack_traces(ir_model: Any) -> None:
    import onnx_ir as ir

    graphs = [ir_model.graph, *ir_model.functions.values()]
    for graph in graphs:
        for node in ir.traversal.RecursiveGraphIterator(graph):
            node.metadata_props.pop(STACK_TRACE_KEY, None)


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence the exporter's known, harmless noise.

    * "torchvision is not installed. Skipping torchvision::nms" (op registry logger);
    * "The axis name: ... will not be used, since it shares the same shape
      constraints with another axis": two inputs share a dim (batch, or the rank
      of a layer's A and B);
    * a FutureWarning about ``LeafSpec`` from torch's own pytree code.
    """
    registry_logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    old_level = registry_logger.level
    registry_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*shares the same shape constraints")
            warnings.filterwarnings("ignore", message=r".*LeafSpec", category=FutureWarning)
            yield
    finally:
        registry_logger.setLevel(old_level)


def exporter_summary(err: BaseException) -> str:
    """The useful line of a long exporter error (the one under "Exception summary")."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if line.startswith("## Exception summary") and index + 1 < len(lines):
            return lines[index + 1][:MESSAGE_LIMIT]
    return first_line(err, MESSAGE_LIMIT)


# ---------------------------------------------------- initializer names ----


def rename_tied(graph: Any, module: nn.Module) -> None:
    """Name each shared (tied) tensor after its first name in the module.

    The exporter keeps one initializer per shared tensor but may pick any of
    its names (GPT-2 came out as ``lm_head.weight``), while
    ``named_parameters()`` and ``save_pretrained`` use the first one
    (``transformer.wte.weight``), which is what the checkpoint has.
    """
    first_name: dict[int, str] = {}
    canonical: dict[str, str] = {}
    named = itertools.chain(
        module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)
    )
    for name, tensor in named:
        canonical[name] = first_name.setdefault(id(tensor), name)
    for value in list(graph.initializers.values()):
        target = canonical.get(value.name or "")
        if target and target != value.name and target not in graph.initializers:
            value.name = target


def strip_prefix(graph: Any, prefix: str) -> None:
    """Rename initializers "<prefix>x.y" -> "x.y" so they match checkpoint keys.

    The export wrapper holds the model as an attribute, which adds one level
    (``model.`` / ``base.``) that no checkpoint has.
    """
    for value in list(graph.initializers.values()):
        name = value.name or ""
        new_name = name[len(prefix) :]
        if name.startswith(prefix) and new_name and new_name not in graph.initializers:
            value.name = new_name  # onnx-ir re-keys graph.initializers itself


# ----------------------------------------------------------------- save ----


def initializer_bytes(graph: Any) -> int:
    """Total bytes of all initializers (what decides external data)."""
    return sum(value.const_value.nbytes for value in graph.initializers.values() if value.const_value is not None)


def save_atomic(
    ir_model: Any,
    path: Path,
    check: Callable[[Path], Any] | None = None,
    external_data: bool | None = None,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Any:
    """Write the model in a hidden sibling directory, run ``check`` on it there,
    then move it into place; returns what ``check`` returns.

    Any error leaves nothing behind, and an older file at ``path`` untouched.
    ``external_data=None`` puts the weights in ``<name>.data`` only above
    ``EXTERNAL_DATA_BYTES``; True/False forces it. An existing file is replaced only
    with ``overwrite``; ``path`` must keep clear of ``inputs`` (check_output).
    """
    check_output(path, inputs, overwrite)
    with staging_dir(path, rename=False, overwrite=overwrite) as tmp_dir:
        tmp_path = tmp_dir / path.name
        external = write_model(ir_model, tmp_path, external_data)
        result = check(tmp_path) if check is not None else None
        try:
            move_into_place(tmp_path, path, external, overwrite)
        except OSError as exc:
            raise staging.output_error(path, exc, "cannot move the output into place") from exc
    return result


def write_model(ir_model: Any, path: Path, external_data: bool | None) -> bool:
    """Write the model; returns whether weights went to ``<name>.data``."""
    import onnx_ir as ir

    external = external_data if external_data is not None else initializer_bytes(ir_model.graph) > EXTERNAL_DATA_BYTES
    try:
        if external:
            ir.save(ir_model, path, external_data=f"{path.name}.data")
        else:
            ir.save(ir_model, path)
    except OSError as err:  # a full disk, an I/O error: a write failed (exit 3), not the export
        raise staging.output_error(Path(err.filename or path), err, "cannot write") from err
    except ValueError as err:
        raise ExportError(f"cannot write {path.name}: {first_line(err)}") from err
    return external


def name_values(graph, input_names: Sequence[str], output_names: Sequence[str]) -> None:
    """The graph's inputs and outputs named exactly, in order (the exporter numbers list arguments)."""
    if len(graph.inputs) != len(input_names) or len(graph.outputs) != len(output_names):
        raise ExportError(
            f"exported graph has {len(graph.inputs)} inputs / {len(graph.outputs)} outputs, "
            f"expected {len(input_names)} / {len(output_names)}"
        )
    for value, name in zip(graph.inputs, input_names):
        value.name = name
    for value, name in zip(graph.outputs, output_names):
        value.name = name
