"""`lora-deploy build trt`: ONNX -> TensorRT engine + MODEL.engine.json, atomically.

Thin on purpose: polygraphy's loaders do the TensorRT work (NetworkFromOnnxPath,
CreateConfig, EngineFromNetwork, SaveEngine); what this module adds is which loaders and
arguments a TensorRT version gets (`engine_loader`, from versions.build_plan), the
conversion TensorRT 11 needs for fp16/bf16, the read-back of the realized precision, and
the manifest. tensorrt is imported only inside `build_engine`, after the inputs are checked.

Never run here (no TensorRT, no GPU on the development and CI machines); the choice of
loaders and flags per version is tested with a recorded-call double.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lora_deploy.backends.trt import manifest as manifest_mod
from lora_deploy.backends.trt import versions
from lora_deploy.backends.trt.profiles import InputProfile, build_profiles, onnx_inputs
from lora_deploy.backends.trt.refit import writer
from lora_deploy.backends.trt.weights import initializer_map
from lora_deploy.errors import BadInputError
from lora_deploy.io.digests import file_sha256
from lora_deploy.io.provenance import artifact_hashes, report_header
from lora_deploy.io.staging import check_output, write_file_atomic


@dataclass
class EngineBuild:
    path: Path
    manifest_path: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        p = self.manifest["precision"]
        return (
            f"built {self.path} (TensorRT {self.manifest['environment']['tensorrt']}, "
            f"{p['requested']} requested, {p['realized']} realized) in {self.manifest['build']['seconds']:.1f}s"
        )


def polygraphy_loaders() -> SimpleNamespace:
    """polygraphy's TensorRT loaders (importing them does not import tensorrt)."""
    from polygraphy.backend import trt as ptrt

    return SimpleNamespace(
        NetworkFromOnnxPath=ptrt.NetworkFromOnnxPath,
        PostprocessNetwork=ptrt.PostprocessNetwork,
        CreateConfig=ptrt.CreateConfig,
        PostprocessConfig=ptrt.PostprocessConfig,
        Profile=ptrt.Profile,
        EngineFromNetwork=ptrt.EngineFromNetwork,
    )


