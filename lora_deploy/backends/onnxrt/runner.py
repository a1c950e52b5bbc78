"""ONNX Runtime behind the runner contract (backends/base.py)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from lora_deploy.backends.base import InputMeta, Runner
from lora_deploy.backends.onnxrt.loader import (
    CPU,
    SessionFromOnnx,
    SessionOrLoader,
    error_line,
    ort_errors,
    session_from,
)
from lora_deploy.dtypes import BY_ORT
from lora_deploy.errors import BadInputError


def ort_metadata(args: Sequence[Any]) -> dict[str, InputMeta]:
    """{name: (numpy dtype or None, shape)} of ONNX Runtime NodeArgs; str for symbolic dims."""
    metadata: dict[str, InputMeta] = {}
    for arg in args:
        row = BY_ORT.get(arg.type)
        # bfloat16 has no numpy dtype of its own that ONNX Runtime accepts: leave it unchecked.
        dtype = row.numpy if row is not None and row.name != "bfloat16" else None
        shape = tuple(dim if isinstance(dim, (int, str)) else "?" for dim in arg.shape)
        metadata[arg.name] = (np.dtype(dtype) if dtype is not None else None, shape)
    return metadata


class OnnxrtRunner(Runner):
    """Run an ONNX graph in ONNX Runtime.

    Takes a path, a session, or a loader that makes one (`SessionFromOnnx`, or any
    callable): with a path, `providers` and `threads` configure the loader. Overridable
    initializers (LoRA weights with a default) may be fed and are checked like inputs.
    ``run_options`` (an ``onnxruntime.RunOptions``) is a hook for per-run settings such as
    active LoRA adapters: set the attribute once, or pass ``run_options=`` to ``infer``.
    """

    def __init__(
        self,
        source: str | os.PathLike | SessionOrLoader,
        *,
        providers: Sequence[str] = CPU,
        threads: int | None = None,
        name: str | None = None,
    ):
        super().__init__(name)
        if isinstance(source, (str, os.PathLike)):
            source = SessionFromOnnx(source, providers=providers, threads=threads)
        self.loader = source
        self.path = getattr(source, "path", None)
        self.run_options: Any = None
        self.session: Any = None

    def output_names(self) -> list[str]:
        """Graph output names, in order."""
        self._require_active()
        return [output.name for output in self.session.get_outputs()]

    def _activate(self) -> None:
        self.session = session_from(self.loader)

    def _deactivate(self) -> None:
        self.session = None

    def _input_metadata(self) -> dict[str, InputMeta]:
        return ort_metadata(self.session.get_inputs())

    def optional_metadata(self) -> dict[str, InputMeta]:
        self._require_active()
        return ort_metadata(self.session.get_overridable_initializers())

    def _infer(self, feed: dict[str, np.ndarray], run_options: Any = None) -> dict[str, np.ndarray]:
        names = self.output_names()
        try:
            values = self.session.run(names, feed, run_options or self.run_options)
        except ort_errors() as err:
            raise BadInputError(f"ONNX Runtime failed on this feed: {error_line(err)}") from err
        return dict(zip(names, values))
