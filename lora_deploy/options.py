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
EXPORT_DTYPES = ("float32", "float16")  # what `export onnx` writes a Hugging Face model in
PARITY_MODES = ("auto", "full", "proxy", "skip")  # export onnx --parity


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
    sha256: bool = False  # record SHA-256 beside BLAKE3 in the manifest
    rehash: bool = False  # hash every input again, whatever the digest memo knows
    onto: str | None = None  # nf4 | fp4 | int8: merge onto dequant(quant(W)) as bitsandbytes computes it (merge/bnb.py)
    blocksize: int | None = None  # --onto nf4|fp4: bitsandbytes' block size (None: 64)
    double_quant: bool = False  # --onto nf4|fp4: the absmax scales double-quantized (bnb_4bit_use_double_quant)
    skip_modules: tuple[str, ...] = ()  # --onto: modules left unquantized (llm_int8_skip_modules)
    requantize: str | None = None  # fp8: a block-scaled FP8 base written back as FP8 with fresh block scales


@dataclass(frozen=True)
class ExportOptions(StageOptions):
    """`lora_deploy.export.export_checkpoint`."""

    task: str = "auto"
    opset: int | None = None
    dtype: str = "float32"  # auto: follow the checkpoint (float16 -> float16; bfloat16 -> float32)
    overwrite: bool = False  # replace an existing output file
    stream_weights: bool = False  # trace without weights, stream initializers from the checkpoint
    parity: str = "auto"  # stream_weights: ORT check on the real model or a 1-layer proxy (auto/full/proxy/skip)
    module: str | None = None  # a plain torch module: "package.module:factory"; the model path is its checkpoint
    inputs_path: Path | None = None  # module: example inputs (.npz, names = forward's arguments)
    static: bool = False  # module: every input dim fixed (no dynamic batch)
    part: str | None = None  # module: export this submodule alone (e.g. "blocks.0"), on its recorded inputs


@dataclass(frozen=True)
class PackOptions(StageOptions):
    """`lora_deploy.backends.onnxrt.lora_format.pack_adapter` (`lora-deploy pack`)."""

    dtype: str | None = None  # what the packed A and B are stored as (PACK_DTYPES); None: the graph's LoRA dtype
    overwrite: bool = False  # replace an existing output file


@dataclass(frozen=True)
class CompressOptions(StageOptions):
    """`lora_deploy.merge.combine.compress_adapter` (`lora-deploy compress`)."""

    rank: int | None = None  # every module truncated to this rank (or kept, if lower)
    energy: float | None = None  # or: the rank keeping this fraction of each module's ||dW||_F^2
    per_module: bool = False  # with energy: each module its own rank (rank_pattern); else the largest for all
    overwrite: bool = False  # replace an existing output directory


# `lora-deploy combine --method` (the order the CLI lists them).
COMBINE_METHODS = ("linear", "cat", "svd", "ties", "dare")


@dataclass(frozen=True)
class CombineOptions(StageOptions):
    """`lora_deploy.merge.combine.combine_adapters` (`lora-deploy combine`)."""

    weights: tuple[float, ...] | None = None  # one per adapter; None: 1 each
    method: str = "linear"  # COMBINE_METHODS
    rank: int | None = None  # svd/ties/dare: the output rank (None: the largest input rank)
    density: float | None = None  # ties/dare: the fraction of each update's entries kept
    seed: int = 0  # dare: the seed of the random drop
    overwrite: bool = False  # replace an existing output directory


# `lora-deploy export genai --precision`: what onnxruntime-genai's model builder builds.
GENAI_PRECISIONS = ("fp32", "fp16", "int4")


@dataclass(frozen=True)
class GenaiExportOptions(StageOptions):
    """`lora_deploy.export.genai.export_genai` (`lora-deploy export genai`)."""

    precision: str = "fp32"  # fp32 and int4 for the CPU; fp16 for CUDA (the builder has no fp16 CPU target)
    overwrite: bool = False  # replace an existing folder


@dataclass(frozen=True)
class VerifyOptions(StageOptions):
    """`lora_deploy.proof.verify`: tolerances (None: by dtype), the sample inputs, whether
    an adapter with no effect on the outputs may pass, and where ONNX Runtime runs."""

    atol: float | None = None
    rtol: float | None = None
    batch: int = 2
    seq: int = 16
    seed: int = 0
    task: str = "auto"
    allow_no_effect: bool = False
    device: str = "cpu"  # where ONNX Runtime runs the --onnx graph (cuda: needs onnxruntime-gpu)
    provider: str | None = None  # onnxruntime on cuda: cuda (default) | tensorrt execution provider
    trt_fp16: bool = False  # onnxruntime's TensorRT provider builds fp16 engines
    trt_cache: Path | None = None  # onnxruntime's TensorRT provider: engine and timing cache directory


@dataclass(frozen=True)
class BenchOptions(StageOptions):
    """`lora_deploy.bench.run_bench`: what to time, where, how often, and the gates."""

    backend: str = "onnxruntime"
    device: str = "cpu"
    module: str | None = None  # torch: "package.module:factory", model paths are checkpoints for it
    shapes: str | None = None  # None: 1x1,1x128,8x128, or the shape of --inputs (or of example_inputs())
    inputs_path: Path | None = None  # an .npz of real inputs, by input name
    reference: str | None = None
    threads: int | None = None
    rounds: int = 50
    warmup: int = 5
    inner: int = 1
    seed: int = 0
    generate: int | None = None  # every shape a prompt; each round one greedy generation of N tokens (KV-cache graphs)
    until_width: float | str | None = None  # adaptive rounds: add rounds until every interval is this narrow
    max_time: str | None = None  # the time budget of until_width, e.g. "120s" (the default)
    max_overhead: float | str | None = None
    baseline_model: Path | None = None  # the previous artifact, timed in the same run (recommended)
    baseline_path: Path | None = None  # a saved JSON report
    max_regression: float | str | None = None
    run_margin: float | str | None = None  # between-run allowance against a saved report
    allow_mismatch: bool = False  # compare with a baseline of another configuration (gates inconclusive)
    noise_runs: int | None = None  # repeat the run N times (models reopened), store the noise floor for --baseline
    sessions: int | None = None  # sessions per variant, the rounds split between them (None: 3; 1 with until_width)
    on_inconclusive: str = "warn"  # pass | warn | fail
    rate: str | None = None  # control-loop mode, e.g. "100hz"
    duration: str | None = None  # per shape in control-loop mode, e.g. "30s"
    max_p99: str | None = None  # control-loop budget, e.g. "8ms"
    max_misses: int | None = None
    cuda_graphs: bool = False
    provider: str | None = None  # onnxruntime on cuda: cuda (default) | tensorrt execution provider
    trt_fp16: bool = False  # onnxruntime's TensorRT provider builds fp16 engines
    trt_cache: Path | None = None  # onnxruntime's TensorRT provider: engine and timing cache directory


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
    converter: str = "builtin"  # builtin | modelopt: makes the fp16/bf16 graph TensorRT 11 builds
    overwrite: bool = False


@dataclass(frozen=True)
class TrtRefitOptions(StageOptions):
    """`lora_deploy.backends.trt.refit.refit_engine` (`lora-deploy refit`)."""

    out: Path | None = None  # required: the input engine is never changed
    overwrite: bool = False
