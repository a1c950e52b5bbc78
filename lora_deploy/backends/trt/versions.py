"""Every TensorRT version gate, in one place (as polygraphy keeps its own in one module).

Nothing here imports tensorrt at import time. `load_tensorrt()` imports it when a command
needs it and turns "not installed" into one line saying what is missing and how to get it.
The rest is pure: which builder settings a TensorRT major version gets for a precision and a
refit mode. The builder (build.py) applies what these return; tests check the choice for
TensorRT 10 and 11 without TensorRT.

TensorRT 10.x: precision by builder flags (FP16, BF16); networks weakly typed.
TensorRT 11.x: the precision flags are gone; networks are always strongly typed, so fp16 or
bf16 means converting the ONNX first (convert.py) and building it as it is typed.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from lora_deploy.errors import BadInputError

PRECISIONS = ("fp32", "fp16", "bf16")
REFIT_MODES = ("none", "all", "adapter-targets")
HARDWARE_COMPAT = ("same", "ampere+")
OLDEST_MAJOR = 10  # polygraphy's loaders and the REFIT_INDIVIDUAL / STRIP_PLAN flags need 10

INSTALL_HINT = "pip install 'lora-deploy[tensorrt]' on a machine with an NVIDIA GPU and driver"


class TensorRTUnavailable(BadInputError):
    """TensorRT or a GPU is missing: exit 2, one line, nothing written."""


def load_tensorrt() -> ModuleType:
    """The tensorrt module, or TensorRTUnavailable saying what is missing.

    `tensorrt-stubs` installs a bare `tensorrt/` directory of .pyi files, which Python imports
    as an empty namespace package: that is not TensorRT either, and is refused the same way.
    """
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:
        raise TensorRTUnavailable(f"TensorRT is not installed ({exc}): {INSTALL_HINT}") from exc
    except Exception as exc:  # a broken install (missing libnvinfer, CUDA libraries) raises OSError and the like
        raise TensorRTUnavailable(f"TensorRT failed to load ({type(exc).__name__}: {exc}): {INSTALL_HINT}") from exc
    if not hasattr(trt, "Builder") or not getattr(trt, "__version__", None):
        raise TensorRTUnavailable(f"TensorRT is not installed (only its type stubs are): {INSTALL_HINT}")
    return trt


def require_gpu() -> str:
    """The name of CUDA device 0, or TensorRTUnavailable: TensorRT builds and runs only on a GPU."""
    try:
        import torch
    except ImportError:  # torch is a dependency; without it, let TensorRT find the device itself
        return "unknown (torch not installed)"
    if not torch.cuda.is_available():
        raise TensorRTUnavailable(f"TensorRT needs an NVIDIA GPU and none is visible (no CUDA): {INSTALL_HINT}")
    return torch.cuda.get_device_name(0)


def require_tensorrt() -> ModuleType:
    """TensorRT and a GPU, both checked before any work; returns the tensorrt module."""
    trt = load_tensorrt()
    major = major_version(trt.__version__)
    if major < OLDEST_MAJOR:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} is too old: lora-deploy needs {OLDEST_MAJOR}.x or newer")
    require_gpu()
    return trt


def major_version(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError as exc:
        raise TensorRTUnavailable(f"cannot read TensorRT's version {version!r}") from exc


@dataclass(frozen=True)
class BuildPlan:
    """What the builder does for one TensorRT major version, precision and refit mode.

    config: keyword arguments for polygraphy's CreateConfig (fp16=, bf16=, refittable=,
    strip_plan=, version_compatible=). flags: extra BuilderFlag names set on the config
    (CreateConfig has no keyword for them). convert: the ONNX is converted to this type
    first (TensorRT 11), else None. strongly_typed: NetworkFromOnnxPath(strongly_typed=).
    mark_refittable: network.mark_weights_refittable for the adapter-targeted weights.
    """

    major: int
    precision: str
    config: dict[str, Any] = field(default_factory=dict)
    flags: tuple[str, ...] = ()
    convert: str | None = None
    strongly_typed: bool = False
    mark_refittable: bool = False
    hardware_compat: str | None = None  # a HardwareCompatibilityLevel member name


def build_plan(
    major: int,
    precision: str = "fp32",
    refittable: str = "none",
    strip_weights: bool = False,
    hardware_compat: str = "same",
    version_compatible: bool = False,
) -> BuildPlan:
    """The version gates. Raises BadInputError for a combination a version cannot build."""
    if precision not in PRECISIONS:
        raise BadInputError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    if refittable not in REFIT_MODES:
        raise BadInputError(f"unknown refit mode {refittable!r}; choose {', '.join(REFIT_MODES)}")
    if hardware_compat not in HARDWARE_COMPAT:
        raise BadInputError(f"unknown hardware compatibility {hardware_compat!r}; choose {', '.join(HARDWARE_COMPAT)}")
    if major < OLDEST_MAJOR:
        raise TensorRTUnavailable(f"TensorRT {major}.x is too old: lora-deploy needs {OLDEST_MAJOR}.x or newer")
    config: dict[str, Any] = {}
    flags: list[str] = []
    convert = None
    strongly_typed = major >= 11
    if precision != "fp32":
        if major >= 11:  # no precision flags: the graph itself carries fp16/bf16
            convert = precision
        else:
            config[precision] = True
    if refittable == "all":
        config["refittable"] = True  # BuilderFlag.REFIT: every weight
    elif refittable == "adapter-targets":
        flags.append("REFIT_INDIVIDUAL")  # only weights marked refittable; never REFIT_IDENTICAL
    if strip_weights:
        if refittable == "none":
            # A stripped plan is refitted at deploy time: it must be refittable.
            raise BadInputError("--strip-weights needs --refittable all or adapter-targets")
        config["strip_plan"] = True
    if version_compatible:
        config["version_compatible"] = True
    compat = {"same": None, "ampere+": "AMPERE_PLUS"}[hardware_compat]
    return BuildPlan(
        major=major,
        precision=precision,
        config=config,
        flags=tuple(flags),
        convert=convert,
        strongly_typed=strongly_typed,
        mark_refittable=refittable == "adapter-targets",
        hardware_compat=compat,
    )


# Engine inspector layer precisions that count as each requested precision being realized.
REALIZED_TYPES = {"fp32": {"FLOAT"}, "fp16": {"HALF"}, "bf16": {"BF16"}}


def realized_precision(layer_types: dict[str, int], requested: str) -> tuple[str, str | None]:
    """(realized precision, problem or None) from counts of layer output types read back
    from the engine ({"HALF": 40, "FLOAT": 6}). An fp16/bf16 build where no compute layer
    came out in that type is the silent failure the check exists for."""
    if not layer_types:
        return "unknown", "the engine inspector reported no layer types"
    low = {"fp16": "HALF", "bf16": "BF16"}
    present = [name for name, want in low.items() if layer_types.get(want, 0) > 0]
    realized = "+".join(["fp32"] * bool(layer_types.get("FLOAT")) + present) or "other"
    if requested in low and requested not in present:
        return realized, f"requested {requested} but no layer runs in {low[requested]}: the engine is {realized}"
    return realized, None
