"""Bad input: one line naming the problem, exit 2, no traceback, nothing written."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lora_deploy.cli import main


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_bad_input(result, out_dir, *words):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]
    assert not out_dir.exists()
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")]


@pytest.fixture
def llama(reference, tmp_path):
    base, adapter = reference("llama", "plain")
    work = tmp_path / "in"
    shutil.copytree(base, work / "base")
    shutil.copytree(adapter, work / "adapter")
    return work / "base", work / "adapter"


def edit_adapter(adapter, fn):
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def edit_config(adapter, **changes):
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_missing_directories(llama, tmp_path):
    base, adapter = llama
    out = tmp_path / "out"
    assert_bad_input(run_cli("merge", tmp_path / "nope", adapter, "-o", out), out, "nope")
    assert_bad_input(run_cli("merge", base, tmp_path / "nope", "-o", out), out, "nope")


def test_base_without_weights(llama, tmp_path):
    base, adapter = llama
    (base / "model.safetensors").unlink()
    out = tmp_path / "out"
    assert_bad_input(run_cli("merge", base, adapter, "-o", out), out, "model.safetensors")


def test_truncated_base(llama, tmp_path):
    base, adapter = llama
    path = base / "model.safetensors"
    os.truncate(path, path.stat().st_size - 100)
    out = tmp_path / "out"
    assert_bad_input(run_cli("merge", base, adapter, "-o", out), out, "truncated")


def test_corrupt_header(llama, tmp_path):
    base, adapter = llama
    path = base / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"not json!!!!"
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert_bad_input(run_cli("merge", base, adapter, "-o", out), out, "corrupt")


def test_truncated_adapter(llama, tmp_path):
    base, adapter = llama
    path = adapter / "adapter_model.safetensors"
    os.truncate(path, path.stat().st_size // 2)
    out = tmp_path / "out"
    assert_bad_input(run_cli("merge", base, adapter, "-o", out), out, "adapter_model.safetensors")


def test_adapter_for_another_base(reference, llama, tmp_path):
    base, _ = llama
    _, gpt2_adapter = reference("gpt2", "plain")
    out = tmp_path / "out"
    assert_bad_input(run_cli("merge", base, gpt2_adapter, "-o", out), out, "another base")


def widen_a(t):
    key = next(k for k in t if k.endswith("q_proj.lora_A.weight"))
    t[key] = torch.zeros(t[key].shape[0], t[key].shape[1] + 3)


def spatial_factors(t):
    key = next(k for k in t if k.endswith("q_proj.lora_B.weight"))
    t[key] = torch.zeros(*t[key].shape, 3, 3)  # B of a conv LoRA is a 1x1 kernel
    a_key = key.replace("lora_B", "lora_A")
    t[a_key] = torch.zeros(*t[a_key].shape, 3, 3)


@pytest.mark.parametrize(
    "edit,words",
    [(widen_a, "does not fit"), (spatial_factors, "no LoRA layer produces")],
    ids=["shape mismatch", "factors no layer produces"],
)
def test_malformed_factors(llama, tmp_path, edit, words):
    base, adapter = llama
    edit_adapter(adapter, edit)
    out = tmp_path / "out"
    assert_bad_input(run_cli("merge", base, adapter, "-o", out), out, words)


def test_rank_disagreeing_with_config(llama, tmp_path):
    base, adapter = llama
    edit_config(adapter, r=3)
    out = tmp_path / "out"
    assert_bad_input(run_cli("merge", base, adapter, "-o", out), out, "rank")


def test_nan_in_adapter(llama, tmp_path):
    base, adapter = llama

    def poison(t):
        key = next(k for k in t if "lora_B" in k)
        t[key][0, 0] = float("nan")

    edit_adapter(adapter, poison)
    out = tmp_path / "out"
    assert_bad_input(run_cli("merge", base, adapter, "-o", out), out, "nan")


def test_overflow_in_merged_half_precision(reference, tmp_path):
    base, adapter = reference("llama", "plain", dtype="float16")
    work = tmp_path / "adapter"
    shutil.copytree(adapter, work)
    edit_adapter(work, lambda t: t.update({k: v * 1e8 for k, v in t.items() if "lora_B" in k}))
    out = tmp_path / "out"
    assert_bad_input(run_cli("merge", base, work, "-o", out), out, "inf")


@pytest.mark.parametrize(
    "changes,word",
    [
        ({"peft_type": "LOHA"}, "not lora"),
        ({"peft_type": "IA3"}, "not lora"),
        ({"peft_type": "PROMPT_TUNING"}, "not lora"),
        ({"init_lora_weights": "pissa"}, "rewrote the base"),
        ({"init_lora_weights": "olora"}, "rewrote the base"),
        ({"init_lora_weights": "corda"}, "rewrote the base"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
    ],
)
def test_unsupported_adapter_types(llama, tmp_path, changes, word):
    base, adapter = llama
    edit_config(adapter, **changes)
    out = tmp_path / "out"
    assert_bad_input(run_cli("merge", base, adapter, "-o", out), out, word)


class Payload:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_never_executed(llama, tmp_path):
    base, adapter = llama
    tensors = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    tensors["evil"] = Payload(str(marker))
    with open(adapter / "adapter_model.bin", "wb") as f:
        pickle.dump(tensors, f)
    out = tmp_path / "out"
    assert_bad_input(run_cli("merge", base, adapter, "-o", out), out, "refused")
    assert not marker.exists()


def test_plain_tensor_pickle_is_accepted_weights_only(llama, tmp_path):
    base, adapter = llama
    tensors = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter / "adapter_model.bin")
    result = run_cli("merge", base, adapter, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output


def test_non_empty_output_refused_unless_overwrite(llama, tmp_path):
    base, adapter = llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli("merge", base, adapter, "-o", out)
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
    result = run_cli("merge", base, adapter, "-o", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_failure_midway_leaves_nothing(llama, tmp_path, monkeypatch):
    import lora_deploy.merge.streaming as merge_module

    base, adapter = llama
    calls = {"n": 0}
    real = merge_module.merged_weight

    def fail_on_third(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(merge_module, "merged_weight", fail_on_third)
    out = tmp_path / "out"
    result = run_cli("merge", base, adapter, "-o", out)
    assert result.exit_code == 130
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_write_error_is_one_line_and_leaves_nothing(llama, tmp_path, monkeypatch):
    """A full disk during a kernel copy on the writer thread reaches the user as one line."""
    import errno

    import lora_deploy.io.stream as stream_module

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stream_module.os, "copy_file_range", disk_full)
    base, adapter = llama
    out = tmp_path / "out"
    result = run_cli("merge", base, adapter, "-o", out)
    assert result.exit_code == 3  # a failed write, not bad input
    assert "No space left on device" in result.output and result.output.count("\n") == 1
    assert f"{out}/model.safetensors" in result.output  # OUT named, not the hidden staging dir
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_shard_truncated_during_the_merge_is_one_line(llama, tmp_path, monkeypatch):
    """A shard cut short after its header was checked (another process rewriting it)."""
    import lora_deploy.io.stream as stream_module

    base, adapter = llama
    real_open = stream_module.CheckpointStream._reader

    def truncate_first(self, info):
        if self.reader is None and not self.done:
            with open(info.file, "r+b") as f:
                f.truncate(info.file.stat().st_size - 4096)
        return real_open(self, info)

    monkeypatch.setattr(stream_module.CheckpointStream, "_reader", truncate_first)
    out = tmp_path / "out"
    assert_bad_input(run_cli("merge", base, adapter, "-o", out), out, "truncated")


def test_writer_thread_failure_is_reported_not_hidden(llama, tmp_path, monkeypatch):
    """Any failure on the writer thread (not only OSError) stops the merge with one line."""
    import lora_deploy.io.stream as stream_module

    def broken(*args):
        raise AttributeError("copy_file_range")  # as on a platform without it

    monkeypatch.setattr(stream_module.os, "copy_file_range", broken)
    out = tmp_path / "out"
    result = run_cli("merge", *llama, "-o", out)
    assert result.exit_code == 3 and "cannot write" in result.output and result.output.count("\n") == 1
    assert not out.exists()


def test_an_unexpected_error_is_not_bad_input(llama, tmp_path, monkeypatch):
    """A bug says so in one line and exits 3: nothing says the input was at fault."""
    import lora_deploy.merge.streaming as merge_module

    def bug(*args, **kwargs):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(merge_module, "load_adapter", bug)
    out = tmp_path / "out"
    result = run_cli("merge", *llama, "-o", out)
    assert result.exit_code == 3 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: unexpected ValueError") and "--debug" in result.stderr
    assert not out.exists()


def test_console_script_reports_one_line(llama, tmp_path):
    base, _ = llama
    out = tmp_path / "out"
    exe = shutil.which("lora-deploy") or pytest.skip("console script not installed")
    done = subprocess.run(
        [exe, "merge", str(base), str(tmp_path / "missing"), "-o", str(out)], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert not out.exists()


def test_a_closed_stdout_exits_quietly_with_the_output_in_place(llama, tmp_path):
    """`lora-deploy merge ... | head -0`: the report cannot be printed, but the merge is
    done; not an "unexpected error" (exit 3), but SIGPIPE's status, nothing on stderr."""
    base, adapter = llama
    out = tmp_path / "out"
    exe = shutil.which("lora-deploy") or pytest.skip("console script not installed")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command writes
    try:
        done = subprocess.run(
            [exe, "merge", str(base), str(adapter), "-o", str(out)], stdout=write_end, stderr=subprocess.PIPE, text=True
        )
    finally:
        os.close(write_end)
    assert done.returncode == 141 and done.stderr == "", done.stderr
    assert (out / "merge-manifest.json").is_file()


