"""merge --onnx-like on an onnxruntime-genai build: the builder's own names and layout
(Wᵀ under MatMul names, q/k/v packed into one qkv_proj) mapped back onto the checkpoint.

The claim: merging ADAPTER into the base's genai folder gives what the builder gives for the
merged checkpoint (`merge` then `export genai`): initializers byte-identical, and the folder
generates PEFT's unmerged tokens (verify --genai). The plain adapter changes q and v but not
k, so the packed qkv initializers mix merged and untouched sources; all_linear touches every
projection. Bad graphs are built by editing a copy of the base folder's graph.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from lora_deploy.cli import main
from lora_deploy.errors import BadInputError, OutputError
from lora_deploy.export import initializers as graph_initializers
from lora_deploy.export import like
from lora_deploy.export.initializers import read_initializers
from lora_deploy.export.layouts import GENAI, OURS, Mapping, detect, resolve
from lora_deploy.export.like import copy_folder, external_data_file, folder_entries, merge_onnx
from lora_deploy.proof.genai import verify_genai


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def initializers(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def assert_nothing_written(out):
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture(scope="module")
def folders(genai_folder):
    """(base folder, base checkpoint, plain adapter, the builder's folder of the merged checkpoint)."""
    base_folder, base, (plain,) = genai_folder("base")
    merged_folder, _, _ = genai_folder("merged")
    return base_folder, base, plain, merged_folder


def test_folder_equals_a_genai_build_of_the_merged_checkpoint(folders, tmp_path):
    base_folder, base, plain, fresh = folders
    out = tmp_path / "merged-genai"
    result = cli("merge", base, plain, "--onnx-like", base_folder, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["layout"] == "onnxruntime-genai model builder" and record["folder"] is True
    assert record["merged"] == [f"model.layers.{i}.attn.qkv_proj.MatMul.weight" for i in (0, 1)]
    assert record["unmapped"] == ["cos_cache", "sin_cache"]  # the rotary caches: computed, not weights

    ours, theirs, before = (
        initializers(out / "model.onnx"),
        initializers(fresh / "model.onnx"),
        initializers(base_folder / "model.onnx"),
    )
    assert set(ours) == set(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and ours[name].tobytes() == theirs[name].tobytes(), name
    assert sorted(n for n in ours if ours[n].tobytes() != before[n].tobytes()) == record["merged"]
    # Same graph, same data layout: the files themselves are the builder's.
    for name in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (fresh / name).read_bytes(), name
    assert not (out / "genai-manifest.json").exists()  # it describes the base's build


def test_merged_folder_generates_pefts_tokens(folders, reference, tmp_path):
    base_folder, base, plain, _ = folders
    _, all_linear = reference("llama", "all_linear")
    for adapter in (plain, all_linear):
        out = tmp_path / adapter.name
        result = merge_onnx(base, adapter, base_folder, out)
        assert result.folder and len(result.merged) == {plain: 2, all_linear: 10}[adapter]
        report = verify_genai(base, adapter, out, 8)
        assert report.equivalent, report.problem()


def test_single_graph_from_the_folders_model_onnx(folders, tmp_path):
    base_folder, base, plain, fresh = folders
    out = tmp_path / "m.onnx"
    result = cli("merge", base, plain, "--onnx-like", base_folder / "model.onnx", "-o", out, "--base-check", "full")
    assert result.exit_code == 0, result.output
    assert "onnxruntime-genai model builder layout" in result.output
    ours, theirs = initializers(out), initializers(fresh / "model.onnx")
    assert all(ours[name].tobytes() == theirs[name].tobytes() for name in theirs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def copy_graph(folder, tmp_path, edit=None):
    """A copy of the folder's model.onnx (weights inline) with `edit(model)` applied."""
    model = onnx.load(str(folder / "model.onnx"))
    if edit is not None:
        edit(model)
    path = tmp_path / "edited.onnx"
    onnx.save(model, str(path))
    return path


def init(model, name):
    return next(i for i in model.graph.initializer if i.name == name)


def quantize(model):  # what an int4 build has: MatMulNBits nodes
    next(n for n in model.graph.node if n.op_type == "MatMul").op_type = "MatMulNBits"


def rename_all(model):
    for tensor in model.graph.initializer:
        tensor.name = "x." + tensor.name


def rename_qkv(model):
    init(model, "model.layers.0.attn.qkv_proj.MatMul.weight").name = "model.layers.0.attn.qkv.MatMul.weight"


def widen_qkv(model):
    tensor = init(model, "model.layers.1.attn.qkv_proj.MatMul.weight")
    values = numpy_helper.to_array(tensor)
    tensor.CopyFrom(numpy_helper.from_array(np.concatenate([values, values[:, :8]], axis=1), tensor.name))


def perturb_o_proj(model):  # transposed, and untouched by the adapter: still checked
    tensor = init(model, "model.layers.0.attn.o_proj.MatMul.weight")
    values = numpy_helper.to_array(tensor).copy()
    values[3, 5] += np.float32(1e-3)
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))


def bake_lora(model):  # what the builder writes with adapter_path
    model.graph.initializer.append(
        numpy_helper.from_array(np.zeros((64, 8), np.float32), "model.layers.0.attn.q_proj.lora_A.MatMul.weight")
    )


@pytest.mark.parametrize(
    "edit, message",
    [
        (quantize, "a quantized graph (MatMulNBits nodes)"),
        (rename_all, "no initializer name maps onto a tensor"),
        (rename_qkv, "the adapter changes model.layers.0.self_attn.q_proj.weight, but no initializer"),
        (widen_qkv, "has shape [64, 136] but"),
        (perturb_o_proj, "initializer model.layers.0.attn.o_proj.MatMul.weight differs from"),
        (bake_lora, "carries LoRA weights of its own"),
    ],
)
def test_refuses_a_graph_that_is_not_the_bases(folders, tmp_path, edit, message):
    base_folder, base, plain, _ = folders
    graph = copy_graph(base_folder, tmp_path, edit)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "merged.onnx"
    result = cli("merge", base, plain, "--onnx-like", graph, "-o", out)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert list(out.parent.iterdir()) == []


def test_refused_folder_leaves_nothing(folders, tmp_path):
    base_folder, base, plain, _ = folders
    folder = tmp_path / "edited-folder"
    shutil.copytree(base_folder, folder)
    copy_graph(base_folder, tmp_path, widen_qkv).replace(folder / "model.onnx")
    (folder / "model.onnx.data").unlink()  # the edited graph holds its weights
    out = tmp_path / "out"
    result = cli("merge", base, plain, "--onnx-like", folder, "-o", out)
    assert result.exit_code == 2 and "has shape" in result.output, result.output
    assert_nothing_written(out)
    named_onnx = cli("merge", base, plain, "--onnx-like", base_folder, "-o", tmp_path / "x.onnx")
    assert named_onnx.exit_code == 2 and "name a directory" in named_onnx.output
    inside = cli("merge", base, plain, "--onnx-like", base_folder, "-o", base_folder / "sub", "--overwrite")
    assert inside.exit_code == 2 and "must not be or contain an input" in inside.output
    assert not (base_folder / "sub").exists()


def test_output_folder_policy(folders, tmp_path):
    base_folder, base, plain, _ = folders
    out = tmp_path / "out"
    assert cli("merge", base, plain, "--onnx-like", base_folder, "-o", out).exit_code == 0
    again = cli("merge", base, plain, "--onnx-like", base_folder, "-o", out)
    assert again.exit_code == 2 and "exists; pass --overwrite" in again.output
    assert cli("merge", base, plain, "--onnx-like", base_folder, "-o", out, "--overwrite").exit_code == 0


def bad_entries(folder):
    """Ways an entry of an input folder cannot be copied: (what is made, the refusal)."""
    yield lambda: (folder / "sub" / "dang").symlink_to("/nonexistent"), "sub/dang: a dangling symlink"
    yield lambda: (folder / "dangling").symlink_to(folder / "nowhere"), "dangling: a dangling symlink"
    yield lambda: (folder / "sub" / "self").symlink_to("."), "sub/self: a symlink loop"
    yield lambda: (folder / "sub" / "me").symlink_to("me"), "sub/me: a symlink loop"
    yield lambda: os.mkfifo(folder / "pipe"), "pipe: a named pipe"
    yield lambda: os.mkfifo(folder / "sub" / "pipe"), "sub/pipe: a named pipe"
    yield lambda: bind_socket(folder / "sub", "sock"), "sub/sock: a socket"


def bind_socket(directory, name):
    with contextlib.chdir(directory), socket.socket(socket.AF_UNIX) as sock:  # relative: paths have a length limit
        sock.bind(name)


def test_bad_entries_of_the_folder_are_bad_input_and_nothing_is_written(folders, tmp_path):
    """A dangling symlink, a symlink loop, a pipe or a socket anywhere in the folder: exit 2,
    one line naming the input entry (not the output), before anything is written."""
    base_folder, base, plain, _ = folders
    folder = tmp_path / "folder"
    out = tmp_path / "out" / "merged"
    out.parent.mkdir()
    for make, message in bad_entries(folder):
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(base_folder, folder)
        (folder / "sub").mkdir()
        (folder / "sub" / "notes.txt").write_text("kept")
        make()
        before = sorted(os.listdir(folder)) + sorted(os.listdir(folder / "sub"))
        result = cli("merge", base, plain, "--onnx-like", folder, "-o", out)
        assert result.exit_code == 2, result.output
        assert result.output.startswith(f"error: {folder}/{message}"), result.output
        assert len(result.output.strip().splitlines()) == 1 and len(result.output) < 200, result.output
        assert_nothing_written(out)
        assert sorted(os.listdir(folder)) + sorted(os.listdir(folder / "sub")) == before
    shutil.rmtree(folder)
    shutil.copytree(base_folder, folder)
    (folder / "sub" / "deeper").mkdir(parents=True)
    (folder / "sub" / "deeper" / "notes.txt").write_text("kept")
    (folder / "sub" / "linked").symlink_to(folder / "tokenizer.json")
    fine = cli("merge", base, plain, "--onnx-like", folder, "-o", out)
    assert fine.exit_code == 0, fine.output
    assert (out / "sub" / "deeper" / "notes.txt").read_text() == "kept"
    assert (out / "sub" / "linked").read_bytes() == (folder / "tokenizer.json").read_bytes()


def test_folder_copy_follows_symlinks_and_names_the_first_file_it_cannot_write(tmp_path, monkeypatch):
    """A plain directory tree (no onnxruntime-genai needed): folder_entries checks it,
    copy_folder copies all but `skip` and what the destination holds already."""
    source, dest, outside = tmp_path / "source", tmp_path / "dest", tmp_path / "outside"
    (source / "a" / "b").mkdir(parents=True)
    outside.mkdir()
    (outside / "o.txt").write_text("outside")
    (source / "model.onnx").write_text("the base's")
    (source / "skipped.json").write_text("skip me")
    (source / "a" / "b" / "c.txt").write_text("c")
    (source / "a" / "f.txt").write_text("f")
    (source / "link.txt").symlink_to(source / "a" / "f.txt")
    (source / "a" / "out").symlink_to(outside)
    entries = folder_entries(source, skip={source / "skipped.json"})
    dest.mkdir()
    (dest / "model.onnx").write_text("merged")
    copy_folder(source, entries, dest, durable=True)
    copied = sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))
    assert copied == ["a", "a/b", "a/b/c.txt", "a/f.txt", "a/out", "a/out/o.txt", "link.txt", "model.onnx"]
    assert (dest / "model.onnx").read_text() == "merged" and (dest / "a" / "out" / "o.txt").read_text() == "outside"
    assert not (dest / "link.txt").is_symlink() and (dest / "link.txt").read_text() == "f"

    (source / "a" / "b" / "loop").symlink_to("../..")
    with pytest.raises(BadInputError, match=r"a/b/loop: a symlink loop \(it leads back to .*source\)$"):
        folder_entries(source, skip=set())
    (source / "a" / "b" / "loop").unlink()

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(like.shutil, "copyfile", disk_full)
    shutil.rmtree(dest)
    dest.mkdir()
    with pytest.raises(OutputError) as raised:
        copy_folder(source, folder_entries(source, skip=set()), dest, durable=False)
    assert str(raised.value) == f"{dest / 'a' / 'b' / 'c.txt'}: cannot write (No space left on device)"


