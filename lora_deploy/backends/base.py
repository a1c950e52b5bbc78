"""One runner interface across backends (after polygraphy's runners).

A runner is built cheaply and loads lazily: ``activate()`` creates the ONNX
Runtime session or loads the torch model, ``deactivate()`` drops it, and the
context manager does both. ``infer(feed)`` takes and returns numpy arrays
keyed by name, so comparing backends is a dict-to-dict comparison.

Feed checking lives once, in :meth:`Runner.infer`: names, dtypes, ranks,
fixed dims, and that a named dynamic dim (e.g. "batch") has the same size in
every input. Backends only implement ``_activate``, ``_deactivate``,
``_infer`` and ``_input_metadata``.
"""

from __future__ import annotations

import inspect
import itertools
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from lora_deploy.errors import BadInputError
from lora_deploy.util import first_line

# A metadata entry: (numpy dtype or None when unknown, shape). Shape entries
# are ints for fixed dims and strings for dynamic ones; a shape of None means
# the rank is unknown too. None parts are simply not checked.
InputMeta = tuple[Any, Any]

_COUNTER = itertools.count()

# ONNX Runtime type strings -> numpy dtypes (bfloat16 has no numpy dtype).
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


class Runner:
    """Base class: lifecycle, feed checking, context manager."""

    def __init__(self, name: str | None = None):
        self.name = name or f"{type(self).__name__.lower()}-{next(_COUNTER)}"
        self.is_active = False
        self._metadata: dict[str, InputMeta] | None = None

    def activate(self) -> None:
        """Load the backend (session, model). Idempotent."""
        if not self.is_active:
            self._activate()
            self.is_active = True

    def deactivate(self) -> None:
        """Release the backend. Idempotent."""
        if self.is_active:
            self._deactivate()
            self.is_active = False
            self._metadata = None

    def input_metadata(self) -> dict[str, InputMeta]:
        """{name: (dtype, shape)}, shape with str for dynamic dims. Needs activate()."""
        self._require_active()
        if self._metadata is None:
            # Cached: infer() consults it on every call.
            self._metadata = self._input_metadata()
        return self._metadata

    def infer(self, feed: Mapping[str, np.ndarray], **options: Any) -> dict[str, np.ndarray]:
        """Check the feed against input_metadata, then run the backend.

        ``options`` go to the backend unchanged (e.g. ``run_options`` for
        ONNX Runtime). Raises BadInputError naming the offending input.
        """
        check_feed(feed, self.input_metadata())
        return self._infer(dict(feed), **options)

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.deactivate()

    def __repr__(self) -> str:
        state = "active" if self.is_active else "inactive"
        return f"<{type(self).__name__} {self.name} ({state})>"

    def _require_active(self) -> None:
        if not self.is_active:
            raise BadInputError(f"runner {self.name} is not active; call activate() or use it in a with-block")

    # Backends implement these.
    def _activate(self) -> None:
        raise NotImplementedError

    def _deactivate(self) -> None:
        raise NotImplementedError

    def _input_metadata(self) -> dict[str, InputMeta]:
        raise NotImplementedError

    def _infer(self, feed: dict[str, np.ndarray], **options: Any) -> dict[str, np.ndarray]:
        raise NotImplementedError


def check_feed(feed: Mapping[str, Any], metadata: Mapping[str, InputMeta]) -> None:
    """Raise BadInputError unless ``feed`` fits ``metadata`` exactly."""
    if not isinstance(feed, Mapping):
        raise BadInputError(f"feed must be a dict of name -> numpy array, got {type(feed).__name__}")
    for name in feed:
        if name not in metadata:
            raise BadInputError(f"unexpected input {name!r}; the model takes {', '.join(metadata)}")
    dim_sizes: dict[str, tuple[int, str]] = {}  # dynamic dim name -> (size, first input seen)
    for name, (dtype, shape) in metadata.items():
        if name not in feed:
            raise BadInputError(f"missing input {name!r}")
        array = feed[name]
        if not isinstance(array, np.ndarray):
            raise BadInputError(f"input {name!r} is a {type(array).__name__}, not a numpy array")
        if dtype is not None and array.dtype != np.dtype(dtype):
            raise BadInputError(f"input {name!r} has dtype {array.dtype}, expected {np.dtype(dtype)}")
        if shape is None:
            continue
        if array.ndim != len(shape):
            raise BadInputError(f"input {name!r} has rank {array.ndim}, expected {len(shape)} {tuple(shape)}")
        for axis, (size, want) in enumerate(zip(array.shape, shape)):
            if isinstance(want, int) and want >= 0 and size != want:
                raise BadInputError(f"input {name!r} dim {axis} is {size}, expected {want}")
            if isinstance(want, str):
                seen = dim_sizes.setdefault(want, (size, name))
                if seen[0] != size:
                    raise BadInputError(
                        f"input {name!r} dim {axis} ({want!r}) is {size} but input {seen[1]!r} has {seen[0]}"
                    )


# ---------------------------------------------------------- ONNX Runtime ----