def test_overwrite_never_removes_an_input(llama, tmp_path):
    base, adapter = llama  # both live under tmp_path / "in"
    result = run_cli("merge", base, adapter, "-o", tmp_path / "in", "--overwrite")
    assert result.exit_code == 2 and "must not be or contain an input" in result.stderr
    assert (base / "model.safetensors").exists()


@pytest.mark.parametrize(
    "changes,words",
    [
        ({"r": 0}, ("adapter_config.json", "r must be a positive integer", "got 0")),
        ({"r": "eight"}, ("adapter_config.json", "r must be a positive integer", "got 'eight'")),
        ({"r": 2.5}, ("adapter_config.json", "r must be a positive integer", "got 2.5")),
        ({"lora_alpha": float("nan")}, ("adapter_config.json", "lora_alpha must be a positive finite number", "nan")),
        ({"rank_pattern": {"v_proj": 0}}, ("adapter_config.json", "rank_pattern must map module patterns")),
        ({"alpha_pattern": {"q_proj": "big"}}, ("adapter_config.json", "alpha_pattern must map module patterns")),
        ({"rank_pattern": ["v_proj"]}, ("adapter_config.json", "rank_pattern must map module patterns")),
        # a string is truthy: "false" merged with rsLoRA's scaling, exit 0
        ({"use_rslora": "false"}, ("adapter_config.json", "use_rslora must be true or false", "got 'false'")),
        ({"fan_in_fan_out": 1}, ("adapter_config.json", "fan_in_fan_out must be true or false", "got 1")),
        ({"use_dora": "false"}, ("adapter_config.json", "use_dora must be true or false")),
        # an int target_modules was an internal error (exit 3)
        ({"target_modules": 123}, ("adapter_config.json", "target_modules must be a regex string", "got 123")),
        ({"target_modules": ["q_proj", 7]}, ("adapter_config.json", "target_modules must be", "['q_proj', 7]")),
    ],
)
def test_malformed_numbers_in_config(llama, tmp_path, changes, words):
    base, adapter = llama
    edit_config(adapter, **changes)
    out = tmp_path / "out"
    assert_bad_input(run_cli("merge", base, adapter, "-o", out), out, *words)


