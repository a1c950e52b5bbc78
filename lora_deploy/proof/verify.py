"""Verify stage: prove that an artifact computes what base + adapter computed.

Two levels:
- weights (with a merged checkpoint): every adapted tensor equals W0 + dW recomputed from
  the adapter within one rounding of its dtype; every other tensor is the base, bit for bit.
- outputs: base + adapter run unmerged in torch (the way PEFT computes it) is the
  reference; the merged model (torch) and the ONNX model (ONNX Runtime) are compared with
  it on deterministic inputs: max abs / rel error, cosine similarity, top-1 agreement;
  with golden inputs (`--inputs FILE.npz`, real tokenized text) on those too.

First, on every input set, the adapter's effect: base + adapter against the base. An
adapter that changes nothing measurable makes every output check vacuous (the base itself
would pass them), so it fails unless allowed (see effect_check).

Each check is passed, failed or skipped (not run, with the reason): `equivalent` means no
check failed and at least one passed. A figure that was not measured is None, never 0.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from lora_deploy.adapter.plan import plan_merge
from lora_deploy.adapter.read import Adapter, load_adapter
from lora_deploy.arrays import all_finite
from lora_deploy.backends.onnxrt.gpu import GpuChoice
from lora_deploy.compare import (
    TOLERANCES,
    Comparison,
    OutputMatchError,
    Tolerance,
    check_tolerances,
    compare,
    compare_array,
    tolerance,
)
from lora_deploy.dtypes import BY_ONNX, BY_SAFETENSORS
from lora_deploy.errors import BadInputError, NotEquivalentError
from lora_deploy.io.checkpoint import Checkpoint
from lora_deploy.io.provenance import artifact_hashes, report_header
from lora_deploy.io.staging import check_cache_dir
from lora_deploy.merge.delta import merged_bias, merged_weight
from lora_deploy.modeling.samples import check_input_size, read_config_dict
from lora_deploy.proof.inputs import GENERATED, InputSet, load_golden_inputs
from lora_deploy.util import first_line

SCHEMA = "lora-deploy.verify/1"
PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
ONNX = "onnx (onnxruntime)"
ENGINE = "engine (tensorrt)"

# Output tolerances are lora_deploy.compare.TOLERANCES, by the loosest dtype involved: the
# merged model is run in float32, so what differs from the reference is one rounding of
# each stored weight, or the ONNX graph's output precision.


@dataclass
class Check:
    """One check: its status (passed / failed / skipped) and the figures that decided it.

    A figure that was not measured (a missing tensor or output, a shape mismatch, a check
    that did not run) is None (null in JSON), never 0.0 or inf. `detail` says why a check
    failed or was skipped; `inputs` names the input set of an output check.
    """

    name: str
    status: str  # PASSED, FAILED or SKIPPED; a bool is read as passed / failed
    max_abs: float | None = None
    max_rel: float | None = None
    cosine: float | None = None
    top1: float | None = None
    atol: float | None = None
    rtol: float | None = None
    detail: str = ""
    inputs: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.status, bool):
            self.status = outcome(self.status)
        if self.status not in (PASSED, FAILED, SKIPPED):
            raise ValueError(f"check status must be {PASSED}, {FAILED} or {SKIPPED}, not {self.status!r}")

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    @property
    def failed(self) -> bool:
        return self.status == FAILED

    @property
    def skipped(self) -> bool:
        return self.status == SKIPPED

    def to_dict(self) -> dict:
        # "passed" is kept for readers of older reports: null for a skipped check, which
        # neither passed nor failed.
        return {**asdict(self), "passed": None if self.skipped else self.passed}


def outcome(passed: bool) -> str:
    return PASSED if passed else FAILED


@dataclass
class VerifyReport:
    checks: list[Check] = field(default_factory=list)
    inputs: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)  # role -> {"path", "sha256": {file: digest}}
    effect: dict = field(default_factory=dict)  # input set -> the adapter's effect (effect_check)
    header: dict = field(default_factory=lambda: report_header(SCHEMA))  # schema, created, version

    @property
    def equivalent(self) -> bool:
        """No check failed and at least one passed; skipped checks do not count."""
        return not self.failures() and any(c.passed for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.failed]

    def skipped(self) -> list[Check]:
        return [c for c in self.checks if c.skipped]

    def to_dict(self) -> dict:
        return {
            **self.header,
            "equivalent": self.equivalent,
            "inputs": self.inputs,
            "artifacts": self.artifacts,
            "effect": self.effect,
            "skipped": [{"name": c.name, "reason": c.detail} for c in self.skipped()],
            "checks": [c.to_dict() for c in self.checks],
        }

    def problem(self) -> str | None:
        """Why the artifacts are not shown equivalent, in one line; None when they are."""
        bad = self.failures()
        if not bad:
            return None if self.equivalent else "nothing was verified: every check was skipped"
        # No effect first: it makes the other checks meaningless. Then the largest errors,
        # those that could not be measured at all (missing, wrong shape) before them.
        no_effect = [c for c in bad if c.name.startswith("effect")]
        rest = sorted((c for c in bad if c not in no_effect), key=lambda c: -_or_inf(c.max_abs))
        parts = [c.detail for c in no_effect]  # "no effect: ... on the generated inputs ..."
        parts += [f"{c.name} (max abs {figure(c.max_abs)}{', ' + c.detail if c.detail else ''})" for c in rest[:3]]
        more = f" and {len(rest) - 3} more" if len(rest) > 3 else ""
        return f"{'not equivalent: ' if rest else ''}{'; '.join(parts)}{more}"

    def raise_if_different(self) -> None:
        problem = self.problem()
        if problem is not None:
            raise NotEquivalentError(problem)


def figure(value: float | None, spec: str = ".3g") -> str:
    """A figure for a message or table: "-" when it was not measured."""
    return "-" if value is None else format(value, spec)


def _or_inf(value: float | None) -> float:
    return float("inf") if value is None else value


def verify(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    *,
    merged_dir: str | os.PathLike | None = None,
    onnx_path: str | os.PathLike | None = None,
    dynamic_path: str | os.PathLike | None = None,
    packed_path: str | os.PathLike | None = None,
    multi_path: str | os.PathLike | None = None,
    engine_path: str | os.PathLike | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    batch: int = 2,
    seq: int = 16,
    seed: int = 0,
    task: str = "auto",
    inputs_path: str | os.PathLike | None = None,
    allow_no_effect: bool = False,
    device: str = "cpu",
    provider: str | None = None,
    trt_fp16: bool = False,
    trt_cache: str | os.PathLike | None = None,
) -> VerifyReport:
    """Run every check that the given artifacts allow; never raises on a mismatch.

    `engine_path`: a TensorRT engine (lora-deploy build trt), checked against the unmerged
    reference and against ONNX Runtime on the ONNX its manifest names, with the tolerance
    of the precision its manifest records. Needs TensorRT and a GPU: without them,
    TensorRTUnavailable (exit 2) before any work.

    `device` cuda runs the --onnx graph on ONNX Runtime's CUDA or TensorRT provider
    (`provider`, `trt_fp16`, `trt_cache`: backends/onnxrt/gpu.py); where it really ran is
    recorded in the report's inputs ("onnxruntime"). `trt_cache` is a directory ONNX Runtime
    writes into: never an input, nor inside or containing one (io.staging.check_cache_dir)."""
    from lora_deploy.backends.onnxrt import gpu

    check_tolerances(atol, rtol)  # a negative or NaN --atol: one line, before any work
    choice = gpu.choose(device, provider, trt_fp16, trt_cache)
    if trt_cache is not None:  # before the providers are needed: a wrong path is one line on any machine
        artifacts = [merged_dir, onnx_path, dynamic_path, packed_path, multi_path, engine_path, inputs_path]
        check_cache_dir(trt_cache, [base_dir, adapter_dir, *artifacts])
    if choice.on_gpu and (onnx_path is None or dynamic_path is not None or multi_path is not None):
        raise BadInputError("--device cuda runs the --onnx graph on a GPU: give --onnx (adapter graphs run on the CPU)")
    gpu.require_providers(choice)  # without onnxruntime-gpu: one line, before any work
    engine = engine_graphs(engine_path)  # first: without TensorRT, one line and nothing done
    config_path = Path(base_dir) / "config.json"
    config = read_config_dict(config_path)
    if config is not None:  # outputs will be computed: bound batch and seq first, not after an OOM kill
        check_input_size(batch, seq, config, what="verify --batch/--seq", copies=2, where=str(config_path))
    adapter = load_adapter(adapter_dir)
    graphs = Graphs(_path(onnx_path), _path(dynamic_path), _path(packed_path), _path(multi_path), Path(adapter_dir))
    graphs.engine, graphs.engine_onnx, graphs.engine_manifest = engine
    graphs.choice = choice
    refuse_kv_cache_graphs(graphs.onnx, graphs.dynamic, graphs.multi)
    golden = _path(inputs_path)
    report = VerifyReport(
        inputs={
            "base": str(base_dir),
            "adapter": str(adapter_dir),
            "merged": _str(merged_dir),
            "onnx": _str(onnx_path),
            "dynamic": _str(dynamic_path),
            "packed": _str(packed_path),
            "multi": _str(multi_path),
            "engine": _str(engine_path),
            "golden_inputs": _str(golden),
            "batch": batch,
            "seq": seq,
            "seed": seed,
            "allow_no_effect": allow_no_effect,
            "device": device,
            "provider": choice.provider,
            "onnxruntime": graphs.placement,  # filled in when the --onnx session opens: where it ran
        }
    )
    dtypes = ["float32"]
    if merged_dir is not None:
        report.checks += check_weights(base_dir, adapter, merged_dir)
        dtypes.append(stored_dtype(merged_dir))
    if graphs.onnx is not None:
        dtypes.append(onnx_dtype(graphs.onnx))
    if graphs.engine_manifest is not None:
        from lora_deploy.backends.trt.manifest import engine_dtype

        dtypes.append(engine_dtype(graphs.engine_manifest))  # the precision the engine was read back in
    dtype = loosest(dtypes)
    if not (Path(base_dir) / "config.json").is_file():
        # A plain torch module's checkpoint: no architecture to run, so weights are the proof.
        if merged_dir is None or graphs.onnx or graphs.dynamic or graphs.multi or graphs.engine or golden:
            raise BadInputError(
                f"{base_dir}: no config.json, so outputs cannot be computed; verify --merged only, or give "
                "--module PKG.MOD:FACTORY (a plain module: proof.plain.verify_module)"
            )
        report.checks.append(
            Check(
                "outputs",
                SKIPPED,
                detail="no config.json (a plain torch module's checkpoint): no architecture to run, so neither "
                "the outputs nor the adapter's effect on them are checked; weights only",
            )
        )
    else:
        checks, report.effect = check_outputs(
            base_dir, adapter, merged_dir, graphs, dtype, atol, rtol, batch, seq, seed, task, golden, allow_no_effect
        )
        report.checks += checks
    roles = {"base": base_dir, "adapter": adapter_dir, "merged": merged_dir, "golden_inputs": golden}
    roles.update(onnx=graphs.onnx, dynamic=graphs.dynamic, packed=graphs.packed, multi=graphs.multi)
    roles.update(engine=graphs.engine, engine_onnx=graphs.engine_onnx)
    report.artifacts = {role: artifact_hashes(path) for role, path in roles.items() if path is not None}
    return report


def require_cpu(
    what: str,
    device: str = "cpu",
    provider: str | None = None,
    trt_fp16: bool = False,
    trt_cache: str | os.PathLike | None = None,
    **others,
) -> None:
    """verify's ONNX Runtime GPU options (VerifyOptions: device, provider, trt_fp16,
    trt_cache) run the --onnx output check on a GPU. The checks that run on the CPU
    (`what`: --generate, --genai, --module) take them like every verify entry point and
    refuse them in one line rather than ignore them. `others`: verify's other keywords."""
    if device != "cpu" or provider is not None or trt_fp16 or trt_cache is not None:
        raise BadInputError(f"{what} runs on the CPU: drop --device, --provider, --trt-fp16 and --trt-cache")


