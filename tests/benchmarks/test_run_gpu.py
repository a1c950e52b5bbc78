"""benchmarks/gpu/run_gpu.py in its --dry-run mode, on this machine without TensorRT or a GPU:
the plan runs, every step that cannot run is recorded as skipped with the reason the tool
gives, and the ONNX Runtime steps run on the CPU, labelled as a dry run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "run_gpu.py"


@pytest.fixture(scope="module")
def run_gpu():
    spec = importlib.util.spec_from_file_location("run_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_gpu"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("run_gpu", None)


@pytest.mark.slow  # two small exports and a verify: about 20 s on a quiet 2-core machine
def test_dry_run_records_what_ran_and_why_the_rest_did_not(run_gpu, tmp_path):
    out = tmp_path / "gpu.json"
    machine = run_gpu.Machine.probe()
    if machine.tensorrt is None or machine.cuda is None:
        pytest.skip("this machine has TensorRT or CUDA: the dry run would not be one")
    run_gpu.main(["--dry-run", "--models", "gpt2-medium", "--out", str(out), "--work", str(tmp_path / "work")])
    doc = json.loads(out.read_text())
    assert doc["schema"] == run_gpu.SCHEMA and doc["dry_run"] is True
    steps = {s["step"]: s for s in doc["models"]["gpt2-medium"]["steps"]}
    assert steps["prepare: base, adapter, merge"]["status"] == "passed"
    for name, step in steps.items():
        if "trt" in name or "tensorrt" in name or "engine" in name:
            assert step["status"] == "skipped" and step["reason"] == machine.tensorrt, name
    assert steps["bench torch cuda base / merged / unmerged LoRA"]["reason"] == machine.cuda
    ort = [s for name, s in steps.items() if "[dry run: on the CPU]" in name]
    assert len(ort) == 2 and all(s["status"] == "passed" for s in ort), ort
    verify = next(s for s in ort if s["step"].startswith("verify"))
    assert verify["result"]["equivalent"] and verify["result"]["onnxruntime"]["providers"] == ["CPUExecutionProvider"]
    assert doc["summary"] == {"passed": 3, "skipped": len(steps) - 3}
    with pytest.raises(Exception, match="exists; pass --overwrite"):
        run_gpu.main(["--dry-run", "--models", "gpt2-medium", "--out", str(out)])


def test_time_budget_and_model_names(run_gpu, tmp_path):
    plan = run_gpu.Plan(tmp_path, dry_run=True, budget_s=0.0, rounds=1)
    steps: list[dict] = []
    assert run_gpu.run_step(plan, steps, "late", None, lambda: {"never": "run"}) is None
    assert steps == [
        {"step": "late", "status": "skipped", "reason": "the time budget of 0 s was spent before this step"}
    ]
    plan.budget_s = 60.0
    run_gpu.run_step(plan, steps, "broken", None, lambda: 1 / 0)
    assert steps[-1]["status"] == "failed" and steps[-1]["error"].startswith("ZeroDivisionError")
    with pytest.raises(SystemExit, match="unknown gpt4"):
        run_gpu.parse_models("llama,gpt4")
