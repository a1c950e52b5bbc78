"""`lora-deploy refit`: switch the adapter inside a built engine, without a rebuild.

The weights come from weights.refit_weights (the merge's math, from the base: never a delta
on top of the engine's current weights); the TensorRT part is the Refitter calls below,
run only where TensorRT and a GPU are. Never run here (no TensorRT, no GPU).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_deploy.backends.trt import manifest as manifest_mod
from lora_deploy.backends.trt import versions
from lora_deploy.backends.trt.weights import adapter_weights, refit_weights
from lora_deploy.errors import BadInputError, InternalError
from lora_deploy.io.provenance import artifact_hashes
from lora_deploy.io.staging import check_output, write_file_atomic


@dataclass
class RefitResult:
    path: Path
    weights: int
    seconds: float
    build_seconds: float | None

    def summary(self) -> str:
        build = "" if self.build_seconds is None else f" (the build took {self.build_seconds:.1f}s)"
        return f"refitted {self.weights} weights into {self.path} in {self.seconds:.2f}s{build}"


def refit_engine(
    engine: str | os.PathLike,
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    *,
    out: Path | None = None,
    overwrite: bool = False,
) -> RefitResult:
    """Refit ENGINE to base + ADAPTER; write it to `out` with its manifest. ENGINE itself is an
    input and is never changed (inputs are never outputs), so `out` is required."""
    engine, base, adapter = Path(engine), Path(base), Path(adapter)
    if out is None:
        raise BadInputError("refit needs an output engine (-o NEW.engine): the input engine is never changed")
    versions.require_tensorrt()  # first: exit 2 in one line without it, nothing read or written
    document = manifest_mod.read_manifest(engine)
    target = Path(out)
    inputs = [engine, manifest_mod.manifest_path(engine), base, adapter]
    check_output(target, inputs, overwrite)
    check_output(manifest_mod.manifest_path(target), inputs, overwrite)
    refittable, reset = manifest_mod.refit_targets(document)
    start = time.perf_counter()
    weights = refit_weights(base, adapter, document["weights"], refittable, reset)
    blob = refit_blob(engine.read_bytes(), weights)
    seconds = time.perf_counter() - start
    by_checkpoint = {e["checkpoint"]: n for n, e in document["weights"].items()}
    changed = sorted(by_checkpoint[n] for n in adapter_weights(base, adapter) if n in by_checkpoint)
    document["refit"]["current_adapter"] = {"path": str(adapter), "sha256": artifact_hashes(adapter)}
    document["refit"]["changed_weights"] = changed
    document["refit"]["seconds"] = round(seconds, 3)
    document["sources"] = {"base": artifact_hashes(base), "adapter": artifact_hashes(adapter)}
    text = json.dumps(document, indent=2, default=str) + "\n"
    write_file_atomic(target, writer(blob), overwrite=overwrite)
    write_file_atomic(manifest_mod.manifest_path(target), writer(text.encode()), overwrite=overwrite)
    return RefitResult(target, len(weights), seconds, document.get("build", {}).get("seconds"))


def writer(data: bytes):
    def write(f) -> None:
        f.write(data)

    return write


def refit_blob(plan: bytes, weights: dict[str, np.ndarray]) -> bytes:
    """Deserialize, set every named weight, check none is missing, refit, serialize.
    (Imports tensorrt here, after require_tensorrt: type-checked against tensorrt-stubs.)"""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    cuda_engine = runtime.deserialize_cuda_engine(plan)
    if cuda_engine is None:
        raise BadInputError("TensorRT could not deserialize the engine (another TensorRT version or GPU?)")
    refitter = trt.Refitter(cuda_engine, logger)
    keep = []  # trt.Weights does not own its memory: keep the arrays alive until the refit
    for name, array in weights.items():
        array = np.ascontiguousarray(array)
        keep.append(array)
        if not refitter.set_named_weights(name, trt.Weights(array)):
            raise BadInputError(f"TensorRT refused weight {name!r} (not refittable in this engine, or wrong shape)")
    missing = list(refitter.get_missing_weights())
    if missing:
        raise BadInputError(f"refit incomplete: TensorRT still needs {', '.join(missing[:5])}")
    if not refitter.refit_cuda_engine():
        raise InternalError("TensorRT's refit_cuda_engine failed")
    return bytes(cuda_engine.serialize())