def test_sampled_check_tiles_full_check_every_value(folders, tmp_path, monkeypatch):
    """A transposed tensor the adapter leaves alone is compared in tiles (sampled) or in full."""
    monkeypatch.setattr(graph_initializers, "SAMPLE_VALUES", 64)  # 8x8 tiles: the tiny model's tensors are sampled too
    base_folder, base, plain, _ = folders
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copyfile(base_folder / name, tmp_path / name)
    graph = tmp_path / "model.onnx"
    model = onnx.load(str(graph), load_external_data=False)
    data_file = external_data_file(model, graph)
    inits = read_initializers(model, graph, data_file)
    target = inits["model.layers.0.mlp.down_proj.MatMul.weight"]  # [128, 64] = down_proj.weight [64, 128]ᵀ
    rows, cols = 64, 128  # the checkpoint's
    tiled = set()
    for (r0, r1), (c0, c1) in graph_initializers.transposed_windows(rows, cols, 4, graph_initializers.SAMPLE_BLOCKS):
        tiled.update((r, c) for r in range(r0, r1) for c in range(c0, c1))
    r, c = next((r, c) for r in range(rows) for c in range(cols) if (r, c) not in tiled)
    with open(data_file, "r+b") as f:  # the graph's [c, r] is the checkpoint's [r, c]
        f.seek(target.offset + (c * rows + r) * 4)
        value = np.frombuffer(f.read(4), np.float32) + np.float32(1.0)
        f.seek(target.offset + (c * rows + r) * 4)
        f.write(value.tobytes())
    (tmp_path / "a").mkdir()
    sampled = cli("merge", base, plain, "--onnx-like", graph, "-o", tmp_path / "a" / "m.onnx")
    assert sampled.exit_code == 0, sampled.output  # one edited value between the tiles: not seen (documented)
    (tmp_path / "b").mkdir()
    full = cli("merge", base, plain, "--onnx-like", graph, "-o", tmp_path / "b" / "m.onnx", "--base-check", "full")
    assert full.exit_code == 2 and "down_proj.MatMul.weight differs from" in full.output
    assert list((tmp_path / "b").iterdir()) == []


