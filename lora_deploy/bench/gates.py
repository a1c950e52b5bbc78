"""Gate decisions against baselines, and the report's gates as a verdict.

A saved baseline (`--baseline report.json`) is checked before any timing (same backend
and device; same settings, machine and libraries unless --allow-mismatch; a shape and
model in common), then every (shape, variant) both runs timed gets a regression gate
with a between-run margin: the given one, else the baseline's own noise floor
(--noise-runs), never below DEFAULT_RUN_MARGIN. `check_gates` turns a report's failed
gates into GateFailed (exit 1).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from lora_deploy.bench.schema import load_report, validate_report
from lora_deploy.bench.shapes import Shape, shape_key
from lora_deploy.bench.stats import GateResult, enforce_gates, regression_gate, yardstick_note
from lora_deploy.errors import BadInputError

# Used when a baseline is given without an explicit --max-regression.
DEFAULT_MAX_REGRESSION = 0.05
# The between-run allowance of a regression gate against a saved report, measured by
# benchmarks/gate_calibration.py (README, "Calibration of the gates"). A baseline that
# recorded its own noise floor (--noise-runs) widens it where its runs disagreed more;
# never narrows it: runs inside one process agree better than separate processes do.
DEFAULT_RUN_MARGIN = 0.03

# What must match between a saved baseline and this run for their latencies to be
# comparable: (label, getter on (config, machine)).
_COMPARED = (
    ("backend", lambda c, m: c.get("backend")),
    ("device", lambda c, m: c.get("device")),
    ("threads", lambda c, m: c.get("threads")),
    ("inner", lambda c, m: c.get("inner")),
    ("rate_hz", lambda c, m: c.get("rate_hz")),
    ("generate", lambda c, m: c.get("generate")),
    ("cpu", lambda c, m: m.get("cpu")),
    ("gpu", lambda c, m: m.get("gpu")),
    ("usable cores", lambda c, m: m.get("usable_cores")),
    ("thread variables", lambda c, m: (m.get("threads") or {}).get("env")),
)


# ---------------------------------------------------------------- before timing


def load_baseline(
    path: str | os.PathLike | None,
    max_regression: float | None,
    *,
    backend: str,
    device: str,
    shapes: Sequence[Shape] | None,
    names: Sequence[str],
    config: Mapping[str, Any] | None = None,
    machine: Mapping[str, Any] | None = None,
    allow_mismatch: bool = False,
) -> tuple[dict[str, Any] | None, float | None]:
    """Load and check the baseline report before timing; return (report, max regression).

    A baseline from another backend or device is refused outright; one whose settings,
    machine or library versions differ from `config` / `machine` is refused unless
    `allow_mismatch`, and its gates are then inconclusive with the differences named.
    """
    if path is None:
        return None, max_regression
    baseline = load_report(path)
    there = baseline["config"]
    if (there["backend"], there["device"]) != (backend, device):
        raise BadInputError(
            f"baseline {path} ran {there['backend']} on {there['device']}, this run is {backend} on {device}: "
            "latencies are not comparable"
        )
    if shapes is not None:
        check_shared(baseline, path, shapes, names)
    if config is not None and machine is not None and not allow_mismatch:
        diffs = config_mismatches(config, machine, baseline)
        if diffs:
            raise BadInputError(
                f"baseline {path} was measured under another configuration ({'; '.join(diffs)}): "
                "latencies are not comparable; re-record it, or pass --allow-mismatch to compare anyway "
                "(every gate is then inconclusive)"
            )
    return baseline, DEFAULT_MAX_REGRESSION if max_regression is None else max_regression


def check_shared(baseline: Mapping[str, Any], path: Any, shapes: Sequence[Shape], names: Sequence[str]) -> None:
    """Refuse a baseline that shares no shape and model name with this run."""
    results = baseline["results"]
    shared = [k for k in map(shape_key, shapes) if k in results and set(names) & set(results[k]["variants"])]
    if not shared:
        raise BadInputError(f"baseline {path} shares no shape and model name with this run")


def check_fed_against(
    baseline: Mapping[str, Any], path: Any, fed: Mapping[str, Mapping[str, Mapping[str, Any]]]
) -> None:
    """Refuse a saved baseline whose shared shapes fed other inputs (a static graph then,
    a dynamic one now; another dtype) unless --allow-mismatch."""
    diffs = []
    for key, variants in fed.items():
        base_variants = (baseline["results"].get(key) or {}).get("variants", {})
        for name, now in variants.items():
            there = base_variants.get(name, {}).get("fed")
            if there is not None and there.get("inputs") != now["inputs"]:
                diffs.append(f"{key}/{name} fed {there.get('inputs')} then, {now['inputs']} now")
    if diffs:
        raise BadInputError(
            f"baseline {path} fed other inputs ({'; '.join(diffs)}): latencies are not comparable; "
            "pass --allow-mismatch to compare anyway (those gates are then inconclusive)"
        )


def config_mismatches(config: Mapping[str, Any], machine: Mapping[str, Any], baseline: Mapping[str, Any]) -> list[str]:
    """What differs between this run's configuration and a baseline report's, one
    phrase each ("threads 1 in the baseline, None here"): settings, machine, library
    versions (lora-deploy's own excepted: it is what a regression run tests)."""
    there_c, there_m = baseline.get("config", {}), baseline.get("machine", {})
    diffs = []
    for label, get in _COMPARED:
        a, b = get(there_c, there_m), get(config, machine)
        if a != b:
            diffs.append(f"{label} {a!r} in the baseline, {b!r} here")
    libs_a, libs_b = there_m.get("libraries") or {}, machine.get("libraries") or {}
    for lib in sorted(set(libs_a) | set(libs_b)):
        if libs_a.get(lib) != libs_b.get(lib):
            diffs.append(f"{lib} {libs_a.get(lib)} in the baseline, {libs_b.get(lib)} here")
    return diffs


# ---------------------------------------------------------------- against a saved report


def _fed_mismatches(report: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, str]:
    """{'key/variant': phrase} where a shared shape fed different inputs in the two runs."""
    out = {}
    for key, block in report["results"].items():
        base_block = baseline["results"].get(key) or {"variants": {}}
        for name, entry in block["variants"].items():
            there = base_block["variants"].get(name, {}).get("fed")
            here = entry.get("fed")
            if there is not None and here is not None and there.get("inputs") != here.get("inputs"):
                out[f"{key}/{name}"] = f"inputs {there.get('inputs')} in the baseline, {here.get('inputs')} here"
    return out


def shared_and_unshared(report: Mapping[str, Any], baseline: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """('key/variant' timed in both runs, 'key/variant (where)' timed in only one)."""
    shared, unshared = [], []
    for key, block in report["results"].items():
        base_variants = (baseline["results"].get(key) or {}).get("variants", {})
        for name in block["variants"]:
            (shared if name in base_variants else unshared).append(f"{key}/{name}")
    unshared = [f"{s} (this run only)" for s in unshared]
    for key, block in baseline["results"].items():
        mine = (report["results"].get(key) or {}).get("variants", {})
        unshared += [f"{key}/{name} (baseline only)" for name in block["variants"] if name not in mine]
    return shared, unshared


def configured_margin(run_margin: float | None, baseline: Mapping[str, Any] | None) -> float | None:
    """config.run_margin: the given one; null without a baseline, and when the baseline's
    own noise floor sets it per shape; else the default."""
    if baseline is None:
        return None
    if run_margin is not None:
        return run_margin
    return None if baseline.get("noise") else DEFAULT_RUN_MARGIN


def run_margins(config: Mapping[str, Any], baseline: Mapping[str, Any], max_regression: float) -> dict[str, Any]:
    """{shape key: (margin, note or None)} for the gates against `baseline`: the configured
    margin, or the baseline's noise floor (never below DEFAULT_RUN_MARGIN). A floor wider
    than the regression the gate is asked to catch makes that shape's gates inconclusive."""
    given = config.get("run_margin")
    noise = baseline.get("noise") or {}
    out = {}
    for key in baseline["results"]:
        floor = ((noise.get("shapes") or {}).get(key) or {}).get("margin")
        if given is not None or floor is None:
            out[key] = (DEFAULT_RUN_MARGIN if given is None else given, None)
            continue
        note = None
        if floor > max_regression:
            note = (
                f"the baseline's own {noise.get('runs')} runs call for a {floor:.1%} between-run margin (its noise "
                f"floor), more than the {max_regression:.1%} regression to catch: re-record it on a quieter machine "
                "or with more runs"
            )
        out[key] = (max(DEFAULT_RUN_MARGIN, floor), note)
    return out


def baseline_summary(
    report: Mapping[str, Any], baseline: Mapping[str, Any], path: str | os.PathLike | None = None
) -> dict[str, Any]:
    """The baseline as the JSON report records it: where it came from, its configuration,
    its figures, what differs and which shapes and variants only one run has."""
    config, machine = baseline.get("config", {}), baseline.get("machine", {})
    _, unshared = shared_and_unshared(report, baseline)
    here = report["config"]
    return {
        "path": None if path is None else str(path),
        "schema": baseline.get("schema"),
        "created": baseline.get("created"),
        "config": {k: config.get(k) for k in ("backend", "device", "threads", "inner", "rounds", "shapes", "rate_hz")},
        "machine": {k: machine.get(k) for k in ("cpu", "gpu", "usable_cores", "libraries")},
        "run_margin": here.get("run_margin"),
        "run_margins": {k: m for k, (m, _) in run_margins(here, baseline, here.get("max_regression") or 0).items()},
        "noise_runs": (baseline.get("noise") or {}).get("runs"),
        "mismatches": config_mismatches(here, report["machine"], baseline)
        + [f"{k}: {v}" for k, v in _fed_mismatches(report, baseline).items()],
        "unshared": unshared,
        "results": {
            key: {
                name: {k: e.get(k) for k in ("p50_ms", "p90_ms", "p99_ms", "p50_ci_ms", "n")}
                for name, e in block["variants"].items()
            }
            for key, block in baseline["results"].items()
        },
    }


def regression_gates(
    report: Mapping[str, Any],
    baseline: Mapping[str, Any],
    max_regression: float,
) -> list[GateResult]:
    """A regression gate for every (shape, variant) present in both reports.

    Each allows the configured between-run margin; a configuration mismatch (settings,
    machine, libraries, the inputs fed) makes every gate it touches inconclusive, with
    the differences named (run_bench refuses such a baseline unless told to allow it).
    """
    validate_report(baseline)
    config = report["config"]
    ci = {k: config.get(k, d) for k, d in (("confidence", 0.95), ("resamples", 10_000), ("seed", 0))}
    margins = run_margins(config, baseline, max_regression)
    common = config_mismatches(config, report["machine"], baseline)
    fed = _fed_mismatches(report, baseline)
    policy = config.get("on_inconclusive") or "warn"
    gates = []
    for key, block in report["results"].items():
        base_block = baseline["results"].get(key)
        if base_block is None:
            continue
        margin, floor_note = margins[key]
        for name, entry in block["variants"].items():
            if name not in base_block["variants"]:
                continue
            subject = f"{key}/{name}"
            notes = [f"configuration differs: {d}" for d in common] + ([floor_note] if floor_note else [])
            ref = config["reference"]
            if ref in block["variants"] and ref in base_block["variants"]:
                note = yardstick_note(
                    block["variants"][ref]["samples_s"], base_block["variants"][ref]["samples_s"], margin, ref
                )
                notes += [note] if note else []
            if subject in fed:
                notes.append(f"the runs fed different inputs: {fed[subject]}")
            gates.append(
                regression_gate(
                    entry,
                    base_block["variants"][name],
                    max_regression,
                    subject=subject,
                    margin=margin,
                    notes=notes,
                    on_inconclusive=policy,
                    **ci,
                )
            )
    if not gates:
        raise BadInputError("the baseline report shares no shape and variant with this run")
    return gates


# ---------------------------------------------------------------- the verdict


def add_gates(report: dict[str, Any], gates: Sequence[GateResult]) -> dict[str, Any]:
    """Append gate results to a report (in place) and return it."""
    report["gates"].extend(g.to_dict() for g in gates)
    return report


def report_gates(report: Mapping[str, Any]) -> list[GateResult]:
    """The report's gates as GateResult objects (e.g. for stats.enforce_gates)."""
    return [GateResult.from_dict(g) for g in report["gates"]]


def inconclusive_gates(report: Mapping[str, Any]) -> list[GateResult]:
    """The gates that could not decide (whatever --on-inconclusive made of them)."""
    return [g for g in report_gates(report) if not g.conclusive]


def check_gates(report: Mapping[str, Any]) -> None:
    """Raise GateFailed (exit 1) naming every failed gate of the report (with
    --on-inconclusive fail, inconclusive gates count as failed)."""
    enforce_gates(report_gates(report))