def engine_loader(
    trt: Any,
    poly: Any,
    plan: versions.BuildPlan,
    onnx_path: str,
    profiles: Sequence[InputProfile],
    refit_names: Sequence[str] = (),
    timing_cache: str | None = None,
    workspace: int | None = None,
):
    """The polygraphy loader chain for this plan: the one place the version gates are applied.

    `trt` and `poly` are the tensorrt module and polygraphy's loaders (a recorded-call
    double in the tests).
    """
    network = poly.NetworkFromOnnxPath(onnx_path, strongly_typed=plan.strongly_typed or None)
    if plan.mark_refittable:
        names = list(refit_names)

        def mark(network):
            for name in names:
                if not network.mark_weights_refittable(name):
                    raise BadInputError(f"TensorRT has no weight named {name!r} to mark refittable")

        network = poly.PostprocessNetwork(network, mark)
    profile = poly.Profile()
    for p in profiles:
        profile.add(p.name, min=p.min, opt=p.opt, max=p.max)
    extra: dict[str, Any] = dict(plan.config)
    if plan.hardware_compat:
        extra["hardware_compatibility_level"] = getattr(trt.HardwareCompatibilityLevel, plan.hardware_compat)
    if workspace:
        extra["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: workspace}
    config = poly.CreateConfig(
        profiles=[profile] if profiles else None,
        load_timing_cache=timing_cache,
        profiling_verbosity=trt.ProfilingVerbosity.DETAILED,  # the inspector then reports layer types
        **extra,
    )
    if plan.flags:  # CreateConfig has no keyword for REFIT_INDIVIDUAL
        flags = [getattr(trt.BuilderFlag, f) for f in plan.flags]

        def set_flags(builder, network, config):
            for flag in flags:
                config.set_flag(flag)

        config = poly.PostprocessConfig(config, set_flags)
    return poly.EngineFromNetwork(network, config=config, save_timing_cache=timing_cache)


def parse_workspace(size: str | int | None) -> int | None:
    if size is None or isinstance(size, int):
        return size
    from lora_deploy.io.checkpoint import parse_size

    return parse_size(size, minimum=1, what="workspace")


def build_engine(
    onnx_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    precision: str = "fp32",
    shapes: tuple[str, ...] = (),
    timing_cache: Path | None = None,
    refittable: str = "none",
    refit_targets: str | None = None,
    strip_weights: bool = False,
    hardware_compat: str = "same",
    version_compatible: bool = False,
    workspace: str | None = None,
    base: Path | None = None,
    converter: str = "builtin",
    overwrite: bool = False,
) -> EngineBuild:
    """Build a TensorRT engine from an ONNX file and write MODEL.engine + MODEL.engine.json.

    refit_targets: comma-separated module names (q_proj,v_proj) whose weights
    --refittable adapter-targets marks refittable. base: the checkpoint the ONNX was
    exported from, to check the initializer -> checkpoint map by shape (without it the
    initializer names are taken as the checkpoint's, which is what the export writes).
    converter: what makes the fp16/bf16 graph TensorRT 11 builds (convert.CONVERTERS).
    """
    onnx_path, out = Path(onnx_path), Path(out)
    if not onnx_path.is_file():
        raise BadInputError(f"{onnx_path}: ONNX model not found")
    inputs = [onnx_path, base]
    check_output(out, inputs, overwrite)
    check_output(manifest_mod.manifest_path(out), inputs, overwrite)
    profiles = build_profiles(onnx_inputs(onnx_path), shapes)
    if refittable == "adapter-targets" and not refit_targets:
        raise BadInputError("--refittable adapter-targets needs --refit-targets, e.g. q_proj,v_proj")
    workspace_bytes = parse_workspace(workspace)
    refuse_lora_defaults(onnx_path)
    trt = versions.require_tensorrt()  # before any work: exit 2 in one line without it
    plan = versions.build_plan(
        versions.major_version(trt.__version__),
        precision,
        refittable,
        strip_weights,
        hardware_compat,
        version_compatible,
    )
    weights = initializer_map(onnx_path, base) if base is not None else onnx_weight_map(onnx_path)
    refit_names = select_refit_weights(weights, refit_targets) if plan.mark_refittable else []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".lora-deploy-trt-", dir=out.parent) as scratch:
        source, conversion = onnx_path, None
        if plan.convert:
            from lora_deploy.backends.trt.convert import convert

            source = Path(scratch) / f"{onnx_path.stem}.{plan.convert}.onnx"
            conversion = convert(onnx_path, source, plan.convert, converter)
            weights = initializer_map(source, base) if base is not None else onnx_weight_map(source)
        cache_before = timing_cache.stat().st_size if timing_cache and timing_cache.is_file() else None
        loader = engine_loader(
            trt,
            polygraphy_loaders(),
            plan,
            str(source),
            profiles,
            refit_names,
            None if timing_cache is None else str(timing_cache),
            workspace_bytes,
        )
        engine = loader()
        seconds = time.perf_counter() - start
        realized = read_precision(engine, precision)
        blob = engine.serialize()
    document = manifest_mod.build_manifest(
        header=report_header(manifest_mod.SCHEMA),
        environment=environment(trt),
        onnx={"path": str(onnx_path.resolve()), "sha256": file_sha256(onnx_path), "conversion": conversion},
        options={
            "precision": precision,
            "shapes": list(shapes),
            "refittable": refittable,
            "refit_targets": refit_targets,
            "strip_weights": strip_weights,
            "hardware_compat": hardware_compat,
            "version_compatible": version_compatible,
            "workspace": workspace_bytes,
            "converter": converter,
        },
        plan=plan,
        precision=realized,
        profiles=[p.as_dict() | {"input": p.name} for p in profiles],
        weights=weights,
        refittable=refit_names,
        build_seconds=seconds,
        timing_cache=None
        if timing_cache is None
        else {
            "path": str(timing_cache),
            "existed": cache_before is not None,
            "hit": cache_before is not None,
        },
        sources={"base": artifact_hashes(base)} if base is not None else None,
    )
    if realized.get("problem"):
        raise BadInputError(f"engine not written: {realized['problem']}")
    path = write_file_atomic(out, writer(bytes(blob)), overwrite=overwrite, inputs=inputs)
    mpath = write_manifest(out, document, overwrite=overwrite, inputs=inputs)
    return EngineBuild(path, mpath, document)


