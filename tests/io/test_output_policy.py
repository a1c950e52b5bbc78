"""One output policy for every command (lora_deploy.io.staging.check_output): an input is
never an output, whatever the flags; an existing output is replaced only with --overwrite;
two runs racing for one new output cannot both succeed; a replaced output leaves nothing
behind, or says what it left."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

import lora_deploy.io.staging as staging
from lora_deploy.cli import main
from lora_deploy.errors import BadInputError, OutputError
from lora_deploy.io.staging import (
    HOST,
    check_output,
    place_new,
    remove_dead_siblings,
    staging_dir,
    write_file_atomic,
)
from lora_deploy.merge.streaming import merge
from tests.bench.test_bench import tiny_graph


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def hidden_siblings(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under root (links followed) by content hash: "untouched" means equal."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_refused(result, *names):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for name in names:
        assert str(name) in lines[0], lines[0]


@pytest.fixture
def llama(reference, tmp_path):
    """A base with a side-file subdirectory (as sentence-transformers' 1_Pooling) and an
    adapter, both private copies."""
    base, adapter = reference("llama", "plain")
    shutil.copytree(base, tmp_path / "base")
    shutil.copytree(adapter, tmp_path / "adapter")
    (tmp_path / "base" / "1_Pooling").mkdir()
    (tmp_path / "base" / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    return tmp_path / "base", tmp_path / "adapter"


@pytest.fixture
def hf_cache(reference, tmp_path):
    """The Hugging Face cache layout: snapshot files are symlinks into a blob directory."""
    base, adapter = reference("llama", "plain")
    repo = tmp_path / "models--org--tiny"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    for path in sorted(base.rglob("*")):
        if path.is_file():
            blob = hashlib.sha256(path.read_bytes()).hexdigest()
            shutil.copyfile(path, blobs / blob)
            link = snapshot / path.relative_to(base)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blobs / blob, link.parent))
    return snapshot, blobs, adapter


# ------------------------------------------------------------ inputs are never outputs


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_merge_into_a_subdirectory_of_the_base_is_refused(llama, flags):
    base, adapter = llama
    before = tree_digest(base)
    result = run_cli("merge", base, adapter, "-o", base / "1_Pooling", *flags)
    assert_refused(result, base / "1_Pooling", base)
    assert tree_digest(base) == before


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_merge_into_the_blob_directory_of_a_cached_base_is_refused(hf_cache, flags):
    snapshot, blobs, adapter = hf_cache
    before = tree_digest(blobs)
    for out in (blobs, blobs.parent):  # the blobs, or a directory holding them
        result = run_cli("merge", snapshot, adapter, "-o", out, *flags)
        assert_refused(result, out, snapshot)
    assert tree_digest(blobs) == before
    assert all(p.resolve().exists() for p in snapshot.rglob("*"))


def test_merge_from_a_cached_base_works(hf_cache, tmp_path):
    snapshot, _, adapter = hf_cache
    merge(snapshot, adapter, tmp_path / "merged")
    assert (tmp_path / "merged" / "merge-manifest.json").exists()


def test_merge_over_an_output_holding_the_adapter_file_is_refused(llama, tmp_path):
    base, adapter = llama
    out = tmp_path / "out"
    out.mkdir()
    weights = adapter / "adapter_model.safetensors"
    shutil.move(weights, out / weights.name)
    weights.symlink_to(out / weights.name)  # the adapter's weights live in OUT
    before = tree_digest(out)
    result = run_cli("merge", base, adapter, "-o", out, "--overwrite")
    assert_refused(result, out, adapter)
    assert tree_digest(out) == before


def test_an_output_symlinked_to_an_input_is_refused(llama, tmp_path):
    base, adapter = llama
    link = tmp_path / "link"
    link.symlink_to(base)
    result = run_cli("merge", base, adapter, "-o", link, "--overwrite")
    assert_refused(result, link, base)
    assert (base / "model.safetensors").exists()


@pytest.mark.parametrize(
    "out, relation",
    [
        ("in/base", "is"),
        ("in", "contains"),
        ("in/base/new", "lies inside"),
        ("in/file.json", "is"),
        ("in/data", "contains"),  # the directory an input file lives in
        ("in/blobs", "contains"),  # where a file linked from an input directory lives
        ("in/blobs/b1", "is"),
    ],
)
def test_check_output_names_the_relation_and_both_paths(tmp_path, out, relation):
    (tmp_path / "in" / "base").mkdir(parents=True)
    (tmp_path / "in" / "data").mkdir()
    (tmp_path / "in" / "data" / "file.bin").write_text("x")
    (tmp_path / "in" / "file.json").write_text("{}")
    (tmp_path / "in" / "blobs").mkdir()
    (tmp_path / "in" / "blobs" / "b1").write_text("w")
    (tmp_path / "in" / "base" / "w.bin").symlink_to(tmp_path / "in" / "blobs" / "b1")
    inputs = [tmp_path / "in" / "base", tmp_path / "in" / "file.json", tmp_path / "in" / "data" / "file.bin"]
    for overwrite in (False, True):
        with pytest.raises(BadInputError) as info:
            check_output(tmp_path / out, inputs, overwrite, directory=True)
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"{tmp_path / out}: ")
        assert f"it {relation} " in message, message


def test_outputs_beside_inputs_are_fine(tmp_path):
    (tmp_path / "models").mkdir()
    model = tmp_path / "models" / "base.onnx"
    model.write_text("graph")
    # next to an input file, and beside (not inside) an input directory
    assert check_output(tmp_path / "models" / "bench.json", [model]) == tmp_path / "models" / "bench.json"
    check_output(tmp_path / "merged", [tmp_path / "models"], directory=True)
    check_output(tmp_path / "empty", [model], directory=True)


# --------------------------------------- every command that writes: one output policy


@pytest.fixture(scope="module")
def work(reference, tmp_path_factory):
    """Inputs for every writing command: base, adapter, a tiny ONNX model, a bench report.
    Shared by the tests below, which must leave them as they found them."""
    root = tmp_path_factory.mktemp("inputs")
    base, adapter = reference("llama", "plain")
    shutil.copytree(base, root / "base")
    shutil.copytree(adapter, root / "adapter")
    (root / "base" / "1_Pooling").mkdir()
    (root / "base" / "1_Pooling" / "config.json").write_text("{}")
    onnx_model = tiny_graph(root / "tiny.onnx")
    result = run_cli(
        "bench", "--model", f"tiny={onnx_model}", "--shapes", "1x4", "--rounds", "2", "--warmup", "0", "--quiet",
        "--json", root / "prev.json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    merge(root / "base", root / "adapter", root / "merged")
    return {
        "base": root / "base",
        "adapter": root / "adapter",
        "merged": root / "merged",
        "onnx": onnx_model,
        "prev": root / "prev.json",
    }


BENCH = ["bench", "--model", "tiny={onnx}", "--shapes", "1x4", "--rounds", "2", "--warmup", "0", "--quiet"]

# (command, the input its output is pointed at): each writing command and output flag.
COMMANDS = {
    "merge": (["merge", "{base}", "{adapter}", "-o", "{out}"], "{base}/1_Pooling"),
    "export onnx": (["export", "onnx", "{base}", "-o", "{out}"], "{base}/model.safetensors"),
    "export dynamic": (
        ["export", "onnx", "{base}", "--dynamic-adapters", "--adapter", "{adapter}", "-o", "{out}"],
        "{adapter}/adapter_model.safetensors",
    ),
    "export multi": (
        ["export", "onnx", "{base}", "--multi-adapter", "--adapter", "{adapter}", "-o", "{out}"],
        "{base}/config.json",
    ),
    "pack": (["pack", "{adapter}", "-o", "{out}"], "{adapter}/adapter_model.safetensors"),
    "verify --report": (
        ["verify", "{base}", "{adapter}", "--merged", "{merged}", "--report", "{out}"],
        "{merged}/config.json",
    ),
    "bench --json": ([*BENCH, "--json", "{out}"], "{onnx}"),
    "bench --markdown": ([*BENCH, "--markdown", "{out}"], "{onnx}"),
    "bench --plot": ([*BENCH, "--plot", "{out}"], "{onnx}"),
    "bench --json --baseline": ([*BENCH, "--baseline", "{prev}", "--json", "{out}"], "{prev}"),
}


def command_line(name: str, work: dict, out: Path) -> list[str]:
    return [arg.format(**work, out=out) for arg in COMMANDS[name][0]]


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
@pytest.mark.parametrize("name", list(COMMANDS))
def test_no_command_writes_over_its_input(work, name, flags, tmp_path):
    victim = Path(COMMANDS[name][1].format(**work))
    inputs = (victim, work["base"], work["adapter"], work["merged"])
    before = {p: tree_digest(p) if p.is_dir() else p.read_bytes() for p in inputs}
    result = run_cli(*command_line(name, work, victim), *flags)
    assert_refused(result, victim)
    assert "must not be or contain an input" in result.stderr
    after = {p: tree_digest(p) if p.is_dir() else p.read_bytes() for p in before}
    assert after == before
    assert not hidden_siblings(victim)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_an_existing_output_is_replaced_only_with_overwrite(work, name, tmp_path):
    out = tmp_path / "existing"
    if name == "merge":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    else:
        out.write_text("mine")
    before = tree_digest(out) if out.is_dir() else out.read_bytes()
    result = run_cli(*command_line(name, work, out))
    assert_refused(result, out)
    assert "exists; pass --overwrite" in result.stderr
    assert (tree_digest(out) if out.is_dir() else out.read_bytes()) == before
    assert not hidden_siblings(out)


# Replacing runs the whole command: the cheap ones here (export has its own tests).
@pytest.mark.parametrize("name", ["merge", "pack", "verify --report", "bench --json", "bench --markdown"])
def test_overwrite_replaces_an_existing_output(work, name, tmp_path):
    out = tmp_path / "existing"
    if name == "merge":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    else:
        out.write_text("mine")
    result = run_cli(*command_line(name, work, out), "--overwrite")
    assert result.exit_code == 0, result.output
    if name == "merge":
        assert not (out / "keep.txt").exists() and (out / "merge-manifest.json").exists()
    else:
        assert out.read_bytes() != b"mine"
    assert not hidden_siblings(out)


def test_bench_checks_its_outputs_before_timing(work, monkeypatch):
    import lora_deploy.bench.run as bench_run

    def never(*args, **kwargs):
        raise AssertionError("timed before checking outputs")

    monkeypatch.setattr(bench_run, "run_bench", never)
    result = run_cli(*command_line("bench --json", work, work["prev"]))
    assert_refused(result, work["prev"])


def test_export_refuses_an_existing_external_data_file(work, tmp_path):
    (tmp_path / "m.onnx.data").write_text("someone's weights")
    result = run_cli("export", "onnx", work["base"], "-o", tmp_path / "m.onnx")
    assert_refused(result, tmp_path / "m.onnx.data")
    assert (tmp_path / "m.onnx.data").read_text() == "someone's weights"


def test_outputs_with_long_names_are_written(work, tmp_path):
    """The hidden staging siblings borrow OUT's name: for a long one they must still fit
    in a directory entry (255 bytes), so every OUT whose own name fits works."""
    graph = tmp_path / ("g" * 230 + ".onnx")
    result = run_cli("export", "onnx", work["base"], "-o", graph)
    assert result.exit_code == 0, result.output
    merged = tmp_path / ("m" * 225 + ".onnx")
    result = run_cli("merge", work["base"], work["adapter"], "--onnx-like", graph, "-o", merged)
    assert result.exit_code == 0, result.output
    folder = tmp_path / ("d" * 240)
    result = run_cli("merge", work["base"], work["adapter"], "-o", folder)
    assert result.exit_code == 0, result.output
    assert (folder / "merge-manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (graph, merged, folder))


@pytest.mark.parametrize(
    "command, name, refused",
    [
        ("merge", "d" * 256, "d" * 256),
        ("merge --onnx-like", "m" * 256 + ".onnx", "m" * 256 + ".onnx"),
        ("merge --onnx-like", "m" * 250 + ".onnx", "m" * 250 + ".onnx.data"),  # OUT fits, OUT.data cannot
        ("export onnx", "e" * 250 + ".onnx", "e" * 250 + ".onnx.data"),
    ],
    ids=["merge", "merge-onnx-like", "merge-onnx-like-data", "export-onnx-data"],
)
def test_an_output_that_cannot_exist_is_bad_input(work, tmp_path, command, name, refused):
    out = tmp_path / name
    args = {
        "merge": ["merge", work["base"], work["adapter"]],
        "merge --onnx-like": ["merge", work["base"], work["adapter"], "--onnx-like", work["onnx"]],
        "export onnx": ["export", "onnx", work["base"]],
    }[command]
    result = run_cli(*args, "-o", out)
    assert_refused(result, f"{tmp_path / refused}: cannot be an output (File name too long)")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------- racing runs: create-if-absent


def test_the_second_of_two_racing_directory_outputs_is_refused(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(BadInputError, match="exists; pass --overwrite"):
        with staging_dir(target) as first:
            (first / "a").write_text("first")
            with staging_dir(target) as second:  # started later, finishes first
                (second / "b").write_text("second")
    assert (target / "b").read_text() == "second" and not (target / "a").exists()
    assert not hidden_siblings(target)


def test_the_second_of_two_racing_file_outputs_is_refused(tmp_path):
    target = tmp_path / "report.json"

    def slow_write(f):
        f.write(b"first")
        write_file_atomic(target, lambda g: g.write(b"second"))  # another run, finishing meanwhile

    with pytest.raises(BadInputError, match="exists; pass --overwrite"):
        write_file_atomic(target, slow_write)
    assert target.read_text() == "second" and not hidden_siblings(target)


def test_an_empty_directory_counts_as_absent(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with staging_dir(target) as tmp:
        (tmp / "a").write_text("new")
    assert (target / "a").read_text() == "new" and not hidden_siblings(target)


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_create_if_absent_without_renameat2_or_hard_links(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(staging, "libc_renameat2", lambda: None)

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(staging.os, "link", no_links)
    for name in ("first", "second"):
        src = tmp_path / name
        if kind == "dir":
            src.mkdir()
            (src / "x").write_text(name)
        else:
            src.write_text(name)
        if name == "first":
            place_new(src, tmp_path / "out")
        else:
            with pytest.raises(BadInputError, match="exists"):
                place_new(src, tmp_path / "out")
    winner = tmp_path / "out" / "x" if kind == "dir" else tmp_path / "out"
    assert winner.read_text() == "first"


# Merges with the CLI, holding the final rename until every racer has reached it.
RACING_MERGE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import lora_deploy.io.staging as s
    barrier, count = Path(sys.argv[1]), int(sys.argv[2])
    real = s.staging_dir._commit
    def commit(self):
        (barrier / str(__import__("os").getpid())).touch()
        deadline = time.monotonic() + 120
        while len(list(barrier.iterdir())) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        real(self)
    s.staging_dir._commit = commit
    from lora_deploy.cli import main
    main(["merge", *sys.argv[3:]])
""")


