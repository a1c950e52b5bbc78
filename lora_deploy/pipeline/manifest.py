"""pipeline-manifest.json: what a run did, for the bundle it leaves.

Schema lora-deploy.pipeline-manifest/1: the pipeline (file, SHA-256, overrides, the
resolved document as pipeline.yaml beside it), the SHA-256 of every input and output
file, the tool and library versions, the machine, the targets and whether they could run
here, every step's status, timing and cache use (hit, stored, off for bench, which is
measured on every run unless its cache is turned on; how long a cached step took when it
ran), the verify and bench results, every gate's outcome (a regression gate with no
previous result is "skipped", never passed), and each adapter's outcome on its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lora_deploy.io.provenance import report_header
from lora_deploy.pipeline.cache import Hasher
from lora_deploy.pipeline.plan import BASE, Task
from lora_deploy.pipeline.spec import Pipeline

MANIFEST = "pipeline-manifest.json"
MANIFEST_SCHEMA = "lora-deploy.pipeline-manifest/1"
RESOLVED = "pipeline.yaml"
PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


@dataclass
class StepRecord:
    """One task's line in the log and entry in the manifest."""

    task: Task
    status: str
    seconds: float = 0.0
    cached: bool = False
    detail: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # bundle-relative name -> digest
    key: str | None = None
    error: str | None = None
    exit_code: int | None = None
    lines: list[str] = field(default_factory=list)
    first_seconds: float | None = None  # a cached step: how long it took when it ran
    started: float | None = None  # seconds from the run's first task to this one's start

    def to_dict(self) -> dict[str, Any]:
        t = self.task
        data: dict[str, Any] = {
            "step": t.step,
            "unit": t.unit,
            "target": t.target,
            "required": t.required,
            "status": self.status,
            "cached": self.cached,
            "started_s": None if self.started is None else round(self.started, 3),
            "seconds": round(self.seconds, 3),
            "cache": self.cache_use(),
            "detail": self.detail,
        }
        if self.first_seconds is not None:
            data["first_run_seconds"] = round(self.first_seconds, 3)
        if self.key is not None:
            data["key"] = self.key
        if self.error is not None:
            data |= {"error": self.error, "exit_code": self.exit_code}
        data["outputs"] = self.files
        data["result"] = self.result
        return data

    def cache_use(self) -> str | None:
        """hit (outputs reused), stored (ran, now in the cache), off (runs every time: bench
        unless its cache is on), not stored (failed), None (skipped: nothing ran)."""
        if self.status == SKIPPED:
            return None
        if not self.task.cacheable:
            return "off"
        if self.cached:
            return "hit"
        return "stored" if self.status == PASSED else "not stored"

    def line(self, index: int, total: int) -> str:
        status = {PASSED: "cached" if self.cached else "ok", FAILED: "FAILED", SKIPPED: "skipped"}[self.status]
        text = self.error if self.status == FAILED and self.error else self.detail
        width = len(str(total))
        return f"[{index:>{width}}/{total}] {status:<7} {self.task.name:<32} {self.seconds:6.1f}s  {text}"


def build_manifest(
    pipeline: Pipeline,
    path: Path,
    overrides: Sequence[str],
    only: Sequence[str],
    records: list[StepRecord],
    inputs: Mapping[str, Any],
    tool: Mapping[str, Any],
    hasher: Hasher,
    unavailable: Mapping[str, str],
    started: float,
    failed: list[StepRecord],
    run: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    from lora_deploy.bench.machine import machine_info

    gates = []
    for r in records:
        if r.task.step == "verify" and r.status != SKIPPED:
            passed = r.status == PASSED
            gates.append(gate_entry(r, "verify", passed, r.error or ("equivalent" if passed else r.detail)))
        if r.task.step == "bench":
            for g in r.result.get("gates", []):
                gates.append(gate_entry(r, g.get("gate"), g.get("passed"), g.get("message"), g.get("verdict")))
            if r.status == SKIPPED:
                gates.append(gate_entry(r, "bench", None, r.detail, "skipped"))
            skipped = (r.result.get("baseline") or {}).get("skipped")
            if skipped:  # gates.baseline: previous with no previous result: not a pass
                gates.append(gate_entry(r, "regression", None, f"baseline previous: {skipped}", "skipped"))
    statuses = [r.status for r in records]
    return {
        **report_header(MANIFEST_SCHEMA),
        "status": "failed" if failed else "passed",
        "pipeline": {
            "file": str(path),
            "sha256": hasher.file(path),
            "name": pipeline.name,
            "overrides": list(overrides),
            "only": list(only),
            "resolved": RESOLVED,
        },
        "inputs": inputs,
        "tool": tool,
        "machine": machine_info(),
        "targets": {
            name: {**t.model_dump(), "available": name not in unavailable, "reason": unavailable.get(name)}
            for name, t in pipeline.targets.items()
        },
        "summary": {
            "steps": len(records),
            "passed": statuses.count(PASSED),
            "failed": statuses.count(FAILED),
            "skipped": statuses.count(SKIPPED),
            "cached": sum(r.cached for r in records),
            "seconds": round(time.time() - started, 3),
        },
        "run": dict(run or {}),
        "base": unit_summary([r for r in records if r.task.unit == BASE]),
        "adapters": {
            name: unit_summary([r for r in records if r.task.unit == name])
            for name in dict.fromkeys(r.task.unit for r in records if r.task.unit != BASE)
        },
        "steps": [r.to_dict() for r in records],
        "gates": gates,
        "outputs": {name: digest for r in records for name, digest in r.files.items()},
    }


def unit_summary(records: list[StepRecord]) -> dict[str, Any]:
    """One adapter's (or the base's) outcome: failed when a required step of it failed."""
    failed = [r for r in records if r.status == FAILED]
    return {
        "status": "failed" if any(r.task.required for r in failed) else "passed",
        "steps": len(records),
        "failed": {r.task.name: r.error for r in failed},
        "skipped": {r.task.name: r.detail for r in records if r.status == SKIPPED},
        "seconds": round(sum(r.seconds for r in records), 3),
    }


def gate_entry(record: StepRecord, gate: str | None, passed: bool | None, message: str | None, verdict=None) -> dict:
    t = record.task
    return {
        "step": t.step,
        "unit": t.unit,
        "target": t.target,
        "gate": gate,
        "passed": passed,
        "verdict": verdict or ("pass" if passed else "fail"),
        "message": message,
    }


def write_bundle_files(tmp: Path, manifest: dict[str, Any], document: dict, hasher: Hasher) -> None:
    """The resolved pipeline and the manifest, into the bundle being built."""
    (tmp / RESOLVED).write_text(
        "# The pipeline as run: ${VAR} expanded, --set applied (pipeline-manifest.json names the file).\n"
        + yaml.safe_dump(document, sort_keys=False)
    )
    manifest["outputs"][RESOLVED] = hasher.file(tmp / RESOLVED)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
