"""Compiled kernels, optional: built by `pip install` when a C compiler is there (see
setup.py, where each is declared optional), else absent, and the callers use their numpy code.

- `_f16` (f16.c): float16 <-> float32 and the merge's fused widen-add-round, for
  lora_deploy.arrays.
- `_quant4` (quant4.c): NF4/FP4 quantization.

Importing this package imports neither: callers ask `kernel(name)` for the module they use
and take their numpy code when it answers None (not built, or LORA_DEPLOY_NATIVE=0).
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

OFF = ("0", "false", "no", "off")


def enabled() -> bool:
    """False when LORA_DEPLOY_NATIVE is 0 (or false, no, off): the numpy code runs even
    where the kernels are built."""
    return os.environ.get("LORA_DEPLOY_NATIVE", "1").strip().lower() not in OFF


@functools.cache
def _built(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"lora_deploy._native.{name}")
    except ImportError:  # not built: no C compiler at install time, or its build failed
        return None


def kernel(name: str) -> ModuleType | None:
    """The compiled module `name` ("_f16", "_quant4"), or None: not built, or switched off.

    Read at each call, so a test can compare both paths in one process."""
    return _built(name) if enabled() else None
