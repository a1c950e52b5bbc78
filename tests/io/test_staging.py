"""Atomic outputs under signals: SIGTERM cleans up like Ctrl-C, and what a killed run
leaves behind (SIGKILL cannot be caught) is removed by the next run for the same target,
while a live run's staging directory is left alone."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import lora_deploy.io.staging as staging
from lora_deploy.errors import BadInputError, InternalError, OutputError
from lora_deploy.io.staging import (
    CREATING,
    HOST,
    STAGING,
    SWAPPED_OUT,
    lock,
    remove_dead_siblings,
    staging_dir,
    unlock,
    write_file_atomic,
    write_path_atomic,
)
from lora_deploy.merge.streaming import merge

# Runs the CLI merge with a merge step that announces itself and then waits to be
# signalled, so the signal lands mid-merge with the staging directory half written.
SLOW_MERGE = textwrap.dedent("""
    import sys, time
    import lora_deploy.merge.streaming as m
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
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_MERGE, str(base), str(adapter), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "merging", proc.stderr.read()
    return proc


@pytest.fixture
def old_output(tmp_path) -> Path:
    """An earlier output at the target, holding one file "old"."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    return target


def write_new_output(target: Path) -> None:
    with staging_dir(target, overwrite=True) as tmp:
        (tmp / "new").write_text("new")


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
    assert stderr.strip() == "interrupted: no partial output left behind"
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
    dead = tmp_path / f".out.partial-{HOST}-0badc0de"
    swapped = tmp_path / f".out.old-{HOST}-0badc0de"
    live = tmp_path / f".out.partial-{HOST}-1111eeee"
    unrelated = [
        tmp_path / f".outer.partial-{HOST}-0badc0de",  # another target's
        tmp_path / ".out.partial-0000ffff-0badc0de",  # another machine's: its lock may be invisible here
        tmp_path / ".out.old-backup-2024",  # the user's own
        tmp_path / "out.partial-x",
        tmp_path / f".out.partial-{HOST}-deadbeef",  # a file, not a run's directory
    ]
    for d in (dead, swapped, live, *unrelated[:-1]):
        d.mkdir()
        (d / "shard").write_bytes(b"x")
    unrelated[-1].write_bytes(b"x")
    creating_long_ago, creating_now = tmp_path / f".out.new-{HOST}-00000001", tmp_path / f".out.new-{HOST}-00000002"
    creating_long_ago.mkdir()
    creating_now.mkdir()  # unlocked for an instant while a run starts: kept
    os.utime(creating_long_ago, (time.time() - 3600, time.time() - 3600))
    target.mkdir()  # so a swapped-out copy is a leftover, not the output to put back
    held = lock(live)
    try:
        assert sorted(remove_dead_siblings(target)) == sorted([dead, swapped, creating_long_ago])
        assert creating_now.exists()
        assert live.exists() and all(p.exists() for p in unrelated)
    finally:
        unlock(held)
    assert remove_dead_siblings(target) == [live]  # once its run is gone


def test_a_live_run_is_not_disturbed_by_a_second(tmp_path):
    target = tmp_path / "out"
    with staging_dir(target, overwrite=True) as first:  # without overwrite, see tests/io/test_output_policy.py
        (first / "a").write_text("first")
        with staging_dir(tmp_path / "out") as second:  # its start-up cleans dead siblings
            assert first.exists()
            (second / "b").write_text("second")
        assert (target / "b").exists()
    assert (target / "a").exists() and not (target / "b").exists()  # the later finisher wins, whole
    assert not hidden_siblings(target)


def test_error_removes_staging_and_keeps_the_old_output(old_output):
    target = old_output
    with pytest.raises(RuntimeError):
        with staging_dir(target, overwrite=True) as tmp:
            (tmp / "new").write_text("half")
            raise RuntimeError("disk on fire")
    assert (target / "old").read_text() == "old" and not (target / "new").exists()
    assert not hidden_siblings(target)


def test_scratch_directory_is_never_renamed(tmp_path):
    target = tmp_path / "model.onnx"
    with staging_dir(target, rename=False) as tmp:
        (tmp / "model.onnx").write_text("graph")
        os.replace(tmp / "model.onnx", target)
    assert target.read_text() == "graph" and not hidden_siblings(target)


@pytest.mark.parametrize("kind", [STAGING, CREATING])
def test_an_error_in_a_scratch_directory_names_the_file_beside_the_target(tmp_path, kind):
    """With rename=False the staged files are named for their places beside the target
    (OUT and OUT.data): a path inside the scratch directory maps there, not under OUT."""
    target = tmp_path / "m.onnx"
    with pytest.raises(OutputError) as raised:
        with staging_dir(target, rename=False) as tmp:
            raise OutputError(f"{tmp / 'm.onnx.data'}: cannot write (No space left on device)")
    assert str(raised.value) == f"{tmp_path / 'm.onnx.data'}: cannot write (No space left on device)"
    with pytest.raises(OutputError) as raised:
        with staging_dir(target, rename=False) as tmp:
            raise OutputError(f"{tmp}: cannot sync")
    assert str(raised.value) == f"{target}: cannot sync"
    with pytest.raises(OutputError) as raised:  # a directory output: its files end up inside it
        with staging_dir(tmp_path / "out") as tmp:
            raise OutputError(f"{tmp / 'model.safetensors'}: cannot write")
    assert str(raised.value) == f"{tmp_path / 'out' / 'model.safetensors'}: cannot write"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def name_bytes(path: Path) -> int:
    return len(os.fsencode(path.name))


@pytest.mark.parametrize("name", ["x" * 255, "é" * 127 + "x", "m" * 226 + ".onnx"], ids=["255", "utf8", "onnx"])
@pytest.mark.parametrize("rename", [True, False], ids=["dir", "file"])
def test_a_target_whose_name_fits_gets_hidden_siblings_that_fit(tmp_path, name, rename):
    target = tmp_path / name
    assert name_bytes(target) <= staging.NAME_MAX
    seen = []
    real_replace = os.replace

    def spy(src, dst, *args, **kwargs):
        seen.extend(Path(p) for p in (src, dst) if Path(p).parent == tmp_path and Path(p).name.startswith("."))
        return real_replace(src, dst, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(staging.os, "replace", spy)
        for overwrite in (False, True):  # the second swaps the first out ("old")
            with staging_dir(target, rename=rename, overwrite=overwrite) as tmp:
                seen.append(tmp)
                if rename:
                    (tmp / "file").write_text(str(overwrite))
                else:
                    (tmp / name).write_text(str(overwrite))
                    staging.place_file(tmp / name, target, overwrite)
    kinds = {p.name.split(".")[-1].split("-")[0] for p in seen}
    assert kinds == ({STAGING, CREATING, SWAPPED_OUT} if rename else {STAGING, CREATING})
    assert all(name_bytes(p) <= staging.NAME_MAX for p in seen)
    assert (target / "file" if rename else target).read_text() == "True"
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_leftovers_of_a_long_named_target_are_found_and_only_its_own(tmp_path):
    target = tmp_path / ("x" * 240)
    other = tmp_path / ("x" * 239 + "y")  # the same shortened start: told apart by the hash
    target.mkdir()
    dead, swapped, live = (staging.sibling(target, kind) for kind in (STAGING, SWAPPED_OUT, STAGING))
    others = staging.sibling(other, STAGING)
    for d in (dead, swapped, live, others):
        d.mkdir()
        (d / "shard").write_bytes(b"x")
    assert len({d.name.split(".")[1] for d in (dead, swapped, live)}) == 1
    held = lock(live)
    try:
        assert sorted(remove_dead_siblings(target)) == sorted([dead, swapped])
        assert live.exists() and others.exists()
    finally:
        unlock(held)
    with staging_dir(target, overwrite=True) as tmp:  # a run's start-up removes them too
        (tmp / "file").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, others.name])
    assert remove_dead_siblings(other) == [others]


# Slows one merge block on the pool's threads, so the signal lands while the main thread
# waits for blocks.
SLOW_BLOCK = textwrap.dedent("""
    import sys, time
    import lora_deploy.merge.blocks as b, lora_deploy.merge.delta as d
    real = b.BlockPool.run
    def run(self, work, starts):
        def slow(i):
            if i == starts[0]:
                print("merging", flush=True)
                time.sleep(3)  # the pool's threads are joined at exit: keep it short
            work(i)
        real(self, slow, starts)
    b.BlockPool.run = run
    b.worker_count = lambda: 4
    d.BLOCK_ELEMENTS = 1024
    from lora_deploy.cli import main
    main(["merge", *sys.argv[1:]])
