"""ONNX Runtime models opened for timing: one session, one prepared call per feed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lora_deploy.backends.base import Feed, Runner, TimedModel
from lora_deploy.backends.generation import Generation
from lora_deploy.backends.onnxrt import gpu
from lora_deploy.backends.onnxrt.decode import cache_layout, greedy
from lora_deploy.backends.onnxrt.lora_format import check_parameters, read_adapter_file, session_inputs
from lora_deploy.backends.onnxrt.runner import OnnxrtRunner
from lora_deploy.backends.onnxrt.sessions import IDS_INPUT as ADAPTER_IDS
from lora_deploy.backends.onnxrt.sessions import adapter_arrays, required_zeros
from lora_deploy.modeling.tasks import PAST_PREFIX


def _ort_run_options(runner: OnnxrtRunner, adapter: Path, model_name: str) -> Any:
    """RunOptions with `adapter` (.onnx_adapter) active, after checking it fits the graph."""
    import onnxruntime as ort

    shapes, lora = read_adapter_file(adapter)
    where = f"adapter {adapter} does not fit model {model_name!r} ({runner.path})"
    check_parameters(shapes, session_inputs(runner.session), where, runner.path.name)
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


def _lora_feeds(runner: OnnxrtRunner, adapter: Path | None, extra: Callable[[int], Feed]) -> Callable[[int], Feed]:
    """extra_inputs for a graph whose LoRA inputs are required (export --lora-defaults none):
    the adapter's packed arrays over zeros, so its layers are timed with the skill's values
    rather than drawn noise; zeros ("no adapter") without one."""
    lora = {**runner.lora_zeros, **(adapter_arrays(adapter) if adapter is not None else {})}
    return lambda batch: {**extra(batch), **lora}


def _ort_binder(runner: OnnxrtRunner, run_options: Any, plain: bool = False) -> Callable[[Feed], Callable[[], None]]:
    """`plain`: the adapter off, i.e. zeros fed to required LoRA inputs (its RunOptions dropped
    otherwise)."""

    def bind(feed: Feed) -> Callable[[], None]:
        session, names = runner.session, runner.output_names()
        if plain and runner.lora_zeros:
            feed = {**feed, **runner.lora_zeros}

        def call() -> None:
            session.run(names, feed, run_options)

        return call

    return bind


def _ort_generation_binder(runner: OnnxrtRunner, run_options: Any, extra_inputs: Callable[[int], Feed]) -> Callable:
    """bind_generation for a KV-cache graph: the greedy loop of backends/onnxrt/decode.py on
    this very session, with the adapter's RunOptions and the adapter ids on every step."""

    def bind(ids: np.ndarray, mask: np.ndarray, n_new: int, record: Callable[[list[float]], None]):
        layout, cache_dtype = cache_layout(runner.session, runner.path)
        session, names = runner.session, runner.output_names()
        extra = extra_inputs(ids.shape[0])

        def step(feed: Feed) -> dict[str, np.ndarray]:
            return dict(zip(names, session.run(names, feed, run_options)))

        def call() -> Generation:
            times: list[float] = []
            generation = greedy(step, layout, cache_dtype, ids, mask, n_new, extra, times=times)
            record(times)
            return generation

        return call

    return bind


def timed_model(
    name: str, path: Path, device: str, threads: int | None, adapter: Path | None, options: Mapping[str, Any]
) -> TimedModel:
    """An ONNX Runtime session; an adapter is activated on every run through RunOptions.

    options: `provider` (cuda | tensorrt, with device cuda), `trt_fp16`, `trt_cache`: the
    GPU providers of backends/onnxrt/gpu.py, which checks and records where the session runs."""
    choice = gpu.choose(device, options.get("provider"), bool(options.get("trt_fp16")), options.get("trt_cache"))
    # One graph runs at a time: inter-op threads would only compete with the intra-op
    # pool that --threads sizes.
    session, placement = gpu.open_session(choice, path, threads=threads, inter_op_threads=1, log_level=4)
    runner = OnnxrtRunner(session, name=name)
    runner.path = Path(path)
    runner.activate()
    try:
        used = placement["providers"]
        runner.lora_zeros = required_zeros(runner.session, path)
        # required LoRA inputs take the adapter as fed arrays (extra_inputs), not RunOptions
        active = adapter is not None and not runner.lora_zeros
        run_options = _ort_run_options(runner, adapter, name) if active else None
        if adapter is not None and runner.lora_zeros:
            _ort_run_options(runner, adapter, name)  # checks the fit; its RunOptions are not used
        runner.run_options = run_options  # so runner.infer() runs with the adapter too
        n_adapters = adapter_bank_size(runner.session)
    except BaseException:
        runner.deactivate()
        raise
    has_ids = ADAPTER_IDS in runner.input_metadata()
    extra_inputs = _adapter_ids_input(runner, n_adapters)
    if runner.lora_zeros:
        extra_inputs = _lora_feeds(runner, adapter, extra_inputs)
    generates = any(name.startswith(PAST_PREFIX) for name in runner.input_metadata())
    return TimedModel(
        name=name,
        path=path,
        runner=runner,
        bind=_ort_binder(runner, run_options),
        adapter=adapter,
        bind_plain=_ort_binder(runner, None, plain=True) if adapter is not None else None,
        extra_inputs=extra_inputs,
        bind_generation=_ort_generation_binder(runner, run_options, extra_inputs) if generates else None,
        details={
            "path": str(path),
            "adapter": str(adapter) if adapter else None,
            "providers": used,
            "onnxruntime": placement,
            "intra_op_threads": threads,
            "inter_op_threads": 1,
            "adapter_ids": {"n_adapters": n_adapters} if has_ids else None,
        },
    )
