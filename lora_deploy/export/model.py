"""Export PyTorch modules and Hugging Face checkpoints to ONNX, checked.

Every export here is "export, then prove it": the file is written to a
temporary directory next to the destination, checked with
``onnx.checker``, run once in ONNX Runtime against the torch module on the
example inputs, and only then moved into place. Any error leaves nothing
behind (and leaves an older file at the destination untouched).

Facts about the torch 2.13 dynamo exporter this module relies on
(``torch.onnx.export(..., dynamo=True)``, onnxscript 0.7, onnx-ir 1.1):

* Dynamic dims: ``dynamic_shapes={"input_ids": {0: "batch", 1: "sequence"}}``
  with *string* dim names works when the example inputs are passed as
  ``kwargs``; the exporter turns each string into ``Dim.DYNAMIC`` and renames
  the ONNX dims to those strings. The dict needs one key per kwarg (``None``
  for a static input). torch.onnx.export's own ``dynamic_axes=`` still works but
  warns that its conversion may hit "Constraints violated", so our
  ``dynamic_axes`` argument is translated to ``dynamic_shapes`` here.
* Input names are the kwarg names, in the order the kwargs are passed (not
  the forward signature order). ``output_names`` renames the outputs.
* Initializer names: the exporter names each initializer after the module's
  parameter/buffer path (``model.model.layers.0.self_attn.q_proj.weight`` for
  a wrapper holding a Llama as ``self.model``; non-persistent buffers such as
  ``rotary_emb.inv_freq`` become initializers too). Tied weights appear once,
  under whichever alias the exporter picks (GPT-2 came out as
  ``lm_head.weight``, while its checkpoint stores ``transformer.wte.weight``);
  we rename such initializers to the first name ``named_parameters()``
  gives, which is the one ``save_pretrained`` keeps.
* ``optimize=True`` (the exporter's default) runs the onnxscript optimizer,
  which MANGLES those names: every Linear weight is consumed by a Transpose
  that constant folding always folds (Transpose is on its always-fold list,
  whatever the size), leaving a transposed copy named ``val_<n>``; and
  ``DeduplicateInitializersPass`` merges small (<= 1024 elements) initializers
  with identical bytes, e.g. all freshly initialised LayerNorm weights. Only a
  few names survive (embeddings, the first norm). Anything that later needs
  to find a weight by its PyTorch name (LoRA merge into ONNX, adapters)
  therefore needs ``optimize=False``, which is this module's default. We
  measured no runtime cost: ONNX Runtime folds the same transposes when it
  creates the session (same latency on a 2-layer Llama at batch 4 x 128).
  The graph has ~3.5x more nodes before ORT's own optimisation.
* ``strip_prefix`` then renames initializers so they equal the checkpoint's
  own state-dict keys (``model.layers.0.self_attn.q_proj.weight``): the
  export wrapper adds one attribute level (``model.``) that no checkpoint has.
* Noise silenced during export: logger warnings "torchvision is not
  installed. Skipping torchvision::nms" (from the op registry), the
  UserWarning "The axis name: batch will not be used, since it shares the same
  shape constraints with another axis" (harmless: two inputs share a dim), and
  a FutureWarning about ``LeafSpec`` from torch's own pytree code.
* Opset: the default is 20 (torch's ONNX_DEFAULT_OPSET); torchlib implements
  >= 18. A lower opset goes through a version converter that failed on Llama
  (Squeeze/Unsqueeze axes), after which the exporter silently keeps 18, so
  graph.check_opset refuses one below 18 before the trace, and we raise
  ExportError whenever the written opset is not the requested one.
* A size-1 dim in the example inputs is still exported as dynamic
  (``Dim.DYNAMIC`` is not 0/1-specialised here), but the graph is only proven
  at the example shape, so prefer batch >= 2.
* Export of a tiny (1-2 layer, hidden 32-64) Llama/GPT-2/BERT takes 5-10 s on
  2 CPU cores, nearly all in ``torch.export`` tracing and decompositions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from lora_deploy.arrays import from_torch
from lora_deploy.backends.onnxrt.runner import OnnxrtRunner
from lora_deploy.compare import TOLERANCES, compare_array, tolerance
from lora_deploy.dtypes import BY_SAFETENSORS, of_torch
from lora_deploy.errors import BadInputError, ExportError
from lora_deploy.export import graph as onnx_graph
from lora_deploy.export.graph import EXTERNAL_DATA_BYTES  # noqa: F401  (re-exported)
from lora_deploy.io.staging import make_parent
from lora_deploy.modeling.hf import HFExportWrapper, flatten_outputs, parse_dtype, wrap_checkpoint
from lora_deploy.modeling.samples import sample_inputs
from lora_deploy.modeling.tasks import AUTO
from lora_deploy.util import first_line


@dataclass(frozen=True)
class ExportResult:
    """What export_checkpoint wrote and how close it is to torch."""

    path: Path
    task: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    max_abs_error: float | None  # None: no output had a position to compare (or no parity check)
    dtype: str
    opset: int
    dtype_source: str = "requested"  # "requested", or why --dtype auto chose `dtype`
    weights: str = "loaded"  # "loaded": traced with the weights; "streamed": traced fake, streamed by name
    parity: str = "checked"  # ONNX Runtime vs torch: "checked", or "skipped: <why>"


# --------------------------------------------------------------- export ----


def export_checkpoint(
    model_dir: str | os.PathLike,
    path: str | os.PathLike,
    *,
    task: str = AUTO,
    opset: int | None = None,
    dtype: str = "float32",
    batch: int = 2,
    seq: int = 16,
    optimize: bool = False,
    overwrite: bool = False,
    stream_weights: bool = False,
    parity: str = "auto",
    module: str | None = None,
    inputs_path: str | os.PathLike | None = None,
    static: bool = False,
    part: str | None = None,
) -> ExportResult:
    """Export a Hugging Face checkpoint directory to one checked ONNX file.

    With ``module`` ("package.module:factory", modeling/factory.py) the model is the plain
    ``nn.Module`` that factory returns with ``model_dir`` (a safetensors directory or file,
    or a ``.pt`` state dict) loaded into it; ``part`` exports one submodule of it; see
    :func:`export_plain`.

    Inputs: input_ids, attention_mask (+ token_type_ids for BERT-like
    models), all int64 with dynamic dims "batch" and "sequence". Output:
    ``logits`` or ``last_hidden_state``, plus ``sentence_embedding`` for a
    sentence-transformers checkpoint (modeling/sentence.py). ``dtype="float16"`` exports a
    half-precision graph (torch's CPU half kernels are used as the parity
    reference, with half-precision tolerances). Initializers keep the
    checkpoint's state-dict names unless ``optimize=True``. An existing file is
    replaced only with ``overwrite=True``, and never one of the checkpoint's.

    ``dtype="auto"`` follows the checkpoint's float dtype (float32 for bfloat16, which
    ONNX Runtime's CPU kernels lack); the result says which and why. ``stream_weights``
    traces the model without its weights and streams them from the checkpoint into
    ``<name>.data`` (export/streamed.py): memory is about one tensor, and the parity
    check runs on the real model when it fits a memory budget, else on a one-layer proxy
    of its config (``parity``: auto, full, proxy or skip; without streaming the loaded
    model is always checked).
    """
    onnx_graph.check_opset(opset)  # before the model is loaded and traced
    if module is not None or inputs_path is not None or static or part is not None:
        if module is None:
            raise BadInputError(
                "--inputs, --static and --part apply to plain modules: give --module package.module:factory"
            )
        if stream_weights or parity != "auto" or task != AUTO:
            raise BadInputError("--module exports the module as it is: no --task, --stream-weights or --parity")
        return export_plain(
            model_dir,
            path,
            module=module,
            inputs_path=inputs_path,
            dtype=dtype,
            static=static,
            opset=opset,
            overwrite=overwrite,
            part=part,
        )
    onnx_graph.check_output(Path(path), [model_dir], overwrite)
    dtype, dtype_source = resolve_dtype(model_dir, dtype)
    torch_dtype = parse_dtype(dtype)
    if stream_weights:
        result = _export_streamed(
            model_dir, Path(path), task, opset, torch_dtype, batch, seq, optimize, overwrite, parity
        )
        return replace(result, dtype_source=dtype_source)
    if parity != "auto":
        raise BadInputError("parity applies to stream_weights exports (a loaded model is always checked)")
    wrapper = wrap_checkpoint(model_dir, task, torch_dtype)
    feed = sample_inputs(wrapper.model.config, batch=batch, seq=seq)
    example = {name: torch.from_numpy(array) for name, array in feed.items()}
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in wrapper.input_names}
    written, max_err, opset_used = _export_verified(
        wrapper,
        example,
        Path(path),
        output_names=wrapper.output_names,
        dynamic_axes=dynamic_axes,
        opset=opset,
        optimize=optimize,
        external_data=None,
        strip_prefix=HFExportWrapper.PARAM_PREFIX,
        overwrite=overwrite,
        inputs=[model_dir],
    )
    return export_result(written, wrapper, max_err, torch_dtype, opset_used, dtype_source=dtype_source)


def export_plain(
    checkpoint: str | os.PathLike,
    path: str | os.PathLike,
    *,
    module: str,
    inputs_path: str | os.PathLike | None = None,
    dtype: str = "float32",
    static: bool = False,
    opset: int | None = None,
    overwrite: bool = False,
    part: str | None = None,
) -> ExportResult:
    """Export a plain torch module (the factory form: ``module`` names importable code
    returning the ``nn.Module``, ``checkpoint`` is loaded into it) to one checked ONNX file.

    Inputs are named after ``forward``'s arguments and taken from ``inputs_path`` (an .npz,
    array names = argument names; e.g. recorded observations) or the module's own
    ``example_inputs()``; outputs after its ``output_names`` attribute ("output" else).
    Axis 0 of every input is the dynamic ``batch`` unless ``static`` (every dim fixed to
    the example's, as TensorRT on a Jetson wants it). ``dtype="float16"`` exports a
    half-precision graph with float16 inputs and outputs, refused when a weight or a
    module's float32 output on the example inputs exceeds float16's range, or when the
    float16 module's outputs are not finite; torch's CPU half kernels are the parity
    reference, with float16 tolerances.

    ``part`` (a submodule path such as ``blocks.0``, modeling/parts.py) exports that part
    alone: its inputs are what it receives during the whole model's forward on the
    example inputs (recorded with hooks), named after its ``forward`` arguments; its
    outputs are ``output`` (or ``output_0``, ``output_1``, ...). Axis 0 of a part input
    is the dynamic ``batch`` where it is the observations' batch, unless ``static``.
    """
    from lora_deploy.export.plain import (
        as_dtype,
        check_float16_outputs,
        check_float16_range,
        module_feed,
        part_export,
    )
    from lora_deploy.modeling.factory import check_module_checkpoint, load_module

    if dtype not in ("float32", "float16", "auto"):
        raise BadInputError(f"--dtype {dtype}: a plain module exports as float32 or float16")
    check_module_checkpoint(checkpoint)
    onnx_graph.check_opset(opset)
    onnx_graph.check_output(Path(path), [checkpoint, *([inputs_path] if inputs_path else [])], overwrite)
    model = load_module(module, checkpoint)
    feed = module_feed(model, inputs_path, f"the module from {module}")
    dtype_source = (
        "requested" if dtype != "auto" else "auto: a plain module exports as float32 (--dtype float16 for half)"
    )
    dtype = "float32" if dtype == "auto" else dtype
    try:
        with torch.inference_mode():
            count = len(flatten_outputs(model(**{n: torch.from_numpy(a) for n, a in feed.items()})))
    except Exception as err:  # user code on its own inputs
        raise BadInputError(f"the module from {module} fails on its inputs: {first_line(err)}") from err
    names = list(
        getattr(model, "output_names", None) or (["output"] if count == 1 else [f"output_{i}" for i in range(count)])
    )
    if dtype == "float16":
        check_float16_range(model, feed)
    batched = list(feed)  # inputs whose axis 0 is the batch
    if part is not None:
        model, feed, names, batched = part_export(model, part, feed, module, dtype)
    elif dtype == "float16":
        model = model.half()
        feed = as_dtype(feed, np.dtype(np.float16))
        check_float16_outputs(model, feed)
    example = {name: torch.from_numpy(np.ascontiguousarray(arr)) for name, arr in feed.items()}
    dynamic_axes = None if static else {name: {0: "batch"} for name in batched}
    written, max_err, opset_used = _export_verified(
        model,
        example,
        Path(path),
        output_names=names,
        dynamic_axes=dynamic_axes,
        opset=opset,
        optimize=False,
        external_data=None,
        strip_prefix="",
        overwrite=overwrite,
        inputs=[checkpoint, *([inputs_path] if inputs_path else [])],
    )
    return ExportResult(
        path=written,
        task=f"module {module}" + (f", part {part}" if part else "") + (" (static shapes)" if static else ""),
        input_names=tuple(example),
        output_names=tuple(names),
        max_abs_error=max_err,
        dtype=dtype,
        opset=opset_used,
        dtype_source=dtype_source,
    )


def export_result(path: Path, wrapper, max_err, torch_dtype, opset: int, **extra) -> ExportResult:
    """What an export of `wrapper` wrote: names from the wrapper, dtype from the torch dtype."""
    return ExportResult(
        path=path,
        task=wrapper.task,
        input_names=tuple(wrapper.input_names),
        output_names=tuple(wrapper.output_names),
        max_abs_error=max_err,
        dtype=of_torch(torch_dtype).name,
        opset=opset,
        **extra,
    )


def resolve_dtype(model_dir: str | os.PathLike, dtype: str) -> tuple[str, str]:
    """(export dtype, why): ``auto`` follows the checkpoint's float tensors."""
    if dtype != "auto":
        return dtype, "requested"
    from lora_deploy.io.checkpoint import Checkpoint

    with Checkpoint(model_dir) as ckpt:
        sizes: dict[str, int] = {}
        for info in ckpt.tensors.values():
            if info.np_dtype.kind == "f" or info.dtype == "BF16":
                sizes[info.dtype] = sizes.get(info.dtype, 0) + info.nbytes
    stored = max(sizes, key=sizes.get) if sizes else "F32"
    if stored == "F16":
        return "float16", "auto: the checkpoint is float16"
    if stored == "BF16":
        return "float32", "auto: the checkpoint is bfloat16, which ONNX Runtime's CPU kernels lack; float32"
    return "float32", f"auto: the checkpoint is {BY_SAFETENSORS[stored].name}"


def _export_streamed(
    model_dir, path: Path, task, opset, torch_dtype, batch, seq, optimize, overwrite, parity_mode="auto"
) -> ExportResult:
    """export_checkpoint(stream_weights=True): see export/streamed.py."""
    from lora_deploy.export.streamed import export_streamed
    from lora_deploy.modeling.tasks import load_config

    if optimize:
        raise BadInputError("stream_weights keeps checkpoint names on initializers: optimize must be False")
    feed = sample_inputs(load_config(model_dir), batch=batch, seq=seq)

    def parity(tmp_path: Path, output_names: Sequence[str]) -> float | None:
        _check_onnx(tmp_path)
        wrapper = wrap_checkpoint(model_dir, task, torch_dtype)
        example = {name: torch.from_numpy(feed[name]) for name in wrapper.input_names}
        reference = _torch_outputs(wrapper, example)
        del wrapper  # the torch model goes before the ORT session comes
        outputs = _ort_outputs(tmp_path, {name: feed[name] for name in example}, output_names)
        return _compare(output_names, reference, outputs, None, None)

    def proxy() -> tuple[float | None, str]:
        return _proxy_parity(model_dir, task, opset, torch_dtype, batch, seq)

    wrapper, max_err, opset_used, status = export_streamed(
        Path(model_dir),
        path,
        task=task,
        opset=opset,
        torch_dtype=torch_dtype,
        feed=feed,
        parity=parity,
        overwrite=overwrite,
        proxy=proxy,
        parity_mode=parity_mode,
    )
    return export_result(path, wrapper, max_err, torch_dtype, opset_used, weights="streamed", parity=status)


def _proxy_parity(model_dir, task, opset, torch_dtype, batch, seq) -> tuple[float | None, str]:
    """The parity check on a one-layer proxy of the checkpoint's config (random weights),
    exported through the same streamed path: (max abs error, status)."""
    import tempfile

    import transformers

    from lora_deploy.export.streamed import proxy_config
    from lora_deploy.modeling.tasks import AUTO_CLASS, load_config, resolve_task

    config = load_config(model_dir)
    proxy = proxy_config(config)
    auto_class = getattr(transformers, AUTO_CLASS[resolve_task(task, config)])
    with tempfile.TemporaryDirectory(prefix="lora-deploy-proxy-") as tmp:
        torch.manual_seed(0)
        auto_class.from_config(proxy, dtype=torch_dtype).save_pretrained(tmp)
        out = Path(tmp) / "proxy.onnx"
        result = _export_streamed(tmp, out, task, opset, torch_dtype, batch, seq, False, False, "full")
    layers = proxy.num_hidden_layers
    return result.max_abs_error, f"checked on a {layers}-layer proxy of the config, vocab {proxy.vocab_size}"


def export_module(
    module: nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    opset: int | None = None,
    optimize: bool = False,
    external_data: bool | None = None,
    strip_prefix: str = "",
    atol: float | None = None,
    rtol: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Export any ``nn.Module`` to a checked ONNX file and return its path.

    ``example_inputs`` are passed to ``forward`` as keyword arguments, so
    their keys are the ONNX input names (in dict order). ``dynamic_axes``
    maps an input name to ``{axis: dim_name}``; output dims follow from the
    inputs, so entries for outputs are accepted and ignored. The module is
    put in eval mode. ``external_data=None`` writes a single ``<name>.data``
    file next to the model only when the weights exceed
    ``EXTERNAL_DATA_BYTES``; True/False forces it. ``strip_prefix`` is removed
    from initializer names that start with it. ``atol``/``rtol`` override
    the per-dtype parity tolerances of ``lora_deploy.compare.TOLERANCES``
    (giving one keeps the table's value of the other). An existing file is
    replaced only with ``overwrite=True``.

    Raises ExportError if export, the ONNX checker or the ONNX Runtime parity
    run fails; BadInputError for unusable arguments.
    """
    written, _, _ = _export_verified(
        module,
        example_inputs,
        Path(path),
        output_names=output_names,
        dynamic_axes=dynamic_axes,
        opset=opset,
        optimize=optimize,
        external_data=external_data,
        strip_prefix=strip_prefix,
        atol=atol,
        rtol=rtol,
        overwrite=overwrite,
    )
    return written


def _export_verified(
    module: nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    path: Path,
    *,
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]] | None,
    opset: int | None,
    optimize: bool,
    external_data: bool | None,
    strip_prefix: str,
    atol: float | None = None,
    rtol: float | None = None,
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike] = (),
) -> tuple[Path, float, int]:
    """Export, check, compare with torch, move into place.

    Returns (path, max abs error vs torch, opset of the written model).
    """
    output_names = _check_arguments(module, example_inputs, path, output_names, dynamic_axes, opset)
    onnx_graph.check_output(path, inputs, overwrite)
    module.eval()
    reference = _torch_outputs(module, example_inputs)
    if len(reference) != len(output_names):
        raise BadInputError(
            f"module returns {len(reference)} tensor(s) but {len(output_names)} output name(s) were given"
        )
    program = _run_exporter(module, example_inputs, output_names, dynamic_axes, opset, optimize)
    model = program.model
    _check_signature(model, list(example_inputs), output_names)
    onnx_graph.rename_tied(model.graph, module)
    if strip_prefix:
        onnx_graph.strip_prefix(model.graph, strip_prefix)
    opset_used = model.opset_imports.get("", 0)
    if opset is not None and opset_used != opset:
        raise ExportError(f"requested opset {opset} but the exporter produced opset {opset_used}")

    feed = {name: tensor.detach().cpu().numpy() for name, tensor in example_inputs.items()}

    def prove(tmp_path: Path) -> float:
        # Looked up by module-level name so tests can replace _check_onnx.
        _check_onnx(tmp_path)
        outputs = _ort_outputs(tmp_path, feed, output_names)
        return _compare(output_names, reference, outputs, atol, rtol)

    make_parent(path)
    max_err = onnx_graph.save_atomic(model, path, prove, external_data, overwrite=overwrite, inputs=inputs)
    return path, max_err, opset_used


def _check_arguments(
    module: Any,
    example_inputs: Any,
    path: Path,
    output_names: Any,
    dynamic_axes: Any,
    opset: int | None,
) -> list[str]:
    """Fail early, with one line, on arguments the exporter would choke on."""
    if not isinstance(module, nn.Module):
        raise BadInputError(f"expected a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(example_inputs, Mapping) or not example_inputs:
        raise BadInputError("example_inputs must be a non-empty dict of name -> tensor")
    for name, value in example_inputs.items():
        if not isinstance(value, torch.Tensor):
            raise BadInputError(f"example input {name!r} is a {type(value).__name__}, not a torch.Tensor")
    if isinstance(output_names, str) or not output_names:
        raise BadInputError("output_names must be a non-empty list of names")
    output_names = [str(name) for name in output_names]
    if path.is_dir():
        raise BadInputError(f"output path is a directory: {path}")
    for name, axes in (dynamic_axes or {}).items():
        if name in output_names:
            continue  # output dims are derived from the inputs by the exporter
        if name not in example_inputs:
            raise BadInputError(f"dynamic_axes names {name!r}, which is neither an input nor an output")
        if not isinstance(axes, Mapping):
            raise BadInputError(f"dynamic_axes[{name!r}] must map axis -> dim name, e.g. {{0: 'batch'}}")
        rank = example_inputs[name].dim()
        for axis in axes:
            if not isinstance(axis, int) or not 0 <= axis < rank:
                raise BadInputError(f"dynamic axis {axis} of input {name!r} is out of range for rank {rank}")
    onnx_graph.check_opset(opset)
    return output_names


def _run_exporter(
    module: nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]] | None,
    opset: int | None,
    optimize: bool,
) -> Any:
    """torch.onnx.export with the dynamo exporter; returns the ONNXProgram (ExportError on failure)."""
    # One entry per kwarg is required by torch.export; None means static.
    dynamic_shapes = None
    if dynamic_axes:
        dynamic_shapes = {
            name: ({int(axis): str(dim) for axis, dim in dynamic_axes[name].items()} if name in dynamic_axes else None)
            for name in example_inputs
        }
    return onnx_graph.run_exporter(
        module,
        kwargs=example_inputs,
        dynamic_shapes=dynamic_shapes,
        output_names=output_names,
        opset=opset,
        optimize=optimize,
    )


def _check_signature(model: Any, input_names: list[str], output_names: list[str]) -> None:
    """The graph must have exactly the inputs and outputs we promise."""
    graph_inputs = [value.name for value in model.graph.inputs]
    graph_outputs = [value.name for value in model.graph.outputs]
    if graph_inputs != input_names:
        raise ExportError(f"exported graph inputs {graph_inputs} differ from the example inputs {input_names}")
    if graph_outputs != output_names:
        raise ExportError(f"exported graph outputs {graph_outputs} differ from output_names {output_names}")


def _check_onnx(path: Path) -> None:
    """onnx.checker on the path, which works for external-data models too."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as err:
        raise ExportError(f"onnx.checker rejected the exported model: {first_line(err)}") from err


def _ort_outputs(path: Path, feed: dict[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
    """Run the model once through OnnxrtRunner on the CPU execution provider."""
    try:
        with OnnxrtRunner(path, name="export-check") as runner:
            result = runner.infer(feed)
    except BadInputError as err:
        raise ExportError(f"ONNX Runtime cannot run the exported model: {err}") from err
    return [result[name] for name in output_names]


def _torch_outputs(module: nn.Module, example_inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Reference outputs of the module, flattened in return order."""
    try:
        with torch.inference_mode():
            result = module(**example_inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        raise ExportError(f"the module fails on the example inputs: {first_line(err)}") from err
    return flatten_outputs(result)


def _compare(
    output_names: Sequence[str],
    reference: Sequence[torch.Tensor],
    outputs: Sequence[np.ndarray],
    atol: float | None,
    rtol: float | None,
) -> float | None:
    """ORT outputs against torch's (ExportError on a miss); returns the max abs error over all
    outputs, None when no output had a position to compare."""
    worst = None
    for name, ref_tensor, got in zip(output_names, reference, outputs):
        # Tolerance by the reference's dtype; integer outputs are compared exactly whatever it is.
        dtype_name = of_torch(ref_tensor.dtype).name if ref_tensor.dtype.is_floating_point else "float32"
        tol = tolerance(dtype_name if dtype_name in TOLERANCES else "float32", atol, rtol)
        result = compare_array(name, got, from_torch(ref_tensor), tol)
        result.raise_for(ExportError, "ONNX Runtime differs from torch")
        if result.max_abs is not None:
            worst = result.max_abs if worst is None else max(worst, result.max_abs)
    return worst
