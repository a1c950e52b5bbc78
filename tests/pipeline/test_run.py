"""`lora-deploy run` end to end on the tiny reference LLaMA: the bundle and its manifest, the
step cache (hits, a changed adapter, --force), a failing gate that leaves the previous
bundle, --only, --json, and a run stopped by SIGTERM or SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from lora_deploy.cli import main
from lora_deploy.pipeline.run import PipelineFailed, run_pipeline
from tests import oracle
from tests.pipeline.conftest import EVERY_STEP, write_pipeline


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bundle_files(bundle: Path) -> dict[str, str]:
    return {p.relative_to(bundle).as_posix(): sha256(p) for p in sorted(bundle.rglob("*")) if p.is_file()}


def statuses(result) -> dict[str, str]:
    return {r.task.name: "cached" if r.cached else r.status for r in result.records}


def test_bundle_manifest_and_merged_graph_against_peft(pipeline, models, tmp_path):
    base, adapters = models
    lines: list[str] = []
    result = run_pipeline(pipeline, echo=lines.append)
    bundle = tmp_path / "bundle"
    assert result.out == bundle
    manifest = json.loads((bundle / "pipeline-manifest.json").read_text())
    assert manifest["schema"] == "lora-deploy.pipeline-manifest/1" and manifest["status"] == "passed"
    assert [s["status"] for s in manifest["steps"]] == ["passed"] * 6
    # Every file of the bundle, and only those, with its SHA-256 (hashlib here, not our helper).
    files = bundle_files(bundle)
    assert files.pop("pipeline-manifest.json")
    assert manifest["outputs"] == files
    assert {"base/base.onnx", "adapters/a1/merged.onnx", "adapters/a1/verify.json"} <= set(files)
    assert "adapters/a1/merged/model.safetensors" in files and "adapters/a1/bench-cpu-onnxruntime.json" in files
    adapter_file = adapters / "a1" / "adapter_model.safetensors"
    assert manifest["inputs"]["adapters"]["a1"]["sha256"]["adapter_model.safetensors"] == sha256(adapter_file)
    assert manifest["inputs"]["base"]["sha256"]["config.json"] == sha256(base / "config.json")
    assert manifest["tool"]["libraries"]["onnxruntime"] == ort.__version__
    assert manifest["machine"]["cores"] == os.cpu_count()
    # The verify and bench results name the bytes they checked and timed.
    steps = {s["step"] + " " + s["unit"]: s for s in manifest["steps"]}
    merged_onnx = files["adapters/a1/merged.onnx"]
    assert steps["verify a1"]["result"]["artifacts"]["onnx"]["sha256"] == {"merged.onnx": merged_onnx}
    assert steps["bench a1"]["result"]["artifacts"]["merged"]["sha256"] == {"merged.onnx": merged_onnx}
    assert steps["bench a1"]["result"]["schema"] == "lora-deploy.bench/3" and steps["bench a1"]["result"]["created"]
    gates = {g["gate"]: g for g in manifest["gates"]}
    assert gates["verify"]["passed"] and gates["overhead"]["passed"] is True
    verify = json.loads((bundle / "adapters/a1/verify.json").read_text())
    assert verify["equivalent"] and verify["schema"].startswith("lora-deploy.verify")
    # One line per step, and the bench figures.
    assert sum(line.startswith("[") for line in lines) == 6
    assert any(line.strip().startswith("1x16: base ") and "merged" in line for line in lines), lines
    # merged.onnx, written from the base graph, computes what PEFT computes unmerged.
    batch = oracle.token_batch(256, batch=2, seq=12)
    want = oracle.logits_of(oracle.peft_model(base, adapters / "a1"), batch).numpy()
    session = ort.InferenceSession(str(bundle / "adapters/a1/merged.onnx"), providers=["CPUExecutionProvider"])
    feed = {i.name: batch[i.name].numpy() for i in session.get_inputs()}
    got = session.run(["logits"], feed)[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    base_logits = oracle.logits_of(oracle.load_model(base), batch).numpy()
    assert np.abs(base_logits - want).max() > 1e-2  # the adapter changes the outputs: the check above means something


def test_cache_hits_and_one_changed_byte_reruns_only_that_adapters_steps(pipeline, models, tmp_path):
    base, adapters = models
    run_pipeline(pipeline)
    again = statuses(run_pipeline(pipeline))
    # bench is measured again: a latency figure is never an earlier run's
    assert again.pop("bench a1 @cpu-onnxruntime") == "passed"
    assert set(again.values()) == {"cached"}
    manifest = json.loads((tmp_path / "bundle/pipeline-manifest.json").read_text())
    steps = {s["step"]: s for s in manifest["steps"]}
    assert steps.pop("bench")["cache"] == "off"
    assert all(s["cached"] and s["cache"] == "hit" and s["first_run_seconds"] >= 0 for s in steps.values())
    assert manifest["summary"]["cached"] == 5
    assert list(manifest["run"]["never_cached"]) == ["bench a1 @cpu-onnxruntime"]
    # A second adapter, and one byte of the first changed: a1's steps and the new a2's run;
    # the base's ONNX graph is the one built before.
    shutil_copy(adapters / "a1", adapters / "a2")
    weights = adapters / "a1" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header] ^= 0x01  # the lowest mantissa byte of the first float32 value
    weights.write_bytes(bytes(data))
    changed = statuses(run_pipeline(pipeline))
    assert changed.pop("export-onnx base") == "cached"
    assert {name for name, status in changed.items() if status == "cached"} == {
        f"{step} a2" for step in ("inspect", "merge", "export-onnx", "verify")
    }  # a2 is a1's old bytes: every one of its steps was stored (bench is never)
    assert all(changed[f"{step} a1"] == "passed" for step in ("inspect", "merge", "export-onnx", "verify"))


def shutil_copy(src: Path, dest: Path) -> None:
    """A copy of the adapter before the change (so it has the first run's bytes)."""
    import shutil

    shutil.copytree(src, dest)


def test_a_damaged_cache_entry_is_rebuilt_and_force_reruns(models, tmp_path, step_cache):
    base, adapters = models
    text = EVERY_STEP.split("  - export-onnx")[0]  # inspect and merge only: quick to rerun
    path = write_pipeline(tmp_path, text, base=base, adapters=adapters, out=tmp_path / "bundle", cache=step_cache)
    first = run_pipeline(path)
    merged = next(r for r in first.records if r.task.step == "merge")
    stored = step_cache / "steps" / "merge" / merged.key / "out" / "merged" / "model.safetensors"
    with open(stored, "r+b") as f:  # damaged in place: same inode and size, new mtime
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    assert statuses(run_pipeline(path)) == {"inspect a1": "cached", "merge a1": "passed"}
    assert set(statuses(run_pipeline(path, force=True)).values()) == {"passed"}


def test_a_failing_gate_exits_1_and_leaves_the_previous_bundle(pipeline, tmp_path):
    run_pipeline(pipeline)
    bundle = tmp_path / "bundle"
    before = bundle_files(bundle)
    with pytest.raises(PipelineFailed) as info:
        run_pipeline(pipeline, overrides=["gates.atol=0", "gates.rtol=0"])
    assert info.value.exit_code == 1 and "verify a1: not equivalent" in str(info.value)
    assert bundle_files(bundle) == before
    failed = tmp_path / "bundle.failed"
    manifest = json.loads((failed / "pipeline-manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert {g["gate"]: g["passed"] for g in manifest["gates"]}["verify"] is False
    assert not json.loads((failed / "adapters/a1/verify.json").read_text())["equivalent"]  # the evidence
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]  # no staging left
    result = CliRunner().invoke(main, ["run", str(pipeline), "--set", "gates.atol=0", "--set", "gates.rtol=0"])
    assert result.exit_code == 1 and result.stderr.strip().splitlines()[-1].startswith("error: verify a1")
    run_pipeline(pipeline)  # passing again: the failed run's directory goes
    assert not failed.exists()


def test_only_and_json(pipeline, tmp_path):
    result = CliRunner().invoke(main, ["run", str(pipeline), "--only", "verify", "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert [s["step"] for s in manifest["steps"]] == ["merge", "export-onnx", "export-onnx", "verify"]
    assert manifest["pipeline"]["only"] == ["verify"]
    assert "verify a1" in result.stderr  # the step lines, off stdout
    bad = CliRunner().invoke(main, ["run", str(pipeline), "--only", "pack", "--json"])
    assert bad.exit_code == 2 and "has no pack step" in json.loads(bad.stdout)["error"]


def test_the_bundle_never_replaces_a_directory_that_is_not_one(pipeline, tmp_path):
    other = tmp_path / "bundle"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["run", str(pipeline)])
    assert result.exit_code == 2 and "is not a pipeline bundle" in result.stderr
    assert (other / "notes.txt").read_text() == "mine"


RUN = "import sys; from lora_deploy.cli import main; main(['run', *sys.argv[1:]])"


def start_run(pipeline: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RUN, str(pipeline), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_line(proc: subprocess.Popen, text: str) -> None:
    for line in proc.stdout:
        if text in line:
            return
    raise AssertionError(f"the run ended before {text!r}: {proc.stderr.read()}")


# The export step stands in for a long torch export: it writes half a file, says it started,
# and computes in torch until the process ends.
RUN_SPINNING = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
import torch
import lora_deploy.export as export

def spinning(model, path, **options):
    path.write_bytes(b"half")
    open(sys.argv[1], "w").close()
    a = torch.randn(256, 256)
    while True:
        torch.mm(a, a)

export.export_checkpoint = spinning
from lora_deploy.cli import main
main(["run", *sys.argv[2:]])
"""


def test_ctrl_c_while_a_step_thread_runs_in_torch_exits_130_in_one_line(pipeline, tmp_path, step_cache):
    """The step thread cannot be stopped; the interpreter's shutdown killed it inside torch
    ("terminate called without an active exception", exit 134). Now: exit 130, one line,
    and the step's unfinished cache entry removed."""
    started = tmp_path / "started"
    args = [str(started), str(pipeline), "--only", "export-onnx", "--force"]
    proc = subprocess.Popen([sys.executable, "-c", RUN_SPINNING, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not started.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.decode().strip().splitlines() == ["interrupted: no partial output left behind"]
    assert not [p for p in step_cache.rglob("*") if ".partial-" in p.name]
    assert not (tmp_path / "bundle").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle.")]


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_a_stopped_run_leaves_the_previous_bundle(pipeline, tmp_path, how):
    run_pipeline(pipeline)
    bundle = tmp_path / "bundle"
    before = bundle_files(bundle)
    proc = start_run(pipeline, "--set", "steps.bench.rounds=1000000")
    wait_for_line(proc, "verify a1")  # the bench step, the last, is running now
    proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert bundle_files(bundle) == before
    assert not (tmp_path / "bundle.failed").exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".bundle.")]
    if how == "sigterm":
        assert proc.returncode == 128 + signal.SIGTERM
        assert stderr.strip().splitlines()[-1] == "interrupted: no partial output left behind"
        assert not leftovers
    else:  # nothing in the process ran: its staging directory is the next run's to remove
        assert proc.returncode == -signal.SIGKILL and len(leftovers) == 1
        run_pipeline(pipeline)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle.")]
    assert bundle_files(bundle)["pipeline-manifest.json"]


def test_a_step_that_is_not_required_may_fail(pipeline, tmp_path):
    overrides = ["gates.atol=0", "gates.rtol=0", "steps.verify.required=false"]
    result = run_pipeline(pipeline, overrides=overrides)
    manifest = json.loads((tmp_path / "bundle/pipeline-manifest.json").read_text())
    assert manifest["status"] == "passed" and result.out == tmp_path / "bundle"
    [verify] = [s for s in manifest["steps"] if s["step"] == "verify"]
    assert verify["status"] == "failed" and not verify["required"] and verify["exit_code"] == 1


def test_an_adapter_that_does_not_load_fails_its_steps_with_exit_2(pipeline, models, tmp_path):
    run_pipeline(pipeline)
    before = bundle_files(tmp_path / "bundle")
    config = models[1] / "a1" / "adapter_config.json"
    config.write_text(config.read_text().replace('"r": 8', '"r": "eight"'))
    with pytest.raises(PipelineFailed) as info:
        run_pipeline(pipeline)
    assert info.value.exit_code == 2 and str(info.value).startswith("inspect a1: ")
    assert bundle_files(tmp_path / "bundle") == before
    steps = {s["step"] + " " + s["unit"]: s for s in info.value.manifest["steps"]}
    assert steps["export-onnx base"]["status"] == "passed"  # the base's steps do not need the adapter
    assert steps["verify a1"]["status"] == "skipped" and "needs " in steps["verify a1"]["detail"]
