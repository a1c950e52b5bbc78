"""`bench --backend tensorrt`: a built engine, timed through polygraphy's TrtRunner.

Never run here (no TensorRT, no GPU). Opening one without them fails in one line (exit 2)
before anything is timed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lora_deploy.backends.base import Feed, InputMeta, Runner, TimedModel
from lora_deploy.backends.trt import versions
from lora_deploy.errors import BadInputError


class TrtEngineRunner(Runner):
    """A serialized engine run by polygraphy's TrtRunner (which synchronizes each inference)."""

    def __init__(self, path: Path, name: str | None = None):
        super().__init__(name)
        self.path = Path(path)
        self._runner: Any = None

    def _activate(self) -> None:
        versions.require_tensorrt()
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self._runner = TrtRunner(EngineFromBytes(BytesFromPath(str(self.path))))
        self._runner.activate()

    def _deactivate(self) -> None:
        self._runner.deactivate()
        self._runner = None

    def _input_metadata(self) -> dict[str, InputMeta]:
        meta = self._runner.get_input_metadata()
        return {name: (dtype, ["dyn" if d < 0 else d for d in shape]) for name, (dtype, shape) in meta.items()}

    def _infer(self, feed: Feed, **options: Any) -> dict[str, Any]:
        return dict(self._runner.infer(feed, **options))


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
        def call() -> None:
            runner.infer(feed)

        return call

    return TimedModel(name=name, path=path, runner=runner, bind=bind)
