"""Backends side by side behind one runner contract (after polygraphy).

A runner takes a session or a loader that makes one; `infer(feed)` checks the feed once,
in the base class, and returns numpy arrays by name. `registry` lists what `bench` can
time; a TensorRT backend is one more subpackage and one more registry entry.
"""

from lora_deploy.backends.base import Runner, TimedModel, check_feed
from lora_deploy.backends.onnxrt.loader import SessionFromOnnx
from lora_deploy.backends.onnxrt.runner import OnnxrtRunner
from lora_deploy.backends.torch.runner import TorchRunner

__all__ = ["Runner", "TimedModel", "check_feed", "SessionFromOnnx", "OnnxrtRunner", "TorchRunner"]
