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
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lora_deploy.backends import registry
from lora_deploy.backends.base import Feed, TimedModel, check_feed
from lora_deploy.backends.onnxrt.loader import error_line, ort_errors
from lora_deploy.bench.report import (
    Shape,
    build_report,
    config_mismatches,
    load_report,
    machine_info,
    parse_shapes,
    plot,
    report_gates,
    shape_key,
    to_markdown,
    write_json,
)
from lora_deploy.bench.stats import GateResult, check_on_inconclusive, enforce_gates, parse_percent
from lora_deploy.bench.timing import check_counts, measure_interleaved, measure_paced, parse_duration, parse_rate
from lora_deploy.errors import BadInputError, LoraDeployError
from lora_deploy.io.staging import check_output, write_file_atomic
from lora_deploy.modeling.samples import ATTENTION_MASK, INPUT_IDS, TOKEN_TYPE_IDS, sample_inputs
from lora_deploy.util import library_versions

# progress(shape key, rounds done, rounds in total), called after every round.
BenchProgress = Callable[[str, int, int], None]

DEFAULT_SHAPES = "1x1,1x128,8x128"
# Used when a baseline is given without an explicit --max-regression.
DEFAULT_MAX_REGRESSION = 0.05
# Control-loop mode: how long each shape runs when no --duration is given.
DEFAULT_DURATION_S = 30.0
# The variant --baseline-model adds: the previous artifact, timed in the same run.
PREVIOUS = "previous"
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
    shapes: Sequence[Shape] | None,
    names: Sequence[str],
    config: Mapping[str, Any] | None = None,
    machine: Mapping[str, Any] | None = None,
    allow_mismatch: bool = False,
) -> tuple[dict[str, Any] | None, float | None]:
    """Load and check the baseline report before timing; return (report, max regression).

    A baseline from another backend or device is refused outright; one whose settings,
    machine or library versions differ from `config` / `machine` is refused unless
    `allow_mismatch`, and its gates are then inconclusive with the differences named.
    """
    if path is None:
        return None, max_regression
    baseline = load_report(path)
    there = baseline["config"]
    if (there["backend"], there["device"]) != (backend, device):
        raise BadInputError(
            f"baseline {path} ran {there['backend']} on {there['device']}, this run is {backend} on {device}: "
            "latencies are not comparable"
        )
    results = baseline["results"]
    if shapes is not None:
        shared = [k for k in map(shape_key, shapes) if k in results and set(names) & set(results[k]["variants"])]
        if not shared:
            raise BadInputError(f"baseline {path} shares no shape and model name with this run")
    if config is not None and machine is not None and not allow_mismatch:
        diffs = config_mismatches(config, machine, baseline)
        if diffs:
            raise BadInputError(
                f"baseline {path} was measured under another configuration ({'; '.join(diffs)}): "
                "latencies are not comparable; re-record it, or pass --allow-mismatch to compare anyway "
                "(every gate is then inconclusive)"
            )
    return baseline, DEFAULT_MAX_REGRESSION if max_regression is None else max_regression


# ---------------------------------------------------------------- feeds


def _canonical(dtype: Any) -> np.dtype | None:
    """The dtype values are drawn in: float32 for every float, int64 for every integer,
    so float16 and float32 variants (or int32 and int64 ones) get the same values."""
    if dtype is None:
        return None
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.floating):
        return np.dtype(np.float32)
    if np.issubdtype(dtype, np.integer):
        return np.dtype(np.int64)
    return dtype


def _resolve_dims(name: str, dims: Any, shape: Shape) -> tuple[tuple[int, ...], bool]:
    """Concrete dims for one input at a requested shape, and whether one of them is the
    sequence length. Token inputs are forced to (batch, sequence) even where a graph
    declares fixed dims, so a graph that cannot take the shape is caught by `check_feed`
    instead of being fed another shape. Elsewhere fixed dims stay; a dynamic dim on axis
    0, or named like "batch", is the batch; any other dynamic dim the sequence."""
    batch, seq = shape
    if name in TOKEN_INPUTS or dims is None:
        return (batch, seq), True
    out, uses_seq = [], False
    for axis, dim in enumerate(dims):
        if isinstance(dim, (int, np.integer)) and dim >= 0:
            out.append(int(dim))
        elif axis == 0 or (isinstance(dim, str) and "batch" in dim.lower()):
            out.append(batch)
        else:
            out.append(seq)
            uses_seq = True
    return tuple(out), uses_seq


