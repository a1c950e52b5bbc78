"""examples/robot/run.sh end to end: build -> merge -> float16 static export -> verify on
recorded observations (the whole graph, and part by part) -> a 50 Hz control loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "robot" / "run.sh"


@pytest.mark.slow
def test_the_walkthrough_script_runs_and_verifies(tmp_path):
    env = dict(os.environ, DURATION="1s", STEPS="10", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "demo")], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "demo" / "verify.json").read_text())
    assert report["equivalent"] and report["inputs"]["action_kind"] == "continuous"
    actions = [c for c in report["checks"] if c["name"].startswith("actions [observations.npz]: onnx")]
    assert actions and actions[0]["status"] == "passed"
    parts = json.loads((tmp_path / "demo" / "verify-parts.json").read_text())
    assert parts["equivalent"]
    assert set(parts["inputs"]["parts"]) == {"patch_embed", "blocks.0", "blocks.1", "action_head"}
    chain = [c for c in parts["checks"] if c["name"].startswith("actions [observations.npz]: parts chain")]
    assert chain and chain[0]["status"] == "passed"
    bench = json.loads((tmp_path / "demo" / "bench.json").read_text())
    assert bench["config"]["rate_hz"] == 50.0  # the control loop ran at the requested rate
