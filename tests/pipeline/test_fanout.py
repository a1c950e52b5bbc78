"""Many adapters in one run: their steps run in parallel (at most --jobs at once, the
base's graph built once, bench alone, torch's steps one at a time), each adapter's
outcome on its own in the manifest, and one failed adapter fails the run (the previous
bundle stays)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_deploy.cli import main
from lora_deploy.pipeline.run import PipelineFailed, run_pipeline


@pytest.fixture
def pipeline(pipeline, models, reference) -> Path:
    """conftest's pipeline (every step) over two adapters: a1 and an rsLoRA one, a2."""
    _, rslora = reference("llama", "rslora")
    shutil.copytree(rslora, models[1] / "a2")
    return pipeline


def intervals(manifest: dict) -> list[tuple[float, float, dict]]:
    return [(s["started_s"], s["started_s"] + s["seconds"], s) for s in manifest["steps"] if s["started_s"] is not None]


def uses_torch(step: dict) -> bool:
    return step["step"] == "verify" or (step["step"], step["unit"]) == ("export-onnx", "base")


SLACK = 0.003  # the manifest's times are rounded to the millisecond


def overlap(a, b) -> bool:
    return a[0] < b[1] - SLACK and b[0] < a[1] - SLACK


def new_bytes(adapter: Path) -> None:
    """One bit of the adapter's second weight changed: its steps are not in the session's
    cache (test_run changes the first)."""
    weights = adapter / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8 + int.from_bytes(data[:8], "little") + 4] ^= 0x01
    weights.write_bytes(bytes(data))


def test_adapters_run_in_parallel_within_the_job_limit(pipeline, models, tmp_path):
    for name in ("a1", "a2"):  # their steps run; the base's graph comes from the session's cache
        new_bytes(models[1] / name)
    lines: list[str] = []
    manifest = run_pipeline(pipeline, jobs=2, echo=lines.append).manifest
    assert manifest["status"] == "passed" and manifest["run"]["jobs"] == 2
    names = [f"{s['step']} {s['unit']}" for s in manifest["steps"]]
    assert names.count("export-onnx base") == 1  # the base's graph, shared by both adapters
    spans = intervals(manifest)
    pairs = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1 :] if overlap(a, b)]
    # Steps of different adapters ran at the same time.
    assert any(a[2]["unit"] != b[2]["unit"] for a, b in pairs), spans
    # Never more than 2 at once: at each start, count what was running.
    for start, _, _ in spans:
        assert sum(s <= start < e - SLACK for s, e, _ in spans) <= 2, spans
    for a, b in pairs:
        assert "bench" not in (a[2]["step"], b[2]["step"]), (a, b)  # a measurement runs alone
        # torch's steps one at a time (the adapters' merged graphs come from the base graph: no torch)
        assert not (uses_torch(a[2]) and uses_torch(b[2])), (a, b)
    assert set(manifest["adapters"]) == {"a1", "a2"}
    assert all(u["status"] == "passed" and u["failed"] == {} for u in manifest["adapters"].values())
    assert manifest["base"]["status"] == "passed"
    assert sum(line.startswith("[") for line in lines) == len(manifest["steps"])


def test_a_failed_adapter_fails_the_run_and_is_told_apart(pipeline, models, tmp_path):
    run_pipeline(pipeline)
    bundle = tmp_path / "bundle"
    before = (bundle / "pipeline-manifest.json").read_bytes()
    config = models[1] / "a2" / "adapter_config.json"
    config.write_text(config.read_text().replace('"r": 8', '"r": "eight"'))
    with pytest.raises(PipelineFailed) as info:
        run_pipeline(pipeline, jobs=2)
    assert info.value.exit_code == 2 and "a2" in str(info.value)
    assert (bundle / "pipeline-manifest.json").read_bytes() == before  # the previous bundle stays
    manifest = info.value.manifest
    assert manifest["adapters"]["a1"] == manifest["adapters"]["a1"] | {"status": "passed", "failed": {}}
    a2 = manifest["adapters"]["a2"]
    assert a2["status"] == "failed" and "inspect a2" in a2["failed"] and "verify a2" in a2["skipped"]
    steps = {f"{s['step']} {s['unit']}": s["status"] for s in manifest["steps"]}
    assert {steps[f"{step} a1"] for step in ("inspect", "merge", "export-onnx", "verify")} == {"passed"}
    assert (tmp_path / "bundle.failed" / "adapters/a1/merged.onnx").is_file()  # a1's results, for diagnosis


def test_jobs_from_the_cli(pipeline):
    result = CliRunner().invoke(main, ["run", str(pipeline), "--jobs", "0"])
    assert result.exit_code == 2 and "--jobs" in result.stderr
    result = CliRunner().invoke(main, ["run", str(pipeline), "--jobs", "1", "--only", "inspect", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["run"]["jobs"] == 1