""")


def test_sigterm_while_blocks_run_on_the_pool(small, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_BLOCK, *map(str, small), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "merging", proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert not out.exists() and not hidden_siblings(out)


def test_a_signal_during_the_swap_waits_for_it(old_output, monkeypatch, ctrl_c):
    """Ctrl-C between swapping the old output out and the new one in would lose both."""
    target = old_output
    real = os.replace

    def interrupted_replace(src, dst):
        real(src, dst)
        if Path(dst).name.startswith(".out.old-"):  # old output swapped out, new not yet in
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(staging.os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        write_new_output(target)
    assert (target / "new").read_text() == "new" and not (target / "old").exists()
    assert not hidden_siblings(target)


class Terminated(Exception):
    """What the CLI's SIGTERM handler raises (lora_deploy.cli.Terminated), stood in for here."""


def test_sigterm_during_the_swap_waits_for_it(old_output, monkeypatch):
    """A cancelled CI job's SIGTERM must be held back like Ctrl-C: delivered between the two
    renames it would leave neither the old output nor the new one in place."""
    target = old_output
    real = os.replace
    delivered = []

    def terminate(signum, frame):
        delivered.append(Path(target / "new").exists())
        raise Terminated

    def terminated_replace(src, dst):
        real(src, dst)
        if Path(dst).name.startswith(".out.old-"):  # old output swapped out, new not yet in
            signal.raise_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        monkeypatch.setattr(staging.os, "replace", terminated_replace)
        with pytest.raises(Terminated):
            write_new_output(target)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert delivered == [True]  # delivered once, after the new output was in place
    assert (target / "new").read_text() == "new" and not (target / "old").exists()
    assert not hidden_siblings(target)


