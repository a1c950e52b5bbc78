"""The engine behind `lora-deploy bench`: measured proof that a merge costs nothing.

A bench run compares named variants of one model (base, merged, a dynamic
adapter graph, an unmerged LoRA) on the same machine, the same inputs and the
same thread settings:

1. check every name, path and option before anything is loaded
   (`parse_model_specs`, `parse_adapter_specs`, `check_plan`);
2. open one runner per variant through a backend registry (`BACKENDS`,
   `make_runner`), so a TensorRT backend can be added as one more entry;
3. for every shape build one feed from a fixed seed (identical arrays for all
   variants) and run each variant once, so a shape or adapter that does not
   fit fails with one line *before* any timing;
4. time the variants with `timing.measure_interleaved`, then summarise and
   gate with `report.build_report`;
5. `write_outputs` puts JSON / Markdown / PNG on disk and only then
   `check_gates` raises GateFailed (exit 1), so the evidence for a failed gate
   is always kept.

`bench` does 1-5 in one call.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lora_deploy.errors import BadInputError, LoraDeployError
from lora_deploy.bench.report import (
    Shape,
    build_report,
    load_report,
    parse_shapes,
    plot,
    report_gates,
    shape_key,
    to_markdown,
    write_json,
)
from lora_deploy.backends.base import OnnxrtRunner, Runner, TorchRunner, check_feed, ort_errors
from lora_deploy.modeling.samples import ATTENTION_MASK, INPUT_IDS, TOKEN_TYPE_IDS, sample_inputs
from lora_deploy.bench.stats import enforce_gates, parse_percent
from lora_deploy.bench.timing import check_counts, measure_interleaved
from lora_deploy.util import write_file_atomic
from lora_deploy.util import first_line, library_versions

# progress(shape key, rounds done, rounds in total), called after every round.
BenchProgress = Callable[[str, int, int], None]
Feed = dict[str, np.ndarray]

DEFAULT_SHAPES = "1x1,1x128,8x128"
DEVICES = ("cpu", "cuda")
# Used when a baseline is given without an explicit --max-regression.
DEFAULT_MAX_REGRESSION = 0.05
# The extra input of a multi-adapter graph: one adapter index per batch row.
ADAPTER_IDS = "adapter_ids"
# Inputs that are always a (batch, sequence) matrix, whatever a graph declares.
TOKEN_INPUTS = (INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS)
# Names end up as report keys, gate subjects ("8x128/merged") and table cells.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_VERSIONED = ("lora-deploy", "numpy", "torch", "transformers", "peft", "onnx", "onnxruntime", "onnxruntime-gpu")


# ---------------------------------------------------------------- specs


def _parse_specs(specs: Sequence[str], option: str) -> dict[str, Path]:
    """['name=path', ...] -> {name: Path}; malformed or repeated names are bad input."""
    parsed: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = str(spec).partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise BadInputError(f"bad {option} {spec!r}: expected NAME=PATH, e.g. merged=merged.onnx")
        if not _NAME_RE.match(name):
            raise BadInputError(f"bad {option} name {name!r}: use letters, digits and _ . + - only")
        if name in parsed:
            raise BadInputError(f"{option} name {name!r} is given twice")
        parsed[name] = Path(path).expanduser()
    return parsed


def parse_model_specs(specs: Sequence[str]) -> dict[str, Path]:
    """`--model` values ['base=base.onnx', ...] -> {'base': Path('base.onnx'), ...}, in order."""
    models = _parse_specs(specs, "--model")
    if not models:
        raise BadInputError("no models given: pass --model NAME=PATH at least once")
    return models


def parse_adapter_specs(specs: Sequence[str], models: Sequence[str] = ()) -> dict[str, Path]:
    """`--adapter` values ['dynamic=x.onnx_adapter'] -> {'dynamic': Path(...)}.

    The name is the model the adapter attaches to (checked in `check_plan`). A bare path
    attaches to the model named "dynamic", or to the one model that is neither "base"
    nor "merged"; anything else is ambiguous.
    """
    named = [s if "=" in s else f"{default_adapter_target(models, s)}={s}" for s in specs]
    return _parse_specs(named, "--adapter")


def default_adapter_target(models: Sequence[str], spec: str) -> str:
    if "dynamic" in models:
        return "dynamic"
    others = [m for m in models if m not in ("base", "merged")]
    if len(others) == 1:
        return others[0]
    raise BadInputError(f"--adapter {spec}: say which model it is for, as --adapter NAME={spec}")


# ---------------------------------------------------------------- backends


@dataclass
class Variant:
    """One opened variant: its runner and how to turn a feed into a timed call.

    `bind(feed)` returns a zero-argument callable running one inference on
    that feed (prepared once, so the timed call does no conversion) and
    returning only when the work is done. `bind_plain` does the same without
    the adapter, so a failure can be blamed on the adapter or on the model.
    `extra_inputs(batch)` supplies backend-specific inputs (adapter_ids).
    """

    name: str
    path: Path
    runner: Runner
    bind: Callable[[Feed], Callable[[], None]]
    adapter: Path | None = None
    bind_plain: Callable[[Feed], Callable[[], None]] | None = None
    extra_inputs: Callable[[int], Feed] = lambda batch: {}
    details: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        """Release the session or model."""
        self.runner.deactivate()


# make(name, model path, device, threads, adapter path or None, options) -> an active Variant
VariantFactory = Callable[[str, Path, str, int | None, Path | None, Mapping[str, Any]], Variant]


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
    make: VariantFactory


_ORT_NOISE = (
    re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : "),  # status prefix
    re.compile(r"/\S+\.(?:h|cc|cpp):\d+ "),  # source location
    re.compile(r"(?:\w+ )?\w+(?:::\w+)+\([^)]*\) "),  # C++ signature
)


def _error_line(err: BaseException) -> str:
    """One short line of an error; ONNX Runtime's source paths and signatures dropped."""
    line = first_line(err)
    for pattern in _ORT_NOISE:
        line = pattern.sub("", line)
    return line[:300]


