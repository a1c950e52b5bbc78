"""Running exported adapter graphs in ONNX Runtime: load once, check feeds, run.

`DynamicSession` serves a dynamic graph (dynamic.py): packed adapters are loaded by
name and one is activated per call through RunOptions.add_active_adapter. ONNX
Runtime ignores active adapters when IO binding is used, so the session never binds.
`MultiSession` (multi.py) builds on the same helpers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from lora_deploy.errors import AdapterError, BadInputError
from lora_deploy.util import first_line

# ONNX Runtime type strings of the float inputs a LoRA graph has -> our dtype names.
ONNX_FLOAT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}


def make_session(onnx_path: str | os.PathLike, providers: Sequence[str] | None, options=None):
    import onnxruntime as ort

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise BadInputError(f"{onnx_path}: ONNX graph not found")
    if options is None:
        options = ort.SessionOptions()
        # Every overridable initializer draws a "will not be treated as constant" warning.
        options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BadInputError(f"{onnx_path}: ONNX Runtime cannot load it ({first_line(exc, 300)})") from None


def check_feeds(session, feeds: Mapping[str, np.ndarray], reserved: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """Known names only; overridable feeds must fit their static dims."""
    inputs = {i.name: i for i in session.get_inputs()}
    overridable = {i.name: i for i in session.get_overridable_initializers()}
    reserved = set(reserved)
    out = {}
    for name, value in feeds.items():
        if name in reserved:
            raise BadInputError(f"{name} is set through its own argument, not feeds")
        if name not in inputs and name not in overridable:
            raise BadInputError(f"unknown input {name!r} (the graph takes {', '.join(sorted(inputs))})")
        value = np.asarray(value)
        if name in overridable:
            check_dims(name, value, overridable[name].shape)
        out[name] = value
    missing = sorted(set(inputs) - set(out) - reserved)
    if missing:
        raise BadInputError(f"missing input(s): {', '.join(missing)}")
    return out


def check_dims(name: str, value: np.ndarray, dims: list) -> None:
    if len(dims) != value.ndim or any(isinstance(d, int) and d != n for d, n in zip(dims, value.shape)):
        raise BadInputError(f"{name} is {list(value.shape)} but the graph expects {dims}")


def run_session(session, feeds: dict, options=None) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    try:
        values = session.run(names, feeds, options)
    except Exception as exc:  # ONNX Runtime's InvalidArgument/Fail
        raise BadInputError(f"ONNX Runtime rejected the inputs: {first_line(exc, 300)}") from None
    return dict(zip(names, values))


class DynamicSession:
    """A dynamic graph loaded once; adapters loaded by name and chosen per call.

    >>> s = DynamicSession("model.onnx")
    >>> s.load_adapter("task-a", "a.onnx_adapter")
    >>> s.run({"input_ids": ids, "attention_mask": mask}, adapter="task-a")["logits"]
    """

    def __init__(self, onnx_path: str | os.PathLike, *, providers: Sequence[str] | None = None, options=None):
        self.path = Path(onnx_path)
        self.session = make_session(self.path, providers, options)
        self.overridable = {
            i.name: (i.shape, ONNX_FLOAT_TYPES.get(i.type, i.type)) for i in self.session.get_overridable_initializers()
        }
        self.adapters: dict[str, object] = {}

    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Load a packed adapter (once, memory-mapped) under `name`, after checking it fits the graph."""
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise AdapterError(f"{path}: adapter file not found")
        try:
            params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
        except Exception as exc:  # a corrupt flatbuffer
            raise AdapterError(f"{path}: not an ONNX Runtime adapter file ({first_line(exc, 200)})") from None
        shapes = {n: (list(v.shape()), ONNX_FLOAT_TYPES.get(v.data_type(), v.data_type())) for n, v in params.items()}
        from lora_deploy.export.dynamic import check_parameters  # dynamic.py imports this module

        check_parameters(shapes, self.overridable, path, self.path.name)
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        self.adapters[name] = adapter

    def unload_adapter(self, name: str) -> None:
        self.adapters.pop(name, None)

    def run(self, feeds: Mapping[str, np.ndarray], adapter: str | None = None) -> dict[str, np.ndarray]:
        """One forward pass with `adapter` active (None: the base model). Returns outputs by name."""
        import onnxruntime as ort

        feeds = check_feeds(self.session, feeds)
        options = ort.RunOptions()
        if adapter is not None:
            if adapter not in self.adapters:
                raise BadInputError(f"adapter {adapter!r} is not loaded (loaded: {', '.join(self.adapters) or 'none'})")
            options.add_active_adapter(self.adapters[adapter])
        return run_session(self.session, feeds, options)