def refuse_kv_cache_graphs(*paths: Path | None) -> None:
    """A KV-cache graph takes the cache as inputs, which these output checks do not feed:
    its check is `verify --generate N` (proof/generate.py)."""
    from lora_deploy.backends.onnxrt.decode import has_kv_cache

    for path in paths:
        if path is not None and has_kv_cache(path):
            raise BadInputError(f"{path}: a KV-cache graph (past_key_values.* inputs): check it with --generate N")


def loosest(dtypes: list[str]) -> str:
    """The dtype with the widest tolerance among those involved."""
    return max(dtypes, key=lambda d: TOLERANCES[d].atol)


def onnx_dtype(path: Path) -> str:
    """The dtype name of the graph's first output, float32 if it has no tolerance row."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types for a non-ONNX file
        raise BadInputError(f"{path}: not an ONNX model ({type(exc).__name__})") from None
    elem = model.graph.output[0].type.tensor_type.elem_type if model.graph.output else onnx.TensorProto.FLOAT
    row = BY_ONNX.get(elem)
    return row.name if row is not None and row.name in TOLERANCES else "float32"


@dataclass
class Graphs:
    """The ONNX artifacts to check: a merged/plain graph, a dynamic one, a multi-adapter one."""

    onnx: Path | None
    dynamic: Path | None
    packed: Path | None  # a .onnx_adapter for the dynamic graph; packed on the fly when None
    multi: Path | None
    adapter_dir: Path
    engine: Path | None = None  # a TensorRT engine, with the ONNX it was built from and its manifest
    engine_onnx: Path | None = None
    engine_manifest: dict | None = None
    choice: GpuChoice | None = None  # where the --onnx graph runs (ONNX Runtime's providers)
    placement: dict = field(default_factory=dict)  # what its session really ran on


def _str(path) -> str | None:
    return None if path is None else str(path)


def _path(path) -> Path | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise BadInputError(f"{path}: file not found")
    return Path(path)


def stored_dtype(model_dir) -> str:
    """The widest-error float dtype among a checkpoint's tensors (decides tolerances)."""
    with Checkpoint(model_dir) as ckpt:
        names = {BY_SAFETENSORS[t.dtype].name for t in ckpt.tensors.values()}
    return loosest(["float32", *(n for n in names if n in TOLERANCES)])


