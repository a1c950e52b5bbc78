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
import time
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
    noise_summary,
    parse_shapes,
    plot,
    report_gates,
    shape_key,
    to_markdown,
    write_json,
)
from lora_deploy.bench.stats import (
    GateResult,
    check_on_inconclusive,
    enforce_gates,
    more_rounds,
    parse_percent,
    widest_interval,
)
from lora_deploy.bench.timing import check_counts, measure_interleaved, measure_paced, parse_duration, parse_rate
from lora_deploy.errors import BadInputError, LoraDeployError
from lora_deploy.io.staging import check_output, write_file_atomic
from lora_deploy.modeling.samples import ATTENTION_MASK, INPUT_IDS, TOKEN_TYPE_IDS, sample_inputs
from lora_deploy.modeling.tasks import PAST_PREFIX
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
# Adaptive rounds (--until-width): the time budget when no --max-time is given, the most
# rounds one shape may reach, and the bootstrap resamples of each width check (the
# report's own intervals use the full count).
DEFAULT_MAX_TIME_S = 120.0
MAX_ADAPTIVE_ROUNDS = 10_000
WIDTH_CHECK_RESAMPLES = 1000
# --noise-runs: fewer runs leave the prediction bound too wide to be of use (t = 12.7 for 2).
MIN_NOISE_RUNS = 3
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
    module: str | None = None,
) -> tuple[dict[str, Path], dict[str, Path], str]:
    """Validate names and paths before loading anything; return (models, adapters, reference).

    The reference defaults to 'base' when there is one, else the first model. With
    `module` (the factory form, torch only) every model path is a checkpoint for it.
    """
    spec = registry.get(backend)
    if not models:
        raise BadInputError("no models given: pass --model NAME=PATH at least once")
    models = {name: Path(p) for name, p in models.items()}
    adapters = {name: Path(p) for name, p in (adapters or {}).items()}
    for name, path in models.items():
        if not _NAME_RE.match(name):
            raise BadInputError(f"bad model name {name!r}: use letters, digits and _ . + - only")
        registry.check_model(path, backend, name, module)
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
    return parse_shapes(",".join(shape_key(shape) for shape in shapes))


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
    if shapes is not None:
        check_shared(baseline, path, shapes, names)
    if config is not None and machine is not None and not allow_mismatch:
        diffs = config_mismatches(config, machine, baseline)
        if diffs:
            raise BadInputError(
                f"baseline {path} was measured under another configuration ({'; '.join(diffs)}): "
                "latencies are not comparable; re-record it, or pass --allow-mismatch to compare anyway "
                "(every gate is then inconclusive)"
            )
    return baseline, DEFAULT_MAX_REGRESSION if max_regression is None else max_regression


