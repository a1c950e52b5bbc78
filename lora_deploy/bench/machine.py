"""Where a bench ran: CPU, cores, GPU, thread settings, library versions (the report's
"machine" block; a saved baseline from another machine is not comparable)."""

from __future__ import annotations

import os
import platform
from typing import Any

from lora_deploy.util import library_versions

# Distribution names tried for each library; the first installed one wins.
_LIBRARIES = {
    "numpy": ("numpy",),
    "torch": ("torch",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "transformers": ("transformers",),
}
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _cpu_model() -> str:
    """CPU model from /proc/cpuinfo (Linux), else whatever platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Processor") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _library_versions() -> dict[str, str | None]:
    """Installed version per library: its first installed distribution, else None."""
    found = library_versions(dist for dists in _LIBRARIES.values() for dist in dists)
    return {lib: next((found[d] for d in dists if d in found), None) for lib, dists in _LIBRARIES.items()}


def _torch_facts() -> dict[str, Any]:
    """GPU name and torch thread counts; empty when torch is absent or broken."""
    try:
        import torch  # lazy: torch is heavy and optional for the report itself
    except Exception:  # ImportError, or a broken install raising anything
        return {}
    facts: dict[str, Any] = {
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }
    try:
        if torch.cuda.is_available():
            facts["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # a driver problem must not cost us the whole report
        pass
    return facts


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """Where the bench ran: CPU, cores, GPU, thread settings, library versions."""
    torch_facts = _torch_facts()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": torch_facts.get("gpu"),
        "threads": {
            "requested": threads,
            "torch": torch_facts.get("torch_threads"),
            "torch_interop": torch_facts.get("torch_interop_threads"),
            "env": {name: os.environ.get(name) for name in _THREAD_ENV},
        },
        "libraries": _library_versions(),
    }
