"""Backends side by side behind one runner contract (after polygraphy).

A runner takes a session or a loader that makes one; `infer(feed)` checks the feed once,
in the base class, and returns numpy arrays by name. `registry` lists what `bench` can
time; a TensorRT backend is one more subpackage and one more registry entry.

The names below are loaded on first use: the CLI imports `registry` (bench's choices) for
every command, and `merge` needs no runner.
"""

from __future__ import annotations

__all__ = ["Runner", "TimedModel", "check_feed", "SessionFromOnnx", "OnnxrtRunner", "TorchRunner"]


def __getattr__(name: str):
    if name in ("Runner", "TimedModel", "check_feed"):
        from lora_deploy.backends import base

        return getattr(base, name)
    if name == "SessionFromOnnx":
        from lora_deploy.backends.onnxrt.loader import SessionFromOnnx

        return SessionFromOnnx
    if name == "OnnxrtRunner":
        from lora_deploy.backends.onnxrt.runner import OnnxrtRunner

        return OnnxrtRunner
    if name == "TorchRunner":
        from lora_deploy.backends.torch.runner import TorchRunner

        return TorchRunner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
