"""The engine behind `lora-deploy bench`: measured proof that a merge costs nothing.

A bench run compares named variants of one model (base, merged, a dynamic
adapter graph, an unmerged LoRA) on the same machine, the same inputs and the
same thread settings. `run_bench` orchestrates; each step lives in its own module:

1. check every name, path and option before anything is loaded (`plan`,
   `shapes`, and each mode's own checks);
2. open one runner per variant through a backend registry (`backends.registry`),
   so a TensorRT backend can be added as one more entry;
3. for every shape build one feed from a fixed seed (identical arrays for all
   variants) and run each variant once, so a shape or adapter that does not
   fit fails with one line *before* any timing (`feeds`; `generation` for
   --generate);
4. time the variants: fixed interleaved rounds (`measure`), adaptive rounds
   (`adaptive`, --until-width), repeated runs (`noise`, --noise-runs) or a paced
   control loop (`control`, --rate); the rounds and the loop in K sessions per variant
   (`sessions`, --sessions: every variant reopened between them); then summarise and gate with
   `summary.build_report` (`gates` for baselines);
5. `write_outputs` puts JSON / Markdown / PNG on disk (`schema`, `report`) and only
   then `check_gates` raises GateFailed (exit 1), so the evidence for a failed gate
   is always kept.

`bench` does 1-5 in one call.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lora_deploy.backends import registry
from lora_deploy.backends.base import TimedModel
from lora_deploy.bench.adaptive import adaptive_settings, measure_adaptive
from lora_deploy.bench.control import loop_settings, measure_loop
from lora_deploy.bench.feeds import declared_inputs, prepare_shape, same_inputs, shape_of_inputs
from lora_deploy.bench.gates import (
    DEFAULT_MAX_REGRESSION,
    check_fed_against,
    check_gates,
    check_shared,
    inconclusive_gates,
    load_baseline,
)
from lora_deploy.bench.generation import (
    StepRecorder,
    add_generation,
    check_generate,
    closing_rounds,
    prepare_generation,
)
from lora_deploy.bench.machine import machine_info
from lora_deploy.bench.measure import BenchProgress, measure_shapes, torch_threads
from lora_deploy.bench.noise import check_noise_runs, measure_repeated
from lora_deploy.bench.plan import check_plan, check_run_counts, with_previous
from lora_deploy.bench.report import plot, to_markdown
from lora_deploy.bench.schema import write_json
from lora_deploy.bench.sessions import concat_loops, concat_sessions, in_sessions, session_count, split_rounds
from lora_deploy.bench.shapes import DEFAULT_SHAPES, Shape, as_shapes, shape_key
from lora_deploy.bench.stats import check_on_inconclusive, fraction
from lora_deploy.bench.summary import build_report
from lora_deploy.errors import BadInputError
from lora_deploy.export.plain import read_npz
from lora_deploy.io.staging import check_cache_dir, check_output, write_file_atomic
from lora_deploy.util import library_versions

_VERSIONED = ("lora-deploy", "numpy", "torch", "transformers", "peft", "onnx", "onnxruntime", "onnxruntime-gpu")


def _open_variants(
    models: Mapping[str, Path],
    adapters: Mapping[str, Path],
    backend: str,
    device: str,
    threads: int | None,
    options: Mapping[str, Any],
    epoch: int = 0,
) -> dict[str, TimedModel]:
    """Open every variant, closing the ones already open if one fails; returned in the
    models' order.

    The opening order turns by one every epoch: the session opened last ran faster here
    (ONNX Runtime CPU, 100 Hz loop, 20 sessions: the same graph opened again after the
    others gave a p50 ratio of 0.978 [0.964, 0.993] and a p99 ratio of 0.968 against
    itself), so a fixed order would put that into every ratio."""
    names = list(models)
    turn = epoch % len(names) if names else 0
    variants: dict[str, TimedModel] = {}
    try:
        for name in names[turn:] + names[:turn]:
            variants[name] = registry.open_timed(
                name, models[name], backend, device, threads, adapters.get(name), **options
            )
    except BaseException:
        for variant in variants.values():
            variant.close()
        raise
    return {name: variants[name] for name in names}


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
    generate: int | None = None,
    until_width: float | str | None = None,
    max_time: str | float | None = None,
    max_overhead: float | str | None = None,
    baseline_model: str | os.PathLike | None = None,
    baseline_path: str | os.PathLike | None = None,
    max_regression: float | str | None = None,
    run_margin: float | str | None = None,
    allow_mismatch: bool = False,
    noise_runs: int | None = None,
    sessions: int | None = None,
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
    it recorded one, never below gates.DEFAULT_RUN_MARGIN) for the drift between runs
    and refusing a baseline of another configuration unless `allow_mismatch`.
    `noise_runs` (>= 3) repeats the whole measurement that many times, every model
    reopened in between, and records the spread of their medians (report["noise"]) so a
    later comparison against this report as a baseline is calibrated by it.
    `sessions` (K) splits the rounds (or the control loop's duration) between K sessions
    of every variant, each epoch's sessions closed before the next epoch's open, and the
    ratios' intervals resample sessions, then rounds (`stats.session_ratio_ci`); default
    `sessions.DEFAULT_SESSIONS` (3, fewer with fewer rounds; 1 with `until_width` or
    `noise_runs`). One session leaves session-to-session variation out of the intervals.
    `on_inconclusive` (pass | warn | fail) decides what a gate that cannot decide does.
    `rate` ('100hz') switches to the control-loop mode: each shape paced for `duration`
    ('30s'), gated by `max_p99` ('8ms') and `max_misses`.
    `provider` (cuda | tensorrt), `trt_fp16` and `trt_cache`: ONNX Runtime's GPU providers
    with device cuda (backends/onnxrt/gpu.py); each variant records where it really ran.
    `generate` (N) makes every shape a prompt (BATCHxPROMPT) and every round one greedy
    generation of N new tokens per row on each KV-cache graph; latencies, ratios and gates
    are those of whole generations, and each entry's "generation" block adds the prefill
    and per-token decode latencies and tokens/s (generation.generation_summary).
    """
    models, reference = with_previous(models, baseline_model, reference)
    models, adapters, reference = check_plan(models, adapters, backend, reference, module)
    if device not in registry.DEVICES:
        raise BadInputError(f"unknown device {device!r}; choose {', '.join(registry.DEVICES)}")
    if cuda_graphs and (backend, device) != ("torch", "cuda"):
        raise BadInputError("CUDA graphs need --backend torch --device cuda")
    ort_gpu = {"provider": provider, "trt_fp16": trt_fp16, "trt_cache": trt_cache}
    factory_options = {"cuda_graphs": cuda_graphs, "module": module, **ort_gpu}
    if backend == "onnxruntime":
        from lora_deploy.backends.onnxrt import gpu

        choice = gpu.choose(device, provider, trt_fp16, trt_cache)
        if trt_cache is not None:  # ONNX Runtime writes there: never an input (io.staging.check_cache_dir)
            check_cache_dir(trt_cache, [*models.values(), *adapters.values(), baseline_path, inputs_path])
        gpu.require_providers(choice)  # one line, before any work
    elif provider or trt_fp16 or trt_cache is not None:
        raise BadInputError("--provider, --trt-fp16 and --trt-cache are ONNX Runtime's: use --backend onnxruntime")
    check_on_inconclusive(on_inconclusive)
    supplied = None
    if inputs_path is not None:
        if shapes is not None:
            raise BadInputError("--inputs fixes the shape (its arrays'); drop --shapes")
        supplied = read_npz(inputs_path)
        shape_list: list[Shape] | None = [shape_of_inputs(supplied)]
    elif shapes is None and module is not None:
        shape_list = None  # the modules' example_inputs() decide, once they are built
    else:
        shape_list = as_shapes(DEFAULT_SHAPES if shapes is None else shapes)
    check_run_counts(rounds, warmup, inner, threads)
    check_generate(generate, shape_list, inner, rate, inputs_path, module)
    max_overhead = fraction(max_overhead)
    max_regression = fraction(max_regression)
    run_margin = fraction(run_margin)
    if baseline_model is not None and max_overhead is not None:
        raise BadInputError("--baseline-model gates with --max-regression; --max-overhead would gate the same pairs")
    if max_regression is not None and baseline_path is None and baseline_model is None:
        raise BadInputError("a max regression needs a baseline report (--baseline) or --baseline-model")
    if run_margin is not None and baseline_path is None:
        raise BadInputError("--run-margin is the allowance between a saved baseline and this run: it needs --baseline")
    if baseline_model is not None and max_regression is None:
        max_regression = DEFAULT_MAX_REGRESSION
    rate_hz, duration_s, max_p99_s = loop_settings(rate, duration, max_p99, max_misses)
    width, max_time_s = adaptive_settings(until_width, max_time, rate_hz, noise_runs)
    check_noise_runs(noise_runs, rate_hz)
    ticks = None if rate_hz is None else duration_s * rate_hz / max(1, len(models))
    sessions = session_count(
        sessions, rounds, until_width=until_width, noise_runs=noise_runs, rate=rate_hz, ticks=ticks
    )
    machine = machine_info(threads)
    here = {
        "backend": backend,
        "device": device,
        "threads": threads,
        "inner": None if rate_hz else inner,
        "rate_hz": rate_hz,
        "generate": generate,
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
    with torch_threads(threads if backend == "torch" else None):
        opened = [_open_variants(models, adapters, backend, device, threads, factory_options)]
        try:
            variants = opened[-1]
            if shape_list is None:
                supplied, source = declared_inputs(variants, module), "example"
                shape_list = as_shapes(DEFAULT_SHAPES) if supplied is None else [shape_of_inputs(supplied)]
                if baseline is not None:
                    check_shared(baseline, baseline_path, shape_list, list(models))
            elif supplied is None:
                declared_inputs(variants, module)  # --shapes: a plain module must say what it takes

            def prepare(variants: Mapping[str, TimedModel]) -> tuple[dict, dict]:
                # Every shape is validated before any is timed: a misfit fails in seconds.
                calls, fed = {}, {}
                for shape in shape_list:
                    key = shape_key(shape)
                    if generate is not None:
                        recorders = steps.setdefault(key, {name: StepRecorder() for name in variants})
                        calls[key], fed[key] = prepare_generation(variants, shape, generate, seed, recorders)
                    else:
                        calls[key], fed[key] = prepare_shape(variants, shape, seed, supplied, source)
                return calls, fed

            def reopen() -> dict:
                # --noise-runs, --sessions: a fresh open of every model: new sessions, new allocations, a later moment.
                for variant in opened[-1].values():
                    variant.close()
                opened.append(_open_variants(models, adapters, backend, device, threads, factory_options, len(opened)))
                return prepare(opened[-1])[0]

            steps: dict[str, dict[str, StepRecorder]] = {}

            calls, fed = prepare(variants)
            same_inputs(fed)
            if baseline is not None and not allow_mismatch:
                check_fed_against(baseline, baseline_path, fed)
            loop = adaptive = noise = labels = None
            measure = {"rounds": rounds, "warmup": warmup, "inner": inner}
            if generate is not None:
                progress = closing_rounds(steps, progress)
            if rate_hz is not None:
                share = duration_s / sessions
                paced = {"rate_hz": rate_hz, "duration_s": share, "warmup": warmup}
                parts = in_sessions(
                    calls, sessions, reopen, lambda c, epoch, tick: measure_loop(c, **paced, progress=tick), progress
                )
                results, labels = concat_sessions([p[0] for p in parts])
                loop = {"rate_hz": rate_hz, "shapes": concat_loops([p[1] for p in parts])}
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
                results, noise = measure_repeated(calls, noise_runs, reopen, **measure, progress=progress)
            else:
                counts = split_rounds(rounds, sessions)
                parts = in_sessions(
                    calls,
                    sessions,
                    reopen,
                    lambda c, epoch, tick: measure_shapes(c, **{**measure, "rounds": counts[epoch]}, progress=tick),
                    progress,
                )
                results, labels = concat_sessions(parts)
            extra = {
                "models": {name: str(path) for name, path in models.items()},
                "adapters": {name: str(path) for name, path in adapters.items()},
                "variants": {name: v.details for name, v in opened[-1].items()},
                "input_seed": seed,
                "inputs": None if inputs_path is None else str(inputs_path),
                "module": module,
                "duration_s": duration_s if rate_hz else None,
                "cuda_graphs": cuda_graphs,
                "generate": generate,
                "libraries": library_versions(_VERSIONED),
            }
            report = build_report(
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
                sessions=labels,
            )
            if generate is not None:
                add_generation(report, {k: {n: r.rounds for n, r in v.items()} for k, v in steps.items()}, generate)
            return report
        finally:
            for variant in opened[-1].values():
                variant.close()


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