def test_layouts_map_names_both_ways():
    ckpt = {
        "model.embed_tokens.weight",
        "model.norm.weight",
        *(f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkvo"),
        "model.layers.0.mlp.down_proj.weight",
    }
    builder = [
        "model.embed_tokens.weight",
        "model.layers.0.attn.qkv_proj.MatMul.weight",
        "model.layers.0.attn.q_proj.MatMul.weight",  # unpacked (a build with an adapter)
        "model.layers.0.mlp.down_proj.MatMul.weight",
        "model.layers.1.final_norm_layernorm.weight",
        "lm_head.MatMul.weight",  # tied: the checkpoint has no lm_head.weight
        "cos_cache",
    ]
    found = detect(builder, ckpt)
    assert found is not None and found.layout is GENAI and found.unmapped == ["cos_cache"]
    qkv = found.mapped["model.layers.0.attn.qkv_proj.MatMul.weight"]
    assert qkv.sources == tuple(f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv") and qkv.transpose
    assert qkv.shape([(64, 64), (32, 64), (32, 64)]) == (64, 128)
    assert found.mapped["lm_head.MatMul.weight"] == Mapping(("model.embed_tokens.weight",), True)
    assert found.mapped["model.layers.1.final_norm_layernorm.weight"] == Mapping(("model.norm.weight",))
    ours = detect(sorted(ckpt) + ["some.buffer"], ckpt)
    assert ours is not None and ours.layout is OURS and ours.unmapped == ["some.buffer"]
    assert detect(["x.y"], ckpt) is None
    assert resolve(GENAI, ["model.layers.0.attn.qkv_proj.Add.bias"], ckpt.__contains__).unmapped  # no biases here
    assert Mapping(("a", "b")).shape([(4, 3), (4, 2)]) is None  # cannot be concatenated
