"""Export a checkpoint without its weights in memory: trace on fake tensors, stream the
initializers from the checkpoint into the external data file by name.

torch 2.13 (torch.onnx.enable_fake_mode is gone): the model is built from its config
inside FakeTensorMode, traced with torch.export.export, and converted with
torch.onnx.export(exported_program, optimize=False), which keeps one named initializer
per parameter and buffer, with fake data. Each initializer named like a checkpoint
tensor is then read from the checkpoint (one tensor at a time), converted to the
graph's dtype and appended to ``<name>.data``; the others (non-persistent buffers such
as rotary ``inv_freq``) take their values from a second build of the model whose
parameters live on the meta device. Peak memory is about the traced graph plus one
tensor, whatever the model's size.

The parity check in ONNX Runtime needs the real model in torch and then an ORT session
(about twice the weights, one after the other), which would undo what streaming saves. So
by default (`parity="auto"`) it runs on the real model only when that fits PARITY_BUDGET
and half the available memory; otherwise on a proxy: the same config cut to one layer
(and a small vocabulary where no special token id needs a large one), random weights,
saved and exported through this same path, and compared with torch. The proxy proves the
traced graph for this architecture and config; the real weights are then only streamed
by name with their shapes checked. "full" forces the real model, "proxy" the proxy,
"skip" neither; the result says which ran.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from lora_deploy.dtypes import BY_ONNX
from lora_deploy.errors import BadInputError, ExportError, OutputError
from lora_deploy.export import graph as onnx_graph
from lora_deploy.io.checkpoint import Checkpoint, check_checkpoint
from lora_deploy.io.fileio import write_at
from lora_deploy.io.staging import check_parent, make_parent, output_error, staging_dir
from lora_deploy.modeling.hf import HFExportWrapper
from lora_deploy.modeling.sentence import pooling_for_task
from lora_deploy.modeling.tasks import AUTO_CLASS, load_config, model_input_names, resolve_task
from lora_deploy.options import PARITY_MODES
from lora_deploy.util import first_line

# Offsets in the data file are aligned like onnx-ir's (so ORT can map large tensors).
ALIGN = 4096


def trace_fake(config: Any, task: str, torch_dtype: torch.dtype, example: Mapping[str, torch.Tensor], opset):
    """(ONNX program, fake wrapper): the model traced without weights."""
    import transformers
    from torch._subclasses.fake_tensor import FakeTensorMode

    auto_class = getattr(transformers, AUTO_CLASS[task])
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = {name: {0: batch, 1: seq} for name in example}
    try:
        with onnx_graph.quiet_exporter(), FakeTensorMode(allow_non_fake_inputs=True):
            model = auto_class.from_config(config, dtype=torch_dtype, attn_implementation="eager").eval()
            wrapper = HFExportWrapper(model, task, list(example))
            exported = torch.export.export(wrapper, (), kwargs=dict(example), dynamic_shapes=dynamic)
    except ValueError as err:
        raise BadInputError(f"{config.model_type} does not support task {task}: {first_line(err)}") from err
    except Exception as err:
        raise ExportError(f"torch.export failed on the fake model: {onnx_graph.exporter_summary(err)}") from err
    program = onnx_graph.run_exporter(exported, kwargs=example, output_names=wrapper.output_names, opset=opset)
    return program, wrapper


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Parameters are created on the meta device (no memory, no init), buffers for real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def real_buffers(config: Any, task: str, torch_dtype: torch.dtype) -> dict[str, np.ndarray]:
    """Buffer values (names as in the checkpoint) from a build without parameter memory."""
    import transformers

    auto_class = getattr(transformers, AUTO_CLASS[task])
    with parameters_on_meta():
        model = auto_class.from_config(config, dtype=torch_dtype, attn_implementation="eager")
    return {name: buf.detach().cpu().numpy() for name, buf in model.named_buffers() if buf.device.type != "meta"}


def name_dims(model: Any, input_names: list[str]) -> None:
    """Dims of the inputs are "batch" and "sequence"; outputs' dims that are the same
    symbols get the same names."""
    import onnx_ir as ir

    names: dict[str, str] = {}
    for value in model.graph.inputs:
        dims = list(value.shape)
        for axis, label in ((0, "batch"), (1, "sequence")):
            if isinstance(dims[axis], ir.SymbolicDim) and dims[axis].value:
                names[dims[axis].value] = label
            dims[axis] = ir.SymbolicDim(label)
        value.shape = ir.Shape(dims)
    for value in model.graph.outputs:
        if value.shape is None:
            continue
        dims = [
            ir.SymbolicDim(names[d.value]) if isinstance(d, ir.SymbolicDim) and d.value in names else d
            for d in value.shape
        ]
        value.shape = ir.Shape(dims)


def stream_initializers(model: Any, ckpt: Checkpoint, buffers: Mapping[str, np.ndarray], data_path: Path) -> int:
    """Fill every initializer: checkpoint tensors appended to ``data_path`` (external data),
    buffers stored in the graph. Returns the bytes written."""
    import onnx_ir as ir

    offset = 0
    try:
        fd = os.open(data_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as exc:
        raise OutputError(f"{data_path}: cannot write ({exc.strerror})") from None
    try:
        for value in list(model.graph.initializers.values()):
            name = value.name or ""
            dtype = BY_ONNX[int(value.dtype)].numpy
            shape = tuple(int(d) for d in value.shape)
            if name in ckpt.tensors:
                info = ckpt.tensors[name]
                if info.shape != shape:
                    raise BadInputError(
                        f"{ckpt.dir}: tensor {name} has shape {list(info.shape)}, the config's model {list(shape)}"
                    )
                array = ckpt.read(name)
                array = array if array.dtype == dtype else array.astype(dtype)
                data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
                offset += -offset % ALIGN
                write_at(fd, data_path, data, offset)
                value.const_value = ir.ExternalTensor(
                    data_path.name,
                    offset,
                    len(data),
                    value.dtype,
                    shape=ir.Shape(shape),
                    name=name,
                    base_dir=data_path.parent,
                )
                offset += len(data)
                del array, data
            elif name in buffers:
                value.const_value = ir.Tensor(np.ascontiguousarray(buffers[name].astype(dtype, copy=False)), name=name)
            else:
                raise ExportError(f"initializer {name} is neither a tensor of {ckpt.dir} nor a buffer of the model")
    finally:
        os.close(fd)
    return offset


def proxy_config(config: Any) -> Any:
    """`config` cut to one layer, with a small vocabulary unless a special token id needs
    the large one: the graph the parity proxy exports (module docstring)."""
    import copy

    proxy = copy.deepcopy(config)
    proxy.num_hidden_layers = 1
    ids = [v for k, v in config.to_dict().items() if k.endswith("token_id") and isinstance(v, int)]
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and vocab > 512 and max(ids, default=0) < 512:
        proxy.vocab_size = 512
    return proxy


def memory_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# The most memory the parity check may take on the real model with parity="auto".
PARITY_BUDGET = 1 << 30


def parity_plan(weight_bytes: int, mode: str = "auto") -> tuple[str, str]:
    """("full" | "proxy" | "skip", why): where the parity check runs (module docstring).
    The real model in torch, then an ORT session, take about twice the weights."""
    if mode not in PARITY_MODES:
        raise BadInputError(f"parity must be one of {', '.join(PARITY_MODES)}, not {mode!r}")
    if mode != "auto":
        return mode, "requested"
    available = memory_available()
    needed = 2 * weight_bytes
    limit = PARITY_BUDGET if available is None else min(PARITY_BUDGET, available // 2)
    if needed > limit:
        return "proxy", f"the model itself would need ~{needed / 1e9:.1f} GB (limit {limit / 1e9:.1f} GB)"
    return "full", "checked"


def export_streamed(
    model_dir: Path,
    path: Path,
    *,
    task: str,
    opset: int | None,
    torch_dtype: torch.dtype,
    feed: Mapping[str, np.ndarray],
    parity,
    overwrite: bool,
    proxy=None,
    parity_mode: str = "auto",
) -> tuple[Any, float | None, int, str]:
    """Trace fake, stream weights, prove (module docstring), move into place.

    ``parity(tmp_path, output_names) -> max abs error`` runs the ONNX Runtime check on the
    real model, ``proxy() -> (max abs error, status)`` on the proxy. Returns (wrapper, max
    abs error or None, opset, parity status).
    """
    config = load_config(model_dir)
    check_checkpoint(model_dir)
    if getattr(config, "is_encoder_decoder", False):
        raise BadInputError(f"encoder-decoder models ({config.model_type}) are not supported")
    task = resolve_task(task, config)
    parity_plan(0, parity_mode)  # an unknown mode is refused before the work
    check_parent(path)
    if pooling_for_task(model_dir, task) is not None:
        raise BadInputError("--stream-weights does not export sentence-transformers pooling; export without it")
    example = {name: torch.from_numpy(np.asarray(feed[name])) for name in model_input_names(config)}
    program, wrapper = trace_fake(config, task, torch_dtype, example, opset)
    model = program.model
    onnx_graph.rename_tied(model.graph, wrapper)
    onnx_graph.strip_prefix(model.graph, HFExportWrapper.PARAM_PREFIX)
    name_dims(model, list(example))
    opset_used = model.opset_imports.get("", 0)
    if opset is not None and opset_used != opset:
        raise ExportError(f"requested opset {opset} but the exporter produced opset {opset_used}")
    buffers = real_buffers(config, task, torch_dtype)
    del program
    max_err, status = write_streamed(
        model, model_dir, path, buffers, lambda tmp: parity(tmp, wrapper.output_names), proxy, parity_mode, overwrite
    )
    return wrapper, max_err, opset_used, status


def write_streamed(
    model: Any,
    model_dir: Path,
    path: Path,
    buffers: Mapping[str, np.ndarray],
    parity,
    proxy,
    parity_mode: str,
    overwrite: bool,
) -> tuple[float | None, str]:
    """A traced-fake ONNX model (onnx-ir, initializers named as the checkpoint's tensors)
    with its initializers streamed from `model_dir` into ``<name>.data``, saved in a
    staging directory, proven (``parity(tmp_path)`` on the real model or ``proxy()``, as
    `parity_plan` decides) and moved into place. Returns (max abs error or None, status)."""
    import onnx_ir as ir

    make_parent(path)  # missing parent directories are made, as the loaded model's export makes them
    with Checkpoint(model_dir) as ckpt, staging_dir(path, rename=False, overwrite=overwrite) as tmp_dir:
        tmp_path = tmp_dir / path.name
        data_path = tmp_dir / f"{path.name}.data"
        weight_bytes = stream_initializers(model, ckpt, buffers, data_path)
        try:
            ir.save(model, tmp_path)
        except (OSError, ValueError) as err:
            raise ExportError(f"cannot write {path.name}: {first_line(err)}") from err
        del model
        where, why = parity_plan(weight_bytes, parity_mode)
        max_err, status = None, f"skipped: {why}"
        if where == "full":
            max_err, status = parity(tmp_path), "checked"
        elif where == "proxy" and proxy is not None:
            max_err, status = proxy()
            status = f"{status} ({why})"
        try:
            onnx_graph.move_into_place(tmp_path, path, True, overwrite)
        except OSError as exc:
            raise output_error(path, exc, "cannot move the output into place") from exc
    return max_err, status