def rewrite_header(path, edit):
    import struct

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (n - len(raw)) if len(raw) <= n else b""
    assert len(raw) == n, "edit must not grow the header"
    path.write_bytes(data[:8] + raw + data[8 + n :])


@pytest.mark.parametrize("field,value", [("data_offsets", ["0", "4"]), ("shape", [-1, 4]), ("dtype", 32)])
def test_malformed_header_entries(llama, tmp_path, field, value):
    base, adapter = llama

    def edit(header):
        name = next(k for k in header if k != "__metadata__")
        header[name][field] = value

    rewrite_header(base / "model.safetensors", edit)
    out = tmp_path / "out"
    assert_bad_input(run_cli("merge", base, adapter, "-o", out), out, "corrupt")


def test_malformed_index(reference, tmp_path):
    base, adapter = reference("llama", "plain", sharded=True)
    work = tmp_path / "base"
    shutil.copytree(base, work)
    (work / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a", "b"]}))
    out = tmp_path / "out"
    assert_bad_input(run_cli("merge", work, adapter, "-o", out), out, "index")


@pytest.mark.parametrize("size", ["inf", "-5GB", "5XB", "0"])
def test_bad_shard_size(llama, tmp_path, size):
    base, adapter = llama
    out = tmp_path / "out"
    assert_bad_input(run_cli("merge", base, adapter, "-o", out, "--max-shard-size", size), out, "size")


def test_an_interrupt_wrapped_by_python_is_still_an_interrupt(llama, tmp_path, monkeypatch):
    """Python 3.11 wraps an exception raised while a class is built (a Ctrl-C landing in an
    import, say) in a RuntimeError; it is still reported as an interrupt."""
    import lora_deploy.merge.streaming as merge_module

    def interrupted_import(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise RuntimeError("Error calling __set_name__ on 'Field' instance") from exc

    monkeypatch.setattr(merge_module, "load_adapter", interrupted_import)
    base, adapter = llama
    result = run_cli("merge", base, adapter, "-o", tmp_path / "out")
    assert result.exit_code == 130 and result.stderr.strip() == "interrupted: no partial output left behind"


def test_an_interrupt_while_the_line_is_parsed_is_an_interrupt(llama, tmp_path, monkeypatch):
    """Ctrl-C after the imports but before the command's own guard (the group's callback,
    the options' parsing): exit 130 and the one line, not click's "Aborted!" and exit 1
    (which says a verification found a difference)."""
    import lora_deploy.cli as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.main, "callback", interrupted)
    base, adapter = llama
    result = run_cli("merge", base, adapter, "-o", tmp_path / "out")
    assert result.exit_code == 130 and result.stderr.strip() == "interrupted: no partial output left behind"
    assert not (tmp_path / "out").exists()


def test_an_interrupt_after_the_output_is_written_says_so(llama, tmp_path, monkeypatch):
    """Ctrl-C while the report is made (--json hashes the output: seconds at 13 GB): the
    output is complete and stays; the line says that, not "no partial output"."""
    import lora_deploy.cli as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "emit_json", interrupted)
    base, adapter = llama
    out = tmp_path / "out"
    result = run_cli("merge", base, adapter, "-o", out, "--json")
    assert result.exit_code == 130
    assert result.stderr.strip() == f"interrupted after {out} was written in full: the report was not printed"
    assert (out / "merge-manifest.json").is_file()


