"""Verify stage: prove that an artifact computes what base + adapter computed.

Two levels:
- weights (with a merged checkpoint): every adapted tensor equals W0 + dW recomputed from
  the adapter within one rounding of its dtype; every other tensor is the base, bit for bit.
- outputs: base + adapter run unmerged in torch (the way PEFT computes it) is the
  reference; the merged model (torch) and the ONNX model (ONNX Runtime) are compared with
  it on deterministic inputs: max abs / rel error, cosine similarity, top-1 agreement.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from lora_deploy.adapter.plan import plan_merge
from lora_deploy.adapter.read import Adapter, load_adapter
from lora_deploy.arrays import all_finite
from lora_deploy.compare import TOLERANCES, Comparison, OutputMatchError, Tolerance, compare, compare_array, tolerance
from lora_deploy.dtypes import BY_ONNX, BY_SAFETENSORS
from lora_deploy.errors import BadInputError, NotEquivalentError
from lora_deploy.io.checkpoint import Checkpoint
from lora_deploy.merge.delta import merged_bias, merged_weight

# Output tolerances are lora_deploy.compare.TOLERANCES, by the loosest dtype involved: the
# merged model is run in float32, so what differs from the reference is one rounding of
# each stored weight, or the ONNX graph's output precision.


@dataclass
class Check:
    """One comparison: passed or not, with the numbers that decided it."""

    name: str
    passed: bool
    max_abs: float = 0.0
    max_rel: float = 0.0
    cosine: float | None = None
    top1: float | None = None
    atol: float | None = None
    rtol: float | None = None
    detail: str = ""


@dataclass
class VerifyReport:
    checks: list[Check] = field(default_factory=list)
    inputs: dict = field(default_factory=dict)

    @property
    def equivalent(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict:
        return {"equivalent": self.equivalent, "inputs": self.inputs, "checks": [asdict(c) for c in self.checks]}

    def raise_if_different(self) -> None:
        bad = sorted(self.failures(), key=lambda c: -c.max_abs)
        if bad:
            worst = "; ".join(
                f"{c.name} (max abs {c.max_abs:.3g}{', ' + c.detail if c.detail else ''})" for c in bad[:3]
            )
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise NotEquivalentError(f"not equivalent: {worst}{more}")


def verify(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    *,
    merged_dir: str | os.PathLike | None = None,
    onnx_path: str | os.PathLike | None = None,
    dynamic_path: str | os.PathLike | None = None,
    packed_path: str | os.PathLike | None = None,
    multi_path: str | os.PathLike | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    batch: int = 2,
    seq: int = 16,
    seed: int = 0,
    task: str = "auto",
) -> VerifyReport:
    """Run every check that the given artifacts allow; never raises on a mismatch."""
    adapter = load_adapter(adapter_dir)
    graphs = Graphs(_path(onnx_path), _path(dynamic_path), _path(packed_path), _path(multi_path), Path(adapter_dir))
    report = VerifyReport(
        inputs={
            "base": str(base_dir),
            "adapter": str(adapter_dir),
            "merged": _str(merged_dir),
            "onnx": _str(onnx_path),
            "dynamic": _str(dynamic_path),
            "multi": _str(multi_path),
            "batch": batch,
            "seq": seq,
            "seed": seed,
        }
    )
    dtypes = ["float32"]
    if merged_dir is not None:
        report.checks += check_weights(base_dir, adapter, merged_dir)
        dtypes.append(stored_dtype(merged_dir))
    if graphs.onnx is not None:
        dtypes.append(onnx_dtype(graphs.onnx))
    dtype = loosest(dtypes)
    if not (Path(base_dir) / "config.json").is_file():
        # A plain torch module's checkpoint: no architecture to run, so weights are the proof.
        if merged_dir is None or graphs.onnx or graphs.dynamic or graphs.multi:
            raise BadInputError(f"{base_dir}: no config.json, so outputs cannot be computed; verify --merged only")
        report.checks.append(Check("outputs: skipped (no config.json: checked at weight level only)", True))
        return report
    report.checks += check_outputs(base_dir, adapter, merged_dir, graphs, dtype, atol, rtol, batch, seq, seed, task)
    return report


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
        checks = name_checks("missing from the merged checkpoint", expected_names - set(merged.tensors))
        checks += name_checks("in the merged checkpoint but not the base", set(merged.tensors) - expected_names)
        bias_of = {t.bias_key: t for t in plan.targets.values() if t.bias_key}
        worst, copied = 0.0, 0
        for name in sorted(expected_names & set(merged.tensors)):
            got = merged.read(name)
            expected = expected_tensor(name, base, plan, bias_of)
            if expected is None:  # untouched: must be the base tensor itself
                copied += 1
                check = compare_exact(name, got, base.read(plan.untie.get(name, name)))
            else:
                check = compare_weight(name, got, expected, merged.tensors[name].dtype)
                worst = max(worst, check.max_abs)
            if not check.passed:
                checks.append(check)
    changed = len(plan.targets) + len(bias_of)
    summary = Check(
        f"weights: {changed} merged tensors within one rounding, {copied} others equal to the base",
        not checks,
        max_abs=worst,
    )
    return [summary] + checks


def name_checks(what: str, names: set[str]) -> list[Check]:
    if not names:
        return []
    listed = ", ".join(sorted(names)[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return [Check(f"weights: {len(names)} tensors {what}", False, max_abs=float("inf"), detail=listed)]


def expected_tensor(name: str, base: Checkpoint, plan, bias_of) -> np.ndarray | None:
    """W0 + dW (or the merged bias, or a replacement) in float32; None for untouched tensors."""
    if name in plan.targets:
        w0 = plan.replacements.get(name)
        w0 = base.read(name) if w0 is None else w0
        return merged_weight(plan.targets[name].module, plan.targets[name].kind, w0)
    if name in bias_of:
        return merged_bias(bias_of[name], base.read(name))
    if name in plan.replacements:
        return plan.replacements[name].astype(np.float32)
    return None


def compare_exact(name: str, got: np.ndarray, base: np.ndarray) -> Check:
    """Untouched tensors: bit-exact, or exactly the base converted to the output dtype."""
    want = base.astype(got.dtype, copy=False)
    if got.shape == want.shape and got.tobytes() == want.tobytes():
        return Check(f"weights: {name}", True)
    diff = float(np.abs(as_f64(got) - as_f64(want)).max()) if got.shape == want.shape and got.size else float("inf")
    return Check(f"weights: {name}", False, max_abs=diff, detail="should equal the base tensor")


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
        return Check(
            f"weights: {name}", False, max_abs=float("inf"), detail=f"shape {list(got.shape)} != {list(want.shape)}"
        )
    diff = np.abs(as_f64(got) - as_f64(want))
    if dtype == "F32":
        allowed = 1e-6 + 1e-5 * np.abs(as_f64(want))
    else:
        allowed = ulp(want, dtype)
    passed = bool((diff <= allowed).all()) and all_finite(got)
    return Check(
        f"weights: {name}",
        passed,
        max_abs=float(diff.max()) if diff.size else 0.0,
        max_rel=float((diff / np.maximum(np.abs(as_f64(want)), 1e-12)).max()) if diff.size else 0.0,
        detail="" if passed else f"more than one {dtype} rounding from W0 + dW",
    )


# ------------------------------------------------------------------ outputs ----


def check_outputs(
    base_dir, adapter, merged_dir, graphs: Graphs, dtype, atol, rtol, batch, seq, seed, task
) -> list[Check]:
    from lora_deploy.backends.torch.runner import TorchRunner
    from lora_deploy.modeling.hf import wrap_checkpoint
    from lora_deploy.modeling.samples import sample_inputs
    from lora_deploy.modeling.unmerged import attach

    tol = tolerance(dtype, atol, rtol)
    model = wrap_checkpoint(base_dir, task, "float32")
    feed = sample_inputs(model.model.config, batch=batch, seq=seq, seed=seed)
    with TorchRunner(model, name="base") as runner:
        base_out = runner.infer(feed)
        with attach(model.model, adapter):
            reference = runner.infer(feed)
    candidates = {}
    if merged_dir is not None:
        with TorchRunner(wrap_checkpoint(merged_dir, task, "float32"), name="merged") as runner:
            candidates["merged (torch)"] = runner.infer(feed)
    if graphs.onnx is not None:
        candidates["onnx (onnxruntime)"] = run_onnx_with_polygraphy(graphs.onnx, feed)
    if graphs.dynamic is not None:
        candidates.update(dynamic_outputs(graphs, feed))
    multi = None
    if graphs.multi is not None:
        from lora_deploy.backends.onnxrt.sessions import MultiSession

        multi = MultiSession(graphs.multi)  # loaded once for the per-adapter and mixed-batch checks
        candidates.update(multi_outputs(multi, graphs, feed))
    if not candidates:
        raise BadInputError("nothing to verify: give --merged, --onnx, --dynamic and/or --multi")
    mask = feed.get("attention_mask")
    checks = []
    for label, outputs in candidates.items():
        # Labels ending in "(no adapter)" must equal the base model, the rest base + adapter.
        want_all = base_out if label.endswith("(no adapter)") else reference
        against = "base" if want_all is base_out else "unmerged"
        for result in compare(outputs, want_all, tol, mask).outputs:
            missing = result.error is OutputMatchError
            name = (
                f"outputs: {label} lacks output {result.name}"
                if missing
                else f"outputs: {label} {result.name} vs {against}"
            )
            checks.append(output_check(name, result))
    if multi is not None:
        checks += mixed_batch_checks(multi, feed, mask, tol)
    if graphs.onnx is not None:
        checks.append(polygraphy_check(reference, candidates["onnx (onnxruntime)"], tol))
    return checks


def quiet_polygraphy():
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    return G_LOGGER


def run_onnx_with_polygraphy(path: Path, feed: dict) -> dict:
    """The ONNX model in ONNX Runtime, through polygraphy's loader and runner."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from lora_deploy.backends.onnxrt.loader import SessionFromOnnx, ort_errors

    quiet_polygraphy()
    try:
        # polygraphy's runner takes any session loader: ours, so every session is made one way.
        with OnnxrtRunner(SessionFromOnnx(path)) as runner:
            return {k: v for k, v in runner.infer(feed).items()}
    except ort_errors() as exc:
        raise BadInputError(
            f"{path}: ONNX Runtime cannot run it on the sample inputs ({str(exc).splitlines()[0]})"
        ) from None