def test_a_failed_swap_keeps_the_old_output_and_says_so(old_output, monkeypatch):
    target = old_output
    real = os.replace

    def refuse_new(src, dst):
        if Path(src).name.startswith(".out.partial-") and Path(dst) == target:
            raise PermissionError(13, "Permission denied")
        real(src, dst)

    monkeypatch.setattr(staging.os, "replace", refuse_new)
    with pytest.raises(staging.OutputError, match="cannot move the output into place"):
        write_new_output(target)
    assert (target / "old").read_text() == "old" and not hidden_siblings(target)


def test_an_output_another_run_holds_is_not_swapped(old_output, monkeypatch):
    target = old_output
    monkeypatch.setattr(staging, "LOCK_WAIT_S", 0.2)
    held = lock(target)  # as a run that has just renamed its output into place holds it
    try:
        with pytest.raises(staging.OutputError, match="locked by another run"):
            write_new_output(target)
    finally:
        unlock(held)
    assert (target / "old").read_text() == "old" and not hidden_siblings(target)


def test_an_output_swapped_out_by_a_killed_run_is_put_back(tmp_path):
    target = tmp_path / "out"
    old = tmp_path / f".out.old-{HOST}-0badc0de"  # killed between the two renames
    new = tmp_path / f".out.partial-{HOST}-0badc0de"
    for d, text in ((old, "old"), (new, "new")):
        d.mkdir()
        (d / "file").write_text(text)
    remove_dead_siblings(target)
    assert (target / "file").read_text() == "old" and not hidden_siblings(target)


# Writes one file through write_file_atomic, announcing itself mid-write and then waiting
# to be killed.
SLOW_FILE_WRITE = textwrap.dedent("""
    import sys, time
    from lora_deploy.io.staging import write_file_atomic
    def write(f):
        f.write(b"half")
        f.flush()
        print("writing", flush=True)
        time.sleep(60)
    write_file_atomic(sys.argv[1], write, overwrite=True)
""")