INTERRUPTED_IMPORT = """
import sys
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "lora_deploy.cli":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
sys.argv = ["lora-deploy", "--help"]
from lora_deploy.__main__ import main
main()
"""


def test_an_interrupt_during_the_imports_is_one_line():
    """The console script's entry (lora_deploy/__main__.py) imports the CLI itself, so a
    Ctrl-C in the first tenth of a second is exit 130 and one line, not a traceback."""
    done = subprocess.run([sys.executable, "-c", INTERRUPTED_IMPORT], capture_output=True, text=True)
    assert done.returncode == 130 and done.stderr == "interrupted: no partial output left behind\n", done.stderr


def test_a_json_error_with_stdout_gone_keeps_its_exit_code_and_line(llama, tmp_path):
    """--json writes its error to stdout too; with stdout's reader gone the line on stderr
    and exit 2 remain (not exit 1 and silence)."""
    base, _ = llama
    exe = shutil.which("lora-deploy") or pytest.skip("console script not installed")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        command = [exe, "merge", str(base), str(tmp_path / "missing"), "-o", str(tmp_path / "out"), "--json"]
        done = subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_a_full_stdout_is_a_failed_write_not_a_bug(llama, tmp_path, as_json):
    """`lora-deploy merge ... > full-disk`: the merge is done, the report cannot be written:
    exit 3 (a write failed) with one line, no traceback, no "unexpected"."""
    base, adapter = llama
    exe = shutil.which("lora-deploy") or pytest.skip("console script not installed")
    out = tmp_path / "out"
    with open("/dev/full", "w") as full:
        command = [exe, "merge", str(base), str(adapter), "-o", str(out)] + (["--json"] if as_json else [])
        done = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True)
    assert done.returncode == 3, done.stderr
    assert done.stderr == "error: cannot write the report to standard output (No space left on device)\n"
    assert (out / "merge-manifest.json").is_file()