def _draw(name: str, dtype: np.dtype | None, dims: tuple[int, ...], shape: Shape, seed: int) -> np.ndarray:
    """One input's values, seeded by (seed, name) alone: the same whichever other inputs
    a variant has or in which order they come."""
    own_seed = (seed * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % 2**32
    return sample_inputs({name: (dtype, dims)}, batch=shape[0], seq=shape[1], seed=own_seed)[name]


def load_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """`--inputs FILE.npz`: {input name: array}, never unpickling anything."""
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            arrays = {name: np.ascontiguousarray(data[name]) for name in data.files}
    except (OSError, ValueError, EOFError) as err:
        raise BadInputError(f"--inputs {path}: not a readable .npz of plain arrays ({error_line(err)})") from err
    if not arrays:
        raise BadInputError(f"--inputs {path}: holds no arrays")
    for name, arr in arrays.items():
        if arr.ndim == 0 or arr.dtype.kind not in "biuf":
            raise BadInputError(
                f"--inputs {path}: {name!r} must be a numeric array of rank >= 1, got {arr.dtype} {arr.shape}"
            )
    return arrays


def shape_of_inputs(arrays: Mapping[str, np.ndarray]) -> Shape:
    """(batch, seq) of supplied inputs: axis 0, and axis 1 of a token input (else of any
    input of rank >= 2, else 1)."""
    first = next(iter(arrays.values()))
    tokens = [a for n, a in arrays.items() if n in TOKEN_INPUTS and a.ndim == 2]
    wide = tokens or [a for a in arrays.values() if a.ndim >= 2]
    return int(first.shape[0]), int(wide[0].shape[1]) if wide else 1


def build_feeds(
    variants: Mapping[str, TimedModel],
    shape: Shape,
    seed: int,
    supplied: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, Feed], dict[str, dict[str, Any]]]:
    """Each variant's feed at `shape` from its own input types, and what it really gets.

    Values are drawn once per input name (in float32 / int64, `_canonical`) and cast to
    each variant's declared dtype, so float16 and float32 variants take the same numbers;
    variants of the same dtype share the very same arrays. `supplied` arrays (--inputs)
    replace drawn ones by name. The second result maps each variant to
    {"batch", "seq" (None when no input has a sequence axis), "tokens" (takes token
    inputs), "inputs" ({name: shape}), "source"}: what throughput is computed from.
    """
    supplied = supplied or {}
    drawn: dict[tuple, np.ndarray] = {}
    feeds: dict[str, Feed] = {}
    fed: dict[str, dict[str, Any]] = {}
    for vname, variant in variants.items():
        meta = variant.runner.input_metadata()
        ordered = sorted(meta.items(), key=lambda item: item[0] not in TOKEN_INPUTS)
        feed: Feed = {}
        uses_seq = False
        for name, (dtype, dims) in ordered:
            target = None if dtype is None else np.dtype(dtype)
            if name in supplied:
                base, key = supplied[name], ("file", name)
                uses_seq = uses_seq or (name in TOKEN_INPUTS and base.ndim == 2)
            else:
                concrete, seq_dim = _resolve_dims(name, dims, shape)
                uses_seq = uses_seq or seq_dim
                key = (name, _canonical(target), concrete)
                if key not in drawn:
                    drawn[key] = _draw(name, _canonical(target), concrete, shape, seed)
                base = drawn[key]
            if target is not None and base.dtype != target:
                cast_key = (*key, str(target))
                if cast_key not in drawn:
                    drawn[cast_key] = base.astype(target)
                base = drawn[cast_key]
            feed[name] = base
        ranked = [a for a in feed.values() if a.ndim >= 1]
        batch = int(ranked[0].shape[0]) if ranked else 1
        feed.update(variant.extra_inputs(batch))
        tokens = any(name in TOKEN_INPUTS for name in meta)
        token_arrays = [feed[n] for n in meta if n in TOKEN_INPUTS and feed[n].ndim == 2]
        seq = int(token_arrays[0].shape[1]) if token_arrays else (shape[1] if uses_seq else None)
        feeds[vname] = feed
        fed[vname] = {
            "batch": batch,
            "seq": seq,
            "tokens": tokens,
            "inputs": {name: list(arr.shape) for name, arr in feed.items()},
            "dtypes": {name: str(arr.dtype) for name, arr in feed.items()},
            "source": "file" if any(n in supplied for n in meta) else "generated",
        }
    return feeds, fed


def shared_feed(metadatas: Sequence[Mapping[str, Any]], shape: Shape, seed: int) -> Feed:
    """One feed holding every input the given metadata name (first declaration wins),
    drawn as `build_feeds` draws them."""
    feed: Feed = {}
    for meta in metadatas:
        for name, (dtype, dims) in meta.items():
            if name not in feed:
                concrete, _ = _resolve_dims(name, dims, shape)
                target = None if dtype is None else np.dtype(dtype)
                arr = _draw(name, _canonical(target), concrete, shape, seed)
                feed[name] = arr if target is None else arr.astype(target, copy=False)
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