@pytest.fixture
def old_file(tmp_path) -> Path:
    target = tmp_path / "report.json"
    target.write_text("old")
    return target


def test_a_killed_file_write_is_cleaned_up_by_the_next(old_file):
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_FILE_WRITE, str(old_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
    proc.kill()  # SIGKILL: its staging directory stays, unlocked
    proc.communicate(timeout=60)
    [leftover] = hidden_siblings(old_file)
    assert (leftover / old_file.name).read_bytes() == b"half"
    assert old_file.read_text() == "old"
    write_file_atomic(old_file, lambda f: f.write(b"new"), overwrite=True)
    assert old_file.read_text() == "new" and not hidden_siblings(old_file)


def test_a_live_file_write_is_not_disturbed(old_file):
    with staging_dir(old_file, rename=False, overwrite=True) as live:  # as another run's write in progress
        write_file_atomic(old_file, lambda f: f.write(b"new"), overwrite=True)
        assert live.exists()
    assert old_file.read_text() == "new" and not hidden_siblings(old_file)


@pytest.mark.parametrize("error", [RuntimeError("bug"), KeyboardInterrupt()])
def test_a_failed_file_write_leaves_the_old_file_and_nothing_else(old_file, error):
    def fail(f):
        f.write(b"half")
        raise error

    with pytest.raises(type(error)):
        write_file_atomic(old_file, fail, overwrite=True)
    assert old_file.read_text() == "old" and not hidden_siblings(old_file)


def test_a_failed_first_write_leaves_no_file(tmp_path):
    target = tmp_path / "sub" / "x.json"

    def fail(f):
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        write_file_atomic(target, fail)
    assert not target.exists() and not hidden_siblings(target)


def test_disk_full_is_an_output_error_naming_the_target(old_file):
    def disk_full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match="No space left") as info:
        write_file_atomic(old_file, disk_full, overwrite=True)
    assert not isinstance(info.value, BadInputError) and info.value.exit_code == 3
    assert str(info.value).startswith(f"{old_file}: ")  # not the hidden staging path
    assert old_file.read_text() == "old" and not hidden_siblings(old_file)


def test_our_errors_from_a_path_writer_name_the_target(tmp_path):
    target = tmp_path / "x.onnx_adapter"

    def fail(staged):
        raise OutputError(f"{staged}: cannot write (Input/output error)")

    with pytest.raises(OutputError) as info:
        write_path_atomic(target, fail)
    assert str(info.value) == f"{target}: cannot write (Input/output error)"


def test_a_path_writer_that_writes_nothing_is_a_bug(tmp_path):
    target = tmp_path / "x.onnx_adapter"
    with pytest.raises(InternalError):
        write_path_atomic(target, lambda staged: None)
    assert not target.exists() and not hidden_siblings(target)


def test_a_path_writer_output_is_renamed_into_place(old_file):
    assert write_path_atomic(old_file, lambda staged: staged.write_text("new"), overwrite=True) == old_file
    assert old_file.read_text() == "new" and not hidden_siblings(old_file)


def test_durable_writes_land_whole(old_file):
    write_file_atomic(old_file, lambda f: f.write(b"new"), durable=True, overwrite=True)
    assert old_file.read_text() == "new" and not hidden_siblings(old_file)


def test_a_path_of_the_wrong_shape_is_bad_input(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    for target in (tmp_path / "file" / "x.json", tmp_path / "dir"):
        with pytest.raises(BadInputError):
            write_file_atomic(target, lambda f: f.write(b"new"))
    with pytest.raises(BadInputError):  # a directory output under a file
        write_new_output(tmp_path / "file" / "out")
    assert (tmp_path / "file").read_text() == "x" and not any((tmp_path / "dir").iterdir())


def test_write_errors_are_not_bad_input():
    for kind in (OutputError, InternalError):
        assert kind.exit_code == 3 and not issubclass(kind, BadInputError)