# ---------------------------------------------------------------- one checkpoint validator


def retarget(header):
    """Point q_proj of layer 0 at o_proj's bytes (same shape): it was merged from them, exit 0."""
    layer = "model.layers.0.self_attn."
    header[layer + "q_proj.weight"]["data_offsets"] = header[layer + "o_proj.weight"]["data_offsets"]


def rewrite_raw_header(path, raw: bytes):
    """Replace a safetensors header by `raw` (any length), keeping the data section."""
    import struct

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def duplicate_name(path):
    """Rename o_proj's entry to q_proj's name: the header then holds q_proj twice."""
    data = path.read_bytes()
    path.write_bytes(
        data.replace(b'"model.layers.0.self_attn.o_proj.weight"', b'"model.layers.0.self_attn.q_proj.weight"')
    )


def edit_any_header(path, edit):
    """Edit a safetensors header, which may grow (rewrite_header keeps its length)."""
    import struct

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    rewrite_raw_header(path, json.dumps(header).encode())


def overflowing_shape(path):
    """An extra zero-byte tensor whose shape [2^32, 2^32] wrapped to 0 in int64: the merge
    wrote an output safetensors cannot load."""
    huge = {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}
    edit_any_header(path, lambda header: header.update({"zz.huge": huge}))


@pytest.mark.parametrize(
    "corrupt,words",
    [
        (lambda p: rewrite_header(p, retarget), ("q_proj", "overlaps")),
        (duplicate_name, ("q_proj", "twice")),
        (overflowing_shape, ("zz.huge", "overflows int64")),
        (lambda p: rewrite_raw_header(p, b"[" * 200_000 + b"]" * 200_000), ("nested too deeply",)),
    ],
    ids=["overlapping offsets", "duplicate name", "int64 overflow", "deep nesting"],
)
def test_corrupt_base_header_is_refused(llama, tmp_path, corrupt, words):
    base, adapter = llama
    corrupt(base / "model.safetensors")
    out = tmp_path / "out"
    assert_bad_input(run_cli("merge", base, adapter, "-o", out), out, "model.safetensors", *words)


def test_adapter_header_with_an_overflowing_shape_is_refused(llama, tmp_path):
    base, adapter = llama

    def huge(header):
        key = next(k for k in header if k.endswith("q_proj.lora_A.weight"))
        header[key] = {"dtype": "F32", "shape": [2**70, 0], "data_offsets": [0, 0]}

    edit_any_header(adapter / "adapter_model.safetensors", huge)
    out = tmp_path / "out"
    assert_bad_input(run_cli("merge", base, adapter, "-o", out), out, "adapter_model.safetensors", "overflows")


@pytest.fixture
def sharded_llama(reference, tmp_path):
    base, adapter = reference("llama", "plain", sharded=True)
    work = tmp_path / "in"
    shutil.copytree(base, work / "base")
    return work / "base", adapter


def edit_index(base, fn):
    path = base / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    fn(index["weight_map"])
    path.write_text(json.dumps(index))


def test_index_naming_a_tensor_no_shard_holds_is_refused(sharded_llama, tmp_path):
    # It was silently dropped from the merged output.
    base, adapter = sharded_llama
    edit_index(base, lambda m: m.update({"model.layers.0.extra.weight": next(iter(m.values()))}))
    out = tmp_path / "out"
    assert_bad_input(run_cli("merge", base, adapter, "-o", out), out, "model.layers.0.extra.weight", "no shard")


def escape_index(base, absolute: bool):
    """Move the first shard out of BASE and point the index at it outside."""
    shard = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]["lm_head.weight"]
    outside = base.parent / "outside.safetensors"
    os.replace(base / shard, outside)
    name = str(outside) if absolute else "../outside.safetensors"
    edit_index(base, lambda m: m.update({k: name for k, v in m.items() if v == shard}))


