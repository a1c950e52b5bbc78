"""`bench --backend tensorrt`: a built engine, timed through polygraphy's TrtRunner (runner.py).

Never run here (no TensorRT, no GPU). Opening one without them fails in one line (exit 2)
before anything is timed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lora_deploy.backends.base import Feed, TimedModel
from lora_deploy.backends.trt import versions
from lora_deploy.backends.trt.runner import TrtEngineRunner, fit_feed
from lora_deploy.errors import BadInputError


def timed_model(
    name: str, path: Path, device: str, threads: int | None, adapter: Path | None, options: Mapping[str, Any]
) -> TimedModel:
    versions.require_tensorrt()  # one line, exit 2, before anything else
    if device != "cuda":
        raise BadInputError("the tensorrt backend runs on a GPU: pass --device cuda")
    if adapter is not None:
        raise BadInputError("the tensorrt backend takes no --adapter: refit the engine (lora-deploy refit) instead")
    runner = TrtEngineRunner(path, name)
    runner.activate()

    def bind(feed: Feed):
        fitted = fit_feed(feed, runner.input_metadata())  # int64 ids to an int32 binding, once

        def call() -> None:
            runner.infer(fitted)

        return call

    return TimedModel(name=name, path=path, runner=runner, bind=bind)
