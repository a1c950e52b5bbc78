"""Torch models opened for timing: eager forward passes, or replays of a captured CUDA graph."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lora_deploy.backends.base import Feed, TimedModel
from lora_deploy.backends.torch.runner import TorchRunner
from lora_deploy.errors import BadInputError, LoraDeployError
from lora_deploy.util import first_line


def _eager_call(module: Any, tensors: Mapping[str, Any], device: str) -> Callable[[], None]:
    import torch

    cuda = device == "cuda"

    def call() -> None:
        with torch.inference_mode():
            module(**tensors)
        if cuda:
            torch.cuda.synchronize()  # CUDA launches are async: time the work, not the launch

    return call


def _cuda_graph_call(module: Any, tensors: Mapping[str, Any], name: str) -> Callable[[], None]:
    """Capture one forward at this fixed shape; the call replays it and synchronises."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.inference_mode():
            # Lazy init (cuBLAS handles, allocator pools) must happen before capture.
            with torch.cuda.stream(side):
                for _ in range(3):
                    module(**tensors)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = module(**tensors)
    except RuntimeError as err:
        raise BadInputError(
            f"model {name!r}: CUDA graph capture failed ({first_line(err, 300)}); rerun without CUDA graphs"
        ) from err

    def call() -> None:
        graph.replay()
        torch.cuda.synchronize()

    call.output = output  # type: ignore[attr-defined]  # keep the graph's output buffer referenced
    return call


def _torch_binder(runner: TorchRunner, device: str, cuda_graphs: bool) -> Callable[[Feed], Callable[[], None]]:
    import torch

    def bind(feed: Feed) -> Callable[[], None]:
        # Converted and moved once, so the timed call is the forward pass only.
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in feed.items()}
        if cuda_graphs:
            return _cuda_graph_call(runner.module, tensors, runner.name)
        return _eager_call(runner.module, tensors, device)

    return bind


def timed_model(
    name: str, path: Path, device: str, threads: int | None, adapter: Path | None, options: Mapping[str, Any]
) -> TimedModel:
    """An HF checkpoint directory, or with `options["module"]` ("package.module:factory")
    the module that factory returns with the checkpoint at `path` loaded into it
    (modeling.factory), in eager torch; an adapter is attached unmerged (forward hooks)."""
    import torch

    from lora_deploy.modeling.factory import load_module
    from lora_deploy.modeling.unmerged import attach

    if device == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--device cuda: torch sees no CUDA device here")
    cuda_graphs = bool(options.get("cuda_graphs")) and device == "cuda"
    factory = options.get("module")
    runner = TorchRunner(path if factory is None else load_module(factory, path), device=device, name=name)
    runner.activate()
    try:
        if adapter is not None:
            # Hooks on the wrapper: attach() finds the adapter's modules under `model.`.
            attach(runner.module, adapter)
    except LoraDeployError as err:
        runner.deactivate()
        raise type(err)(f"adapter {adapter} does not fit model {name!r} ({path}): {err}") from err
    try:
        examples = runner.example_feed()
    except LoraDeployError:
        runner.deactivate()
        raise
    return TimedModel(
        name=name,
        path=path,
        runner=runner,
        bind=_torch_binder(runner, device, cuda_graphs),
        adapter=adapter,
        example_feed=examples,
        details={
            "path": str(path),
            "module": factory,
            "adapter": str(adapter) if adapter else None,
            "mode": ("cuda-graphs" if cuda_graphs else "eager") + (" + unmerged LoRA hooks" if adapter else ""),
            "torch_threads": torch.get_num_threads(),
        },
    )