def prepare_shape(
    variants: Mapping[str, TimedModel],
    shape: Shape,
    seed: int,
    supplied: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, Callable[[], None]], dict[str, dict[str, Any]]]:
    """Timed calls for one shape, each validated by one inference, and what each is fed.

    A variant whose graph fixes another batch than the one asked for is refused (it
    would run its own batch under the requested shape's name)."""
    key = shape_key(shape)
    feeds, fed = build_feeds(variants, shape, seed, supplied)
    calls = {}
    for name, variant in variants.items():
        feed = feeds[name]
        if fed[name]["batch"] != shape[0]:
            fixed = ", ".join(f"{n!r} {list(s)}" for n, s in fed[name]["inputs"].items())
            raise BadInputError(
                f"shape {key} does not fit model {name!r} ({variant.path}): its graph fixes batch "
                f"{fed[name]['batch']} (inputs {fixed}); ask for --shapes {fed[name]['batch']}x{shape[1]}"
            )
        try:
            check_feed(feed, variant.runner.input_metadata())
        except BadInputError as err:
            raise BadInputError(f"shape {key} does not fit model {name!r} ({variant.path}): {err}") from err
        calls[name] = first_call(variant, feed, key)
    return calls, fed


def _same_inputs(fed: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> None:
    """Refuse two requested shapes that feed every variant the very same inputs (a model
    with no sequence axis: 1x1 and 1x128 are one measurement under two names)."""
    seen: dict[tuple, str] = {}
    for key, variants in fed.items():
        signature = tuple(sorted((n, str(f["inputs"])) for n, f in variants.items()))
        if signature in seen:
            raise BadInputError(
                f"shapes {seen[signature]} and {key} feed every model the same inputs (no model takes a "
                "sequence length): list only one"
            )
        seen[signature] = key


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


def measure_loop(
    calls: Mapping[str, Mapping[str, Callable[[], None]]],
    *,
    rate_hz: float,
    duration_s: float,
    warmup: int,
    progress: BenchProgress | None = None,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, dict[str, list]]]]:
    """Control-loop mode: every shape paced for `duration_s` at `rate_hz`, ticks alternating
    between variants; returns ({shape: {variant: latencies}}, {shape: {variant: lag, misses}})."""
    results, loops = {}, {}
    for key, shape_calls in calls.items():
        ticks = max(1, int(round(duration_s * rate_hz / len(shape_calls))))
        tick = None if progress is None else (lambda i, n, key=key: progress(key, i + 1, n))
        with _gc_paused():
            paced = measure_paced(shape_calls, rate_hz=rate_hz, ticks=ticks, warmup=warmup, progress=tick)
        results[key] = {name: r["latency_s"] for name, r in paced.items()}
        loops[key] = {name: {"lag_s": r["lag_s"], "miss": r["miss"]} for name, r in paced.items()}
    return results, loops


def _with_previous(
    models: Mapping[str, str | os.PathLike], baseline_model: str | os.PathLike | None, reference: str | None
) -> tuple[dict[str, str | os.PathLike], str | None]:
    """--baseline-model OLD: the previous artifact joins the run as the reference."""
    models = dict(models)
    if baseline_model is None:
        return models, reference
    if PREVIOUS in models:
        raise BadInputError(f"--baseline-model adds a model named {PREVIOUS!r}: rename the --model of that name")
    if reference not in (None, PREVIOUS):
        raise BadInputError(f"--baseline-model makes {PREVIOUS!r} the reference; drop --reference {reference}")
    return {PREVIOUS: baseline_model, **models}, PREVIOUS


