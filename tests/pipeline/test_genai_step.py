"""export-genai then verify in a pipeline: each genai folder's greedy tokens are checked
against PEFT's unmerged generate (proof.genai), as `verify --genai DIR --generate N` does."""

from __future__ import annotations

import json

import pytest

from lora_deploy.pipeline.run import run_pipeline
from tests.pipeline.conftest import write_pipeline

PIPELINE = """\
base: {base}
adapters: {adapters}/a1
out: {out}
cache: {cache}
steps:
  - merge
  - export-genai            # mode merged: a folder per adapter from its merged checkpoint
  - verify:
      generate: 4
      seq: 8
"""


def test_genai_folder_is_verified_by_generation(models, tmp_path, step_cache):
    pytest.importorskip("onnxruntime_genai")
    base, adapters = models
    path = write_pipeline(tmp_path, PIPELINE, base=base, adapters=adapters, out=tmp_path / "bundle", cache=step_cache)
    result = run_pipeline(path)
    records = {r.task.name: r for r in result.records}
    genai = records["verify a1 (genai)"]
    assert genai.status == "passed" and genai.result["report"] == "verify-genai.json"
    report = json.loads((tmp_path / "bundle/adapters/a1/verify-genai.json").read_text())
    assert report["equivalent"] is True
    checks = [c for c in report["checks"] if "onnxruntime-genai" in c["name"]]
    assert checks and all(c["status"] == "passed" for c in checks), report["checks"]
    assert report["artifacts"]["genai"]["sha256"]  # the folder it checked, by its bytes
    gates = {(g["step"], g["unit"]): g for g in result.manifest["gates"] if g["gate"] == "verify"}
    assert gates["verify", "a1"]["passed"] is True
    # The folder verified is the one in the bundle.
    folder = tmp_path / "bundle/adapters/a1/genai"
    assert (folder / "genai_config.json").is_file()
    assert report["inputs"]["genai"].endswith("/genai")