def check_shared(baseline: Mapping[str, Any], path: Any, shapes: Sequence[Shape], names: Sequence[str]) -> None:
    """Refuse a baseline that shares no shape and model name with this run."""
    results = baseline["results"]
    shared = [k for k in map(shape_key, shapes) if k in results and set(names) & set(results[k]["variants"])]
    if not shared:
        raise BadInputError(f"baseline {path} shares no shape and model name with this run")


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
    0, or named like "batch", is the batch; any other dynamic dim the sequence.

    A decode shape (batch, seq, past) feeds a KV-cache graph: a dynamic dim named like
    "past" (past_key_values.* [batch, heads, past_sequence, head_size]) is the past
    length, and the attention mask covers past + new tokens."""
    batch, seq = shape[0], shape[1]
    past = shape[2] if len(shape) > 2 else 0
    if name == ATTENTION_MASK:
        return (batch, past + seq), True
    if name in TOKEN_INPUTS or dims is None:
        return (batch, seq), True
    out, uses_seq = [], False
    for axis, dim in enumerate(dims):
        if isinstance(dim, (int, np.integer)) and dim >= 0:
            out.append(int(dim))
        elif axis == 0 or (isinstance(dim, str) and "batch" in dim.lower()):
            out.append(batch)
        elif isinstance(dim, str) and "past" in dim.lower():
            out.append(past)
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
    source: str = "file",
) -> tuple[dict[str, Feed], dict[str, dict[str, Any]]]:
    """Each variant's feed at `shape` from its own input types, and what it really gets.

    Values are drawn once per input name (in float32 / int64, `_canonical`) and cast to
    each variant's declared dtype, so float16 and float32 variants take the same numbers;
    variants of the same dtype share the very same arrays. `supplied` arrays (--inputs)
    replace drawn ones by name. The second result maps each variant to
    {"batch", "seq" (None when no input has a sequence axis), "tokens" (takes token
    inputs), "inputs" ({name: shape}), "source"}: what throughput is computed from;
    "source" is `source` ("file": --inputs, "example": the modules' example_inputs())
    when supplied arrays were used, else "generated".
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
        # New tokens per row: input_ids' width (a KV-cache graph's mask also spans the past).
        token_arrays = [feed[n] for n in sorted(meta, key=lambda n: n != INPUT_IDS) if n in TOKEN_INPUTS]
        token_arrays = [a for a in token_arrays if a.ndim == 2]
        seq = int(token_arrays[0].shape[1]) if token_arrays else (shape[1] if uses_seq else None)
        past = past_length(meta, feed)
        feeds[vname] = feed
        fed[vname] = {
            "batch": batch,
            "seq": seq,
            **({"past": past} if past is not None else {}),
            "tokens": tokens,
            "inputs": {name: list(arr.shape) for name, arr in feed.items()},
            "dtypes": {name: str(arr.dtype) for name, arr in feed.items()},
            "source": source if any(n in supplied for n in meta) else "generated",
        }
    return feeds, fed


def past_length(meta: Mapping[str, Any], feed: Feed) -> int | None:
    """The cached tokens a KV-cache graph is fed (axis 2 of its past_key_values.* inputs);
    None for a graph without a cache."""
    pasts = [n for n in meta if n.startswith(PAST_PREFIX) and n in feed and feed[n].ndim == 4]
    return int(feed[pasts[0]].shape[2]) if pasts else None


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
    source: str = "file",
) -> tuple[dict[str, Callable[[], None]], dict[str, dict[str, Any]]]:
    """Timed calls for one shape, each validated by one inference, and what each is fed.

    A variant whose graph fixes another batch than the one asked for is refused (it
    would run its own batch under the requested shape's name)."""
    key = shape_key(shape)
    feeds, fed = build_feeds(variants, shape, seed, supplied, source)
    calls = {}
    for name, variant in variants.items():
        feed = feeds[name]
        if len(shape) > 2 and fed[name].get("past") is None:
            raise BadInputError(
                f"shape {key} is a decode step ({shape[1]} new token(s) after {shape[2]} cached): model {name!r} "
                f"({variant.path}) takes no {PAST_PREFIX}* inputs; export it with --task text-generation-with-past"
            )
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