def polygraphy_check(reference: dict, outputs: dict, tol: Tolerance) -> Check:
    """A second opinion from polygraphy's comparator (elementwise, every position).

    Polygraphy decides pass/fail; the figures are ours, from the same arrays at every
    position (polygraphy's result does not expose them)."""
    from polygraphy.comparator import SimpleCompareFunc
    from polygraphy.comparator.struct import IterationResult

    quiet_polygraphy()
    judge = SimpleCompareFunc(atol=tol.atol, rtol=tol.rtol)
    result = judge(
        IterationResult(dict(reference), runner_name="unmerged"),
        IterationResult({k: outputs[k] for k in reference if k in outputs}, runner_name="onnx"),
    )
    passed = bool(result) and all(bool(r) for r in result.values())
    ours = compare(outputs, reference, tol)
    return Check(
        "outputs: polygraphy comparator, onnx vs unmerged",
        passed,
        max_abs=ours.max_abs,
        max_rel=ours.max_rel,
        cosine=ours.cosine,
        top1=ours.top1,
        atol=tol.atol,
        rtol=tol.rtol,
        detail="" if passed else "polygraphy found outputs beyond tolerance",
    )


def dynamic_outputs(graphs: Graphs, feed: dict) -> dict[str, dict]:
    """The dynamic graph with the adapter active, and with none (must be the base)."""
    import tempfile

    from lora_deploy.backends.onnxrt.lora_format import pack_adapter
    from lora_deploy.backends.onnxrt.sessions import DynamicSession

    session = DynamicSession(graphs.dynamic)
    with tempfile.TemporaryDirectory() as tmp:
        packed = graphs.packed
        if packed is None:
            packed = pack_adapter(graphs.adapter_dir, Path(tmp) / "adapter.onnx_adapter", onnx_path=graphs.dynamic)
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


def mixed_batch_checks(session, feed: dict, mask, tol) -> list[Check]:
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
                    f"outputs: multi mixed batch row {row} (id {adapter_id}) {name} vs same id alone",
                    mixed[name][row : row + 1],
                    want[row : row + 1],
                    row_mask,
                    same_graph,
                )
            )
    return checks


def compare_outputs(label: str, got, want, mask, tol: Tolerance) -> Check:
    """One output against its reference, as a check."""
    return output_check(label, compare_array(label, got, want, tol, mask))


def output_check(label: str, result: Comparison) -> Check:
    return Check(
        label,
        result.passed,
        max_abs=result.max_abs,
        max_rel=result.max_rel,
        cosine=result.cosine,
        top1=result.top1,
        atol=result.tol.atol,
        rtol=result.tol.rtol,
        detail=result.reason,
    )
