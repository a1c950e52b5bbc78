"""The one checkpoint validator (lora_deploy.io.checkpoint): headers and indexes are
refused in one line naming the file and the tensor, whichever command reads them."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from lora_deploy.errors import CheckpointError
from lora_deploy.io.checkpoint import INDEX_FILE, Checkpoint, check_checkpoint, parse_size, read_header


def write_raw(path, header: dict | bytes, data: bytes) -> None:
    """A safetensors file with exactly this header and data section."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def entry(shape, start, end, dtype="F32"):
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def refused(path, *words):
    with pytest.raises(CheckpointError) as info:
        read_header(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for word in words:
        assert word in message, message
    return message


def test_a_file_written_by_safetensors_is_accepted(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": np.ones((2, 3), np.float32), "b": np.zeros(4, np.float16), "empty": np.zeros(0)}, path)
    tensors, _ = read_header(path)
    assert sorted(tensors) == ["a", "b", "empty"]


def test_overlapping_offsets_are_refused(tmp_path):
    # q_proj pointing at o_proj's bytes: merged from the wrong weights, exit 0, before.
    path = tmp_path / "model.safetensors"
    write_raw(path, {"o_proj": entry([2, 2], 0, 16), "q_proj": entry([2, 2], 0, 16)}, bytes(16))
    refused(path, "overlaps", "'o_proj'", "'q_proj'")


@pytest.mark.parametrize(
    "header,size,words",
    [
        ({"a": entry([1], 0, 4), "b": entry([1], 8, 12)}, 12, ("4 bytes before tensor 'b'",)),
        ({"a": entry([1], 0, 4)}, 8, ("4 bytes after the last tensor",)),
    ],
    ids=["gap", "trailing bytes"],
)
def test_offsets_must_cover_the_data_exactly(tmp_path, header, size, words):
    path = tmp_path / "model.safetensors"
    write_raw(path, header, bytes(size))
    refused(path, *words)


def test_duplicate_tensor_names_are_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    one = json.dumps(entry([1], 0, 4))
    write_raw(path, f'{{"w": {one}, "w": {one}}}'.encode(), bytes(4))
    refused(path, "'w' appears twice")


def test_duplicate_fields_in_an_entry_are_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    write_raw(path, b'{"w": {"dtype": "F32", "dtype": "F16", "shape": [1], "data_offsets": [0, 4]}}', bytes(4))
    refused(path, "corrupt header entry for 'w'")


@pytest.mark.parametrize("shape", [[2**32, 2**32], [2**70, 0], [2**62, 2]], ids=["2^64", "2^70 x 0", "bytes"])
def test_shapes_whose_size_overflows_int64_are_refused(tmp_path, shape):
    # [2^32, 2^32] with 0 bytes passed before (np.prod wrapped to 0) and the merge wrote
    # an output safetensors cannot load.
    path = tmp_path / "model.safetensors"
    write_raw(path, {"w": entry([1], 0, 4), "huge": entry(shape, 4, 4)}, bytes(4))
    refused(path, "'huge'", "overflows int64")


def test_deeply_nested_header_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    write_raw(path, b"[" * 200_000 + b"]" * 200_000, b"")
    refused(path, "nested too deeply")


def sharded(tmp_path, weight_map=None):
    """A two-shard checkpoint; weight_map (tensor -> shard name) overrides the index."""
    model = tmp_path / "model"
    model.mkdir()
    save_file({"a": np.ones(4, np.float32)}, model / "s1.safetensors")
    save_file({"b": np.ones(4, np.float32)}, model / "s2.safetensors")
    index = {"metadata": {}, "weight_map": weight_map or {"a": "s1.safetensors", "b": "s2.safetensors"}}
    (model / INDEX_FILE).write_text(json.dumps(index))
    return model


def test_index_naming_a_tensor_no_shard_holds_is_refused(tmp_path):
    # It was silently left out of the merged output.
    model = sharded(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s2.safetensors"})
    with pytest.raises(CheckpointError, match=r"tensor 'c' is mapped to s2.safetensors but no shard holds it"):
        Checkpoint(model)


@pytest.mark.parametrize("name", ["../outside.safetensors", "sub/../../outside.safetensors", "ABSOLUTE"])
def test_shard_names_outside_the_directory_are_refused(tmp_path, name):
    model = sharded(tmp_path)
    outside = tmp_path / "outside.safetensors"
    os.replace(model / "s2.safetensors", outside)
    name = str(outside) if name == "ABSOLUTE" else name
    (model / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": name}}))
    for check in (Checkpoint, check_checkpoint):
        with pytest.raises(CheckpointError, match="outside the checkpoint directory") as info:
            check(model)
        assert "'b'" in str(info.value) and str(model / INDEX_FILE) in str(info.value)


def test_shards_that_are_symlinks_and_subdirectories_are_the_users_layout(tmp_path):
    """A Hugging Face cache snapshot links its files into a blob directory: names are
    checked lexically, links are followed."""
    model = sharded(tmp_path, {"a": "s1.safetensors", "b": "sub/s2.safetensors"})
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    os.replace(model / "s1.safetensors", blobs / "0123abcd")
    (model / "s1.safetensors").symlink_to(blobs / "0123abcd")
    (model / "sub").mkdir()
    os.replace(model / "s2.safetensors", model / "sub" / "s2.safetensors")
    check_checkpoint(model)
    assert sorted(Checkpoint(model).names()) == ["a", "b"]


def test_pickle_checkpoints_are_left_to_the_loader_unless_an_index_escapes(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "pytorch_model.bin").write_bytes(b"whatever transformers makes of it")
    check_checkpoint(model)  # no safetensors weights: today's behaviour
    (model / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "../x.bin"}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        check_checkpoint(model)


def test_model_safetensors_is_checked_beside_an_index(tmp_path):
    model = sharded(tmp_path)
    write_raw(model / "model.safetensors", {"a": entry([1], 0, 4), "b": entry([1], 0, 4)}, bytes(4))
    with pytest.raises(CheckpointError, match="overlaps"):
        check_checkpoint(model)


def test_deeply_nested_index_and_config_are_refused(tmp_path):
    model = sharded(tmp_path)
    (model / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        Checkpoint(model).config
    (model / INDEX_FILE).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        Checkpoint(model)


@pytest.mark.parametrize("size", ["0.5B", "1KB", "60KiB", 1000])
def test_shard_sizes_below_the_minimum_are_refused(size):
    # 0.5B rounded to 0 and wrote one shard per tensor.
    with pytest.raises(CheckpointError, match="shard size .* smallest allowed is 64KiB"):
        parse_size(size)


@pytest.mark.parametrize("size,expected", [("100KB", 100_000), ("200KiB", 204_800), ("5GB", 5 * 10**9)])
def test_shard_sizes_in_use_are_accepted(size, expected):
    assert parse_size(size) == expected
