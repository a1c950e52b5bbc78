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


def test_reused_output_buffers_write_what_each_tensor_held(tmp_path):
    # Each tensor is computed into one of two reused buffers: a buffer overwritten before
    # the writer and the hashing thread were done with it would change the file or its digest.
    import blake3
    import numpy as np

    from lora_deploy.io.stream import BinaryFile, OutputBuffers, tensor_bytes

    rng = np.random.default_rng(0)
    tensors = [rng.standard_normal((n, 300)).astype(np.float16) for n in (5000, 700, 5000, 3000, 4000, 10)]
    buffers, out = OutputBuffers(), BinaryFile(tmp_path / "out.bin")
    for t in tensors:
        slot, array = buffers.take(t.shape, t.dtype)
        array[...] = t
        out.write(tensor_bytes(array))
        buffers.written(slot, out)
    digests = out.close()
    expected = b"".join(t.tobytes() for t in tensors)
    assert (tmp_path / "out.bin").read_bytes() == expected
    assert digests["blake3"] == blake3.blake3(expected).hexdigest()


def test_a_write_error_does_not_leave_a_buffer_waiting_forever(tmp_path):
    import os
    import threading

    import numpy as np

    from lora_deploy.errors import OutputError
    from lora_deploy.io.stream import BinaryFile, OutputBuffers, tensor_bytes

    buffers, out = OutputBuffers(count=1), BinaryFile(tmp_path / "out.bin")
    os.close(out.fd)  # every write now fails on the writer thread
    out.fd = os.open(os.devnull, os.O_RDONLY)
    raised = []

    def produce() -> None:
        slot, array = buffers.take((1000,), np.float32)
        try:
            for _ in range(100):  # the error shows at a later queued piece or at done()
                out.write(tensor_bytes(array))
                buffers.written(slot, out)
                slot, array = buffers.take((1000,), np.float32)  # waits for the pieces queued from it
        except OutputError as exc:
            raised.append(exc)

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "take() waits forever for a buffer the failed writer dropped"
    assert raised
    # a "done" mark queued after the failure still comes through the hashing thread
    mark = threading.Event()
    out._writer.put(mark)
    assert mark.wait(10)
    out.abort()  # stops its threads, closes the file
