"""File digests and the memo that hashes an unchanged input once (lora_deploy.io.digests).
Oracles: hashlib for SHA-256, the blake3 package for BLAKE3, the files' own bytes."""

from __future__ import annotations

import hashlib
import json
import os
import time

import blake3
import pytest

from lora_deploy.io import digests as digests_module
from lora_deploy.io.digests import DigestMemo, file_digests
from lora_deploy.merge.streaming import merge


@pytest.fixture
def not_racy(monkeypatch):
    """Files written by the test itself, milliseconds ago, may be remembered."""
    monkeypatch.setattr(digests_module, "RACY_NS", 0)


def oracle(path) -> dict[str, str]:
    data = path.read_bytes()
    return {"blake3": blake3.blake3(data).hexdigest(), "sha256": hashlib.sha256(data).hexdigest()}


def plant(memo: DigestMemo, path, digests: dict[str, str]) -> None:
    """Overwrite what the memo remembers of `path`, to see whether a later call uses it."""
    entry = memo.dir / f"{os.stat(path).st_dev}-{os.stat(path).st_ino}.json"
    data = json.loads(entry.read_text())
    data["digests"].update(digests)
    entry.write_text(json.dumps(data))


def test_file_digests_match_the_reference_implementations(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    assert file_digests(path, ("blake3", "sha256")) == oracle(path)
    assert file_digests(path) == {"blake3": oracle(path)["blake3"]}


def test_the_memo_is_used_while_the_file_is_unchanged_and_dropped_once_it_changes(tmp_path, not_racy):
    memo = DigestMemo(tmp_path / "cache")
    path = tmp_path / "blob"
    path.write_bytes(b"a" * 4096)
    assert file_digests(path, ("blake3",), memo) == {"blake3": oracle(path)["blake3"]}
    plant(memo, path, {"blake3": "remembered"})
    assert file_digests(path, ("blake3",), memo) == {"blake3": "remembered"}  # not read again
    assert file_digests(path, ("sha256",), memo) == {"sha256": oracle(path)["sha256"]}  # not known: hashed
    assert file_digests(path, ("blake3", "sha256"), memo)["blake3"] == "remembered"  # both known now

    # Same size, same mtime, different bytes: the ctime the rewrite set still tells.
    stat = os.stat(path)
    path.write_bytes(b"b" * 4096)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == stat.st_mtime_ns and os.stat(path).st_size == stat.st_size
    assert file_digests(path, ("blake3", "sha256"), memo) == oracle(path)

    assert DigestMemo(tmp_path / "cache", refresh=True).lookup(os.stat(path), ("blake3",)) is None


def test_a_file_changed_while_it_was_read_is_not_remembered(tmp_path, not_racy):
    memo = DigestMemo(tmp_path / "cache")
    path = tmp_path / "blob"
    path.write_bytes(b"a" * 100)
    before = os.stat(path)
    path.write_bytes(b"a" * 101)
    memo.store(path, before, time.time_ns(), os.stat(path), {"blake3": "stale"})
    assert memo.lookup(before, ("blake3",)) is None
    assert memo.lookup(os.stat(path), ("blake3",)) is None


def test_a_file_changed_within_the_last_clock_ticks_is_not_remembered(tmp_path):
    """Another write in the same tick as the last one would leave the identity unchanged."""
    memo = DigestMemo(tmp_path / "cache")
    path = tmp_path / "blob"
    path.write_bytes(b"a" * 100)
    assert file_digests(path, ("blake3",), memo) == {"blake3": oracle(path)["blake3"]}
    assert memo.lookup(os.stat(path), ("blake3",)) is None
    stat = os.stat(path)
    memo.store(path, stat, stat.st_ctime_ns + digests_module.RACY_NS, stat, {"blake3": "ok"})
    assert memo.lookup(stat, ("blake3",)) == {"blake3": "ok"}


def test_a_memo_that_cannot_be_written_costs_nothing_but_time(tmp_path):
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 1000)
    assert file_digests(path, ("blake3",), DigestMemo(blocked)) == {"blake3": oracle(path)["blake3"]}


def test_merge_takes_unchanged_inputs_from_the_memo_and_rehash_reads_them(reference, tmp_path, monkeypatch, not_racy):
    monkeypatch.setenv("LORA_DEPLOY_CACHE", str(tmp_path / "cache"))
    base, adapter = reference("llama", "plain", sharded=True)
    first = merge(base, adapter, tmp_path / "one", max_shard_size="100KB").manifest
    shards = sorted(p for p in base.iterdir() if p.suffix == ".safetensors")
    assert len(shards) > 1
    assert first["inputs"]["blake3"]["base"][shards[0].name] == oracle(shards[0])["blake3"]
    memo = DigestMemo(tmp_path / "cache")
    for path in [*shards, adapter / "adapter_model.safetensors"]:
        plant(memo, path, {"blake3": "remembered"})

    second = merge(base, adapter, tmp_path / "two", max_shard_size="100KB").manifest
    assert {second["inputs"]["blake3"]["base"][p.name] for p in shards} == {"remembered"}
    assert second["inputs"]["blake3"]["adapter"]["adapter_model.safetensors"] == "remembered"
    assert second["output"] == first["output"]  # outputs are always hashed from their bytes

    third = merge(base, adapter, tmp_path / "three", max_shard_size="100KB", rehash=True).manifest
    assert third["inputs"] == first["inputs"]
    # ...and the rehash put the true digests back into the memo.
    assert memo.lookup(os.stat(shards[0]), ("blake3",)) == {"blake3": oracle(shards[0])["blake3"]}


@pytest.mark.parametrize("flag", ["--sha256", "--rehash"])
def test_onnx_like_refuses_the_checkpoint_digest_flags(reference, tmp_path, flag):
    from click.testing import CliRunner

    from lora_deploy.cli import main

    base, adapter = reference("llama", "plain")
    graph = tmp_path / "base.onnx"
    graph.write_bytes(b"")
    result = CliRunner().invoke(
        main, ["merge", str(base), str(adapter), "-o", str(tmp_path / "m.onnx"), "--onnx-like", str(graph), flag]
    )
    assert result.exit_code == 2 and "--onnx-like" in result.output
