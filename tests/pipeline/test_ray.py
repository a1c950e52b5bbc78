"""`lora-deploy run --ray local`: two adapters' steps run as tasks of a local Ray instance
(worker processes, not this one), into the same bundle and cache as a local run; without Ray
the option stops before any work and names the extra."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_deploy.cli import main
from lora_deploy.pipeline.run import run_pipeline
from tests.pipeline.conftest import write_pipeline

PIPELINE = """\
base: {base}
adapters: {adapters}/*
out: {out}
cache: {cache}
steps:
  - inspect
  - merge
  - export-onnx
  - verify
"""


@pytest.fixture
def pipeline(models, reference, tmp_path, step_cache) -> Path:
    base, adapters = models
    _, rslora = reference("llama", "rslora")
    shutil.copytree(rslora, adapters / "a2")
    return write_pipeline(tmp_path, PIPELINE, base=base, adapters=adapters, out=tmp_path / "bundle", cache=step_cache)


def test_without_ray_the_option_names_the_extra(pipeline, tmp_path):
    try:
        import ray  # noqa: F401

        pytest.skip("Ray is installed here")
    except ImportError:
        pass
    result = CliRunner().invoke(main, ["run", str(pipeline), "--ray", "local"])
    assert result.exit_code == 2 and "pip install 'lora-deploy[ray]'" in result.stderr
    assert not (tmp_path / "bundle").exists()


def test_steps_run_as_ray_tasks(pipeline, tmp_path):
    pytest.importorskip("ray")
    from lora_deploy.pipeline import distributed

    seen: list[int] = []
    step = distributed.run_step

    def remote_pid(produce, out, inputs):  # what the workers run: the step, and the process it ran in
        outcome = step(produce, out, inputs)
        outcome.result["pid"] = os.getpid()
        return outcome

    distributed.run_step = remote_pid
    try:
        result = run_pipeline(pipeline, ray="local", force=True, jobs=4)
    finally:
        distributed.run_step = step
    manifest = result.manifest
    assert manifest["status"] == "passed" and manifest["run"]["ray"]["nodes"] >= 1
    pids = {s["result"].get("pid") for s in manifest["steps"]}
    seen = pids - {None}
    assert seen and os.getpid() not in seen, pids  # every step ran in a Ray worker
    assert {u["status"] for u in manifest["adapters"].values()} == {"passed"}
    for name in ("a1", "a2"):
        report = json.loads((tmp_path / f"bundle/adapters/{name}/verify.json").read_text())
        assert report["equivalent"] is True
    # The same steps locally: the same outputs, from the cache the workers filled.
    again = run_pipeline(pipeline)
    assert all(s["cached"] for s in again.manifest["steps"])
    assert again.manifest["outputs"] == {k: v for k, v in manifest["outputs"].items() if k in again.manifest["outputs"]}
