"""merge --onnx-like: an adapter's merged ONNX from the base's graph, without an export.

The claim: the result equals a fresh `export onnx` of the merged checkpoint (same graph,
initializers byte-identical) and computes what base + adapter compute unmerged. The base
is float16 and its graph float32, so the merged tensors must be rounded to the
checkpoint's dtype first, as `merge` then `export onnx` do. The base graph is exported
once (with external data); an inline copy is made from it without a second export.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper
from safetensors.numpy import load_file, save_file

from lora_deploy.cli import main
from lora_deploy.compare import TOLERANCES
from lora_deploy.examples import models as ref
from lora_deploy.export import graph as onnx_graph
from lora_deploy.export.like import merge_onnx
from lora_deploy.export.model import export_checkpoint
from lora_deploy.merge import merge
from lora_deploy.modeling.samples import sample_inputs
from lora_deploy.modeling.tasks import load_config
from lora_deploy.proof.verify import verify


@pytest.fixture(scope="module")
def case(reference, tmp_path_factory):
    base, adapter = reference("llama", "plain", dtype="float16")
    root = tmp_path_factory.mktemp("like")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_graph, "EXTERNAL_DATA_BYTES", 0)  # the streamed path: weights in base.onnx.data
        export_checkpoint(base, root / "base.onnx")
    inline = onnx.load(str(root / "base.onnx"))  # loads the external data into the graph
    onnx.save(inline, str(root / "inline.onnx"))
    merge(base, adapter, root / "merged")
    export_checkpoint(root / "merged", root / "fresh.onnx")
    return base, adapter, root


def initializers(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def ort_logits(path, feed) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("graph", ["base.onnx", "inline.onnx"])
def test_equals_a_fresh_export_of_the_merged_checkpoint(case, graph, tmp_path):
    base, adapter, root = case
    out = tmp_path / "merged.onnx"
    result = merge_onnx(base, adapter, root / graph, out)
    assert result.external_data == (graph == "base.onnx")
    assert (tmp_path / "merged.onnx.data").exists() == result.external_data
    assert len(result.merged) == 4 and result.graph_dtypes == ["float32"] and result.checkpoint_dtypes == ["float16"]

    ours, fresh, before = initializers(out), initializers(root / "fresh.onnx"), initializers(root / "base.onnx")
    assert set(ours) == set(fresh)
    for name in fresh:
        assert ours[name].dtype == fresh[name].dtype and ours[name].tobytes() == fresh[name].tobytes(), name
    assert sorted(n for n in ours if ours[n].tobytes() != before[n].tobytes()) == result.merged
    ops = [node.op_type for node in onnx.load(str(out), load_external_data=False).graph.node]
    assert ops == [node.op_type for node in onnx.load(str(root / "fresh.onnx"), load_external_data=False).graph.node]

    feed = sample_inputs(load_config(base), batch=3, seq=11)
    np.testing.assert_array_equal(ort_logits(out, feed), ort_logits(root / "fresh.onnx", feed))
    onnx.checker.check_model(str(out))


STARTS_BARE = """
import sys
from lora_deploy.cli import main
from lora_deploy.io import fileio
base, adapter, graph, out = sys.argv[1:5]
# The copy of the data, most of the command's time, starts before numpy's import (~0.1 s).
imported_at_copy = []
class Watched(fileio.FileCopy):
    def __init__(self, *args, **kwargs):
        imported_at_copy.append("numpy" in sys.modules)
        super().__init__(*args, **kwargs)
