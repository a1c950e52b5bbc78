"""MODEL.engine.json, written beside every engine: how it was built, from what, on what.

Pure: the builder gathers the facts (TensorRT, CUDA, GPU, what the engine inspector read
back) and this module lays them out, and reads them back for refit and verify (the
tolerance an engine gets, the ONNX it came from, the shapes its profiles take).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lora_deploy.errors import BadInputError

SCHEMA = "lora-deploy.trt-engine/1"


def manifest_path(engine: str | os.PathLike) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def build_manifest(
    *,
    header: Mapping[str, Any],
    environment: Mapping[str, Any],
    onnx: Mapping[str, Any],
    options: Mapping[str, Any],
    plan: Any,
    precision: Mapping[str, Any],
    profiles: list[dict],
    weights: Mapping[str, Mapping],
    refittable: list[str] | None,
    build_seconds: float,
    timing_cache: Mapping[str, Any] | None,
    sources: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest document.

    header: report_header(SCHEMA). environment: tensorrt, cuda, gpu, compute_capability.
    onnx: path and sha256 of the given ONNX, and `built_from` (the converted graph) when
    TensorRT 11 built a converted one. plan: the BuildPlan (versions.py). precision:
    requested, realized, layer_types, problem. weights: the initializer -> checkpoint map.
    refittable: ONNX names the engine can refit (None: all, or none when not refittable).
    sources: sha256 of the base and adapter when known.
    """
    refit_mode = options.get("refittable", "none")
    return {
        **header,
        "environment": dict(environment),
        "onnx": dict(onnx),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()},
        "build": {
            "tensorrt_major": plan.major,
            "strongly_typed": plan.strongly_typed,
            "config": dict(plan.config),
            "flags": list(plan.flags),
            "converted_to": plan.convert,
            "hardware_compatibility_level": plan.hardware_compat,
            "seconds": round(build_seconds, 3),
            "timing_cache": dict(timing_cache) if timing_cache else None,
        },
        "precision": dict(precision),
        "profiles": profiles,
        "refit": {
            "mode": refit_mode,
            "weights": None if refit_mode != "adapter-targets" else sorted(refittable or []),
            "current_adapter": None,  # set by each refit: the weights it changed from W0
            "changed_weights": [],
        },
        "weights": {name: dict(entry) for name, entry in sorted(weights.items())},
        "sources": dict(sources or {}),
    }


def read_manifest(engine: str | os.PathLike) -> dict[str, Any]:
    path = manifest_path(engine)
    if not Path(engine).is_file():
        raise BadInputError(f"{engine}: engine not found")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInputError(f"{path}: no engine manifest beside {engine} (lora-deploy build trt writes it)") from None
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: unreadable engine manifest ({exc})") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise BadInputError(f"{path}: not a lora-deploy engine manifest (schema {SCHEMA})")
    return data


def refit_targets(manifest: Mapping[str, Any]) -> tuple[list[str] | None, list[str]]:
    """(refittable ONNX names or None for all, names to reset to W0 besides the new adapter's)."""
    refit = manifest.get("refit") or {}
    mode = refit.get("mode", "none")
    if mode == "none":
        raise BadInputError("the engine was built without --refittable: rebuild with --refittable all|adapter-targets")
    if mode == "adapter-targets":
        names = list(refit.get("weights") or [])
        return names, names  # every marked weight is written: W0 + dW or W0
    return None, list(refit.get("changed_weights") or [])  # all: put back what the last adapter changed


def layer_types(inspector_json: str | Mapping[str, Any]) -> dict[str, int]:
    """Counts of layer output types ({"HALF": 40, "FLOAT": 6}) from the engine inspector's
    JSON (IEngineInspector.get_engine_information, LayerInformationFormat.JSON, built with
    ProfilingVerbosity.DETAILED). Read from each layer's outputs' "Format/Datatype" text."""
    data = json.loads(inspector_json) if isinstance(inspector_json, str) else inspector_json
    counts: dict[str, int] = {}
    for layer in data.get("Layers", []):
        if not isinstance(layer, Mapping):
            continue  # without DETAILED verbosity a layer is only its name
        for output in layer.get("Outputs", []):
            text = str(output.get("Format/Datatype", "")).lower()
            kind = (
                "BF16"
                if "bf16" in text
                else "HALF"
                if ("fp16" in text or "half" in text)
                else "FLOAT"
                if ("fp32" in text or "float" in text)
                else "INT8"
                if "int8" in text
                else "OTHER"
            )
            counts[kind] = counts.get(kind, 0) + 1
    return counts


# Realized precision -> the dtype whose output tolerance (compare.TOLERANCES) an engine gets.
PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def engine_dtype(manifest: Mapping[str, Any]) -> str:
    """The tolerance dtype of an engine: the loosest precision its layers were read back in
    ("fp32+fp16" -> float16); the requested one when the read-back was inconclusive."""
    precision = manifest.get("precision") or {}
    realized = str(precision.get("realized") or "")
    found: list[str] = [p for p in ("bf16", "fp16", "fp32") if p in realized.split("+")]
    if not found:
        found = [str(precision.get("requested") or "fp32")]
    if found[0] not in PRECISION_DTYPES:
        raise BadInputError(f"engine manifest: unknown precision {found[0]!r}")
    return PRECISION_DTYPES[found[0]]


def engine_onnx(engine: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
    """The ONNX the engine was built from, as its manifest names it (absolute, or relative to
    the directory the build ran in or to the engine's), and unchanged since (its sha256)."""
    from lora_deploy.io.digests import file_sha256

    entry = manifest.get("onnx") or {}
    named = Path(str(entry.get("path") or ""))
    if not entry.get("path"):
        raise BadInputError(f"{manifest_path(engine)}: names no ONNX model")
    candidates = (
        [named] if named.is_absolute() else [named, Path(engine).parent / named, Path(engine).parent / named.name]
    )
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise BadInputError(
            f"{manifest_path(engine)}: its ONNX model {named} is not found (looked beside the engine too)"
        )
    if entry.get("sha256") and file_sha256(found) != entry["sha256"]:
        raise BadInputError(f"{found}: changed since the engine was built from it (sha256 differs from the manifest's)")
    return found


def check_in_profiles(manifest: Mapping[str, Any], feed: Mapping[str, Any]) -> None:
    """Each fed input's shape within its optimization profile (min <= shape <= max)."""
    for profile in manifest.get("profiles") or []:
        name = profile.get("input")
        if name not in feed:
            continue
        shape = list(getattr(feed[name], "shape", ()))
        low, high = list(profile.get("min") or []), list(profile.get("max") or [])
        if len(shape) != len(low) or not all(a <= s <= b for a, s, b in zip(low, shape, high)):
            raise BadInputError(
                f"input {name} of shape {shape} is outside the engine's profile (min {low}, max {high}): "
                "choose --batch/--seq within it, or rebuild with --shapes"
            )
