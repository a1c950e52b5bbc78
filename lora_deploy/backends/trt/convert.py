"""fp16 / bf16 ONNX for TensorRT 11, whose strongly typed networks take precision from the graph.

Mixed precision with the io types kept (the graph still takes and returns what the fp32
graph does), written beside the engine's staging files and recorded in the manifest. Every
converter gets the same pre-pass first (mixed_precision.prepare: local functions inlined,
Constant nodes with an empty `value_ints` given an empty int64 tensor instead).

Converters (`build trt --converter`):
* builtin (default): lora-deploy's own (mixed_precision.py), fp16 and bf16, no extra
  dependency. Tested here: its fp16 graphs of the example models and of a dynamic-adapter
  graph run in ONNX Runtime on the CPU within the fp16 tolerance of the fp32 graph; bf16
  graphs (no bf16 kernels in ONNX Runtime's CPU provider) are checked in onnx's reference
  evaluator.
* modelopt: NVIDIA ModelOpt's autocast (`nvidia-modelopt[onnx]`), what TensorRT 11's
  documentation points to. Not installed here (its [onnx] extra pins onnxruntime-gpu and
  an older onnx), so this path has never run.

Whatever the converter, the result must pass onnx's checker with strict type inference,
and a float16 graph must load in ONNX Runtime, before it is handed to TensorRT.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from lora_deploy.backends.trt.mixed_precision import prepare, to_mixed_precision
from lora_deploy.errors import BadInputError, ExportError
from lora_deploy.util import first_line

CONVERTERS = ("builtin", "modelopt")
MODELOPT_HINT = "pip install 'nvidia-modelopt[onnx]'"


def convert(
    onnx_path: str | os.PathLike, out_path: str | os.PathLike, precision: str, converter: str = "builtin"
) -> dict[str, Any]:
    """Write the `precision` version of onnx_path to out_path; returns what was done (for the manifest)."""
    import onnx

    if precision not in ("fp16", "bf16"):
        raise BadInputError(f"nothing to convert for precision {precision!r}")
    if converter not in CONVERTERS:
        raise BadInputError(f"unknown converter {converter!r}; choose {', '.join(CONVERTERS)}")
    if converter == "modelopt" and importlib.util.find_spec("modelopt") is None:
        raise BadInputError(f"--converter modelopt: ModelOpt is not installed ({MODELOPT_HINT})")
    out_path = Path(out_path)
    model = onnx.load(os.fspath(onnx_path))
    prepared = prepare(model)
    try:
        if converter == "modelopt":
            converted = _modelopt(model, out_path, precision)
            info: dict[str, Any] = {"converter": "modelopt", "precision": precision, "io_types_kept": True}
        else:
            info = to_mixed_precision(model, precision).as_dict()
            converted = model
    except (BadInputError, ExportError):
        raise
    except Exception as exc:
        raise ExportError(f"{converter} could not convert {onnx_path} to {precision}: {first_line(exc, 300)}") from exc
    large = converted.ByteSize() > 1800 * 1024**2
    onnx.save(converted, os.fspath(out_path), save_as_external_data=large, location=out_path.name + ".data")
    check_converted(out_path, precision, converter)
    return info | {"pre_pass": prepared}


def check_converted(path: Path, precision: str, converter: str) -> None:
    """The converted graph type-checks, and (float16) loads in ONNX Runtime; else ExportError.
    ONNX Runtime's CPU provider has almost no bfloat16 kernels, so a bf16 graph is only type-checked."""
    import onnx

    try:
        onnx.checker.check_model(os.fspath(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"{converter}'s {precision} graph does not type-check: {first_line(exc, 300)}") from exc
    if precision != "fp16":
        return
    from lora_deploy.backends.onnxrt.loader import SessionFromOnnx

    try:
        SessionFromOnnx(path)()
    except BadInputError as exc:
        raise ExportError(f"{converter}'s {precision} graph does not load: {exc}") from exc


def _modelopt(model, out_path: Path, precision: str):
    import onnx
    from modelopt.onnx.autocast import convert_to_mixed_precision

    prepared = out_path.with_name(out_path.name + ".fp32.onnx")
    onnx.save(model, os.fspath(prepared))
    try:
        return convert_to_mixed_precision(
            onnx_path=os.fspath(prepared), low_precision_type=precision, keep_io_types=True
        )
    finally:
        prepared.unlink(missing_ok=True)
