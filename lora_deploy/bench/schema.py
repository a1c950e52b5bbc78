"""The bench report file: JSON schema "lora-deploy.bench/3", its validation, and
reading and writing it.

A report keeps the raw per-round samples next to every summary, so any number in it
(and any later regression check against it) can be recomputed from the file alone.
Writes are atomic (io.staging): an interrupted bench never leaves a half-written report
that a later `--baseline` would trip over.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lora_deploy.bench.shapes import SHAPE_RE, as_shape
from lora_deploy.errors import BadInputError
from lora_deploy.io.staging import write_file_atomic

SCHEMA = "lora-deploy.bench/3"
# Reports a baseline may come from: /1 lacks fed shapes, conclusive flags and the baseline block;
# /2 lacks sessions (one session per variant, intervals of rounds only: config.sessions 1).
READABLE_SCHEMAS = ("lora-deploy.bench/1", "lora-deploy.bench/2", SCHEMA)


def ms(seconds: float) -> float:
    """Seconds -> the report's milliseconds (every *_ms field)."""
    return seconds * 1000.0


def _need(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise BadInputError(f"invalid bench report: {where}: {what}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_entry(entry: Any, where: str) -> None:
    _need(isinstance(entry, dict), where, "expected an object")
    samples = entry.get("samples_s")
    _need(
        isinstance(samples, list) and bool(samples) and all(_is_number(s) and s >= 0 for s in samples),
        f"{where}.samples_s",
        "expected a non-empty list of non-negative seconds",
    )
    for key in ("p50_ms", "mean_ms", "min_ms"):
        _need(_is_number(entry.get(key)), f"{where}.{key}", "expected a number")
    for key in ("p90_ms", "p99_ms", "p999_ms"):  # null: too few samples for that percentile
        _need(entry.get(key) is None or _is_number(entry[key]), f"{where}.{key}", "expected null or a number")
    _need(isinstance(entry.get("throughput"), dict), f"{where}.throughput", "expected an object")
    labels = entry.get("sample_sessions")
    if labels is not None:
        _need(
            isinstance(labels, list)
            and len(labels) == len(samples)
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in labels),
            f"{where}.sample_sessions",
            "expected one session index (>= 0) per sample",
        )
    for key in ("ratio", "p99_ratio"):
        ratio = entry.get(key)
        if ratio is not None:
            _need(
                isinstance(ratio, dict) and all(_is_number(ratio.get(k)) for k in ("median", "low", "high")),
                f"{where}.{key}",
                "expected null or {median, low, high}",
            )


def _check_results(results: Any, reference: str) -> None:
    _need(isinstance(results, dict) and bool(results), "results", "expected a non-empty object")
    for key, block in results.items():
        where = f"results[{key!r}]"
        _need(isinstance(block, dict), where, "expected an object")
        _need(SHAPE_RE.match(key) is not None, where, "key must be BATCHxSEQ or BATCHxSEQ+PAST")
        shape = (block.get("batch"), block.get("seq")) + ((block["past"],) if block.get("past") else ())
        _need(as_shape(key) == shape, where, "batch/seq do not match the key")
        variants = block.get("variants")
        _need(
            isinstance(variants, dict) and reference in variants,
            f"{where}.variants",
            f"expected an object including the reference {reference!r}",
        )
        for name, entry in variants.items():
            _check_entry(entry, f"{where}.variants[{name!r}]")


def validate_report(report: Any) -> Any:
    """Return `report` if it follows schema lora-deploy.bench/3 (or /1, /2, for baselines), else BadInputError."""
    _need(isinstance(report, dict), "top level", "expected a JSON object")
    _need(report.get("schema") in READABLE_SCHEMAS, "schema", f"expected {SCHEMA!r}, got {report.get('schema')!r}")
    for key in ("machine", "config", "results"):
        _need(isinstance(report.get(key), dict), key, "expected an object")
    config = report["config"]
    for key in ("backend", "device", "reference"):
        _need(isinstance(config.get(key), str), f"config.{key}", "expected a string")
    _need(isinstance(config.get("shapes"), list), "config.shapes", "expected a list")
    _need(isinstance(config.get("rounds"), int), "config.rounds", "expected an integer")
    if report["schema"] == SCHEMA:
        sessions = config.get("sessions")
        ok = isinstance(sessions, int) and not isinstance(sessions, bool) and sessions >= 1
        _need(ok, "config.sessions", "expected an integer >= 1")
        _need(isinstance(config.get("bootstrap"), str), "config.bootstrap", "expected a string")
    _check_results(report["results"], config["reference"])
    gates = report.get("gates")
    _need(isinstance(gates, list), "gates", "expected a list")
    for i, gate in enumerate(gates):
        ok = isinstance(gate, dict) and isinstance(gate.get("passed"), bool)
        ok = ok and isinstance(gate.get("message"), str)
        _need(ok, f"gates[{i}]", "expected {passed: bool, message: str, ...}")
        if report["schema"] != READABLE_SCHEMAS[0]:
            _need(isinstance(gate.get("conclusive"), bool), f"gates[{i}].conclusive", "expected true or false")
    return report


def write_json(
    report: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Validate and write `report` as JSON, atomically (an existing file is replaced only
    with overwrite; never one of `inputs`)."""
    validate_report(report)
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    return write_file_atomic(path, lambda f: f.write(text.encode("utf-8")), overwrite=overwrite, inputs=inputs)


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a bench report; anything unusable -> BadInputError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"cannot read bench report {path}: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInputError(f"bench report {path} is not valid JSON: {e}") from e
    return validate_report(data)