def ort_errors() -> tuple[type[BaseException], ...]:
    """ONNX Runtime's exception classes; they do not share a base below Exception."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    found = tuple(getattr(state, name) for name in names if hasattr(state, name))
    return found + (RuntimeError, ValueError)


class OnnxrtRunner(Runner):
    """Run an ONNX file in ONNX Runtime.

    ``run_options`` (an ``onnxruntime.RunOptions``) is a hook for per-run
    settings such as active LoRA adapters
    (``RunOptions.add_active_adapter``): set the attribute once, or pass
    ``run_options=`` to ``infer`` for a single call. Subclasses can override
    :meth:`session_options` to change how the session is built.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
        name: str | None = None,
    ):
        super().__init__(name)
        self.path = Path(path)
        self.providers = list(providers)
        self.threads = threads
        self.run_options: Any = None
        self.session: Any = None

    def session_options(self) -> Any:
        """SessionOptions for the session; threads sets intra-op threads."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        if self.threads is not None:
            options.intra_op_num_threads = int(self.threads)
        return options

    def output_names(self) -> list[str]:
        """Graph output names, in order."""
        self._require_active()
        return [output.name for output in self.session.get_outputs()]

    def _activate(self) -> None:
        import onnxruntime as ort

        if not self.path.is_file():
            raise BadInputError(f"ONNX file not found: {self.path}")
        available = ort.get_available_providers()
        missing = [provider for provider in self.providers if provider not in available]
        if missing:
            raise BadInputError(f"ONNX Runtime provider(s) {missing} not available; have {available}")
        try:
            self.session = ort.InferenceSession(str(self.path), self.session_options(), providers=self.providers)
        except ort_errors() as err:
            raise BadInputError(f"ONNX Runtime cannot load {self.path}: {first_line(err)}") from err

    def _deactivate(self) -> None:
        self.session = None

    def _input_metadata(self) -> dict[str, InputMeta]:
        metadata: dict[str, InputMeta] = {}
        for node_arg in self.session.get_inputs():
            dtype = _ORT_TYPES.get(node_arg.type)
            shape = tuple(dim if isinstance(dim, (int, str)) else "?" for dim in node_arg.shape)
            metadata[node_arg.name] = (np.dtype(dtype) if dtype is not None else None, shape)
        return metadata

    def _infer(self, feed: dict[str, np.ndarray], run_options: Any = None) -> dict[str, np.ndarray]:
        names = self.output_names()
        try:
            values = self.session.run(names, feed, run_options or self.run_options)
        except ort_errors() as err:
            raise BadInputError(f"ONNX Runtime failed on this feed: {first_line(err)}") from err
        return dict(zip(names, values))


# ----------------------------------------------------------------- torch ----


class TorchRunner(Runner):
    """Run a torch module, or an HF checkpoint directory, under inference_mode.

    A directory is loaded at activate() with ``export.load_for_task`` and
    wrapped like the ONNX export, so its inputs and output names match the
    exported graph. For a plain module, input names come from ``forward``'s
    signature (or ``input_metadata=``), and outputs are named from
    ``output_names=``, the module's ``output_names`` attribute, or
    "output"/"output_<i>". ``device``/``dtype`` move a given module in place,
    like ``nn.Module.to``.
    """

    def __init__(
        self,
        module_or_model_dir: Any,
        *,
        task: str = "auto",
        device: str = "cpu",
        dtype: Any = None,
        name: str | None = None,
        input_metadata: Mapping[str, InputMeta] | None = None,
        output_names: Sequence[str] | None = None,
    ):
        super().__init__(name)
        self.source = module_or_model_dir
        self.task = task
        self.device = device
        self.dtype = dtype
        self._given_metadata = dict(input_metadata) if input_metadata is not None else None
        self._given_output_names = list(output_names) if output_names is not None else None
        self.module: Any = None

    def _activate(self) -> None:
        import torch
        from torch import nn

        from lora_deploy.export import model as export

        if isinstance(self.source, (str, os.PathLike)):
            self.module = export.wrap_checkpoint(self.source, self.task, self.dtype or "float32")
        elif isinstance(self.source, nn.Module):
            self.module = self.source
            if self.dtype is not None:
                self.module.to(export.parse_dtype(self.dtype))
        else:
            raise BadInputError(f"TorchRunner needs an nn.Module or a checkpoint dir, got {type(self.source).__name__}")
        try:
            self.module.to(torch.device(self.device))
        except (RuntimeError, AssertionError) as err:
            # torch raises AssertionError("Torch not compiled with CUDA enabled").
            raise BadInputError(f"cannot use device {self.device!r}: {first_line(err)}") from err
        self.module.eval()

    def _deactivate(self) -> None:
        self.module = None

    def _input_metadata(self) -> dict[str, InputMeta]:
        if self._given_metadata is not None:
            return self._given_metadata
        declared = getattr(self.module, "input_metadata", None)
        if callable(declared):
            return dict(declared())
        # Unknown dtypes and shapes: only the names are checked.
        params = inspect.signature(self.module.forward).parameters.values()
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return {param.name: (None, None) for param in params if param.kind in kinds and param.default is inspect.Parameter.empty}

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from lora_deploy.export.model import flatten_outputs

        tensors = {name: torch.from_numpy(np.ascontiguousarray(array)).to(self.device) for name, array in feed.items()}
        with torch.inference_mode():
            result = self.module(**tensors)
        outputs = flatten_outputs(result)
        names = self._output_names(result, len(outputs))
        return {name: _to_numpy(tensor) for name, tensor in zip(names, outputs)}

    def _output_names(self, result: Any, count: int) -> list[str]:
        names = self._given_output_names or getattr(self.module, "output_names", None)
        if names is None and isinstance(result, Mapping) and len(result) == count:
            names = list(result.keys())
        if names is None:
            names = ["output"] if count == 1 else [f"output_{index}" for index in range(count)]
        if len(names) != count:
            raise BadInputError(f"{count} output(s) but {len(names)} output name(s): {list(names)}")
        return list(names)


def _to_numpy(tensor: Any) -> np.ndarray:
    """numpy has no bfloat16: such outputs come back as float32."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()