COMMANDS_READING_BASE = {
    "merge": lambda base, adapter, out: ("merge", base, adapter, "-o", out),
    "export": lambda base, adapter, out: ("export", "onnx", base, "-o", out),
    "verify": lambda base, adapter, out: ("verify", base, adapter, "--merged", base),
    "bench": lambda base, adapter, out: ("bench", "--backend", "torch", "--model", f"m={base}", "--shapes", "1x4"),
}


@pytest.mark.parametrize("absolute", [False, True], ids=["dotdot", "absolute"])
@pytest.mark.parametrize("command", list(COMMANDS_READING_BASE))
def test_shard_outside_the_checkpoint_is_refused_by_every_command(sharded_llama, tmp_path, command, absolute):
    """export/verify/bench handed the directory to transformers, which followed the index
    out of BASE (exit 0, an ONNX model built from a file outside it)."""
    base, adapter = sharded_llama
    escape_index(base, absolute)
    out = tmp_path / ("model.onnx" if command == "export" else "out")
    result = run_cli(*COMMANDS_READING_BASE[command](base, adapter, out))
    assert_bad_input(result, out, "outside the checkpoint directory", "lm_head.weight")


def test_truncated_checkpoint_given_to_export(llama, tmp_path):
    base, _ = llama
    path = base / "model.safetensors"
    os.truncate(path, path.stat().st_size - 100)
    out = tmp_path / "model.onnx"
    assert_bad_input(run_cli("export", "onnx", base, "-o", out), out, "model.safetensors", "truncated")


# ---------------------------------------------------------------- foreseeable inputs, specific messages


@pytest.mark.parametrize(
    "raw,words",
    [
        ('"r": 1' + "0" * 400, ("r must be",)),
        ('"lora_alpha": 1' + "0" * 400, ("lora_alpha must be",)),
        ('"rank_pattern": {"q_proj(": 8}', ("rank_pattern", "q_proj(", "regular expression")),
        ('"alpha_pattern": {"[q_proj": 4}', ("alpha_pattern", "[q_proj", "regular expression")),
    ],
    ids=["r=10^400", "alpha=10^400", "rank_pattern regex", "alpha_pattern regex"],
)
def test_unusable_numbers_and_patterns_in_config(llama, tmp_path, raw, words):
    base, adapter = llama
    path = adapter / "adapter_config.json"
    key = raw.split('"')[1]
    config = json.loads(path.read_text())
    config.pop(key, None)
    path.write_text("{" + raw + ", " + json.dumps(config)[1:])
    out = tmp_path / "out"
    assert_bad_input(run_cli("merge", base, adapter, "-o", out), out, "adapter_config.json", *words)