def refuse_lora_defaults(onnx_path: Path) -> None:
    """A dynamic-adapter graph whose LoRA inputs have defaults (ONNX Runtime's overridable
    initializers) is refused: TensorRT's ONNX parser imports a graph input that has an
    initializer as a constant weight, so the engine would run the zeros, never a skill.
    The graph for TensorRT has them as required inputs (export --lora-defaults none); a
    multi-adapter graph's banks are its weights and are built in as such."""
    from lora_deploy.backends.onnxrt.lora_format import is_lora_name, read_graph_inputs

    graph = read_graph_inputs(onnx_path)
    defaulted = [name for name in graph.overridable if is_lora_name(name) and name not in graph.required]
    if defaulted:
        raise BadInputError(
            f"{onnx_path}: LoRA input {defaulted[0]} has a default, which TensorRT builds in as a constant (the "
            "engine would never run a skill); export with --static --lora-defaults none (LoRA inputs required)"
        )


def write_manifest(engine: Path, document: dict, *, overwrite: bool, inputs=()) -> Path:
    import json

    text = json.dumps(document, indent=2, default=str) + "\n"
    try:
        return write_file_atomic(
            manifest_mod.manifest_path(engine), writer(text.encode()), overwrite=overwrite, inputs=inputs
        )
    except BaseException:
        engine.unlink(missing_ok=True)  # an engine without its manifest is not an output
        raise


def onnx_weight_map(onnx_path: Path) -> dict[str, dict]:
    """Without a checkpoint: every float initializer, taken to be the checkpoint tensor of its name."""
    import onnx

    from lora_deploy.dtypes import BY_ONNX

    model = onnx.load(os.fspath(onnx_path), load_external_data=False)
    out = {}
    for init in model.graph.initializer:
        row = BY_ONNX.get(init.data_type)
        if row is not None and row.is_float and len(init.dims) > 0:
            out[init.name] = {"checkpoint": init.name, "dtype": row.name, "shape": [int(d) for d in init.dims]}
    return out


def select_refit_weights(weights: dict[str, dict], targets: str | None) -> list[str]:
    """ONNX names of the weights (and biases) of the modules named in `targets`."""
    modules = [t.strip() for t in (targets or "").split(",") if t.strip()]
    chosen = sorted(
        name
        for name, entry in weights.items()
        if entry["checkpoint"].endswith((".weight", ".bias"))
        and any(f".{m}." in "." + entry["checkpoint"] for m in modules)
    )
    if not chosen:
        raise BadInputError(f"--refit-targets {targets}: no weight of the model belongs to those modules")
    return chosen


def read_precision(engine: Any, requested: str) -> dict[str, Any]:
    import tensorrt as trt

    inspector = engine.create_engine_inspector()
    text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    counts = manifest_mod.layer_types(text)
    realized, problem = versions.realized_precision(counts, requested)
    return {"requested": requested, "realized": realized, "layer_types": counts, "problem": problem}


def environment(trt: Any) -> dict[str, Any]:
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return {
        "tensorrt": trt.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0),
        "compute_capability": f"{major}.{minor}",
    }
