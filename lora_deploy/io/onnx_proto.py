"""Reading an ONNX file's protobuf without importing the onnx package.

Importing onnx imports ml_dtypes (about 1 s of CPU here), which commands that only read a
graph's structure (the output policy looking for an input's external data, `merge
--onnx-like`) need not pay. The classes are onnx's own either way: when onnx is imported,
its module; otherwise its generated module (onnx_ml_pb2, which needs only protobuf) loaded
by itself, and a later `import onnx` registers the same descriptors and gets the same
classes (protobuf keeps one class per message descriptor).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any


@functools.cache
def onnx_protos() -> ModuleType:
    """The module holding onnx's protobuf classes (ModelProto, TensorProto, ...)."""
    if "onnx" in sys.modules:
        from onnx import onnx_ml_pb2

        return onnx_ml_pb2
    spec = importlib.util.find_spec("onnx")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("No module named 'onnx'")
    generated = importlib.util.spec_from_file_location(
        "lora_deploy_onnx_ml_pb2", Path(spec.origin).parent / "onnx_ml_pb2.py"
    )
    if generated is None or generated.loader is None:
        raise ModuleNotFoundError("onnx has no onnx_ml_pb2 module")
    module = importlib.util.module_from_spec(generated)
    generated.loader.exec_module(module)
    return module


def read_model(path: str | Path) -> Any:
    """The ModelProto of an ONNX file without its external data (as onnx.load with
    load_external_data=False). Raises OSError, or protobuf's DecodeError for a file that
    is not one."""
    model = onnx_protos().ModelProto()
    model.ParseFromString(Path(path).read_bytes())
    return model