def measure_adaptive(
    calls: Mapping[str, Mapping[str, Callable[[], None]]],
    *,
    rounds: int,
    warmup: int,
    inner: int,
    reference: str,
    until_width: float,
    max_time_s: float,
    own: bool = False,
    progress: BenchProgress | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, Any]]:
    """`measure_shapes`, then more rounds for every shape whose widest interval
    (`stats.widest_interval`; `own`: each variant's own median counts too) is wider than
    `until_width`, until none is or `max_time_s` (counted from the start, warm-up included)
    is spent. Added rounds are whole interleaved rounds continuing the rotation, after one
    untimed call per variant (the shape was cold while the others ran), so pairing and
    balance are those of one long run. Returns (results, what happened: per shape its
    rounds and final width, and why the run stopped)."""
    start = clock()
    results = measure_shapes(calls, rounds=rounds, warmup=warmup, inner=inner, progress=progress)
    stopped = "narrow"
    with _gc_paused():  # once for all the added rounds: a collection can take a second in a big process
        while True:
            widths = {
                key: widest_interval(samples, reference, own=own, resamples=WIDTH_CHECK_RESAMPLES)
                for key, samples in results.items()
            }
            wide = [key for key, (width, _) in widths.items() if width > until_width]
            if not wide:
                stopped = "narrow"
                break
            added = 0
            for key in wide:
                done = len(next(iter(results[key].values())))
                # What one more round costs, from this shape's own samples.
                per_round = inner * sum(float(np.mean(v)) for v in results[key].values())
                left = max_time_s - (clock() - start)
                fits = int(left // per_round) if per_round > 0 else MAX_ADAPTIVE_ROUNDS
                step = min(more_rounds(done, widths[key][0], until_width), fits, MAX_ADAPTIVE_ROUNDS - done)
                if step < 1:
                    stopped = "time" if done < MAX_ADAPTIVE_ROUNDS else "rounds"
                    continue
                tick = None
                if progress is not None:
                    tick = lambda i, n, key=key, done=done: progress(key, done + i + 1, done + n)
                more = measure_interleaved(
                    calls[key], warmup=min(warmup, 1), rounds=step, inner=inner, progress=tick, first_round=done
                )
                for name, values in more.items():
                    results[key][name].extend(values)
                added += step
            if not added:
                break
    elapsed = clock() - start
    widest_key = max(widths, key=lambda k: widths[k][0])
    width, what = widths[widest_key]
    reason = {
        "narrow": f"every interval at most {until_width:.1%} wide",
        "time": f"the {max_time_s:g} s budget ran out with {widest_key}: {what} {width:.1%} wide",
        "rounds": f"{MAX_ADAPTIVE_ROUNDS} rounds reached with {widest_key}: {what} {width:.1%} wide",
    }[stopped]
    return results, {
        "until_width": until_width,
        "max_time_s": max_time_s,
        "initial_rounds": rounds,
        "stopped": stopped,
        "reason": reason,
        "elapsed_s": elapsed,
        "shapes": {
            key: {"rounds": len(next(iter(results[key].values()))), "width": w, "widest": what}
            for key, (w, what) in widths.items()
        },
    }


def concat_runs(runs: Sequence[Mapping[str, Mapping[str, Sequence[float]]]]) -> dict[str, dict[str, list[float]]]:
    """The rounds of repeated runs one after another (each round stays a pair)."""
    return {key: {name: [x for run in runs for x in run[key][name]] for name in runs[0][key]} for key in runs[0]}


def declared_inputs(variants: Mapping[str, TimedModel], module: str | None) -> dict[str, np.ndarray] | None:
    """The inputs plain modules declare for themselves (example_inputs(); the first
    declaration of a name wins), or None. A plain module that declares neither them nor
    input_metadata() cannot be fed generated inputs: that is refused here."""
    examples: dict[str, np.ndarray] = {}
    for variant in variants.values():
        for name, arr in (variant.example_feed or {}).items():
            examples.setdefault(name, arr)
    if examples:
        return examples
    if module is not None:
        blind = [n for n, v in variants.items() if all(m == (None, None) for m in v.runner.input_metadata().values())]
        if blind:
            raise BadInputError(
                f"model {blind[0]!r} (--module {module}) declares no inputs: pass --inputs FILE.npz (arrays named "
                "like forward's arguments), or give the module example_inputs() (or input_metadata() for --shapes)"
            )
    return None


def run_bench(
    models: Mapping[str, str | os.PathLike],
    *,
    adapters: Mapping[str, str | os.PathLike] | None = None,
    backend: str = "onnxruntime",
    device: str = "cpu",
    module: str | None = None,
    shapes: str | Sequence[Shape] | None = None,
    inputs_path: str | os.PathLike | None = None,
    reference: str | None = None,
    threads: int | None = None,
    rounds: int = 50,
    warmup: int = 5,
    inner: int = 1,
    seed: int = 0,
    until_width: float | str | None = None,
    max_time: str | float | None = None,
    max_overhead: float | str | None = None,
    baseline_model: str | os.PathLike | None = None,
    baseline_path: str | os.PathLike | None = None,
    max_regression: float | str | None = None,
    run_margin: float | str | None = None,
    allow_mismatch: bool = False,
    noise_runs: int | None = None,
    on_inconclusive: str = "warn",
    rate: str | float | None = None,
    duration: str | float | None = None,
    max_p99: str | float | None = None,
    max_misses: int | None = None,
    cuda_graphs: bool = False,
    provider: str | None = None,
    trt_fp16: bool = False,
    trt_cache: str | os.PathLike | None = None,
    progress: BenchProgress | None = None,
) -> dict[str, Any]:
    """Measure every model at every shape and return a validated bench report.

    Does not write files and does not raise for failed gates: see `bench`,
    `write_outputs` and `check_gates`. Limits are fractions or percent
    strings ('2%'). Bad input of any kind raises BadInputError before timing.

    `module` ("package.module:factory", torch only) makes every model path a checkpoint
    loaded into the module that factory returns (modeling.factory). `shapes` defaults to
    1x1,1x128,8x128; `inputs_path` (an .npz) supplies the inputs instead, and its
    arrays' shape is the one shape; with `module` and neither, the modules' own
    example_inputs() are used when they declare them. `until_width` ('1%') keeps adding
    rounds until every interval the gates decide on is at most that wide (relative), or
    `max_time` ('120s', the default budget) is spent; `rounds` is then the minimum.
    `baseline_model` times the previous artifact as the reference in the same
    interleaved run and gates every variant against it with `max_regression` (default
    5%): the recommended regression gate. `baseline_path` (a saved report) gates against
    an earlier run, allowing `run_margin` (default: the baseline's own noise floor when
    it recorded one, never below report.DEFAULT_RUN_MARGIN) for the drift between runs
    and refusing a baseline of another configuration unless `allow_mismatch`.
    `noise_runs` (>= 3) repeats the whole measurement that many times, every model
    reopened in between, and records the spread of their medians (report["noise"]) so a
    later comparison against this report as a baseline is calibrated by it.
    `on_inconclusive` (pass | warn | fail) decides what a gate that cannot decide does.
    `rate` ('100hz') switches to the control-loop mode: each shape paced for `duration`
    ('30s'), gated by `max_p99` ('8ms') and `max_misses`.
    `provider` (cuda | tensorrt), `trt_fp16` and `trt_cache`: ONNX Runtime's GPU providers
    with device cuda (backends/onnxrt/gpu.py); each variant records where it really ran.
    """
    models, reference = _with_previous(models, baseline_model, reference)
    models, adapters, reference = check_plan(models, adapters, backend, reference, module)
    if device not in registry.DEVICES:
        raise BadInputError(f"unknown device {device!r}; choose {', '.join(registry.DEVICES)}")
    if cuda_graphs and (backend, device) != ("torch", "cuda"):
        raise BadInputError("CUDA graphs need --backend torch --device cuda")
    ort_gpu = {"provider": provider, "trt_fp16": trt_fp16, "trt_cache": trt_cache}
    factory_options = {"cuda_graphs": cuda_graphs, "module": module, **ort_gpu}
    if backend == "onnxruntime":
        from lora_deploy.backends.onnxrt import gpu

        gpu.require_providers(gpu.choose(device, provider, trt_fp16, trt_cache))  # one line, before any work
    elif provider or trt_fp16 or trt_cache is not None:
        raise BadInputError("--provider, --trt-fp16 and --trt-cache are ONNX Runtime's: use --backend onnxruntime")
    check_on_inconclusive(on_inconclusive)
    supplied = None
    if inputs_path is not None:
        if shapes is not None:
            raise BadInputError("--inputs fixes the shape (its arrays'); drop --shapes")
        supplied = load_inputs(inputs_path)
        shape_list: list[Shape] | None = [shape_of_inputs(supplied)]
    elif shapes is None and module is not None:
        shape_list = None  # the modules' example_inputs() decide, once they are built
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
    width, max_time_s = _adaptive_settings(until_width, max_time, rate_hz, noise_runs)
    if noise_runs is not None and (noise_runs < MIN_NOISE_RUNS or rate_hz is not None):
        raise BadInputError(
            f"--noise-runs must be >= {MIN_NOISE_RUNS}, got {noise_runs}"
            if rate_hz is None
            else "--noise-runs records a baseline's rounds; the control-loop mode (--rate) has none"
        )
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
    source = "file"
    # torch threads matter for the torch backend only; ORT sizes its own pool.
    with _torch_threads(threads if backend == "torch" else None):
        opened = [_open_variants(models, adapters, backend, device, threads, factory_options)]
        try:
            variants = opened[-1]
            if shape_list is None:
                supplied, source = declared_inputs(variants, module), "example"
                shape_list = _as_shapes(DEFAULT_SHAPES) if supplied is None else [shape_of_inputs(supplied)]
                if baseline is not None:
                    check_shared(baseline, baseline_path, shape_list, list(models))
            elif supplied is None:
                declared_inputs(variants, module)  # --shapes: a plain module must say what it takes

            def prepare(variants: Mapping[str, TimedModel]) -> tuple[dict, dict]:
                # Every shape is validated before any is timed: a misfit fails in seconds.
                calls, fed = {}, {}
                for shape in shape_list:
                    key = shape_key(shape)
                    calls[key], fed[key] = prepare_shape(variants, shape, seed, supplied, source)
                return calls, fed

            calls, fed = prepare(variants)
            _same_inputs(fed)
            if baseline is not None and not allow_mismatch:
                _check_fed_against(baseline, baseline_path, fed)
            loop = adaptive = noise = None
            measure = {"rounds": rounds, "warmup": warmup, "inner": inner}
            if rate_hz is not None:
                results, shapes_loop = measure_loop(
                    calls, rate_hz=rate_hz, duration_s=duration_s, warmup=warmup, progress=progress
                )
                loop = {"rate_hz": rate_hz, "shapes": shapes_loop}
            elif width is not None:
                own = baseline is not None
                results, adaptive = measure_adaptive(
                    calls,
                    **measure,
                    reference=reference,
                    until_width=width,
                    max_time_s=max_time_s,
                    own=own,
                    progress=progress,
                )
            elif noise_runs is not None:
                runs = []
                for run in range(noise_runs):
                    if run:  # a fresh open of every model: new sessions, new allocations, a later moment
                        for variant in opened[-1].values():
                            variant.close()
                        opened.append(
                            _open_variants(
                                models,
                                adapters,
                                backend,
                                device,
                                threads,
                                factory_options,
                            )
                        )
                        calls, _ = prepare(opened[-1])
                    runs.append(measure_shapes(calls, **measure, progress=_offset(progress, run, rounds, noise_runs)))
                results = concat_runs(runs)
                noise = noise_summary(runs, rounds)
            else:
                results = measure_shapes(calls, **measure, progress=progress)
            extra = {
                "models": {name: str(path) for name, path in models.items()},
                "adapters": {name: str(path) for name, path in adapters.items()},
                "variants": {name: v.details for name, v in opened[-1].items()},
                "input_seed": seed,
                "inputs": None if inputs_path is None else str(inputs_path),
                "module": module,
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
                adaptive=adaptive,
                noise=noise,
            )
        finally:
            for variant in opened[-1].values():
                variant.close()


def _adaptive_settings(
    until_width: float | str | None, max_time: str | float | None, rate_hz: float | None, noise_runs: int | None
) -> tuple[float | None, float]:
    """(target width or None, time budget in seconds) of --until-width / --max-time."""
    if until_width is None:
        if max_time is not None:
            raise BadInputError("--max-time is the budget of --until-width: add --until-width (e.g. 1%)")
        return None, DEFAULT_MAX_TIME_S
    width = _fraction(until_width)
    if not width:
        raise BadInputError("--until-width must be above 0, e.g. 1%")
    if rate_hz is not None:
        raise BadInputError("--until-width adds rounds; the control-loop mode (--rate) runs for --duration instead")
    if noise_runs is not None:
        raise BadInputError("--noise-runs records fixed rounds per run, to compare their medians: drop --until-width")
    return width, DEFAULT_MAX_TIME_S if max_time is None else parse_duration(max_time, "time budget")


def _offset(progress: BenchProgress | None, run: int, rounds: int, runs: int) -> BenchProgress | None:
    """Progress of repeat `run` as part of all `runs` repeats."""
    if progress is None:
        return None
    return lambda key, done, total: progress(key, run * rounds + done, runs * rounds)


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
    factory_file = str(options.get("module") or "").rpartition(":")[0]
    if factory_file.endswith(".py"):  # --module path/to/policy.py:build: its source is an input too
        extra.append(factory_file)
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
