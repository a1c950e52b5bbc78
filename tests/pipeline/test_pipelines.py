"""The pipeline files in pipelines/ run as shipped (fewer bench rounds), on the tiny
reference LLaMA: quickstart, task switching over two adapters, and the CI pipeline whose
TensorRT target is skipped with its reason where TensorRT cannot run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from lora_deploy.pipeline.run import probe_target, run_pipeline
from lora_deploy.pipeline.spec import PipelineError, Target

PIPELINES = Path(__file__).parent.parent.parent / "pipelines"
QUICK = ["steps.bench.rounds=3", "steps.bench.warmup=1", "steps.bench.shapes=1x16"]


def link(path: Path, target: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target, target_is_directory=True)
    return path


def test_quickstart_on_the_demo_layout(reference, tmp_path, step_cache):
    base, adapter = reference("llama")
    demo = tmp_path / "demo"  # what `lora-deploy demo -o demo` leaves: base/ and adapter/
    link(demo / "base", base)
    link(demo / "adapter", adapter)
    result = run_pipeline(
        PIPELINES / "quickstart.yaml",
        overrides=[*QUICK, f"cache={step_cache}", "gates.max_overhead=50%"],
        environ={"DEMO_DIR": str(demo)},
    )
    assert result.out == demo / "bundle"
    manifest = json.loads((demo / "bundle/pipeline-manifest.json").read_text())
    assert manifest["status"] == "passed" and manifest["pipeline"]["name"] == "quickstart"
    assert (demo / "bundle/adapters/adapter/merged.onnx").is_file()


def test_task_switching_over_two_adapters(reference, tmp_path, step_cache):
    base, plain = reference("llama")
    _, rslora = reference("llama", "rslora")
    link(tmp_path / "adapters/plain", plain)
    link(tmp_path / "adapters/rslora", rslora)
    lines: list[str] = []
    result = run_pipeline(
        PIPELINES / "task-switching.yaml",
        overrides=[*QUICK, f"cache={step_cache}"],
        environ={"BASE_MODEL": str(base), "ADAPTERS": f"{tmp_path}/adapters/*", "OUT_DIR": str(tmp_path / "out")},
        echo=lines.append,
    )
    names = [r.task.name for r in result.records]
    assert names.count("export-onnx base (dynamic)") == 1  # one graph for both adapters
    bundle = tmp_path / "out"
    for name in ("plain", "rslora"):
        assert (bundle / f"adapters/{name}/adapter.onnx_adapter").is_file()
        report = json.loads((bundle / f"adapters/{name}/verify.json").read_text())
        checks = {c["name"]: c["status"] for c in report["checks"]}
        assert checks["outputs [generated]: dynamic (adapter active) logits vs unmerged"] == "passed", checks
    assert any("dynamic" in line and "1x16:" in line for line in lines), lines


def test_ci_pipeline_skips_tensorrt_where_it_cannot_run(reference, tmp_path, step_cache):
    reason = probe_target(Target(runtime="tensorrt", device="cuda"))
    if reason is None:
        pytest.skip("TensorRT and a GPU are here: the TensorRT steps would run")
    base, adapter = reference("llama")
    environ = {"BASE_MODEL": str(base), "ADAPTER": str(adapter)}
    out = tmp_path / "artifacts"
    result = run_pipeline(
        PIPELINES / "ci-adapter-to-engine.yaml",
        overrides=[*QUICK, f"cache={step_cache}", "gates.max_overhead=50%"],
        out=out,
        environ=environ,
    )
    skipped = {r.task.name: r.detail for r in result.records if r.status == "skipped"}
    assert set(skipped) == {
        "build-trt base @gpu-tensorrt-fp16",
        f"build-trt {adapter.name} @gpu-tensorrt-fp16",
        f"verify {adapter.name} @gpu-tensorrt-fp16",
        f"bench {adapter.name} @gpu-tensorrt-fp16",
    }
    assert all(reason in detail for detail in skipped.values())
    manifest = json.loads((out / "pipeline-manifest.json").read_text())
    assert manifest["targets"]["gpu-tensorrt-fp16"] | {"reason": None} == {
        "runtime": "tensorrt",
        "device": "cuda",
        "precision": "fp16",
        "provider": None,
        "required": False,
        "available": False,
        "reason": None,
    }
    # Marked required, the run stops before any work.
    with pytest.raises(PipelineError, match="target gpu-tensorrt-fp16 is required but cannot run here"):
        run_pipeline(
            PIPELINES / "ci-adapter-to-engine.yaml", out=tmp_path / "gpu", environ={**environ, "REQUIRE_GPU": "true"}
        )
    assert not (tmp_path / "gpu").exists()


def test_deploy_adapter_script_is_a_wrapper(tmp_path):
    text = (PIPELINES / "deploy-adapter.sh").read_text()
    assert "lora-deploy run" in text and "ci-adapter-to-engine.yaml" in text
    done = subprocess.run(["bash", str(PIPELINES / "deploy-adapter.sh")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().startswith("error: usage:")
    assert os.access(PIPELINES / "deploy-adapter.sh", os.X_OK)