# ------------------------------------------------- backend: onnxruntime


class BenchOrtRunner(OnnxrtRunner):
    """OnnxrtRunner with the bench's session settings."""

    lora_adapter: Any = None  # the loaded onnxruntime.LoraAdapter, kept alive here

    def session_options(self) -> Any:
        options = super().session_options()
        # One graph runs at a time; inter-op threads would only compete with
        # the intra-op pool that --threads sizes.
        options.inter_op_num_threads = 1
        # Each overridable initializer (dynamic/multi graphs) logs a warning, and
        # a failed run logs its error before raising it; we report errors ourselves.
        options.log_severity_level = 4
        return options


def _ort_providers(device: str) -> list[str]:
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BadInputError(
            "--device cuda: ONNX Runtime has no CUDAExecutionProvider here "
            f"(have {', '.join(ort.get_available_providers())}); install onnxruntime-gpu"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _check_ort_adapter_fits(session: Any, params: Mapping[str, Any], where: str) -> None:
    """Every adapter parameter must be an overridable initializer with matching fixed dims."""
    accepted = {arg.name: arg.shape for arg in session.get_overridable_initializers()}
    for pname, value in params.items():
        if pname not in accepted:
            raise BadInputError(
                f"{where}: parameter {pname!r} is not an overridable input of the graph "
                "(an adapter for another graph, or a graph exported without LoRA inputs?)"
            )
        dims, shape = accepted[pname], list(value.shape())
        fits = len(dims) == len(shape) and all(not isinstance(d, int) or d == n for d, n in zip(dims, shape))
        if not fits:
            raise BadInputError(f"{where}: parameter {pname!r} is {shape} but the graph expects {dims}")


def _ort_run_options(runner: BenchOrtRunner, adapter: Path, model_name: str) -> Any:
    """RunOptions with `adapter` (.onnx_adapter) active, after checking it fits the graph."""
    import onnxruntime as ort

    where = f"adapter {adapter} does not fit model {model_name!r} ({runner.path})"
    try:
        params = ort.AdapterFormat.read_adapter(str(adapter)).get_parameters()
        lora = ort.LoraAdapter()
        lora.Load(str(adapter))
    except Exception as err:  # onnxruntime raises its own types for a corrupt flatbuffer
        raise BadInputError(f"adapter {adapter}: not an ONNX Runtime adapter file ({_error_line(err)})") from None
    _check_ort_adapter_fits(runner.session, params, where)
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    # RunOptions holds only a pointer to the adapter: keep the object alive.
    runner.lora_adapter = lora
    return options


def adapter_bank_size(session: Any) -> int:
    """Adapters in a multi-adapter graph: dim 0 of a `*.bank` input, or 0 if unknown."""
    for arg in session.get_overridable_initializers():
        if arg.name.endswith("bank") and arg.shape and isinstance(arg.shape[0], int) and arg.shape[0] > 0:
            return int(arg.shape[0])
    return 0


def adapter_ids(batch: int, n_adapters: int) -> np.ndarray:
    """Row i uses adapter i % n, so every adapter in the bank is exercised; all 0 when n is unknown."""
    if n_adapters <= 0:
        return np.zeros(batch, dtype=np.int64)
    return np.arange(batch, dtype=np.int64) % n_adapters


def _adapter_ids_input(runner: Runner, n_adapters: int) -> Callable[[int], Feed]:
    """extra_inputs for a multi-adapter graph (adapter_ids in the graph's dtype); none otherwise."""
    meta = runner.input_metadata().get(ADAPTER_IDS)
    if meta is None:
        return lambda batch: {}
    dtype = np.dtype(meta[0] or np.int64)
    return lambda batch: {ADAPTER_IDS: adapter_ids(batch, n_adapters).astype(dtype)}


def _ort_binder(runner: BenchOrtRunner, run_options: Any) -> Callable[[Feed], Callable[[], None]]:
    def bind(feed: Feed) -> Callable[[], None]:
        session, names = runner.session, runner.output_names()

        def call() -> None:
            session.run(names, feed, run_options)

        return call

    return bind


def make_onnxruntime_variant(
    name: str, path: Path, device: str, threads: int | None, adapter: Path | None, options: Mapping[str, Any]
) -> Variant:
    """An ONNX Runtime session; an adapter is activated on every run through RunOptions."""
    runner = BenchOrtRunner(path, providers=_ort_providers(device), threads=threads, name=name)
    runner.activate()
    try:
        used = runner.session.get_providers()
        # ORT silently falls back to CPU when the CUDA provider fails to load.
        if device == "cuda" and used[0] != "CUDAExecutionProvider":
            raise BadInputError(f"model {name!r}: ONNX Runtime could not use CUDA (session runs on {used[0]})")
        run_options = _ort_run_options(runner, adapter, name) if adapter is not None else None
        runner.run_options = run_options  # so runner.infer() runs with the adapter too
        n_adapters = adapter_bank_size(runner.session)
    except BaseException:
        runner.deactivate()
        raise
    has_ids = ADAPTER_IDS in runner.input_metadata()
    return Variant(
        name=name,
        path=path,
        runner=runner,
        bind=_ort_binder(runner, run_options),
        adapter=adapter,
        bind_plain=_ort_binder(runner, None) if adapter is not None else None,
        extra_inputs=_adapter_ids_input(runner, n_adapters),
        details={
            "path": str(path),
            "adapter": str(adapter) if adapter else None,
            "providers": used,
            "intra_op_threads": threads,
            "inter_op_threads": 1,
            "adapter_ids": {"n_adapters": n_adapters} if has_ids else None,
        },
    )


# ------------------------------------------------------- backend: torch


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
            f"model {name!r}: CUDA graph capture failed ({_error_line(err)}); rerun without CUDA graphs"
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


def make_torch_variant(
    name: str, path: Path, device: str, threads: int | None, adapter: Path | None, options: Mapping[str, Any]
) -> Variant:
    """An HF checkpoint in eager torch; an adapter is attached unmerged (forward hooks)."""
    import torch

    from lora_deploy.modeling.unmerged import attach

    if device == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--device cuda: torch sees no CUDA device here")
    cuda_graphs = bool(options.get("cuda_graphs")) and device == "cuda"
    runner = TorchRunner(path, device=device, name=name)
    runner.activate()
    try:
        if adapter is not None:
            # Hooks on the wrapper: attach() finds the adapter's modules under `model.`.
            attach(runner.module, adapter)
    except LoraDeployError as err:
        runner.deactivate()
        raise type(err)(f"adapter {adapter} does not fit model {name!r} ({path}): {err}") from err
    return Variant(
        name=name,
        path=path,
        runner=runner,
        bind=_torch_binder(runner, device, cuda_graphs),
        adapter=adapter,
        details={
            "path": str(path),
            "adapter": str(adapter) if adapter else None,
            "mode": ("cuda-graphs" if cuda_graphs else "eager") + (" + unmerged LoRA hooks" if adapter else ""),
            "torch_threads": torch.get_num_threads(),
        },
    )


BACKENDS: dict[str, Backend] = {
    "onnxruntime": Backend(
        model=PathKind(directory=False, label="an .onnx file"),
        adapter=PathKind(directory=False, label="an .onnx_adapter file"),
        make=make_onnxruntime_variant,
    ),
    "torch": Backend(
        model=PathKind(directory=True, label="a Hugging Face checkpoint directory", marker="config.json"),
        adapter=PathKind(directory=True, label="a PEFT adapter directory", marker="adapter_config.json"),
        make=make_torch_variant,
    ),
}


def _check_path(path: Path, kind: PathKind, role: str, name: str, backend: str) -> None:
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


def _backend(backend: str) -> Backend:
    if backend not in BACKENDS:
        raise BadInputError(f"unknown backend {backend!r}; choose {', '.join(BACKENDS)}")
    return BACKENDS[backend]


def make_runner(
    name: str,
    path: str | os.PathLike,
    backend: str,
    device: str = "cpu",
    threads: int | None = None,
    adapter: str | os.PathLike | None = None,
    **options: Any,
) -> Variant:
    """Open one variant (activated): `variant.runner` plus `variant.bind(feed)` -> zero-arg call.

    `options` go to the backend factory (torch: `cuda_graphs=True`). The
    caller closes it with `variant.close()`.
    """
    spec = _backend(backend)
    if device not in DEVICES:
        raise BadInputError(f"unknown device {device!r}; choose {', '.join(DEVICES)}")
    path = Path(path)
    _check_path(path, spec.model, "model", name, backend)
    if adapter is not None:
        adapter = Path(adapter)
        _check_path(adapter, spec.adapter, "adapter", name, backend)
    return spec.make(name, path, device, threads, adapter, options)


# ---------------------------------------------------------------- plan


def check_plan(
    models: Mapping[str, str | os.PathLike],
    adapters: Mapping[str, str | os.PathLike] | None,
    backend: str,
    reference: str | None,
) -> tuple[dict[str, Path], dict[str, Path], str]:
    """Validate names and paths before loading anything; return (models, adapters, reference).

    The reference defaults to 'base' when there is one, else the first model.
    """
    spec = _backend(backend)
    if not models:
        raise BadInputError("no models given: pass --model NAME=PATH at least once")
    models = {name: Path(p) for name, p in models.items()}
    adapters = {name: Path(p) for name, p in (adapters or {}).items()}
    for name, path in models.items():
        if not _NAME_RE.match(name):
            raise BadInputError(f"bad model name {name!r}: use letters, digits and _ . + - only")
        _check_path(path, spec.model, "model", name, backend)
    for name, path in adapters.items():
        if name not in models:
            raise BadInputError(
                f"adapter {name}={path}: there is no model named {name!r} (models: {', '.join(models)})"
            )
        _check_path(path, spec.adapter, "adapter", name, backend)
    if reference is None:
        reference = "base" if "base" in models else next(iter(models))
    if reference not in models:
        raise BadInputError(f"reference {reference!r} is not among the models ({', '.join(models)})")
    return models, adapters, reference


def _fraction(value: float | str | None) -> float | None:
    """'2%' / 0.02 -> 0.02; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        return parse_percent(value)
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise BadInputError(f"a limit must be a finite fraction >= 0, got {value}")
    return value


def _as_shapes(shapes: str | Sequence[Shape]) -> list[Shape]:
    if isinstance(shapes, str):
        return parse_shapes(shapes)
    return parse_shapes(",".join(f"{b}x{s}" for b, s in shapes))


def _check_counts(rounds: int, warmup: int, inner: int, threads: int | None) -> None:
    """Fail on nonsense counts now, not after minutes of loading."""
    check_counts(warmup, rounds, inner)
    if threads is not None and threads < 1:
        raise BadInputError(f"threads must be >= 1, got {threads}")


def load_baseline(
    path: str | os.PathLike | None,
    max_regression: float | None,
    *,
    backend: str,
    device: str,
    shapes: Sequence[Shape],
    names: Sequence[str],
) -> tuple[dict[str, Any] | None, float | None]:
    """Load and check the baseline report before timing; return (report, max regression)."""
    if path is None:
        if max_regression is not None:
            raise BadInputError("a max regression needs a baseline report (--baseline)")
        return None, None
    baseline = load_report(path)
    config = baseline["config"]
    if (config["backend"], config["device"]) != (backend, device):
        raise BadInputError(
            f"baseline {path} ran {config['backend']} on {config['device']}, this run is {backend} on {device}: "
            "latencies are not comparable"
        )
    results = baseline["results"]
    shared = [k for k in map(shape_key, shapes) if k in results and set(names) & set(results[k]["variants"])]
    if not shared:
        raise BadInputError(f"baseline {path} shares no shape and model name with this run")
    return baseline, DEFAULT_MAX_REGRESSION if max_regression is None else max_regression


# ---------------------------------------------------------------- feeds


def shared_feed(metadatas: Sequence[Mapping[str, Any]], shape: Shape, seed: int) -> Feed:
    """One feed holding every input any variant takes, from a fixed seed.

    Token inputs are forced to (batch, sequence) even where a graph declares
    fixed dims, so a graph that cannot take the shape is caught by
    `check_feed` instead of being silently fed another shape. They come first
    so their random draws never depend on which other inputs a graph has.
    """
    specs: dict[str, Any] = {}
    for meta in metadatas:
        for name, (dtype, dims) in meta.items():
            specs.setdefault(name, (dtype, ("batch", "sequence") if name in TOKEN_INPUTS else dims))
    ordered = dict(sorted(specs.items(), key=lambda item: item[0] not in TOKEN_INPUTS))
    return sample_inputs(ordered, batch=shape[0], seq=shape[1], seed=seed)


def variant_feed(variant: Variant, shared: Feed, batch: int) -> Feed:
    """The arrays `variant` takes, shared by name (same objects), plus its extra inputs."""
    feed = {name: shared[name] for name in variant.runner.input_metadata() if name in shared}
    feed.update(variant.extra_inputs(batch))
    return feed


def _run_errors() -> tuple[type[BaseException], ...]:
    """What a backend raises when a model cannot run a feed (not our own bugs)."""
    return ort_errors() + (RuntimeError, ValueError, IndexError)


def _runs(bind: Callable[[Feed], Callable[[], None]], feed: Feed) -> bool:
    try:
        bind(feed)()
    except _run_errors():
        return False
    return True


def first_call(variant: Variant, feed: Feed, key: str) -> Callable[[], None]:
    """Bind and run once; a failure becomes one line blaming the adapter or the model."""
    try:
        call = variant.bind(feed)
        call()
        return call
    except LoraDeployError:
        raise
    except _run_errors() as err:
        where = f"model {variant.name!r} ({variant.path})"
        if variant.adapter is not None and variant.bind_plain is not None and _runs(variant.bind_plain, feed):
            raise BadInputError(f"adapter {variant.adapter} does not fit {where}: {_error_line(err)}") from err
        raise BadInputError(f"{where} cannot run shape {key}: {_error_line(err)}") from err


def prepare_shape(variants: Mapping[str, Variant], shape: Shape, seed: int) -> dict[str, Callable[[], None]]:
    """Timed calls for one shape, each validated by one inference."""
    key = shape_key(shape)
    shared = shared_feed([v.runner.input_metadata() for v in variants.values()], shape, seed)
    calls = {}
    for name, variant in variants.items():
        feed = variant_feed(variant, shared, shape[0])
        try:
            check_feed(feed, variant.runner.input_metadata())
        except BadInputError as err:
            raise BadInputError(f"shape {key} does not fit model {name!r} ({variant.path}): {err}") from err
        calls[name] = first_call(variant, feed, key)
    return calls


# ---------------------------------------------------------------- measuring


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No garbage-collector pauses inside timed rounds (as timeit does)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch.set_num_threads for the run, restored afterwards (it is process-global)."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_shapes(
    calls: Mapping[str, Mapping[str, Callable[[], None]]],
    *,
    rounds: int,
    warmup: int,
    inner: int,
    progress: BenchProgress | None = None,
) -> dict[str, dict[str, list[float]]]:
    """{shape key: {variant: seconds per round}}, each shape interleaved across variants."""
    results = {}
    for key, shape_calls in calls.items():
        tick = None if progress is None else (lambda i, n, key=key: progress(key, i + 1, n))
        with _gc_paused():
            results[key] = measure_interleaved(shape_calls, warmup=warmup, rounds=rounds, inner=inner, progress=tick)
    return results


def _open_variants(
    models: Mapping[str, Path], adapters: Mapping[str, Path], backend: str, device: str,
    threads: int | None, options: Mapping[str, Any],
) -> dict[str, Variant]:
    """Open every variant, closing the ones already open if one fails."""
    variants: dict[str, Variant] = {}
    try:
        for name, path in models.items():
            variants[name] = make_runner(name, path, backend, device, threads, adapters.get(name), **options)
    except BaseException:
        for variant in variants.values():
            variant.close()
        raise
    return variants


def run_bench(
    models: Mapping[str, str | os.PathLike],
    *,
    adapters: Mapping[str, str | os.PathLike] | None = None,
    backend: str = "onnxruntime",
    device: str = "cpu",
    shapes: str | Sequence[Shape] = DEFAULT_SHAPES,
    reference: str | None = None,
    threads: int | None = None,
    rounds: int = 50,
    warmup: int = 5,
    inner: int = 1,
    seed: int = 0,
    max_overhead: float | str | None = None,
    baseline_path: str | os.PathLike | None = None,
    max_regression: float | str | None = None,
    cuda_graphs: bool = False,
    progress: BenchProgress | None = None,
) -> dict[str, Any]:
    """Measure every model at every shape and return a validated bench report.

    Does not write files and does not raise for failed gates: see `bench`,
    `write_outputs` and `check_gates`. Limits are fractions or percent
    strings ('2%'). Bad input of any kind raises BadInputError before timing.
    """
    models, adapters, reference = check_plan(models, adapters, backend, reference)
    if device not in DEVICES:
        raise BadInputError(f"unknown device {device!r}; choose {', '.join(DEVICES)}")
    if cuda_graphs and (backend, device) != ("torch", "cuda"):
        raise BadInputError("CUDA graphs need --backend torch --device cuda")
    shape_list = _as_shapes(shapes)
    _check_counts(rounds, warmup, inner, threads)
    max_overhead = _fraction(max_overhead)
    baseline, max_regression = load_baseline(
        baseline_path, _fraction(max_regression), backend=backend, device=device, shapes=shape_list, names=list(models)
    )
    # torch threads matter for the torch backend only; ORT sizes its own pool.
    with _torch_threads(threads if backend == "torch" else None):
        variants = _open_variants(models, adapters, backend, device, threads, {"cuda_graphs": cuda_graphs})
        try:
            # Every shape is validated before any is timed: a misfit fails in seconds.
            calls = {shape_key(s): prepare_shape(variants, s, seed) for s in shape_list}
            results = measure_shapes(calls, rounds=rounds, warmup=warmup, inner=inner, progress=progress)
            extra = {
                "models": {name: str(path) for name, path in models.items()},
                "adapters": {name: str(path) for name, path in adapters.items()},
                "variants": {name: v.details for name, v in variants.items()},
                "input_seed": seed,
                "cuda_graphs": cuda_graphs,
                "libraries": library_versions(_VERSIONED),
            }
            return build_report(
                results, backend=backend, device=device, reference=reference, rounds=rounds, warmup=warmup,
                inner=inner, threads=threads, max_overhead=max_overhead, baseline=baseline,
                max_regression=max_regression, extra_config=extra,
            )
        finally:
            for variant in variants.values():
                variant.close()


# ---------------------------------------------------------------- outputs


def _write_text(path: str | os.PathLike, text: str) -> Path:
    return write_file_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_outputs(
    report: Mapping[str, Any],
    *,
    json_path: str | os.PathLike | None = None,
    markdown_path: str | os.PathLike | None = None,
    plot_path: str | os.PathLike | None = None,
) -> list[Path]:
    """Write the requested files (each atomically); return their paths."""
    written = []
    if json_path is not None:
        written.append(write_json(report, json_path))
    if markdown_path is not None:
        written.append(_write_text(markdown_path, to_markdown(report)))
    if plot_path is not None:
        written.append(plot(report, plot_path))
    return written


def check_gates(report: Mapping[str, Any]) -> None:
    """Raise GateFailed (exit 1) naming every failed gate of the report."""
    enforce_gates(report_gates(report))


def bench(
    models: Mapping[str, str | os.PathLike],
    *,
    json_path: str | os.PathLike | None = None,
    markdown_path: str | os.PathLike | None = None,
    plot_path: str | os.PathLike | None = None,
    **options: Any,
) -> dict[str, Any]:
    """`run_bench`, then `write_outputs`, then `check_gates`: a failed gate leaves its evidence on disk."""
    report = run_bench(models, **options)
    write_outputs(report, json_path=json_path, markdown_path=markdown_path, plot_path=plot_path)
    check_gates(report)
    return report


@contextlib.contextmanager
def bench_progress(enabled: bool = True) -> Iterator[BenchProgress | None]:
    """A rich bar per shape on a terminal; None (no output) otherwise, e.g. in CI logs."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress("[bold]bench {task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        tasks: dict[str, Any] = {}

        def update(key: str, done: int, total: int) -> None:
            if key not in tasks:
                tasks[key] = bar.add_task(key, total=total)
            bar.update(tasks[key], completed=done)

        yield update