fileio.FileCopy = Watched
import lora_deploy.export.like as like
like.FileCopy = Watched
main(["merge", base, adapter, "--onnx-like", graph, "-o", out], standalone_mode=False)
assert imported_at_copy == ([False] if graph.endswith("base.onnx") else []), imported_at_copy
# Nor what only other paths need: export genai's module, importlib.metadata (the version).
unneeded = ("torch", "onnx", "ml_dtypes", "transformers", "lora_deploy.export.genai", "importlib.metadata")
heavy = sorted(m for m in unneeded if m in sys.modules)
assert not heavy, heavy
import onnx  # the protobuf classes read without it are onnx's own
assert onnx.ModelProto is type(onnx.load(out, load_external_data=False))
"""


@pytest.mark.parametrize("graph", ["base.onnx", "inline.onnx"])
def test_needs_neither_torch_nor_onnx_and_writes_the_same_bytes(case, graph, tmp_path):
    """The command's start-up cost: `merge --onnx-like` reads and writes the graph's
    protobuf with onnx's generated classes alone (io/onnx_proto.py), imports nothing that
    only other commands need, and its output is byte for byte what merge_onnx writes in a
    process where onnx is imported."""
    base, adapter, root = case
    bare, here = tmp_path / "bare" / "merged.onnx", tmp_path / "here" / "merged.onnx"
    bare.parent.mkdir()
    here.parent.mkdir()
    subprocess.run(
        [sys.executable, "-c", STARTS_BARE, str(base), str(adapter), str(root / graph), str(bare)],
        check=True,
        cwd=tmp_path,
    )
    merge_onnx(base, adapter, root / graph, here)
    assert sorted(p.name for p in bare.parent.iterdir()) == sorted(p.name for p in here.parent.iterdir())
    for name in (p.name for p in here.parent.iterdir()):
        assert (bare.parent / name).read_bytes() == (here.parent / name).read_bytes(), name


def test_matches_the_unmerged_reference(case, tmp_path):
    base, adapter, root = case
    out = tmp_path / "merged.onnx"
    assert cli("merge", base, adapter, "--onnx-like", root / "base.onnx", "-o", out).exit_code == 0
    # The merged weights are float16 (rounded once, as `merge` writes them) in a float32
    # graph: verify picks tolerances by the graph's dtype, so give it the weights'.
    tol = TOLERANCES["float16"]
    report = verify(base, adapter, onnx_path=out, atol=tol.atol, rtol=tol.rtol)
    assert report.equivalent, report.problem()


def test_output_policy(case, tmp_path):
    base, adapter, root = case
    out = tmp_path / "merged.onnx"
    args = ("merge", base, adapter, "--onnx-like", root / "base.onnx", "-o")
    assert cli(*args, out).exit_code == 0
    again = cli(*args, out)
    assert again.exit_code == 2 and "exists; pass --overwrite" in again.output
    assert cli(*args, out, "--overwrite", "--json").exit_code == 0
    for bad in (root / "base.onnx", base / "x.onnx"):
        result = cli(*args, bad, "--overwrite")
        assert result.exit_code == 2 and "must not be or contain an input" in result.output, bad
    assert not (base / "x.onnx").exists()
    assert "must end in .onnx" in cli(*args, root / "base.onnx.data", "--overwrite").output
    assert cli(*args, tmp_path / "d.onnx", "--dtype", "float16").exit_code == 2


def test_a_single_safetensors_file_as_base_gives_the_directorys_bytes(case, tmp_path):
    """BASE may be one .safetensors file, as for plain `merge`; errors name that file."""
    base, adapter, root = case
    for label, given in (("dir", base), ("file", base / "model.safetensors")):
        (tmp_path / label).mkdir()
        result = cli("merge", given, adapter, "--onnx-like", root / "base.onnx", "-o", tmp_path / label / "m.onnx")
        assert result.exit_code == 0, result.output
    for name in ("m.onnx", "m.onnx.data"):
        assert (tmp_path / "file" / name).read_bytes() == (tmp_path / "dir" / name).read_bytes(), name
    other = tmp_path / "other.safetensors"
    tensors = load_file(str(base / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1
    save_file(tensors, str(other))
    (tmp_path / "refused").mkdir()
    refused = cli("merge", other, adapter, "--onnx-like", root / "base.onnx", "-o", tmp_path / "refused" / "m.onnx")
    assert refused.exit_code == 2 and f"differs from {other}'s model.norm.weight" in refused.output, refused.output
    assert list((tmp_path / "refused").iterdir()) == []


def edited(root, tmp_path, edit):
    """A copy of the inline base graph with `edit(model)` applied."""
    model = onnx.load(str(root / "inline.onnx"))
    edit(model)
    path = tmp_path / "edited.onnx"
    onnx.save(model, str(path))
    return path


def rename_all(model):
    for init in model.graph.initializer:
        init.name = "x." + init.name


def rename_target(model):
    for init in model.graph.initializer:
        if init.name.endswith("q_proj.weight"):
            init.name += ".renamed"


def reshape_target(model):
    init = next(i for i in model.graph.initializer if i.name.endswith("layers.0.self_attn.q_proj.weight"))
    values = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array(np.concatenate([values, values]), init.name))


def perturb_norm(model):  # a tensor the adapter does not touch: still checked
    init = next(i for i in model.graph.initializer if i.name == "model.norm.weight")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + np.float32(1e-3), init.name))


@pytest.mark.parametrize(
    "edit, message",
    [
        (rename_all, "no initializer name maps onto a tensor"),
        (rename_target, "no initializer of the graph has that name"),
        (reshape_target, "has shape [128, 64] but"),
        (perturb_norm, "differs from"),
    ],
)
def test_refuses_a_graph_that_is_not_the_bases(case, tmp_path, edit, message):
    base, adapter, root = case
    graph = edited(root, tmp_path, edit)
    out = tmp_path / "out" / "merged.onnx"
    out.parent.mkdir()
    result = cli("merge", base, adapter, "--onnx-like", graph, "-o", out)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert list(out.parent.iterdir()) == []


def test_refuses_another_models_graph(case, tmp_path):
    _, adapter, root = case
    other = ref.build_base("llama", tmp_path / "other", dtype="float16", seed=1)
    out = tmp_path / "merged.onnx"
    result = cli("merge", other, adapter, "--onnx-like", root / "base.onnx", "-o", out)
    assert result.exit_code == 2 and "is not an export of this base" in result.output
    assert not out.exists() and not (tmp_path / "merged.onnx.data").exists()


def graph_with_one_value_changed(root, tmp_path, name, pick):
    """A copy of base.onnx whose initializer `name` has one value changed in its external
    data, at the flat index `pick(count)`."""
    import shutil

    from lora_deploy.export.initializers import read_initializers
    from lora_deploy.export.like import external_data_file

    for suffix in ("", ".data"):
        shutil.copyfile(root / f"base.onnx{suffix}", tmp_path / f"base.onnx{suffix}")
    graph = tmp_path / "base.onnx"
    model = onnx.load(str(graph), load_external_data=False)
    data_file = external_data_file(model, graph)
    inits = read_initializers(model, graph, data_file)
    init = inits[name]
    count = int(np.prod(init.shape))
    index = pick(count)
    with open(data_file, "r+b") as f:
        f.seek(init.offset + index * init.dtype.itemsize)
        value = np.frombuffer(f.read(init.dtype.itemsize), init.dtype).copy()
        f.seek(init.offset + index * init.dtype.itemsize)
        f.write((value + np.asarray(1.0, init.dtype)).tobytes())
    return graph


def outside_the_samples(count):
    """A flat index in the second half that no sampled block compares (float32 graph)."""
    from lora_deploy.export.initializers import SAMPLE_BLOCKS, compared_blocks

    sampled = set()
    for first, n in compared_blocks(count, 4, SAMPLE_BLOCKS):
        sampled.update(range(first, first + n))
    return next(i for i in range(count // 2, count) if i not in sampled)


def test_sampled_check_compares_blocks_full_check_every_value(case, tmp_path, monkeypatch):
    from lora_deploy.export import initializers

    monkeypatch.setattr(initializers, "SAMPLE_VALUES", 64)  # the tiny model's tensors are sampled too
    base, adapter, root = case
    graph = graph_with_one_value_changed(root, tmp_path, "model.embed_tokens.weight", outside_the_samples)
    (tmp_path / "a").mkdir()
    sampled = cli("merge", base, adapter, "--onnx-like", graph, "-o", tmp_path / "a" / "m.onnx", "--json")
    assert sampled.exit_code == 0, sampled.output  # one edited value between the samples: not seen (documented)
    assert '"base_check": "sampled"' in sampled.output
    (tmp_path / "b").mkdir()
    full = cli("merge", base, adapter, "--onnx-like", graph, "-o", tmp_path / "b" / "m.onnx", "--base-check", "full")
    assert full.exit_code == 2 and "model.embed_tokens.weight differs from" in full.output
    assert list((tmp_path / "b").iterdir()) == []


def test_the_adapters_targets_are_sampled_too(case, tmp_path, monkeypatch):
    """The targets are rewritten from the checkpoint: an edit of the graph's value there
    never reaches the output, so they are sampled like the rest; a graph with the adapter
    already merged in differs at almost every target value, and the samples see it."""
    from lora_deploy.export import initializers

    monkeypatch.setattr(initializers, "SAMPLE_VALUES", 64)  # the tiny model's tensors are sampled too
    base, adapter, root = case
    name = "model.layers.0.self_attn.q_proj.weight"
    outs = {label: tmp_path / label / "m.onnx" for label in ("clean", "edited", "again")}
    for out in outs.values():
        out.parent.mkdir()
    assert cli("merge", base, adapter, "--onnx-like", root / "base.onnx", "-o", outs["clean"]).exit_code == 0
    graph = graph_with_one_value_changed(root, tmp_path, name, outside_the_samples)
    edited = cli("merge", base, adapter, "--onnx-like", graph, "-o", outs["edited"])
    assert edited.exit_code == 0, edited.output
    assert Path(f"{outs['edited']}.data").read_bytes() == Path(f"{outs['clean']}.data").read_bytes()
    again = cli("merge", base, adapter, "--onnx-like", outs["clean"], "-o", outs["again"])
    assert again.exit_code == 2 and "differs from" in again.output and "not an export of this base" in again.output
    assert list(outs["again"].parent.iterdir()) == []


def test_compared_blocks_cover_every_value_or_spaced_samples():
    from lora_deploy.export.initializers import SAMPLE_VALUES, compared_blocks

    full = compared_blocks(10_000_000, 4, None)
    assert sum(n for _, n in full) == 10_000_000 and full[0][0] == 0
    samples = compared_blocks(10_000_000, 4, 8)
    assert len(samples) == 8 and all(n == SAMPLE_VALUES for _, n in samples)
    assert samples[0][0] == 0 and samples[-1][0] + SAMPLE_VALUES == 10_000_000
    assert compared_blocks(100, 4, 8) == [(0, 100)]  # smaller than the samples: all of it
