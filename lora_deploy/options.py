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
    dtype: str = "float32"  # auto: follow the checkpoint (float16 -> float16; bfloat16 -> float32)
    overwrite: bool = False  # replace an existing output file
    stream_weights: bool = False  # trace without weights, stream initializers from the checkpoint


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
    shapes: str | None = None  # None: 1x1,1x128,8x128, or the shape of --inputs
    inputs_path: Path | None = None  # an .npz of real inputs, by input name
    reference: str | None = None
    threads: int | None = None
    rounds: int = 50
    warmup: int = 5
    inner: int = 1
    seed: int = 0
    max_overhead: float | str | None = None
    baseline_model: Path | None = None  # the previous artifact, timed in the same run (recommended)
    baseline_path: Path | None = None  # a saved JSON report
    max_regression: float | str | None = None
    run_margin: float | str | None = None  # between-run allowance against a saved report
    allow_mismatch: bool = False  # compare with a baseline of another configuration (gates inconclusive)
    on_inconclusive: str = "warn"  # pass | warn | fail
    rate: str | None = None  # control-loop mode, e.g. "100hz"
    duration: str | None = None  # per shape in control-loop mode, e.g. "30s"
    max_p99: str | None = None  # control-loop budget, e.g. "8ms"
    max_misses: int | None = None
    cuda_graphs: bool = False


@dataclass(frozen=True)
class TrtBuildOptions(StageOptions):
    """`lora_deploy.backends.trt.build.build_engine` (`lora-deploy build trt`)."""

    precision: str = "fp32"  # fp32 | fp16 | bf16: flags on TensorRT 10, a converted ONNX on 11
    shapes: tuple[str, ...] = ()  # NAME:MIN,OPT,MAX per dynamic input; defaults from the ONNX dims
    timing_cache: Path | None = None
    refittable: str = "none"  # none | all | adapter-targets
    refit_targets: str | None = None  # modules marked refittable with adapter-targets, e.g. q_proj,v_proj
    strip_weights: bool = False
    hardware_compat: str = "same"  # same | ampere+
    version_compatible: bool = False
    workspace: str | None = None  # e.g. 4GB
    base: Path | None = None  # checkpoint the ONNX came from: checks the initializer -> checkpoint map
    overwrite: bool = False


@dataclass(frozen=True)
class TrtRefitOptions(StageOptions):
    """`lora_deploy.backends.trt.refit.refit_engine` (`lora-deploy refit`)."""

    out: Path | None = None  # required: the input engine is never changed
    overwrite: bool = False