# ------------------------------------------------------------------ weights ----


def check_weights(base_dir, adapter: Adapter, merged_dir) -> list[Check]:
    """Each merged tensor against its expected value; a missing or extra tensor fails."""
    with Checkpoint(base_dir) as base, Checkpoint(merged_dir) as merged:
        plan = plan_merge(adapter, base)
        expected_names = set(base.tensors) | set(plan.untie)
        names = name_checks("missing from the merged checkpoint", expected_names - set(merged.tensors))
        names += name_checks("in the merged checkpoint but not the base", set(merged.tensors) - expected_names)
        checks = list(names)
        bias_of = {t.bias_key: t for t in plan.targets.values() if t.bias_key}
        figures: list[Check] = []  # the merged tensors' checks: their errors are measured
        copied = bad_copied = 0
        for name in sorted(expected_names & set(merged.tensors)):
            got = merged.read(name)
            expected = expected_tensor(name, base, plan, bias_of)
            if expected is None:  # untouched: must be the base tensor itself
                copied += 1
                check = compare_exact(name, got, base.read(plan.untie.get(name, name)))
                bad_copied += not check.passed
            else:
                check = compare_weight(name, got, expected, merged.tensors[name].dtype)
                figures.append(check)
            if not check.passed:
                checks.append(check)
    measured = [c for c in figures if c.max_abs is not None]
    summary = Check(
        weights_summary(len(figures), sum(not c.passed for c in figures), copied, bad_copied, names),
        not checks,
        max_abs=max((c.max_abs for c in measured), default=None),
        max_rel=max((c.max_rel for c in measured if c.max_rel is not None), default=None),
    )
    return [summary] + checks


