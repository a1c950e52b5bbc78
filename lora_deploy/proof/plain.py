"""verify for plain torch modules (the factory form: `--module package.module:factory`):
a robot controller with no config.json, its base a `.pt` state dict, a safetensors file
or directory.

The reference is the base module with the adapter attached unmerged (modeling.unmerged,
float32); candidates are the merged checkpoint loaded into the same module (torch), an
ONNX graph (ONNX Runtime: a float16 graph gets float16 inputs, a static-batch graph is
run in slices of its batch), and a dynamic-adapter graph with the adapter active and
with none (a float16 or fully static one too: the adapter is packed in the graph's dtype,
zero-padded to its fixed rank; the tolerance is the loosest of the graphs' dtypes). Input
sets: generated observations (drawn within the ranges of the module's `example_inputs()`
or of the `--inputs` file, same dtypes and sizes) and the `--inputs` file itself
(recorded observations).

Besides the output checks every verify runs (and the adapter's effect), the actions:
the module's `action_kind` attribute says how ("bins": decoded action bins must equal
the reference's, every mismatch reported with its margin and whether it is a near-tie;
"continuous", the default: the largest action error in action units, within the
tolerance). See proof/actions.py.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lora_deploy.adapter.read import load_adapter
from lora_deploy.compare import Tolerance, check_tolerances, tolerance
from lora_deploy.errors import BadInputError
from lora_deploy.io.provenance import artifact_hashes
from lora_deploy.merge.plain import base_source
from lora_deploy.proof.actions import action_error, compare_bins
from lora_deploy.proof.inputs import GENERATED, InputSet
from lora_deploy.proof.verify import (
    ONNX,
    SKIPPED,
    Check,
    Graphs,
    VerifyReport,
    candidate_checks,
    check_weights,
    effect_check,
    loosest,
    mixed_batch_checks,
    multi_outputs,
    onnx_dtype,
    outcome,
    polygraphy_check,
    require_cpu,
    run_onnx_with_polygraphy,
    stored_dtype,
)

ACTION_KINDS = ("continuous", "bins")
GLUE_MERGED = "parts chain (onnx; glue: merged, torch)"
GLUE_UNMERGED = "parts chain (onnx; glue: base + adapter unmerged, torch)"


def verify_module(
    base: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    *,
    module: str,
    merged_dir: str | os.PathLike | None = None,
    onnx_path: str | os.PathLike | None = None,
    dynamic_path: str | os.PathLike | None = None,
    packed_path: str | os.PathLike | None = None,
    multi_path: str | os.PathLike | None = None,
    parts: Mapping[str, str | os.PathLike] | None = None,
    inputs_path: str | os.PathLike | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    batch: int = 2,
    seq: int = 16,
    seed: int = 0,
    task: str = "auto",
    allow_no_effect: bool = False,
    device: str = "cpu",
    provider: str | None = None,
    trt_fp16: bool = False,
    trt_cache: str | os.PathLike | None = None,
) -> VerifyReport:
    """Run every check the given artifacts allow on a plain module; never raises on a
    mismatch. `batch` is the number of generated observations; `seq` and `task` belong to
    text models and must keep their defaults; `device` and ONNX Runtime's GPU options
    (verify's keywords, VerifyOptions) must too: this runs on the CPU. `parts` ({submodule
    path: ONNX graph of that part}, export_plain's `part`) are checked one by one on the
    inputs each part receives in the reference, and as a chain (see part_chain_outputs)."""
    from lora_deploy.backends.torch.runner import TorchRunner
    from lora_deploy.export.plain import module_feed
    from lora_deploy.modeling.factory import check_module_checkpoint, load_module
    from lora_deploy.modeling.unmerged import attach

    require_cpu("--module", device, provider, trt_fp16, trt_cache)
    check_tolerances(atol, rtol)
    if task != "auto" or seq != 16:
        raise BadInputError("--task and --seq apply to text models; a plain module's inputs are its observations")
    parts = {str(name): Path(path) for name, path in (parts or {}).items()}
    if merged_dir is None and onnx_path is None and dynamic_path is None and multi_path is None and not parts:
        raise BadInputError("nothing to verify: give --merged, --onnx, --dynamic, --multi and/or --part")
    if batch < 1:
        raise BadInputError("--batch must be at least 1")
    for path in (onnx_path, dynamic_path, packed_path, multi_path, inputs_path, *parts.values()):
        if path is not None and not Path(path).is_file():
            raise BadInputError(f"{path}: file not found")
    if packed_path is not None and dynamic_path is None:
        raise BadInputError("--packed is the adapter file for --dynamic")
    check_module_checkpoint(base, "base")
    if merged_dir is not None:
        check_module_checkpoint(merged_dir, "merged")
    adapter = load_adapter(adapter_dir)
    source = f"the module from {module}"
    model = load_module(module, base)
    kind = getattr(model, "action_kind", "continuous")
    if kind not in ACTION_KINDS:
        raise BadInputError(f"{source}: action_kind {kind!r} (choose {', '.join(ACTION_KINDS)})")
    golden = module_feed(model, inputs_path, source) if inputs_path is not None else None
    template = golden if golden is not None else module_feed(model, None, source)
    sets = [InputSet(GENERATED, generated_feed(template, batch, seed))]
    if golden is not None:
        sets.append(InputSet(Path(inputs_path).name, golden))

    report = VerifyReport(
        inputs={
            "base": str(base),
            "adapter": str(adapter_dir),
            "module": module,
            "action_kind": kind,
            "merged": _str(merged_dir),
            "onnx": _str(onnx_path),
            "dynamic": _str(dynamic_path),
            "packed": _str(packed_path),
            "multi": _str(multi_path),
            "parts": {name: str(path) for name, path in parts.items()} or None,
            "golden_inputs": _str(inputs_path),
            "batch": batch,
            "seed": seed,
            "allow_no_effect": allow_no_effect,
        }
    )
    dtypes = ["float32"]
    if merged_dir is not None:
        with base_source(Path(base)) as base_view, base_source(Path(merged_dir)) as merged_view:
            report.checks += check_weights(base_view.read_dir, adapter, merged_view.read_dir)
            dtypes.append(stored_dtype(merged_view.read_dir))
    if onnx_path is not None:
        dtypes.append(onnx_dtype(Path(onnx_path)))
    dtypes += [onnx_dtype(Path(path)) for path in (dynamic_path, multi_path) if path is not None]  # float16 too
    dtypes += [onnx_dtype(path) for path in parts.values()]
    tol = tolerance(loosest(dtypes), atol, rtol)

    candidates: list[dict[str, dict]] = [{} for _ in sets]
    part_wants: list[dict[str, dict]] = [{} for _ in sets]
    with TorchRunner(model, name="base") as runner:
        base_outs = [runner.infer(s.feed) for s in sets]
        with attach(model, adapter):
            references = [runner.infer(s.feed) for s in sets]
            if parts and merged_dir is None:  # the glue between the part graphs: base + adapter unmerged
                for found, wants, inputs in zip(candidates, part_wants, sets):
                    found.update(part_chain_outputs(model, parts, inputs.feed, wants, GLUE_UNMERGED))
    if parts and merged_dir is not None:  # the glue: the merged checkpoint, as the robot runs it
        with attach(model, adapter):
            recorded = [record_parts(model, parts, inputs.feed) for inputs in sets]
        merged_model = load_module(module, merged_dir)
        for found, wants, inputs, signatures in zip(candidates, part_wants, sets, recorded):
            found.update(part_chain_outputs(merged_model, parts, inputs.feed, wants, GLUE_MERGED, signatures))
    if merged_dir is not None:
        with TorchRunner(load_module(module, merged_dir), name="merged") as runner:
            for found, inputs in zip(candidates, sets):
                found["merged (torch)"] = runner.infer(inputs.feed)
    if onnx_path is not None:
        for found, inputs in zip(candidates, sets):
            found[ONNX] = run_graph(Path(onnx_path), inputs.feed)
    skipped: dict[str, None] = {}
    if dynamic_path is not None:
        graphs = Graphs(None, Path(dynamic_path), _path(packed_path), None, Path(adapter_dir))
        for found, inputs in zip(candidates, sets):
            found.update(dynamic_module_outputs(graphs, inputs.feed, lambda line: skipped.setdefault(line)))
    multi = None
    if multi_path is not None:
        from lora_deploy.backends.onnxrt.sessions import MultiSession

        graphs = Graphs(None, None, None, Path(multi_path), Path(adapter_dir))
        multi = MultiSession(graphs.multi)  # loaded once for the per-adapter and mixed-batch checks
        for found, inputs in zip(candidates, sets):
            slices, rows = fit_feed(graphs.multi, inputs.feed)
            found.update(joined([multi_outputs(multi, graphs, part) for part in slices], rows))
    action_output = list(references[0])[0]
    for inputs, base_out, reference, found, wants in zip(sets, base_outs, references, candidates, part_wants):
        check = effect_check(base_out, reference, tol, inputs, allow_no_effect)
        report.checks.append(check)
        report.effect[inputs.label] = {"max_abs": check.max_abs, "top1_changed": _changed(check)}
        report.checks += candidate_checks(found, base_out, reference, tol, inputs)
        for label, outputs in wants.items():
            report.checks += candidate_checks({label: outputs["got"]}, {}, outputs["want"], tol, inputs)
        for label, outputs in found.items():
            want = base_out if label.endswith("(no adapter)") else reference
            if action_output in outputs:
                report.checks.append(
                    action_check(kind, label, outputs[action_output], want[action_output], tol, inputs)
                )
        if multi is not None:
            report.checks += mixed_batch_checks(
                multi, fit_feed(Path(multi_path), inputs.feed)[0][0], None, tol, inputs.label
            )
        if onnx_path is not None:
            report.checks.append(polygraphy_check(reference, found[ONNX], tol, inputs.label))
    report.checks += [Check(f"outputs: dynamic graph, {n.split(':')[0]}", SKIPPED, detail=n) for n in skipped]
    roles = {"base": base, "adapter": adapter_dir, "merged": merged_dir, "golden_inputs": inputs_path}
    roles.update(onnx=onnx_path, dynamic=dynamic_path, packed=packed_path, multi=multi_path)
    roles.update({f"part {name}": path for name, path in parts.items()})
    report.artifacts = {role: artifact_hashes(Path(path)) for role, path in roles.items() if path is not None}
    return report


def _str(path) -> str | None:
    return None if path is None else str(path)


def _path(path) -> Path | None:
    return None if path is None else Path(path)


def _changed(check: Check) -> float | None:
    return None if check.top1 is None else 1.0 - check.top1


def generated_feed(template: dict[str, np.ndarray], rows: int, seed: int) -> dict[str, np.ndarray]:
    """`rows` observations drawn uniformly within each template array's value range, with
    its dtype and per-row shape (ids: integers in the template's range)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, arr in template.items():
        shape = (rows, *arr.shape[1:])
        low, high = (arr.min(), arr.max()) if arr.size else (0, 1)
        if arr.dtype.kind == "f":
            out[name] = rng.uniform(float(low), float(high), shape).astype(arr.dtype)
        else:
            out[name] = rng.integers(int(low), int(high) + 1, shape).astype(arr.dtype)
    return out


def action_check(kind: str, label: str, got: np.ndarray, want: np.ndarray, tol: Tolerance, inputs: InputSet) -> Check:
    """The actions of one candidate against the reference's (or the base's, for a
    "(no adapter)" run)."""
    against = "base" if label.endswith("(no adapter)") else "unmerged"
    name = f"actions [{inputs.label}]: {label} vs {against}"
    got = np.asarray(got, dtype=np.float32)
    want = np.asarray(want, dtype=np.float32)
    if got.shape != want.shape:
        return Check(name, False, detail=f"shape {list(got.shape)} != {list(want.shape)}", inputs=inputs.label)
    if kind == "bins":
        result = compare_bins(got, want, tol)
        return Check(
            name,
            outcome(result.all_near_ties),
            max_abs=max((m.margin for m in result.mismatches), default=None),  # the worst margin
            top1=result.share,
            atol=tol.atol,
            rtol=tol.rtol,
            detail=result.summary() + ("" if result.all_near_ties else "; a mismatch beyond a near-tie"),
            inputs=inputs.label,
        )
    worst, where = action_error(got, want)
    bound = tol.atol + tol.rtol * float(np.abs(want[where])) if where else tol.atol
    passed = bool(np.all(np.abs(got.astype(np.float64) - want) <= tol.atol + tol.rtol * np.abs(want)))
    return Check(
        name,
        outcome(passed),
        max_abs=worst,
        atol=tol.atol,
        rtol=tol.rtol,
        detail=f"max action error {worst:.3g} (action units) at {list(where)}, allowed there {bound:.3g}",
        inputs=inputs.label,
    )


def graph_inputs(path: Path) -> dict[str, tuple[np.dtype, int | None]]:
    """{input name: (numpy dtype, fixed batch or None)} of an ONNX graph's inputs."""
    import onnx

    from lora_deploy.backends.onnxrt.lora_format import is_lora_name
    from lora_deploy.backends.onnxrt.sessions import IDS_INPUT
    from lora_deploy.dtypes import BY_ONNX

    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    out = {}
    for value in model.graph.input:
        # LoRA inputs (with defaults or, for TensorRT, required) and adapter ids: not observations
        if value.name in initializers or value.name == IDS_INPUT or is_lora_name(value.name):
            continue
        tensor = value.type.tensor_type
        row = BY_ONNX.get(tensor.elem_type)
        dims = tensor.shape.dim
        fixed = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
        out[value.name] = (np.dtype(row.numpy) if row is not None else None, fixed)
    return out


def fit_feed(path: Path, feed: dict[str, np.ndarray]) -> tuple[list[dict[str, np.ndarray]], int]:
    """The feed in the graph's input dtypes (a float16 graph takes float16), split into
    slices of a static batch (the last padded by repeating rows): (slices, rows)."""
    inputs = graph_inputs(path)
    missing = [name for name in inputs if name not in feed]
    if missing:
        raise BadInputError(f"{path}: the graph takes {', '.join(inputs)}; the observations lack {', '.join(missing)}")
    cast = {
        name: feed[name].astype(dtype) if dtype is not None and feed[name].dtype != dtype else feed[name]
        for name, (dtype, _) in inputs.items()
    }
    rows = len(next(iter(cast.values())))
    fixed = {b for _, b in inputs.values() if b}
    if not fixed:
        return [cast], rows
    if len(fixed) > 1:
        raise BadInputError(f"{path}: its inputs fix different batch sizes {sorted(fixed)}")
    size = fixed.pop()
    slices = []
    for start in range(0, rows, size):
        index = np.minimum(np.arange(start, start + size), rows - 1)  # pad with the last row
        slices.append({name: arr[index] for name, arr in cast.items()})
    return slices, rows


def run_graph(path: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ONNX graph on the observations (the one session loader, via polygraphy's runner),
    outputs as float32 for the comparisons."""
    slices, rows = fit_feed(path, feed)
    results = run_onnx_with_polygraphy(path, slices)
    names = list(results[0])
    return {name: np.concatenate([r[name] for r in results])[:rows].astype(np.float32) for name in names}


def dynamic_module_outputs(graphs: Graphs, feed: dict[str, np.ndarray], note: Any = None) -> dict[str, dict]:
    """A plain module's dynamic-adapter graph with the adapter active and with none (a
    static-batch graph run slice by slice, fit_feed)."""
    import dataclasses
    import tempfile

    from lora_deploy.backends.onnxrt.lora_format import pack_adapter
    from lora_deploy.proof.verify import dynamic_outputs

    slices, rows = fit_feed(graphs.dynamic, feed)
    with tempfile.TemporaryDirectory() as tmp:
        if len(slices) > 1 and graphs.packed is None:  # a static batch: packed once for every slice
            packed = pack_adapter(
                graphs.adapter_dir, Path(tmp) / "adapter.onnx_adapter", onnx_path=graphs.dynamic, note=note
            )
            graphs = dataclasses.replace(graphs, packed=packed)
        return joined([dynamic_outputs(graphs, part, note) for part in slices], rows)


def joined(found: list[dict[str, dict]], rows: int) -> dict[str, dict]:
    """Per-slice {label: outputs} (fit_feed's slices of a static batch) as one, `rows` long, float32."""
    return {
        label: {k: np.concatenate([f[label][k] for f in found])[:rows].astype(np.float32) for k in found[0][label]}
        for label in found[0]
    }


def parse_parts(specs) -> dict[str, Path]:
    """`--part NAME=FILE.onnx` (repeated) -> {part: graph path}; each part once."""
    parts: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = str(spec).partition("=")
        if not sep or not name.strip() or not path.strip():
            raise BadInputError(f"--part {spec!r}: expected NAME=FILE.onnx (NAME a submodule path, e.g. blocks.0)")
        if name.strip() in parts:
            raise BadInputError(f"--part {name.strip()} is given twice")
        parts[name.strip()] = Path(path.strip())
    return parts


def record_parts(model: Any, parts: Mapping[str, Path], feed: dict[str, np.ndarray]) -> dict[str, tuple]:
    """{part: (signature, recorded inputs, recorded outputs)} of each part in one model's
    forward on `feed` (modeling/parts.record_part)."""
    from lora_deploy.modeling.parts import record_part

    return {name: record_part(model, name, feed, "the module") for name in parts}


def part_chain_outputs(
    glue: Any,
    parts: Mapping[str, Path],
    feed: dict[str, np.ndarray],
    wants: dict[str, dict],
    label: str,
    recorded: dict[str, tuple] | None = None,
) -> dict[str, dict]:
    """The model run as a chain of its part graphs in ONNX Runtime, with `glue` (a torch
    module: the model's own code between the parts) around them: {label: outputs}.

    `recorded` holds the reference's part calls (record_parts; recorded on `glue` when
    None, which is then the reference itself). Each part graph is also run alone on the
    inputs its part received in the reference: `wants` gets {"part NAME (onnx)":
    {"got": graph outputs, "want": the reference part's outputs}}.
    """
    import torch

    from lora_deploy.arrays import from_torch
    from lora_deploy.backends.torch.runner import TorchRunner
    from lora_deploy.modeling.parts import substituted

    recorded = recorded if recorded is not None else record_parts(glue, parts, feed)
    runners = {}
    for name, path in parts.items():
        signature, inputs, outputs = recorded[name]
        taken = list(graph_inputs(path))
        if taken != signature.input_names:
            raise BadInputError(
                f"part {name}: {path} takes {', '.join(taken)}; the part receives {', '.join(signature.input_names)}"
            )
        got = run_graph(path, {k: from_torch(v) for k, v in inputs.items()})
        if len(got) != len(outputs):
            raise BadInputError(f"part {name}: {path} has {len(got)} output(s); the part returns {len(outputs)}")
        want = {n: from_torch(t).astype(np.float32) for n, t in zip(got, outputs)}
        wants[f"part {name} (onnx)"] = {"got": got, "want": want}

        def runner(flat, path=path):
            result = run_graph(path, {k: from_torch(v) for k, v in flat.items()})
            return [torch.from_numpy(arr) for arr in result.values()]

        runners[name] = (signature, runner)
    with substituted(glue, runners), TorchRunner(glue, name="parts") as chain:
        return {label: {k: np.asarray(v, dtype=np.float32) for k, v in chain.infer(feed).items()}}