def run_bench(
    models: Mapping[str, str | os.PathLike],
    *,
    adapters: Mapping[str, str | os.PathLike] | None = None,
    backend: str = "onnxruntime",
    device: str = "cpu",
    shapes: str | Sequence[Shape] | None = None,
    inputs_path: str | os.PathLike | None = None,
    reference: str | None = None,
    threads: int | None = None,
    rounds: int = 50,
    warmup: int = 5,
    inner: int = 1,
    seed: int = 0,
    max_overhead: float | str | None = None,
    baseline_model: str | os.PathLike | None = None,
    baseline_path: str | os.PathLike | None = None,
    max_regression: float | str | None = None,
    run_margin: float | str | None = None,
    allow_mismatch: bool = False,
    on_inconclusive: str = "warn",
    rate: str | float | None = None,
    duration: str | float | None = None,
    max_p99: str | float | None = None,
    max_misses: int | None = None,
    cuda_graphs: bool = False,
    progress: BenchProgress | None = None,
) -> dict[str, Any]:
    """Measure every model at every shape and return a validated bench report.

    Does not write files and does not raise for failed gates: see `bench`,
    `write_outputs` and `check_gates`. Limits are fractions or percent
    strings ('2%'). Bad input of any kind raises BadInputError before timing.

    `shapes` defaults to 1x1,1x128,8x128; `inputs_path` (an .npz) supplies the inputs
    instead, and its arrays' shape is the one shape. `baseline_model` times the previous
    artifact as the reference in the same interleaved run and gates every variant
    against it with `max_regression` (default 5%): the recommended regression gate.
    `baseline_path` (a saved report) gates against an earlier run, allowing
    `run_margin` (default report.DEFAULT_RUN_MARGIN) for the drift between runs and
    refusing a baseline of another configuration unless `allow_mismatch`.
    `on_inconclusive` (pass | warn | fail) decides what a gate that cannot decide does.
    `rate` ('100hz') switches to the control-loop mode: each shape paced for `duration`
    ('30s'), gated by `max_p99` ('8ms') and `max_misses`.
    """
    models, reference = _with_previous(models, baseline_model, reference)
    models, adapters, reference = check_plan(models, adapters, backend, reference)
    if device not in registry.DEVICES:
        raise BadInputError(f"unknown device {device!r}; choose {', '.join(registry.DEVICES)}")
    if cuda_graphs and (backend, device) != ("torch", "cuda"):
        raise BadInputError("CUDA graphs need --backend torch --device cuda")
    check_on_inconclusive(on_inconclusive)
    supplied = None
    if inputs_path is not None:
        if shapes is not None:
            raise BadInputError("--inputs fixes the shape (its arrays'); drop --shapes")
        supplied = load_inputs(inputs_path)
        shape_list = [shape_of_inputs(supplied)]
    else:
        shape_list = _as_shapes(DEFAULT_SHAPES if shapes is None else shapes)
    _check_counts(rounds, warmup, inner, threads)
    max_overhead = _fraction(max_overhead)
    max_regression = _fraction(max_regression)
    run_margin = _fraction(run_margin)
    if baseline_model is not None and max_overhead is not None:
        raise BadInputError("--baseline-model gates with --max-regression; --max-overhead would gate the same pairs")
    if max_regression is not None and baseline_path is None and baseline_model is None:
        raise BadInputError("a max regression needs a baseline report (--baseline) or --baseline-model")
    if run_margin is not None and baseline_path is None:
        raise BadInputError("--run-margin is the allowance between a saved baseline and this run: it needs --baseline")
    if baseline_model is not None and max_regression is None:
        max_regression = DEFAULT_MAX_REGRESSION
    rate_hz = None if rate is None else parse_rate(rate)
    if rate_hz is None and (duration is not None or max_p99 is not None or max_misses is not None):
        raise BadInputError("--duration, --max-p99 and --max-misses belong to the control-loop mode: add --rate")
    duration_s = DEFAULT_DURATION_S if duration is None else parse_duration(duration)
    max_p99_s = None if max_p99 is None else parse_duration(max_p99, "p99 budget")
    if max_misses is not None and max_misses < 0:
        raise BadInputError(f"max misses must be >= 0, got {max_misses}")
    machine = machine_info(threads)
    here = {
        "backend": backend,
        "device": device,
        "threads": threads,
        "inner": None if rate_hz else inner,
        "rate_hz": rate_hz,
    }
    baseline, max_regression = load_baseline(
        baseline_path,
        max_regression,
        backend=backend,
        device=device,
        shapes=shape_list,
        names=list(models),
        config=here,
        machine=machine,
        allow_mismatch=allow_mismatch,
    )
    # torch threads matter for the torch backend only; ORT sizes its own pool.
    with _torch_threads(threads if backend == "torch" else None):
        variants = _open_variants(models, adapters, backend, device, threads, {"cuda_graphs": cuda_graphs})
        try:
            # Every shape is validated before any is timed: a misfit fails in seconds.
            calls, fed = {}, {}
            for shape in shape_list:
                key = shape_key(shape)
                calls[key], fed[key] = prepare_shape(variants, shape, seed, supplied)
            _same_inputs(fed)
            if baseline is not None and not allow_mismatch:
                _check_fed_against(baseline, baseline_path, fed)
            loop = None
            if rate_hz is None:
                results = measure_shapes(calls, rounds=rounds, warmup=warmup, inner=inner, progress=progress)
            else:
                results, shapes_loop = measure_loop(
                    calls, rate_hz=rate_hz, duration_s=duration_s, warmup=warmup, progress=progress
                )
                loop = {"rate_hz": rate_hz, "shapes": shapes_loop}
            extra = {
                "models": {name: str(path) for name, path in models.items()},
                "adapters": {name: str(path) for name, path in adapters.items()},
                "variants": {name: v.details for name, v in variants.items()},
                "input_seed": seed,
                "inputs": None if inputs_path is None else str(inputs_path),
                "duration_s": duration_s if rate_hz else None,
                "cuda_graphs": cuda_graphs,
                "libraries": library_versions(_VERSIONED),
            }
            return build_report(
                results,
                backend=backend,
                device=device,
                reference=reference,
                rounds=None if rate_hz else rounds,
                warmup=warmup,
                inner=None if rate_hz else inner,
                threads=threads,
                max_overhead=max_overhead,
                baseline=baseline,
                max_regression=max_regression,
                machine=machine,
                extra_config=extra,
                fed=fed,
                loop=loop,
                on_inconclusive=on_inconclusive,
                run_margin=run_margin,
                baseline_path=baseline_path,
                baseline_model=None if baseline_model is None else str(baseline_model),
                max_p99=max_p99_s,
                max_misses=max_misses,
            )
        finally:
            for variant in variants.values():
                variant.close()


