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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lora_deploy.backends import registry
from lora_deploy.backends.base import Feed, TimedModel, check_feed
from lora_deploy.backends.onnxrt.loader import error_line, ort_errors
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
from lora_deploy.bench.stats import enforce_gates, parse_percent
from lora_deploy.bench.timing import check_counts, measure_interleaved
from lora_deploy.errors import BadInputError, LoraDeployError
from lora_deploy.io.staging import check_output, write_file_atomic
from lora_deploy.modeling.samples import ATTENTION_MASK, INPUT_IDS, TOKEN_TYPE_IDS, sample_inputs
from lora_deploy.util import library_versions

# progress(shape key, rounds done, rounds in total), called after every round.
BenchProgress = Callable[[str, int, int], None]

DEFAULT_SHAPES = "1x1,1x128,8x128"
# Used when a baseline is given without an explicit --max-regression.
DEFAULT_MAX_REGRESSION = 0.05
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
    spec = registry.get(backend)
    if not models:
        raise BadInputError("no models given: pass --model NAME=PATH at least once")
    models = {name: Path(p) for name, p in models.items()}
    adapters = {name: Path(p) for name, p in (adapters or {}).items()}
    for name, path in models.items():
        if not _NAME_RE.match(name):
            raise BadInputError(f"bad model name {name!r}: use letters, digits and _ . + - only")
        registry.check_path(path, spec.model, "model", name, backend)
    for name, path in adapters.items():
        if name not in models:
            raise BadInputError(
                f"adapter {name}={path}: there is no model named {name!r} (models: {', '.join(models)})"
            )
        registry.check_path(path, spec.adapter, "adapter", name, backend)
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


def variant_feed(variant: TimedModel, shared: Feed, batch: int) -> Feed:
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


def first_call(variant: TimedModel, feed: Feed, key: str) -> Callable[[], None]:
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
            raise BadInputError(f"adapter {variant.adapter} does not fit {where}: {error_line(err)}") from err
        raise BadInputError(f"{where} cannot run shape {key}: {error_line(err)}") from err


def prepare_shape(variants: Mapping[str, TimedModel], shape: Shape, seed: int) -> dict[str, Callable[[], None]]:
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
    models: Mapping[str, Path],
    adapters: Mapping[str, Path],
    backend: str,
    device: str,
    threads: int | None,
    options: Mapping[str, Any],
) -> dict[str, TimedModel]:
    """Open every variant, closing the ones already open if one fails."""
    variants: dict[str, TimedModel] = {}
    try:
        for name, path in models.items():
            variants[name] = registry.open_timed(name, path, backend, device, threads, adapters.get(name), **options)
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
    if device not in registry.DEVICES:
        raise BadInputError(f"unknown device {device!r}; choose {', '.join(registry.DEVICES)}")
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
                results,
                backend=backend,
                device=device,
                reference=reference,
                rounds=rounds,
                warmup=warmup,
                inner=inner,
                threads=threads,
                max_overhead=max_overhead,
                baseline=baseline,
                max_regression=max_regression,
                extra_config=extra,
            )
        finally:
            for variant in variants.values():
                variant.close()


# ---------------------------------------------------------------- outputs


def _write_text(path: str | os.PathLike, text: str, **policy: Any) -> Path:
    return write_file_atomic(path, lambda f: f.write(text.encode("utf-8")), **policy)


def bench_inputs(options: Mapping[str, Any], models: Mapping[str, str | os.PathLike]) -> list:
    """Every file or directory a bench run reads: models, adapters, the baseline."""
    adapters = options.get("adapters") or {}
    return [*models.values(), *adapters.values(), options.get("baseline_path")]


def check_outputs(
    paths: Iterable[str | os.PathLike | None], inputs: Iterable[str | os.PathLike | None], overwrite: bool
) -> None:
    """The output policy for every requested file, before any timing; two outputs may not share a path."""
    given = [Path(p) for p in paths if p is not None]
    inputs = list(inputs)
    seen: dict[Path, Path] = {}
    for path in given:
        check_output(path, inputs, overwrite)
        real = path.resolve()
        if real in seen:
            raise BadInputError(f"{path}: given for two outputs (also as {seen[real]})")
        seen[real] = path


def write_outputs(
    report: Mapping[str, Any],
    *,
    json_path: str | os.PathLike | None = None,
    markdown_path: str | os.PathLike | None = None,
    plot_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> list[Path]:
    """Write the requested files (each atomically); return their paths.

    An existing file is replaced only with overwrite, and none may be one of `inputs`
    (lora_deploy.io.staging.check_output)."""
    policy = {"overwrite": overwrite, "inputs": list(inputs)}
    check_outputs([json_path, markdown_path, plot_path], policy["inputs"], overwrite)
    written = []
    if json_path is not None:
        written.append(write_json(report, json_path, **policy))
    if markdown_path is not None:
        written.append(_write_text(markdown_path, to_markdown(report), **policy))
    if plot_path is not None:
        written.append(plot(report, plot_path, **policy))
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
    show: Callable[[dict[str, Any]], None] | None = None,
    overwrite: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """`run_bench`, then `write_outputs`, then `show(report)`, then `check_gates`: a failed
    gate leaves its evidence on disk and on screen.

    The files are checked against the output policy before any timing: an existing one
    is replaced only with overwrite, and none may be a model, adapter or baseline."""
    outputs = {"json_path": json_path, "markdown_path": markdown_path, "plot_path": plot_path}
    inputs = bench_inputs(options, models)
    check_outputs(outputs.values(), inputs, overwrite)
    report = run_bench(models, **options)
    write_outputs(report, **outputs, overwrite=overwrite, inputs=inputs)
    if show is not None:
        show(report)
    check_gates(report)
    return report
