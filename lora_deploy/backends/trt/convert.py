"""fp16 / bf16 ONNX for TensorRT 11, whose strongly typed networks take precision from the graph.

Mixed precision with the io types kept (the graph still takes and returns what the fp32
graph does), written beside the engine's staging files and recorded in the manifest.

Converters, first found wins:
* NVIDIA ModelOpt's autocast (`nvidia-modelopt[onnx]`), fp16 and bf16: what TensorRT 11's
  documentation points to. Its graph surgeon cannot type a `Constant` node with an empty
  `value_ints`, which the exporter writes, so such nodes are first replaced by an empty
  int64 tensor constant (`sanitize`). Not installed here: its [onnx] extra pins
  onnxruntime-gpu and an older onnx, which would replace this environment's onnxruntime,
  so this path has not run here.
* onnxconverter-common's float16 converter, fp16 only: the one tested here (its output is
  checked in ONNX Runtime on the CPU against the fp32 graph).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from lora_deploy.errors import BadInputError, ExportError
from lora_deploy.util import first_line

CONVERTER_HINT = "pip install onnxconverter-common (fp16) or 'nvidia-modelopt[onnx]' (fp16, bf16)"


def available_converter(precision: str) -> str | None:
    """ "modelopt", "onnxconverter-common" or None for this precision."""
    if importlib.util.find_spec("modelopt") is not None:
        return "modelopt"
    if precision == "fp16" and importlib.util.find_spec("onnxconverter_common") is not None:
        return "onnxconverter-common"
    return None


def sanitize(model) -> int:
    """Replace Constant nodes holding an empty value_ints by an empty int64 tensor; returns how many."""
    import numpy as np
    from onnx import helper, numpy_helper

    fixed = 0
    for node in model.graph.node:
        if node.op_type != "Constant":
            continue
        for attr in list(node.attribute):
            if attr.name == "value_ints" and len(attr.ints) == 0:
                node.attribute.remove(attr)
                tensor = numpy_helper.from_array(np.zeros((0,), np.int64), name="")
                node.attribute.append(helper.make_attribute("value", tensor))
                fixed += 1
    return fixed


def convert(onnx_path: str | os.PathLike, out_path: str | os.PathLike, precision: str) -> dict:
    """Write the `precision` version of onnx_path to out_path; returns what was done (for the manifest)."""
    import onnx

    if precision not in ("fp16", "bf16"):
        raise BadInputError(f"nothing to convert for precision {precision!r}")
    converter = available_converter(precision)
    if converter is None:
        raise BadInputError(f"TensorRT 11 builds {precision} from a {precision} ONNX; no converter: {CONVERTER_HINT}")
    out_path = Path(out_path)
    model = onnx.load(os.fspath(onnx_path))
    fixed = sanitize(model)
    try:
        if converter == "modelopt":
            converted = _modelopt(model, out_path, precision)
        else:
            from onnxconverter_common import float16

            # The exporter's value_info types go stale once tensors turn fp16 (ONNX Runtime then
            # refuses the graph: "Type (tensor(float16)) of output arg ... does not match"): drop them.
            model.graph.ClearField("value_info")
            converted = float16.convert_float_to_float16(model, keep_io_types=True)
    except Exception as exc:
        raise ExportError(f"{converter} could not convert {onnx_path} to {precision}: {first_line(exc, 300)}") from exc
    large = converted.ByteSize() > 1800 * 1024**2
    onnx.save(converted, os.fspath(out_path), save_as_external_data=large, location=out_path.name + ".data")
    try:  # a graph ONNX Runtime cannot type is not handed to TensorRT
        import onnxruntime as ort

        ort.InferenceSession(os.fspath(out_path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"{converter}'s {precision} graph does not load: {first_line(exc, 300)}") from exc
    return {"converter": converter, "precision": precision, "io_types_kept": True, "sanitized_constants": fixed}


def _modelopt(model, out_path: Path, precision: str):
    import onnx
    from modelopt.onnx.autocast import convert_to_mixed_precision

    sanitized = out_path.with_name(out_path.name + ".fp32.onnx")
    onnx.save(model, os.fspath(sanitized))
    try:
        return convert_to_mixed_precision(
            onnx_path=os.fspath(sanitized), low_precision_type=precision, keep_io_types=True
        )
    finally:
        sanitized.unlink(missing_ok=True)
