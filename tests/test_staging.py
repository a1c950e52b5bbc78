"""Atomic outputs under signals: SIGTERM cleans up like Ctrl-C, and what a killed run
leaves behind (SIGKILL cannot be caught) is removed by the next run for the same target,
while a live run's staging directory is left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lora_deploy.merge import merge
from lora_deploy.staging import lock, remove_dead_siblings, staging_dir, unlock

# Runs the CLI merge with a merge step that announces itself and then waits to be
# signalled, so the signal lands mid-merge with the staging directory half written.
SLOW_MERGE = textwrap.dedent("""
    import sys, time
    import lora_deploy.merge as m
    real = m.merged_weight
    def slow(*args, **kwargs):
        print("merging", flush=True)
        time.sleep(60)
        return real(*args, **kwargs)
    m.merged_weight = slow
    from lora_deploy.cli import main
    main(["merge", *sys.argv[1:]])
""")


def start_slow_merge(base: Path, adapter: Path, out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, str(base), str(adapter), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "merging", proc.stderr.read()
    return proc


def hidden_siblings(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture
def small(reference):
    return reference("llama", "plain", sharded=True)


def test_sigterm_mid_merge_leaves_nothing(small, tmp_path):
    out = tmp_path / "out"
    proc = start_slow_merge(*small, out)
    assert len(hidden_siblings(out)) == 1  # the staging directory, being written
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert stderr.strip() == "interrupted: nothing was written"
    assert not out.exists() and not hidden_siblings(out)


def test_a_killed_merge_is_cleaned_up_by_the_next(small, tmp_path):
    out = tmp_path / "out"
    proc = start_slow_merge(*small, out)
    proc.kill()  # SIGKILL: nothing in the process runs
    proc.communicate(timeout=60)
    [leftover] = hidden_siblings(out)
    assert any(leftover.iterdir())  # shards were being written
    merge(*small, out)
    assert (out / "merge-manifest.json").exists()
    assert not hidden_siblings(out)


def test_live_staging_directories_are_kept(tmp_path):
    target = tmp_path / "out"
    dead = tmp_path / ".out.partial-0badc0de"
    swapped = tmp_path / ".out.old-0badc0de"
    live = tmp_path / ".out.partial-11ve11ve"
    unrelated = [tmp_path / ".outer.partial-0badc0de", tmp_path / ".out.partial-notadir", tmp_path / "out.partial-x"]
    for d in (dead, swapped, live, unrelated[0], unrelated[2]):
        d.mkdir()
        (d / "shard").write_bytes(b"x")
    unrelated[1].write_bytes(b"a file, not a run's directory")
    held = lock(live)
    try:
        assert sorted(remove_dead_siblings(target)) == sorted([dead, swapped])
        assert live.exists() and all(p.exists() for p in unrelated)
    finally:
        unlock(held)
    assert remove_dead_siblings(target) == [live]  # once its run is gone


def test_a_live_run_is_not_disturbed_by_a_second(tmp_path):
    target = tmp_path / "out"
    with staging_dir(target) as first:
        (first / "a").write_text("first")
        with staging_dir(tmp_path / "out") as second:  # its start-up cleans dead siblings
            assert first.exists()
            (second / "b").write_text("second")
        assert (target / "b").exists()
    assert (target / "a").exists() and not (target / "b").exists()  # the later finisher wins, whole
    assert not hidden_siblings(target)


def test_error_removes_staging_and_keeps_the_old_output(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("kept")
    with pytest.raises(RuntimeError):
        with staging_dir(target) as tmp:
            (tmp / "new").write_text("half")
            raise RuntimeError("disk on fire")
    assert (target / "old").read_text() == "kept" and not (target / "new").exists()
    assert not hidden_siblings(target)


def test_scratch_directory_is_never_renamed(tmp_path):
    target = tmp_path / "model.onnx"
    with staging_dir(target, rename=False) as tmp:
        (tmp / "model.onnx").write_text("graph")
        os.replace(tmp / "model.onnx", target)
    assert target.read_text() == "graph" and not hidden_siblings(target)
