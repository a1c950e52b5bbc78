"""The merge's sharded output, read back with the safetensors library (the oracle): the
index must say where every tensor really is, not only list the right files."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from lora_deploy.merge.streaming import merge


def shard_contents(out_dir) -> dict[str, set[str]]:
    """{shard file name: names of the tensors its own header holds}."""
    contents = {}
    for path in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="np") as f:
            contents[path.name] = set(f.keys())
    return contents


@pytest.mark.parametrize("family,variant", [("llama", "plain"), ("gpt2", "embedding")])
def test_every_index_entry_names_the_shard_that_holds_the_tensor(reference, tmp_path, family, variant):
    # gpt2 + embedding LoRA also writes the untied lm_head, a tensor the base index lacks.
    base, adapter = reference(family, variant, sharded=True)
    out = tmp_path / "out"
    merge(base, adapter, out, max_shard_size="100KB")
    contents = shard_contents(out)
    assert len(contents) > 2  # several shards, so a shifted or constant map cannot pass
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    held_by = {name: shard for shard, names in contents.items() for name in names}
    assert sum(len(names) for names in contents.values()) == len(held_by)  # no tensor in two shards
    assert set(weight_map) == set(held_by)
    wrong = {name: (shard, held_by[name]) for name, shard in weight_map.items() if held_by[name] != shard}
    assert not wrong, f"{len(wrong)} index entries name the wrong shard, e.g. {next(iter(wrong.items()))}"