def weights_summary(merged: int, bad_merged: int, copied: int, bad_copied: int, names: list[Check]) -> str:
    """The summary's name: what was shown when all is well, what went wrong when not
    (`names`: the missing / extra tensor checks)."""
    if not (bad_merged or bad_copied or names):
        return f"weights: {merged} merged tensors within one rounding, {copied} others equal to the base"
    parts = []
    if bad_merged:
        parts.append(f"{bad_merged} of {merged} merged tensors not within one rounding of W0 + dW")
    if bad_copied:
        parts.append(f"{bad_copied} of {copied} other tensors differ from the base")
    parts += [c.name.removeprefix("weights: ") for c in names]
    return f"weights: {', '.join(parts)}"


def name_checks(what: str, names: set[str]) -> list[Check]:
    if not names:
        return []
    listed = ", ".join(sorted(names)[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return [Check(f"weights: {len(names)} tensors {what}", FAILED, detail=listed)]


def expected_tensor(name: str, base: Checkpoint, plan, bias_of) -> np.ndarray | None:
    """W0 + dW (or the merged bias, or a replacement) in float32; None for untouched tensors."""
    if name in plan.targets:
        w0 = plan.replacements.get(name)
        w0 = base.read(name) if w0 is None else w0
        return merged_weight(plan.targets[name].module, plan.targets[name].kind, w0)
    if name in bias_of:
        return merged_bias(bias_of[name].module, base.read(name))
    if name in plan.replacements:
        return plan.replacements[name].astype(np.float32)
    return None


def compare_exact(name: str, got: np.ndarray, base: np.ndarray) -> Check:
    """Untouched tensors: bit-exact, or exactly the base converted to the output dtype."""
    want = base.astype(got.dtype, copy=False)
    if got.shape == want.shape and got.tobytes() == want.tobytes():
        return Check(f"weights: {name}", PASSED, max_abs=0.0 if got.size else None, max_rel=0.0 if got.size else None)
    if got.shape != want.shape:
        shapes = f"shape {list(got.shape)} != base {list(want.shape)}"
        return Check(f"weights: {name}", FAILED, detail=f"should equal the base tensor; {shapes}")
    diff = float(np.abs(as_f64(got) - as_f64(want)).max()) if got.size else None
    return Check(f"weights: {name}", FAILED, max_abs=diff, detail="should equal the base tensor")


def as_f64(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float64)


def ulp(x: np.ndarray, dtype: str) -> np.ndarray:
    """The spacing of safetensors float dtype `dtype` (e.g. "F16") at each |x|."""
    row = BY_SAFETENSORS[dtype]
    bits, min_exp = row.mantissa_bits, row.min_exponent
    x = np.abs(x.astype(np.float64))
    _, exponent = np.frexp(x)
    exponent = np.where(x == 0, min_exp + 1, exponent)  # zero: the smallest step there is
    return np.ldexp(1.0, np.maximum(exponent - 1, min_exp) - bits)


def compare_weight(name: str, got: np.ndarray, want: np.ndarray, dtype: str) -> Check:
    """Within one ulp of the exact float32 result (1e-6 abs + 1e-5 rel for float32)."""
    if got.shape != want.shape:
        return Check(f"weights: {name}", FAILED, detail=f"shape {list(got.shape)} != {list(want.shape)}")
    diff = np.abs(as_f64(got) - as_f64(want))
    if dtype == "F32":
        allowed = 1e-6 + 1e-5 * np.abs(as_f64(want))
    else:
        allowed = ulp(want, dtype)
    passed = bool((diff <= allowed).all()) and all_finite(got)
    return Check(
        f"weights: {name}",
        passed,
        max_abs=float(diff.max()) if diff.size else None,
        max_rel=float((diff / np.maximum(np.abs(as_f64(want)), 1e-12)).max()) if diff.size else None,
        detail="" if passed else f"more than one {dtype} rounding from W0 + dW",
    )


# ------------------------------------------------------------------ outputs ----


def check_outputs(
    base_dir, adapter, merged_dir, graphs: Graphs, dtype, atol, rtol, batch, seq, seed, task, golden, allow_no_effect
) -> tuple[list[Check], dict]:
    """Every output check on every input set, and the adapter's effect per input set."""
    from lora_deploy.backends.torch.runner import TorchRunner
    from lora_deploy.modeling.hf import wrap_checkpoint
    from lora_deploy.modeling.samples import sample_inputs
    from lora_deploy.modeling.unmerged import attach

    if merged_dir is None and not (graphs.onnx or graphs.dynamic or graphs.multi or graphs.engine):
        raise BadInputError("nothing to verify: give --merged, --onnx, --dynamic, --multi and/or --engine")
    tol = tolerance(dtype, atol, rtol)
    model = wrap_checkpoint(base_dir, task, "float32")
    config = model.model.config
    sets = [InputSet(GENERATED, sample_inputs(config, batch=batch, seq=seq, seed=seed))]
    if golden is not None:
        sets.append(load_golden_inputs(golden, config))
    feeds = [s.feed for s in sets]
    with TorchRunner(model, name="base") as runner:
        base_outs = [runner.infer(feed) for feed in feeds]
        with attach(model.model, adapter):
            references = [runner.infer(feed) for feed in feeds]
    candidates: list[dict[str, dict]] = [{} for _ in sets]  # per input set: label -> outputs
    if merged_dir is not None:
        with TorchRunner(wrap_checkpoint(merged_dir, task, "float32"), name="merged") as runner:
            for found, feed in zip(candidates, feeds):
                found["merged (torch)"] = runner.infer(feed)
    if graphs.onnx is not None:
        for found, outputs in zip(candidates, run_onnx_with_polygraphy(graphs.onnx, feeds, graphs)):
            found[ONNX] = outputs
    engine_onnx: list[dict] = []  # ONNX Runtime on the engine's own ONNX, per input set
    if graphs.engine is not None:
        for found, outputs in zip(candidates, run_engine(graphs, feeds)):
            found[ENGINE] = outputs
        if graphs.engine_onnx == graphs.onnx:
            engine_onnx = [found[ONNX] for found in candidates]
        elif not engine_refitted(graphs):
            engine_onnx = run_onnx_with_polygraphy(graphs.engine_onnx, feeds)
    not_computed: dict[str, None] = {}  # pack's notes: adapter modules the dynamic graph does not compute
    if graphs.dynamic is not None:
        for found, feed in zip(candidates, feeds):
            found.update(dynamic_outputs(graphs, feed, lambda line: not_computed.setdefault(line)))
    multi = None
    if graphs.multi is not None:
        from lora_deploy.backends.onnxrt.sessions import MultiSession

        multi = MultiSession(graphs.multi)  # loaded once for the per-adapter and mixed-batch checks
        for found, feed in zip(candidates, feeds):
            found.update(multi_outputs(multi, graphs, feed))
    checks, effect = [], {}
    for i, (inputs, base_out, reference, found) in enumerate(zip(sets, base_outs, references, candidates)):
        check = effect_check(base_out, reference, tol, inputs, allow_no_effect)
        checks.append(check)
        effect[inputs.label] = {
            "max_abs": check.max_abs,
            "max_rel": check.max_rel,
            "top1_changed": None if check.top1 is None else 1.0 - check.top1,
            "no_effect": check.detail.startswith(NO_EFFECT),
        }
        checks += candidate_checks(found, base_out, reference, tol, inputs)
        if multi is not None:
            checks += mixed_batch_checks(multi, inputs.feed, inputs.mask, tol, inputs.label)
        if graphs.onnx is not None:
            checks.append(polygraphy_check(reference, found[ONNX], tol, inputs.label))
        if graphs.engine is not None:
            checks.append(polygraphy_check(reference, found[ENGINE], tol, inputs.label, "engine"))
            checks += engine_onnx_checks(graphs, found[ENGINE], engine_onnx[i] if engine_onnx else None, tol, inputs)
    # "skipped <module>: ..." -> a skipped check "outputs: dynamic graph, skipped <module>".
    checks += [Check(f"outputs: dynamic graph, {n.split(':')[0]}", SKIPPED, detail=n) for n in not_computed]
    return checks, effect


def candidate_checks(found: dict[str, dict], base_out, reference, tol: Tolerance, inputs: InputSet) -> list[Check]:
    """Each candidate's outputs against the reference (labels ending in "(no adapter)":
    against the base model)."""
    checks = []
    for label, outputs in found.items():
        want_all = base_out if label.endswith("(no adapter)") else reference
        against = "base" if want_all is base_out else "unmerged"
        for result in compare(outputs, want_all, tol, inputs.mask).outputs:
            what = f"lacks output {result.name}" if result.error is OutputMatchError else f"{result.name} vs {against}"
            checks.append(output_check(f"outputs [{inputs.label}]: {label} {what}", result, inputs.label))
    return checks


NO_EFFECT = "no effect"


def effect_check(base_out: dict, reference: dict, tol: Tolerance, inputs: InputSet, allow_no_effect: bool) -> Check:
    """The adapter's effect: base + adapter (the reference) against the base model, as max
    |delta| over the outputs and the share of positions whose top-1 prediction changes.

    No effect means: every output of the reference is within the comparison tolerance of
    the base, by the very test each candidate must pass (atol + rtol * |x| elementwise and
    the cosine bound). That is the right line because it is the checks' own resolution:
    below it the base model itself would pass every output check as this adapter's
    merge, so they cannot tell a correct merge from one that lost the adapter and prove
    nothing. Exactly zero would be too strict a test for that (an adapter too small to see
    at this tolerance, e.g. with float16 artifacts or a loose --atol, proves nothing
    either); anything above the tolerance would flag adapters the checks do resolve.
    """
    delta = compare(reference, base_out, tol, inputs.mask)
    changed = None if delta.top1 is None else 1.0 - delta.top1
    shown = f"max |delta| {figure(delta.max_abs)} vs the base"
    if changed is not None:
        shown += f", top-1 changed at {100 * changed:.1f}% of positions"
    no_effect = (
        f"base + adapter is within the comparison tolerance of the base on the {inputs.label} "
        f"inputs ({shown}; atol {tol.atol:g}, rtol {tol.rtol:g}), so the output checks cannot tell the "
        "adapter from its absence"
    )
    changes = None if delta.passed else f"the adapter changes the outputs: {shown}"
    name = f"effect [{inputs.label}]: base + adapter vs base"
    return effect_result(name, delta, tol, inputs.label, changes, no_effect, allow_no_effect)


def effect_result(
    name: str, delta, tol: Tolerance, label: str, changes: str | None, no_effect: str, allow_no_effect: bool
) -> Check:
    """The effect check from its figures (`delta`: max_abs, max_rel, cosine, top1 of base +
    adapter against the base): passed when the adapter changes what is checked (`changes`
    says how), else failed unless allowed (`no_effect` says why that makes the checks vacuous)."""
    if changes is not None:
        status, detail = PASSED, changes
    else:
        detail = f"{NO_EFFECT}: {no_effect}"
        if allow_no_effect:
            status, detail = PASSED, f"{detail} (allowed by --allow-no-effect)"
        else:
            status, detail = FAILED, f"{detail}; pass --allow-no-effect if that is intended"
    return Check(
        name,
        status,
        max_abs=delta.max_abs,
        max_rel=delta.max_rel,
        cosine=delta.cosine,
        top1=delta.top1,
        atol=tol.atol,
        rtol=tol.rtol,
        detail=detail,
        inputs=label,
    )


def quiet_polygraphy():
    """Polygraphy logs to stdout, which must hold only our output (one JSON document with
    --json); its verdicts and figures are in our checks, so it logs nothing. Its CRITICAL
    messages come with a PolygraphyException, which we report as our one line."""
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.CRITICAL + 1
    return G_LOGGER


def engine_graphs(engine_path) -> tuple[Path | None, Path | None, dict | None]:
    """(engine, the ONNX it was built from, its manifest) for --engine; (None, None, None)
    without one. TensorRT and a GPU are checked first: without them TensorRTUnavailable,
    one line, before anything is read."""
    if engine_path is None:
        return None, None, None
    from lora_deploy.backends.trt import manifest, versions

    versions.require_tensorrt()
    engine = _path(engine_path)
    assert engine is not None
    document = manifest.read_manifest(engine)
    return engine, manifest.engine_onnx(engine, document), document


def run_engine(graphs: Graphs, feeds: list[dict]) -> list[dict]:
    """The engine on each feed, through polygraphy's TrtRunner behind the runner contract;
    shapes outside its optimization profiles are refused first, naming the profile."""
    from lora_deploy.backends.trt.manifest import check_in_profiles
    from lora_deploy.backends.trt.runner import TrtEngineRunner, fit_feed

    assert graphs.engine is not None and graphs.engine_manifest is not None
    for feed in feeds:
        check_in_profiles(graphs.engine_manifest, feed)
    quiet_polygraphy()
    with TrtEngineRunner(graphs.engine, name="engine") as runner:
        meta = runner.input_metadata()
        return [runner.infer(fit_feed({k: v for k, v in feed.items() if k in meta}, meta)) for feed in feeds]


def engine_refitted(graphs: Graphs) -> dict | None:
    """The adapter a refit put into the engine after its build, or None."""
    return ((graphs.engine_manifest or {}).get("refit") or {}).get("current_adapter")


def engine_onnx_checks(graphs: Graphs, engine_out: dict, onnx_out: dict | None, tol: Tolerance, inputs) -> list[Check]:
    """The engine against ONNX Runtime on the ONNX it was built from, output by output.
    A refitted engine computes another model than that ONNX: skipped, with the reason."""
    onnx_name = graphs.engine_onnx.name if graphs.engine_onnx else "?"
    label = f"outputs [{inputs.label}]: {ENGINE} vs onnxruntime on {onnx_name}"
    refitted = engine_refitted(graphs)
    if onnx_out is None:
        adapter = (refitted or {}).get("path", "an adapter")
        return [
            Check(
                label,
                SKIPPED,
                detail=f"the engine was refitted to {adapter} after its build from {onnx_name}, so that ONNX no "
                "longer computes what the engine does; the engine is checked against the unmerged reference",
                inputs=inputs.label,
            )
        ]
    return [
        output_check(f"{label}: {result.name}", result, inputs.label)
        for result in compare(engine_out, onnx_out, tol, inputs.mask).outputs
    ]


def run_onnx_with_polygraphy(path: Path, feeds: list[dict], graphs: Graphs | None = None) -> list[dict]:
    """The ONNX model in ONNX Runtime, through polygraphy's loader and runner, on each feed:
    on the CPU, or on the GPU provider `graphs.choice` names (where it ran goes into
    `graphs.placement`)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.exception import PolygraphyException

    from lora_deploy.backends.onnxrt import gpu
    from lora_deploy.backends.onnxrt.loader import ort_errors

    choice = graphs.choice if graphs is not None and graphs.choice is not None else gpu.GpuChoice()

    def load():
        session, placement = gpu.open_session(choice, path)  # the one session loader, checked
        if graphs is not None:
            graphs.placement.update(placement)
        return session

    quiet_polygraphy()
    try:
        # polygraphy's runner takes any session loader: ours, so every session is made one way.
        with OnnxrtRunner(load) as runner:
            return [dict(runner.infer(feed).items()) for feed in feeds]
    except (*ort_errors(), PolygraphyException) as exc:  # polygraphy: inputs that do not fit the graph
        raise BadInputError(f"{path}: ONNX Runtime cannot run it on the sample inputs ({first_line(exc)})") from None


def polygraphy_check(
    reference: dict, outputs: dict, tol: Tolerance, inputs: str = GENERATED, label: str = "onnx"
) -> Check:
    """A second opinion from polygraphy's comparator, with polygraphy's own figures.

    Polygraphy compares elementwise at every position (padding included, which our checks
    leave out) and passes an element within atol OR within rtol of the reference (ours
    needs atol + rtol * |expected|). The ONNX outputs go first and the reference second,
    so polygraphy's relative difference is relative to the reference, as ours is (it
    nudges zeros by 2.2e-16 where we floor at 1e-6). Figures: the largest of polygraphy's
    max absolute and relative differences over the outputs it compared; it measures no
    cosine or top-1, so those are None.
    """
    from polygraphy.comparator import SimpleCompareFunc
    from polygraphy.comparator.compare import OutputCompareResult
    from polygraphy.comparator.struct import IterationResult

    quiet_polygraphy()
    judge = SimpleCompareFunc(check_error_stat="elemwise", atol=tol.atol, rtol=tol.rtol)
    result = judge(
        IterationResult({k: outputs[k] for k in reference if k in outputs}, runner_name=label),
        IterationResult(dict(reference), runner_name="unmerged"),
    )
    measured = [r for r in result.values() if isinstance(r, OutputCompareResult)]
    problems = [
        f"{name}: {'beyond tolerance' if isinstance(r, OutputCompareResult) else 'not compared (shape)'}"
        for name, r in result.items()
        if not r
    ]
    problems += [f"{name}: missing" for name in reference if name not in outputs]
    passed = bool(result) and not problems
    return Check(
        f"outputs [{inputs}]: polygraphy comparator, {label} vs unmerged",
        outcome(passed),
        max_abs=max((r.max_absdiff for r in measured if r.max_absdiff is not None), default=None),
        max_rel=max((r.max_reldiff for r in measured if r.max_reldiff is not None), default=None),
        atol=tol.atol,
        rtol=tol.rtol,
        detail="" if passed else f"polygraphy: {'; '.join(problems) or 'no output compared'}",
        inputs=inputs,
    )


def dynamic_outputs(graphs: Graphs, feed: dict, note=None) -> dict[str, dict]:
    """The dynamic graph with the adapter active, and with none (must be the base).

    Packed here, modules the graph does not compute are left out and reported to `note`."""
    import tempfile

    from lora_deploy.backends.onnxrt.lora_format import pack_adapter
    from lora_deploy.backends.onnxrt.sessions import DynamicSession

    session = DynamicSession(graphs.dynamic)
    with tempfile.TemporaryDirectory() as tmp:
        packed = graphs.packed
        if packed is None:
            packed = pack_adapter(
                graphs.adapter_dir, Path(tmp) / "adapter.onnx_adapter", onnx_path=graphs.dynamic, note=note
            )
        session.load_adapter("adapter", packed)
        return {
            "dynamic (adapter active)": session.run(feed, adapter="adapter"),
            "dynamic (no adapter)": session.run(feed),
        }


def multi_outputs(session, graphs: Graphs, feed: dict) -> dict[str, dict]:
    """The multi-adapter graph with every row on this adapter, and every row on none."""
    rows = len(next(iter(feed.values())))
    own = multi_id(session, graphs)
    return {
        f"multi (adapter_ids={own})": session.run(feed, [own] * rows),
        "multi (no adapter)": session.run(feed, [None] * rows),
    }


def multi_id(session, graphs: Graphs) -> int:
    name = graphs.adapter_dir.resolve().name
    matches = [i for i, n in enumerate(session.adapters) if n == name or n.startswith(f"{name}#")]
    if len(matches) != 1:
        raise BadInputError(f"{graphs.multi}: holds adapters {session.adapters}, none named {name!r} exactly once")
    return matches[0]


def mixed_batch_checks(session, feed: dict, mask, tol, inputs: str = GENERATED) -> list[Check]:
    """Every row of a batch mixing all adapters (and the base) equals that row run alone."""
    rows = len(next(iter(feed.values())))
    choices = list(range(len(session.adapters))) + [-1]
    ids = [choices[i % len(choices)] for i in range(rows)]
    mixed = session.run(feed, ids)
    # One graph run twice, batches differing only in composition: float32's direction bound.
    same_graph = replace(tol, min_cosine=TOLERANCES["float32"].min_cosine)
    checks = []
    for row, adapter_id in enumerate(ids):
        alone = session.run(feed, [adapter_id] * rows)
        for name, want in alone.items():
            row_mask = None if mask is None else mask[row : row + 1]
            checks.append(
                compare_outputs(
                    f"outputs [{inputs}]: multi mixed batch row {row} (id {adapter_id}) {name} vs same id alone",
                    mixed[name][row : row + 1],
                    want[row : row + 1],
                    row_mask,
                    same_graph,
                    inputs,
                )
            )
    return checks


def compare_outputs(label: str, got, want, mask, tol: Tolerance, inputs: str | None = None) -> Check:
    """One output against its reference, as a check."""
    return output_check(label, compare_array(label, got, want, tol, mask), inputs)


def output_check(label: str, result: Comparison, inputs: str | None = None) -> Check:
    return Check(
        label,
        outcome(result.passed),
        max_abs=result.max_abs,
        max_rel=result.max_rel,
        cosine=result.cosine,
        top1=result.top1,
        atol=result.tol.atol,
        rtol=result.tol.rtol,
        detail=result.reason,
        inputs=inputs,
    )