def test_two_merges_racing_for_one_new_output(llama, tmp_path):
    base, adapter = llama
    out, barrier = tmp_path / "out", tmp_path / "barrier"
    barrier.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACING_MERGE, str(barrier), "2", str(base), str(adapter), "-o", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    done = [(p.wait(timeout=300), p.communicate()) for p in procs]
    codes = sorted(code for code, _ in done)
    assert codes == [0, 2], done
    [loser_err] = [err for code, (_, err) in done if code == 2]
    assert loser_err.strip() == f"error: {out}: exists; pass --overwrite to replace it"
    json.loads((out / "merge-manifest.json").read_text())
    assert not hidden_siblings(out)


# --------------------------------------------------------- nothing left behind


def test_a_symlinked_output_is_replaced_without_a_leftover(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "old").write_text("old")
    target = tmp_path / "out"
    target.symlink_to(real)
    with staging_dir(target, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert not target.is_symlink() and (target / "new").read_text() == "new"
    assert (real / "old").read_text() == "old"  # what the link pointed to is not the output
    assert not hidden_siblings(target)


def test_an_old_output_that_cannot_be_removed_is_reported(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    real_rmtree = shutil.rmtree

    def stubborn(path, ignore_errors=False, **kwargs):
        if Path(path).name.startswith(".out.old-"):
            if not ignore_errors:
                raise PermissionError(errno.EACCES, "Permission denied", str(Path(path) / "old"))
            return
        real_rmtree(path, ignore_errors=ignore_errors, **kwargs)

    monkeypatch.setattr(staging.shutil, "rmtree", stubborn)
    with pytest.raises(OutputError) as info:
        with staging_dir(target, overwrite=True) as tmp:
            (tmp / "new").write_text("new")
    [leftover] = hidden_siblings(target)
    message = str(info.value)
    assert info.value.exit_code == 3 and "\n" not in message
    assert str(leftover) in message and "Permission denied" in message
    assert (target / "new").read_text() == "new"  # the new output is in place
    assert (leftover / "old").read_text() == "old"  # nothing lost
    monkeypatch.setattr(staging.shutil, "rmtree", real_rmtree)
    write_file_atomic(tmp_path / "unrelated.json", lambda f: f.write(b"{}"))
    assert hidden_siblings(target) == [leftover]  # another target's run leaves it alone
    with staging_dir(target, overwrite=True) as tmp:  # the next run for this target removes it
        (tmp / "newer").write_text("newer")
    assert not hidden_siblings(target)


def test_a_swapped_out_link_left_by_a_killed_run_is_removed_or_put_back(tmp_path, monkeypatch):
    monkeypatch.setattr(staging, "CREATING_GRACE_S", 0.0)
    real = tmp_path / "real"
    real.mkdir()
    target = tmp_path / "out"
    swapped = tmp_path / f".out.old-{HOST}-0badc0de"
    swapped.symlink_to(real)
    assert remove_dead_siblings(target) == []  # killed between the renames: put back
    assert target.is_symlink() and target.resolve() == real and not swapped.exists()
    swapped.symlink_to(real)
    assert remove_dead_siblings(target) == [swapped]  # the output is there: a leftover
    assert not os.path.lexists(swapped) and target.is_symlink() and real.is_dir()


def test_nothing_is_written_inside_a_cached_base_blob_directory(hf_cache):
    """The blob directory holds the base's real files: not even a new output goes inside it."""
    snapshot, blobs, adapter = hf_cache
    before = tree_digest(blobs)
    result = run_cli("merge", snapshot, adapter, "-o", blobs / "out")
    assert result.exit_code == 2 and "lies inside" in result.stderr, result.output
    assert tree_digest(blobs) == before and not (blobs / "out").exists()


def onnx_with_external_data(directory: Path) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    directory.mkdir()
    path = directory / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    return path


@pytest.mark.parametrize("command", ["bench --json", "verify --report"])
def test_the_external_data_of_an_input_model_is_an_input(reference, tmp_path, command):
    """An ONNX model's weights file is read as much as the model: no output may replace it."""
    model = onnx_with_external_data(tmp_path / "ext")
    data = tmp_path / "ext" / "weights.bin"
    before = data.read_bytes()
    with pytest.raises(BadInputError, match="external data of input"):
        check_output(data, [model], overwrite=True)
    if command == "bench --json":
        argv = ["bench", "--model", f"m={model}", "--shapes", "1x8", "--rounds", "2", "--quiet"]
    else:
        base, adapter = reference("llama", "plain")
        argv = ["verify", base, adapter, "--onnx", model]
    flag = command.split()[1]
    result = run_cli(*argv, flag, data, "--overwrite")
    assert result.exit_code == 2 and "external data of input" in result.stderr, result.output
    assert data.read_bytes() == before


def test_a_graph_rewritten_since_it_was_parsed_is_read_again(tmp_path, monkeypatch):
    """The policy reuses the external data locations of a graph the command parsed
    (io/onnx_proto.py); a graph rewritten since, naming another data file, is parsed again."""
    import onnx

    from lora_deploy.io import onnx_proto

    model = onnx_with_external_data(tmp_path / "ext")
    parses = []
    real = onnx_proto.locations_of
    monkeypatch.setattr(onnx_proto, "locations_of", lambda m: parses.append(1) or real(m))
    onnx_proto.read_model(model)
    with pytest.raises(BadInputError, match="external data of input"):
        check_output(tmp_path / "ext" / "weights.bin", [model], overwrite=True)
    assert len(parses) == 1  # parsed once, by the command
    loaded = onnx.load(str(model))
    onnx.save(loaded, str(model), save_as_external_data=True, location="other.bin", size_threshold=0)
    with pytest.raises(BadInputError, match="external data of input"):
        check_output(tmp_path / "ext" / "other.bin", [model], overwrite=True)
    assert len(parses) == 2


def test_the_current_directory_is_never_replaced(llama, tmp_path, monkeypatch):
    """Renaming onto the working directory (even an empty one) would unlink it under the user."""
    base, adapter = llama
    work = tmp_path / "here"
    work.mkdir()
    monkeypatch.chdir(work)
    for flags in ([], ["--overwrite"]):
        result = run_cli("merge", base, adapter, "-o", ".", *flags)
        assert result.exit_code == 2 and "current directory" in result.stderr, result.output
    assert list(work.iterdir()) == [] and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_an_output_spelled_with_a_trailing_slash_is_staged_beside_it(llama, tmp_path):
    base, adapter = llama
    (tmp_path / "out").mkdir()
    result = run_cli("merge", base, adapter, "-o", f"{tmp_path / 'out'}/")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "merge-manifest.json").is_file()
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").iterdir())


def test_a_symlink_loop_inside_an_input_is_no_crash(tmp_path):
    """Path.resolve raises on a loop: the policy skips it (it leads to no file) rather than
    failing every command with 'unexpected RuntimeError'."""
    (tmp_path / "in").mkdir()
    os.symlink("self", tmp_path / "in" / "self")
    assert check_output(tmp_path / "out", [tmp_path / "in"]) == tmp_path / "out"
    with pytest.raises(BadInputError, match="lies inside"):
        check_output(tmp_path / "in" / "out", [tmp_path / "in"])


def test_an_export_under_a_file_is_refused_before_the_trace(tmp_path, monkeypatch):
    """export onnx -o afile/x/m.onnx: one line, exit 2, before any tracing (was 'unexpected
    NotADirectoryError', exit 3, after it)."""
    import lora_deploy.export.graph as graph

    def no_trace(*args, **kwargs):
        raise AssertionError("traced")

    monkeypatch.setattr(graph, "run_exporter", no_trace)
    (tmp_path / "afile").write_text("x")
    result = run_cli("export", "onnx", tmp_path / "missing-model", "-o", tmp_path / "afile" / "x" / "m.onnx")
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "not a directory" in result.stderr
