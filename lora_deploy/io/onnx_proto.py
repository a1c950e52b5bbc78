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
import os
import sys
import threading
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


# The external data locations of the graphs read_model parsed, by file identity: the
# output policy asks for an input graph's data files after the command has parsed it, and
# parsing a large graph again costs ~15 ms. A file changed since has another identity.
_LOCATIONS: dict[tuple[int, ...], frozenset[str]] = {}
_LOCATIONS_KEPT = 8
_LOCATIONS_LOCK = threading.Lock()


def read_model(path: str | Path) -> Any:
    """The ModelProto of an ONNX file without its external data (as onnx.load with
    load_external_data=False). Raises OSError, or protobuf's DecodeError for a file that
    is not one."""
    return parse(path)[0]


def external_locations(path: str | Path) -> frozenset[str]:
    """The external data locations the graph's initializers name (parsed once per file
    version, see _LOCATIONS). Raises as read_model does."""
    found = _LOCATIONS.get(identity(os.stat(path)))
    return found if found is not None else parse(path)[1]


def parse(path: str | Path) -> tuple[Any, frozenset[str]]:
    """(the ModelProto, its external data locations), remembered in _LOCATIONS."""
    with open(path, "rb") as f:
        key = identity(os.fstat(f.fileno()))
        data = f.read()
    model = onnx_protos().ModelProto()
    model.ParseFromString(data)
    locations = locations_of(model)
    with _LOCATIONS_LOCK:
        if len(_LOCATIONS) >= _LOCATIONS_KEPT:
            _LOCATIONS.pop(next(iter(_LOCATIONS)))
        _LOCATIONS[key] = locations
    return model, locations


def locations_of(model: Any) -> frozenset[str]:
    return frozenset(e.value for t in model.graph.initializer for e in t.external_data if e.key == "location")


def identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