@pytest.mark.parametrize("which", ["config.json", "adapter_config.json"])
def test_deeply_nested_json_configs(llama, tmp_path, which):
    base, adapter = llama
    (adapter if which == "adapter_config.json" else base).joinpath(which).write_text(
        '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    )
    out = tmp_path / "out"
    assert_bad_input(run_cli("merge", base, adapter, "-o", out), out, which, "nested too deeply")
    if which == "config.json":  # export reads it through transformers
        out = tmp_path / "model.onnx"
        assert_bad_input(run_cli("export", "onnx", base, "-o", out), out, which, "nested too deeply")


def test_three_d_factors_on_a_linear_weight(llama, tmp_path):
    base, adapter = llama

    def unsqueeze(t):
        for key in [k for k in t if ".q_proj.lora_" in k]:
            t[key] = t[key][:, :, None].contiguous()

    edit_adapter(adapter, unsqueeze)
    out = tmp_path / "out"
    assert_bad_input(run_cli("merge", base, adapter, "-o", out), out, "q_proj", "3-D")


def assert_write_failed(result, *words):
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "unexpected" not in lines[0], result.stderr
    for word in words:
        assert str(word) in lines[0], lines[0]


def test_full_disk_while_copying_side_files_names_the_file(llama, tmp_path, monkeypatch):
    import errno

    real = shutil.copy2

    def disk_full(src, dst, *args, **kwargs):
        if str(src).endswith("tokenizer.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(src), None, str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copy2", disk_full)
    out = tmp_path / "out"
    assert_write_failed(run_cli("merge", *llama, "-o", out), out / "tokenizer.json", "No space left")
    assert not out.exists()


class FullDiskFile:
    """A file object whose writes fail as on a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_full_disk_while_writing_the_manifest_names_the_file(llama, tmp_path, monkeypatch):
    from pathlib import Path

    real = Path.open

    def open_(self, mode="r", *args, **kwargs):
        f = real(self, mode, *args, **kwargs)
        return FullDiskFile(f) if "w" in mode and self.name == "merge-manifest.json" else f

    monkeypatch.setattr(Path, "open", open_)
    out = tmp_path / "out"
    assert_write_failed(run_cli("merge", *llama, "-o", out), out / "merge-manifest.json", "No space left")
    assert not out.exists()


def test_full_disk_while_writing_the_report_names_the_file(reference, tmp_path, monkeypatch):
    import builtins

    base, adapter = reference("llama", "plain")
    merged = tmp_path / "merged"
    assert run_cli("merge", base, adapter, "-o", merged).exit_code == 0
    real = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        f = real(file, mode, *args, **kwargs)
        return FullDiskFile(f) if "w" in mode and str(file).endswith("report.json") else f

    monkeypatch.setattr(builtins, "open", open_)
    report = tmp_path / "report.json"
    result = run_cli("verify", base, adapter, "--merged", merged, "--report", report)
    assert_write_failed(result, report, "No space left")
    assert not report.exists()


def test_pack_on_a_full_disk_names_the_file(reference, tmp_path):
    """ONNX Runtime reports a failed write as a RuntimeError quoting its C++ source; here
    a file size limit (RLIMIT_FSIZE) makes its write fail for real."""
    resource = pytest.importorskip("resource")
    import signal

    exe = shutil.which("lora-deploy") or pytest.skip("console script not installed")
    _, adapter = reference("llama", "plain")
    out = tmp_path / "a.onnx_adapter"

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    done = subprocess.run(
        [exe, "pack", str(adapter), "-o", str(out)], capture_output=True, text=True, preexec_fn=small_files
    )
    assert done.returncode == 3, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"error: {out}: cannot write"), done.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bench_shape_too_large_for_memory_is_refused_with_an_estimate(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not loaded: the shape is refused first")
    result = run_cli("bench", "--model", f"m={model}", "--shapes", "1x4,100000x100000")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "100000x100000" in result.stderr and "GB" in result.stderr, result.stderr


@pytest.mark.parametrize(
    "args,words",
    [(("--seq", "100000"), ("100000", "128 positions")), (("--batch", str(10**9)), ("GB",))],
    ids=["seq beyond positions", "batch beyond memory"],
)
def test_verify_batch_and_seq_are_bounded_before_running(reference, tmp_path, args, words):
    # --seq 100000 was killed by the OOM killer after 40 s, with no message.
    base, adapter = reference("llama", "plain")
    result = run_cli("verify", base, adapter, "--onnx", tmp_path / "never-read.onnx", *args)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert result.stderr.startswith("error: ") and all(w in result.stderr for w in words), result.stderr


@pytest.mark.parametrize("size", ["0.5B", "1000", "10KB"])
def test_shard_size_below_the_minimum(llama, tmp_path, size):
    # 0.5B rounded to 0 and wrote one shard per tensor.
    out = tmp_path / "out"
    assert_bad_input(run_cli("merge", *llama, "-o", out, "--max-shard-size", size), out, "shard size", "smallest")


@pytest.mark.parametrize(
    "args,words",
    [
        (("merge",), ("Missing argument 'BASE'",)),
        (("merge", "a", "b", "-o", "c", "--dtype", "int8"), ("--dtype", "int8")),
        (("bench", "--model", "m=x.onnx", "--rounds", "0"), ("--rounds",)),
        (("nope",), ("No such command 'nope'",)),
        (("export", "onnx"), ("Missing argument 'MODEL'",)),
        (("export", "onnx", "m", "-o", "x.onnx", "--bogus"), ("--bogus",)),
        (("--bogus",), ("--bogus",)),
    ],
)
def test_usage_errors_are_one_line(args, words):
    result = run_cli(*args)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert all(w in result.stderr for w in words), result.stderr


def test_help_is_unchanged():
    result = run_cli("merge", "--help")
    assert result.exit_code == 0 and result.output.startswith("Usage: ") and "--max-shard-size" in result.output
    result = run_cli("export")  # a group without its subcommand shows its help
    assert "Usage: " in result.output and "onnx" in result.output
