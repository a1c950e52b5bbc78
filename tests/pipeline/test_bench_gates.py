"""Bench in a pipeline: measured on every run unless its cache is turned on (and never
reused in a regression check), and `gates: baseline: previous` against the bundle being
replaced: skipped (not passed) with no previous result, failing on a real regression,
inconclusive when the previous result came from another machine."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lora_deploy.pipeline.run import PipelineFailed, run_pipeline
from lora_deploy.pipeline.spec import PipelineError
from tests.pipeline.conftest import write_pipeline

PIPELINE = """\
name: bench-gates
base: {base}
adapters: {adapters}/*
out: {out}
cache: {cache}
gates:
  baseline: previous
  max_regression: 50%
steps:
  - export-onnx
  - bench:
      shapes: 1x16
      rounds: 3
      warmup: 1
"""
REPORT = "adapters/a1/bench-cpu-onnxruntime.json"


@pytest.fixture
def pipeline(models, tmp_path, step_cache) -> Path:
    base, adapters = models
    return write_pipeline(tmp_path, PIPELINE, base=base, adapters=adapters, out=tmp_path / "bundle", cache=step_cache)


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / "pipeline-manifest.json").read_text())


def bench_of(manifest: dict) -> dict:
    [step] = [s for s in manifest["steps"] if s["step"] == "bench"]
    return step


def rewrite_previous(bundle: Path, change) -> None:
    """Change the previous bundle's bench report and record its new digest in the manifest,
    as a run that measured those figures would have."""
    path = bundle / REPORT
    report = json.loads(path.read_text())
    change(report)
    path.unlink()  # a hard link into the cache would carry the change there too
    path.write_text(json.dumps(report))
    manifest = manifest_of(bundle)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest["outputs"][REPORT] = digest
    bench_of(manifest)["outputs"][REPORT] = digest
    (bundle / "pipeline-manifest.json").write_text(json.dumps(manifest))


def test_bench_cache_is_opt_in_and_never_with_a_baseline(pipeline, tmp_path):
    """(test_run checks that bench runs again by default, cache "off" in the manifest.)"""
    on = ["gates.baseline=null", "gates.max_regression=null", "steps.bench.cache=true"]
    run_pipeline(pipeline, overrides=on)
    stored = run_pipeline(pipeline, overrides=on).manifest
    assert (bench_of(stored)["cached"], bench_of(stored)["cache"]) == (True, "hit")
    assert stored["run"]["never_cached"] == {}
    # Never with a regression baseline: it would compare a measurement with itself.
    with pytest.raises(PipelineError, match=r"steps\[1\].bench: cache: true would reuse an earlier measurement"):
        run_pipeline(pipeline, overrides=["steps.bench.cache=true"])
    with pytest.raises(PipelineError, match="gates.max_regression: needs a baseline"):
        run_pipeline(pipeline, overrides=["gates.baseline=null"])


def test_baseline_previous(pipeline, tmp_path):
    bundle = tmp_path / "bundle"
    # First run: no previous bundle, so the regression gate is skipped, and says so.
    lines: list[str] = []
    first = run_pipeline(pipeline, echo=lines.append).manifest
    [skipped] = [g for g in first["gates"] if g["gate"] == "regression"]
    assert skipped["passed"] is None and skipped["verdict"] == "skipped"
    assert "no previous bundle" in skipped["message"]
    assert any("regression gate skipped" in line for line in lines), lines
    # Second run: gated against the first bundle's report (those bytes, by their digest).
    previous_digest = first["outputs"][REPORT]
    second = run_pipeline(pipeline).manifest
    baseline = bench_of(second)["result"]["baseline"]
    assert baseline["used"] and baseline["sha256"] == previous_digest and baseline["report"] == REPORT
    assert baseline["mismatches"] == []
    regression = [g for g in second["gates"] if g["gate"] == "regression"]
    assert regression and all(g["verdict"] in ("pass", "inconclusive") for g in regression), regression
    report = json.loads((bundle / REPORT).read_text())
    assert report["baseline"]["path"].endswith(REPORT)

    # A previous run whose merged model was 10x faster: this run is a regression, exit 1,
    # and the bundle stays as it was. (On a busy machine the gate may call it inconclusive,
    # the reference having moved too; on_inconclusive: fail makes either a failure.)
    def faster(report):
        for block in report["results"].values():
            entry = block["variants"]["merged"]
            entry["samples_s"] = [s / 10 for s in entry["samples_s"]]

    rewrite_previous(bundle, faster)
    kept = (bundle / REPORT).read_bytes()
    with pytest.raises(PipelineFailed) as info:
        run_pipeline(pipeline, overrides=["gates.on_inconclusive=fail"])
    assert info.value.exit_code == 1 and "regression" in str(info.value)
    assert (bundle / REPORT).read_bytes() == kept
    failed = {g["subject"]: g for g in json.loads((tmp_path / "bundle.failed" / REPORT).read_text())["gates"]}
    assert failed["1x16/merged"]["passed"] is False and failed["1x16/merged"]["median"] > 2, failed

    # Measured on another CPU (at the figures of this machine): compared, but inconclusive
    # with the difference named; on_inconclusive (warn by default) decides.
    def elsewhere(report):
        faster(report)  # undone: x10 back
        for block in report["results"].values():
            entry = block["variants"]["merged"]
            entry["samples_s"] = [s * 100 for s in entry["samples_s"]]
        report["machine"]["cpu"] = "another cpu"

    rewrite_previous(bundle, elsewhere)
    lines = []
    manifest = run_pipeline(pipeline, echo=lines.append).manifest
    mismatches = bench_of(manifest)["result"]["baseline"]["mismatches"]
    assert any("cpu 'another cpu' in the baseline" in m for m in mismatches), mismatches
    verdicts = {g["verdict"] for g in manifest["gates"] if g["gate"] == "regression"}
    assert verdicts == {"inconclusive"}, manifest["gates"]
    assert any("differs: cpu" in line for line in lines), lines

    # A report changed after its manifest was written is not a baseline: skipped, with why.
    (bundle / REPORT).write_text((bundle / REPORT).read_text() + " ")
    manifest = run_pipeline(pipeline).manifest
    [gate] = [g for g in manifest["gates"] if g["gate"] == "regression"]
    assert gate["verdict"] == "skipped" and "changed since its manifest was written" in gate["message"]


def test_baseline_previous_needs_bench_and_one_baseline(pipeline, tmp_path):
    with pytest.raises(PipelineError, match="gates.baseline: one baseline"):
        run_pipeline(pipeline, overrides=[f"gates.baseline_path={tmp_path}/old.json"])
    text = pipeline.read_text().split("  - bench:")[0]
    pipeline.write_text(text)
    with pytest.raises(PipelineError, match="gates.baseline: previous compares bench results: add the bench step"):
        run_pipeline(pipeline)
