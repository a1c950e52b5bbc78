"""The one way to create an ONNX Runtime session (after polygraphy's `SessionFromOnnx`).

A loader stores its arguments and builds the session when called, so it can be handed to
a runner, composed, or called again for a fresh session. Every session in lora-deploy
(verify, bench, the adapter sessions, the export parity check) comes from here, with the
same error lines.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lora_deploy.errors import BadInputError
from lora_deploy.util import first_line

CPU = ("CPUExecutionProvider",)
# Overridable initializers (LoRA inputs) each draw a "will not be treated as constant"
# warning, and a failed run logs its error before raising it; we report errors ourselves.
QUIET = 3

_NOISE = (
    re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : "),  # status prefix
    re.compile(r"/\S+\.(?:h|cc|cpp):\d+ "),  # source location
    re.compile(r"(?:\w+ )?\w+(?:::\w+)+\([^)]*\) "),  # C++ signature
)


def ort_errors() -> tuple[type[BaseException], ...]:
    """ONNX Runtime's exception classes; they do not share a base below Exception."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = (
        "Fail",
        "InvalidArgument",
        "NoSuchFile",
        "NoModel",
        "EngineError",
        "RuntimeException",
        "InvalidProtobuf",
        "ModelLoaded",
        "NotImplemented",
        "InvalidGraph",
        "EPFail",
    )
    found = tuple(getattr(state, name) for name in names if hasattr(state, name))
    return found + (RuntimeError, ValueError)


def error_line(err: BaseException) -> str:
    """One short line of an ONNX Runtime error; its source paths and C++ signatures dropped."""
    line = first_line(err)
    for pattern in _NOISE:
        line = pattern.sub("", line)
    return line[:300]


class SessionFromOnnx:
    """Lazy loader: `SessionFromOnnx(path, threads=1)()` -> onnxruntime.InferenceSession.

    `providers` must all be available (ONNX Runtime would otherwise drop them silently),
    each with its entry of `provider_options` when given; `config` holds session config
    entries (`session.disable_cpu_ep_fallback`: backends/onnxrt/gpu.py). `threads` sizes the
    intra-op pool, `inter_op_threads` the inter-op one. A caller with its own
    `onnxruntime.SessionOptions` passes them as `session_options` instead.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        providers: Sequence[str] = CPU,
        threads: int | None = None,
        inter_op_threads: int | None = None,
        log_level: int = QUIET,
        session_options: Any = None,
        provider_options: Sequence[Mapping[str, str]] | None = None,
        config: Mapping[str, str] | None = None,
    ):
        self.path = Path(path)
        self.providers = list(providers)
        self.provider_options = None if provider_options is None else [dict(o) for o in provider_options]
        self.config = dict(config or {})
        self.threads = threads
        self.inter_op_threads = inter_op_threads
        self.log_level = log_level
        self.session_options = session_options

    def options(self) -> Any:
        import onnxruntime as ort

        if self.session_options is not None:
            options = self.session_options
            for key, value in self.config.items():
                options.add_session_config_entry(key, value)
            return options
        options = ort.SessionOptions()
        for key, value in self.config.items():
            options.add_session_config_entry(key, value)
        options.log_severity_level = self.log_level
        if self.threads is not None:
            options.intra_op_num_threads = int(self.threads)
        if self.inter_op_threads is not None:
            options.inter_op_num_threads = int(self.inter_op_threads)
        return options

    def __call__(self) -> Any:
        import onnxruntime as ort

        if not self.path.is_file():
            raise BadInputError(f"{self.path}: ONNX file not found")
        available = ort.get_available_providers()
        missing = [p for p in self.providers if p not in available]
        if missing:
            raise BadInputError(f"ONNX Runtime provider(s) {missing} not available; have {available}")
        try:
            return ort.InferenceSession(
                str(self.path), self.options(), providers=self.providers, provider_options=self.provider_options
            )
        except ort_errors() as err:
            raise BadInputError(f"ONNX Runtime cannot load {self.path}: {error_line(err)}") from None


SessionOrLoader = Any | Callable[[], Any]


def session_from(session_or_loader: SessionOrLoader) -> Any:
    """A session, built by calling the loader when given one (polygraphy's convention)."""
    return session_or_loader() if callable(session_or_loader) else session_or_loader
