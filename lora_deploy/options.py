"""The settings of each stage, as frozen, typed records.

`lora-deploy merge|export onnx|verify|bench` build one of these from their flags and
call the Python API with it (`merge(base, adapter, out, **options.kwargs())`), and a
test checks that every field is a flag of its command and a keyword of its API function,
so the three cannot drift apart. They are also what a pipeline file or a cache key is
made of: plain values, hashable, compared field by field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

# `lora-deploy pack --dtype` and pack_adapter(dtype=): what a packed adapter's A and B are
# stored as. Here, not in backends/onnxrt/lora_format.py (which re-exports it), so the CLI
# lists the choices without importing torch.
PACK_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class StageOptions:
    def kwargs(self) -> dict[str, Any]:
        """The fields as keyword arguments of the stage's API function."""
        return asdict(self)

    @classmethod
    def from_params(cls, params: dict[str, Any]):
        """Pick this stage's fields out of a command's parameters (click's ctx.params)."""
        return cls(**{f.name: params[f.name] for f in fields(cls) if f.name in params})


@dataclass(frozen=True)
class MergeOptions(StageOptions):
    """`lora_deploy.merge.merge`."""

    dtype: str = "auto"  # auto keeps each tensor's base dtype
    max_shard_size: str | int = "5GB"
    overwrite: bool = False
    durable: bool = False  # fsync every file and the directory before the final rename


@dataclass(frozen=True)
class ExportOptions(StageOptions):
    """`lora_deploy.export.export_checkpoint`."""

    task: str = "auto"
    opset: int | None = None
    dtype: str = "float32"
    overwrite: bool = False  # replace an existing output file


@dataclass(frozen=True)
class VerifyOptions(StageOptions):
    """`lora_deploy.proof.verify`: tolerances (None: by dtype), the sample inputs, and
    whether an adapter with no effect on the outputs may pass."""

    atol: float | None = None
    rtol: float | None = None
    batch: int = 2
    seq: int = 16
    seed: int = 0
    task: str = "auto"
    allow_no_effect: bool = False


@dataclass(frozen=True)
class BenchOptions(StageOptions):
    """`lora_deploy.bench.run_bench`: what to time, where, how often, and the gates."""

    backend: str = "onnxruntime"
    device: str = "cpu"
    shapes: str = "1x1,1x128,8x128"
    reference: str | None = None
    threads: int | None = None
    rounds: int = 50
    warmup: int = 5
    inner: int = 1
    seed: int = 0
    max_overhead: float | str | None = None
    baseline_path: Path | None = None
    max_regression: float | str | None = None
    cuda_graphs: bool = False
