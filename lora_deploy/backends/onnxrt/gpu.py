"""ONNX Runtime on an NVIDIA GPU: the CUDA and TensorRT execution providers, checked.

ONNX Runtime quietly runs on the CPU what a GPU provider does not take (a node without a
GPU kernel, or every node when the CUDA provider fails to load), and a check that passed
on the CPU proves nothing about the GPU. So a GPU session is opened strictly:
`session.disable_cpu_ep_fallback` = "1" and no CPU provider in the list, and ONNX Runtime
then refuses a graph any node of which would land on the CPU.

One exception is by design: the CUDA provider leaves shape arithmetic (Shape, and the
Gather / Concat / Unsqueeze on int64 that follow it) to the CPU on purpose, and a strict
session refuses every exported transformer for it. When the strict session is refused,
one probe session runs the graph once with profiling on a small feed, and the nodes that
ran on the CPU are read from the profile: if none of them outputs a float tensor (shape
arithmetic only), the session is opened without the strict flag and those nodes are
recorded; if any computes floats, the model is refused (exit 2), naming them.

Whatever happens, the providers the session really has (`get_providers()`) and the
options asked for are recorded (`GpuChoice.record`, plus what `open_session` adds).

Without onnxruntime-gpu (no CUDA provider in this ONNX Runtime) every GPU request fails in
one line saying what to install. None of this has run on a GPU yet; the pure parts
(`choose`, the profile reading) are tested on the CPU.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lora_deploy.backends.onnxrt.loader import QUIET, SessionFromOnnx
from lora_deploy.errors import BadInputError

PROVIDERS = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
CPU_PROVIDER = "CPUExecutionProvider"
STRICT = "session.disable_cpu_ep_fallback"
GPU_HINT = "pip install 'lora-deploy[gpu]' (onnxruntime-gpu in place of onnxruntime) on a machine with an NVIDIA GPU"
# What ONNX Runtime says when the strict flag meets a node placed on the CPU.
CPU_ASSIGNED = "assigned to the default CPU EP"
FLOAT_TYPES = ("float", "float16", "bfloat16", "double")


@dataclass(frozen=True)
class GpuChoice:
    """Where a session runs: the device, the provider, and what ONNX Runtime is told."""

    device: str = "cpu"
    provider: str = "cpu"
    providers: tuple[str, ...] = (CPU_PROVIDER,)
    provider_options: tuple[dict[str, str], ...] = ({},)
    config: Mapping[str, str] = field(default_factory=dict)

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    def record(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "provider": self.provider,
            "requested_providers": list(self.providers),
            "provider_options": [dict(o) for o in self.provider_options],
            "session_config": dict(self.config),
        }


def choose(
    device: str = "cpu", provider: str | None = None, trt_fp16: bool = False, trt_cache: str | os.PathLike | None = None
) -> GpuChoice:
    """The providers and options for `--device D --provider P --trt-fp16 --trt-cache DIR`."""
    if device not in ("cpu", "cuda"):
        raise BadInputError(f"unknown device {device!r}; choose cpu, cuda")
    if device == "cpu":
        if provider not in (None, "cpu"):
            raise BadInputError(f"--provider {provider} runs on a GPU: add --device cuda")
        if trt_fp16 or trt_cache is not None:
            raise BadInputError("--trt-fp16 and --trt-cache are options of --device cuda --provider tensorrt")
        return GpuChoice()
    provider = provider or "cuda"
    if provider not in PROVIDERS:
        raise BadInputError(f"unknown provider {provider!r}; choose {', '.join(PROVIDERS)}")
    if provider != "tensorrt" and (trt_fp16 or trt_cache is not None):
        raise BadInputError("--trt-fp16 and --trt-cache are options of --provider tensorrt")
    if provider == "cuda":
        return GpuChoice("cuda", "cuda", (PROVIDERS["cuda"],), ({},), {STRICT: "1"})
    trt: dict[str, str] = {"trt_fp16_enable": str(bool(trt_fp16))}
    if trt_cache is not None:
        cache = str(Path(trt_cache).resolve())
        trt.update(trt_engine_cache_enable="True", trt_engine_cache_path=cache, trt_timing_cache_enable="True")
        trt.update(trt_timing_cache_path=cache)
    # Subgraphs TensorRT does not take run on the CUDA provider: still the GPU.
    return GpuChoice("cuda", "tensorrt", (PROVIDERS["tensorrt"], PROVIDERS["cuda"]), (trt, {}), {STRICT: "1"})


def require_providers(choice: GpuChoice) -> None:
    """Every requested provider is in this ONNX Runtime; else one line saying what to install."""
    if not choice.on_gpu:
        return
    import onnxruntime as ort

    available = ort.get_available_providers()
    missing = [p for p in choice.providers if p not in available]
    if missing:
        raise BadInputError(
            f"--device cuda --provider {choice.provider}: this ONNX Runtime has no {', '.join(missing)} "
            f"(it has {', '.join(available)}): {GPU_HINT}"
        )


def loader(choice: GpuChoice, path: str | os.PathLike, **kwargs: Any) -> SessionFromOnnx:
    """The one session loader, told the choice's providers, options and session config."""
    return SessionFromOnnx(
        path,
        providers=choice.providers,
        provider_options=choice.provider_options,
        config=choice.config,
        **kwargs,
    )