def _check_fed_against(
    baseline: Mapping[str, Any], path: Any, fed: Mapping[str, Mapping[str, Mapping[str, Any]]]
) -> None:
    """Refuse a saved baseline whose shared shapes fed other inputs (a static graph then,
    a dynamic one now; another dtype) unless --allow-mismatch."""
    diffs = []
    for key, variants in fed.items():
        base_variants = (baseline["results"].get(key) or {}).get("variants", {})
        for name, now in variants.items():
            there = base_variants.get(name, {}).get("fed")
            if there is not None and there.get("inputs") != now["inputs"]:
                diffs.append(f"{key}/{name} fed {there.get('inputs')} then, {now['inputs']} now")
    if diffs:
        raise BadInputError(
            f"baseline {path} fed other inputs ({'; '.join(diffs)}): latencies are not comparable; "
            "pass --allow-mismatch to compare anyway (those gates are then inconclusive)"
        )


# ---------------------------------------------------------------- outputs


def _write_text(path: str | os.PathLike, text: str, **policy: Any) -> Path:
    return write_file_atomic(path, lambda f: f.write(text.encode("utf-8")), **policy)


def bench_inputs(options: Mapping[str, Any], models: Mapping[str, str | os.PathLike]) -> list:
    """Every file or directory a bench run reads: models, adapters, baselines, inputs."""
    adapters = options.get("adapters") or {}
    extra = [options.get(k) for k in ("baseline_path", "baseline_model", "inputs_path")]
    return [*models.values(), *adapters.values(), *extra]


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


def inconclusive_gates(report: Mapping[str, Any]) -> list[GateResult]:
    """The gates that could not decide (whatever --on-inconclusive made of them)."""
    return [g for g in report_gates(report) if not g.conclusive]


def check_gates(report: Mapping[str, Any]) -> None:
    """Raise GateFailed (exit 1) naming every failed gate of the report (with
    --on-inconclusive fail, inconclusive gates count as failed)."""
    enforce_gates(report_gates(report))


def bench(
    models: Mapping[str, str | os.PathLike],
    *,
    json_path: str | os.PathLike | None = None,
    markdown_path: str | os.PathLike | None = None,
    plot_path: str | os.PathLike | None = None,
    show: Callable[[dict[str, Any]], None] | None = None,
    warn: Callable[[str], None] | None = None,
    overwrite: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """`run_bench`, then `write_outputs`, then `show(report)`, then `check_gates`: a failed
    gate leaves its evidence on disk and on screen. With on_inconclusive="warn" (the
    default) every inconclusive gate's message goes to `warn` first.

    The files are checked against the output policy before any timing: an existing one
    is replaced only with overwrite, and none may be a model, adapter or baseline."""
    outputs = {"json_path": json_path, "markdown_path": markdown_path, "plot_path": plot_path}
    inputs = bench_inputs(options, models)
    check_outputs(outputs.values(), inputs, overwrite)
    report = run_bench(models, **options)
    write_outputs(report, **outputs, overwrite=overwrite, inputs=inputs)
    if show is not None:
        show(report)
    if warn is not None and report["config"].get("on_inconclusive") == "warn":
        for gate in inconclusive_gates(report):
            warn(gate.message)
    check_gates(report)
    return report
