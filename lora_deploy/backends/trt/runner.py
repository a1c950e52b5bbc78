"""A serialized TensorRT engine behind the runner contract (backends/base.py).

polygraphy's TrtRunner over EngineFromBytes(BytesFromPath(engine)) does the TensorRT work
(it synchronizes each inference and returns host arrays); this class adds the contract's
feed check and one thing TensorRT needs that ONNX Runtime does not: integer inputs in the
engine's own integer type (`fit_feed`; TensorRT may bind int64 token ids as int32).

Never run here (no TensorRT, no GPU). Activating one without them fails in one line
(exit 2) before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lora_deploy.backends.base import Feed, InputMeta, Runner
from lora_deploy.backends.trt import versions
from lora_deploy.errors import BadInputError


class TrtEngineRunner(Runner):
    """A serialized engine run by polygraphy's TrtRunner."""

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
        return {name: np.asarray(array) for name, array in self._runner.infer(feed, **options).items()}


def fit_feed(feed: Mapping[str, np.ndarray], metadata: Mapping[str, InputMeta]) -> Feed:
    """`feed` with each integer or bool input cast to the engine's type for it (int64 token
    ids to an int32 binding); refused when a value does not fit. Float inputs are left as
    they are: a float32 array fed to a float16 binding is a mistake the feed check names."""
    out = {}
    for name, array in feed.items():
        want = metadata.get(name, (None, None))[0]
        if want is None or np.dtype(want) == array.dtype or array.dtype.kind not in "biu":
            out[name] = array
            continue
        target = np.dtype(want)
        if target.kind not in "biu":
            out[name] = array
            continue
        if target.kind != "b" and array.size:
            info = np.iinfo(target.type)  # type: ignore[type-var]  # an integer dtype here
            if array.min() < info.min or array.max() > info.max:
                raise BadInputError(f"input {name!r}: values do not fit the engine's {target.name}")
        out[name] = array.astype(target)
    return out