def open_session(
    choice: GpuChoice,
    path: str | os.PathLike,
    *,
    threads: int | None = None,
    inter_op_threads: int | None = None,
    log_level: int = QUIET,
) -> tuple[Any, dict[str, Any]]:
    """(session, record) on `choice`'s device, checked as the module docstring says."""
    require_providers(choice)
    kwargs = {"threads": threads, "inter_op_threads": inter_op_threads, "log_level": log_level}
    record = choice.record() | {"strict": bool(choice.config), "cpu_nodes": {}}
    try:
        session = loader(choice, path, **kwargs)()
    except BadInputError as exc:
        if not (choice.on_gpu and CPU_ASSIGNED in str(exc)):
            raise
        relaxed = GpuChoice(choice.device, choice.provider, choice.providers, choice.provider_options, {})
        placed = probe_cpu_nodes(loader(relaxed, path, **kwargs))
        compute = {op: n for (op, is_float), n in placed.items() if is_float}
        if compute:
            listed = ", ".join(f"{op} x{n}" for op, n in sorted(compute.items()))
            raise BadInputError(
                f"{path}: ONNX Runtime would run compute nodes on the CPU, not on {choice.providers[0]}: {listed} "
                "(no GPU kernel for them with this graph's types)"
            ) from None
        session = loader(relaxed, path, **kwargs)()
        record.update(strict=False, cpu_nodes={op: n for (op, _), n in sorted(placed.items())})
        record["cpu_nodes_why"] = "shape arithmetic (no float outputs), which the CUDA provider leaves to the CPU"
    used = list(session.get_providers())
    record["providers"] = used
    if choice.on_gpu and used[0] != choice.providers[0]:
        raise BadInputError(f"{path}: ONNX Runtime runs on {used[0]}, not {choice.providers[0]}: {GPU_HINT}")
    return session, record


def probe_cpu_nodes(probe: SessionFromOnnx) -> dict[tuple[str, bool], int]:
    """{(op type, outputs a float): count} of the nodes that ran on the CPU in one profiled run
    of a session from `probe` on a small feed (every dynamic dim 1)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="lora-deploy-ort-profile-") as tmp:
        options = probe.options()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "probe")
        session = SessionFromOnnx(
            probe.path, providers=probe.providers, provider_options=probe.provider_options, session_options=options
        )()
        session.run(None, probe_feed(session.get_inputs()), ort.RunOptions())
        profile = session.end_profiling()
        return cpu_nodes(json.loads(Path(profile).read_text()))


def probe_feed(inputs: Sequence[Any]) -> dict[str, np.ndarray]:
    """Ones of every input's type, every dynamic dim 1 (where nodes run does not depend on values)."""
    from lora_deploy.dtypes import BY_ORT

    feed = {}
    for arg in inputs:
        row = BY_ORT.get(arg.type)
        if row is None:
            raise BadInputError(f"input {arg.name}: type {arg.type} cannot be probed")
        shape = [d if isinstance(d, int) and d >= 0 else 1 for d in arg.shape]
        feed[arg.name] = np.ones(shape, row.numpy)
    return feed


def cpu_nodes(profile: Sequence[Mapping[str, Any]]) -> dict[tuple[str, bool], int]:
    """{(op type, outputs a float): count} of the node events of an ONNX Runtime profile
    that ran on the CPU provider."""
    counts: dict[tuple[str, bool], int] = {}
    for event in profile:
        args = event.get("args") or {}
        name = str(event.get("name", ""))
        if event.get("cat") != "Node" or not name.endswith("_kernel_time") or args.get("provider") != CPU_PROVIDER:
            continue
        types = [t for output in args.get("output_type_shape") or [] for t in output]
        key = (str(args.get("op_name")), any(t in FLOAT_TYPES for t in types))
        counts[key] = counts.get(key, 0) + 1
    return counts
