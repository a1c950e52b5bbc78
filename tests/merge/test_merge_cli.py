"""merge options from the command line: --fsync (durable, and the same output) and --dtype
(every tensor in that dtype, one rounding from PEFT's float32 merge)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lora_deploy.cli import main
from lora_deploy.merge.streaming import MANIFEST_FILE
from tests.oracle import peft_merged_state, read_checkpoint, ulp


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fsynced descriptors")
def test_fsync_syncs_every_file_and_writes_the_same_output(reference, tmp_path, monkeypatch):
    base, adapter = reference("llama", "plain", sharded=True)
    synced: list[Path] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    plain, durable = tmp_path / "plain", tmp_path / "durable"
    assert run_cli("merge", base, adapter, "-o", plain, "--max-shard-size", "100KB").exit_code == 0
    assert synced == []  # without --fsync nothing waits for the disk
    result = run_cli("merge", base, adapter, "-o", durable, "--max-shard-size", "100KB", "--fsync")
    assert result.exit_code == 0, result.output

    files = sorted(p.name for p in durable.iterdir())
    assert files == sorted(p.name for p in plain.iterdir()) and len(files) > 3
    for name in files:
        if name != MANIFEST_FILE:
            assert (durable / name).read_bytes() == (plain / name).read_bytes(), name
    manifests = [json.loads((d / MANIFEST_FILE).read_text()) for d in (plain, durable)]
    assert manifests[0]["output"]["blake3"] == manifests[1]["output"]["blake3"]

    # Every file, and the directory holding them, synced while still in the hidden staging
    # directory: before the rename that makes the output visible.
    staging = {p.parent for p in synced if p.parent.name.startswith(".durable.partial-")}
    assert len(staging) == 1, synced
    [staged] = staging
    assert set(files) <= {p.name for p in synced if p.parent == staged}
    assert staged in synced


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family,variant", [("llama", "dora"), ("gpt2", "plain")])
def test_dtype_option_writes_that_dtype_one_rounding_from_peft(reference, tmp_path, family, variant, dtype):
    name = str(dtype).removeprefix("torch.")
    base, adapter = reference(family, variant)  # a float32 base
    out = tmp_path / "out"
    result = run_cli("merge", base, adapter, "-o", out, "--dtype", name)
    assert result.exit_code == 0, result.output
    ours = read_checkpoint(out)
    exact = peft_merged_state(base, adapter)  # PEFT's float32 merge
    original = read_checkpoint(base)
    assert set(ours) == set(original)
    changed = 0
    for key, tensor in ours.items():
        assert tensor.dtype == dtype, key
        if torch.equal(exact[key], original[key]):  # untouched: the base, rounded once
            assert torch.equal(tensor, original[key].to(dtype)), key
            continue
        changed += 1
        assert ((tensor.float() - exact[key]).abs() <= ulp(exact[key], dtype)).all(), key
    assert changed > 0
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == name
