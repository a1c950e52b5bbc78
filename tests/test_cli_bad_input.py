"""Bad input: one line naming the problem, exit 2, no traceback, nothing written."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess

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


def test_overwrite_never_removes_an_input(llama, tmp_path):
    base, adapter = llama  # both live under tmp_path / "in"
    result = run_cli("merge", base, adapter, "-o", tmp_path / "in", "--overwrite")
    assert result.exit_code == 2 and "must not be or contain an input" in result.stderr
    assert (base / "model.safetensors").exists()


@pytest.mark.parametrize(
    "changes",
    [
        {"r": 0},
        {"r": "eight"},
        {"r": 2.5},
        {"lora_alpha": float("nan")},
        {"rank_pattern": {"v_proj": 0}},
        {"alpha_pattern": {"q_proj": "big"}},
        {"rank_pattern": ["v_proj"]},
    ],
)
def test_malformed_numbers_in_config(llama, tmp_path, changes):
    base, adapter = llama
    edit_config(adapter, **changes)
    out = tmp_path / "out"
    assert_bad_input(run_cli("merge", base, adapter, "-o", out), out)


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
