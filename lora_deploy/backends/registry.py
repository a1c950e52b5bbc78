"""The backends `bench` can time, by name: what each takes as a model and an adapter, and
the factory that opens one. Factories are named by import path so that listing the
backends imports neither ONNX Runtime nor torch; a TensorRT backend is one more entry.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_deploy.errors import BadInputError

if TYPE_CHECKING:  # base.py imports numpy, which the CLI's start-up does without
    from lora_deploy.backends.base import TimedModel

DEVICES = ("cpu", "cuda")

# make(name, model path, device, threads, adapter path or None, options) -> an active TimedModel
TimedModelFactory = Callable[[str, Path, str, "int | None", "Path | None", Mapping[str, Any]], "TimedModel"]


@dataclass(frozen=True)
class PathKind:
    """What a backend accepts as a model or an adapter path."""

    directory: bool
    label: str  # for messages, e.g. "an .onnx file"
    marker: str = ""  # a file a directory must contain


@dataclass(frozen=True)
class Backend:
    """A registry entry: accepted paths plus a factory. TensorRT would be one more entry."""

    model: PathKind
    adapter: PathKind
    make: str | TimedModelFactory  # the factory, or its "module:function" to import on first use
    # Takes plain modules in the factory form (--module package.module:factory, modeling.factory):
    # the model path is then a checkpoint loaded into the module the factory returns.
    module: bool = False

    def factory(self) -> TimedModelFactory:
        if callable(self.make):
            return self.make
        module, _, function = self.make.partition(":")
        return getattr(importlib.import_module(module), function)


BACKENDS: dict[str, Backend] = {
    "onnxruntime": Backend(
        model=PathKind(directory=False, label="an .onnx file"),
        adapter=PathKind(directory=False, label="an .onnx_adapter file"),
        make="lora_deploy.backends.onnxrt.timed:timed_model",
    ),
    "torch": Backend(
        model=PathKind(directory=True, label="a Hugging Face checkpoint directory", marker="config.json"),
        adapter=PathKind(directory=True, label="a PEFT adapter directory", marker="adapter_config.json"),
        make="lora_deploy.backends.torch.timed:timed_model",
        module=True,
    ),
    # Needs TensorRT and a GPU; without them opening a model fails in one line (exit 2).
    "tensorrt": Backend(
        model=PathKind(directory=False, label="a TensorRT engine file (lora-deploy build trt)"),
        adapter=PathKind(directory=False, label="no adapter (refit the engine: lora-deploy refit)"),
        make="lora_deploy.backends.trt.timed:timed_model",
    ),
}


def check_path(path: Path, kind: PathKind, role: str, name: str, backend: str) -> None:
    """Exists, and is what `backend` takes; otherwise one line saying what to use."""
    what = f"{role} {name!r} ({path})"
    if not path.exists():
        raise BadInputError(f"{what}: not found")
    if path.is_dir() != kind.directory:
        others = [b for b, spec in BACKENDS.items() if getattr(spec, role).directory == path.is_dir()]
        hint = f"; that needs --backend {others[0]}" if others else ""
        raise BadInputError(f"{what}: the {backend} backend takes {kind.label}{hint}")
    if kind.marker and not (path / kind.marker).is_file():
        raise BadInputError(f"{what}: no {kind.marker}, so not {kind.label}")


def check_model(path: Path, backend: str, name: str, module: str | None = None) -> None:
    """A model path `backend` takes: its own kind, or with `module` (the factory form) a
    checkpoint that modeling.factory reads; otherwise one line saying what to use."""
    spec = get(backend)
    if module is None:
        check_path(path, spec.model, "model", name, backend)
        return
    if not spec.module:
        takers = [b for b, s in BACKENDS.items() if s.module]
        raise BadInputError(f"--module (a plain torch module) needs --backend {' or '.join(takers)}, not {backend}")
    from lora_deploy.modeling.factory import check_module_checkpoint, parse_factory

    parse_factory(module)
    check_module_checkpoint(path, f"model {name!r}")


def get(backend: str) -> Backend:
    if backend not in BACKENDS:
        raise BadInputError(f"unknown backend {backend!r}; choose {', '.join(BACKENDS)}")
    return BACKENDS[backend]


def open_timed(
    name: str,
    path: str | os.PathLike,
    backend: str,
    device: str = "cpu",
    threads: int | None = None,
    adapter: str | os.PathLike | None = None,
    **options: Any,
) -> TimedModel:
    """Open one variant (activated): `variant.runner` plus `variant.bind(feed)` -> zero-arg call.

    `options` go to the backend factory (torch: `cuda_graphs=True`, `module="pkg.mod:factory"`). The
    caller closes it with `variant.close()`.
    """
    spec = get(backend)
    if device not in DEVICES:
        raise BadInputError(f"unknown device {device!r}; choose {', '.join(DEVICES)}")
    path = Path(path)
    check_model(path, backend, name, options.get("module"))
    if adapter is not None:
        adapter = Path(adapter)
        check_path(adapter, spec.adapter, "adapter", name, backend)
    return spec.factory()(name, path, device, threads, adapter, options)
