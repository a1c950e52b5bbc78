"""Adapter graphs of an ordinary BERT adapter: LoRA on "dense" also lands on pooler.dense,
which a feature-extraction graph never computes (it returns last_hidden_state, not the
pooled output). Export, pack and verify skip that module, say so, and still refuse a
module the model does not have, or one the graph computes but was not exported to target.

The base is a tiny random BertModel saved as a sentence-transformers checkpoint (mean
pooling + Normalize), so every graph here also carries sentence_embedding.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
import transformers
from click.testing import CliRunner
from peft import LoraConfig, get_peft_model
from safetensors.numpy import load_file, save_file

from lora_deploy.backends.onnxrt.lora_format import METADATA_KEY as FORMAT_KEY
from lora_deploy.backends.onnxrt.sessions import METADATA_KEY, DynamicSession
from lora_deploy.cli import main
from lora_deploy.export.dynamic import uncomputed_modules
from lora_deploy.modeling.hf import load_for_task

POOLER_NOTE = "skipped pooler.dense"
# Every "dense" layer but the pooler's: PEFT's suffix rule, as --targets takes it.
COMPUTED_DENSE = "query,value,attention.output.dense,intermediate.dense,layer.0.output.dense"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def save_sentence_bert(path, seed: int = 0):
    """A tiny BertModel + modules.json / 1_Pooling (mean) / Normalize, as sentence-transformers saves it."""
    config = transformers.BertConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        architectures=["BertModel"],
    )
    torch.manual_seed(seed)
    transformers.BertModel(config).eval().save_pretrained(path)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return path


def save_adapter(base, path, targets, seed: int = 1):
    torch.manual_seed(seed)
    model = transformers.BertModel.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, lora_dropout=0.0)
    get_peft_model(model, config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    base = save_sentence_bert(root / "base")
    dense = save_adapter(base, root / "dense", ["query", "value", "dense"])
    return {"root": root, "base": base, "dense": dense}


@pytest.fixture(scope="module")
def dynamic(bert):
    """export --dynamic-adapters --adapter DENSE: the graph and what the CLI said."""
    path = bert["root"] / "dynamic.onnx"
    result = cli("export", "onnx", bert["base"], "-o", path, "--dynamic-adapters", "--adapter", bert["dense"], "--json")
    assert result.exit_code == 0, result.output
    return path, result


@pytest.fixture(scope="module")
def targeted(bert):
    """export --dynamic-adapters --targets (every computed dense layer, not the pooler)."""
    path = bert["root"] / "targets.onnx"
    result = cli("export", "onnx", bert["base"], "-o", path, "--dynamic-adapters", "--targets", COMPUTED_DENSE)
    assert result.exit_code == 0, result.output
    return path


def metadata(path) -> dict:
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return json.loads(props[METADATA_KEY])


def test_the_pooler_is_not_computed_for_feature_extraction_only(bert):
    bare = load_for_task(bert["base"], "feature-extraction")
    assert uncomputed_modules(bare, ["input_ids", "attention_mask", "token_type_ids"], "last_hidden_state") == [
        "pooler.dense"
    ]
    # A classifier reads the pooled output: nothing is left out there.
    classifier = transformers.BertForSequenceClassification(bare.config).eval()
    assert uncomputed_modules(classifier, ["input_ids", "attention_mask"], "logits") == []


def test_export_skips_the_pooler_and_says_so(bert, dynamic):
    path, result = dynamic
    assert POOLER_NOTE in result.stderr
    info = json.loads(result.stdout)
    assert info["skipped"] == ["pooler.dense"]
    assert info["outputs"] == ["last_hidden_state", "sentence_embedding"]
    assert "encoder.layer.0.attention.output.dense" in info["modules"] and "pooler.dense" not in info["modules"]
    assert not any(name.startswith("pooler.") for name in info["lora_inputs"])
    meta = metadata(path)
    assert meta["uncomputed"] == ["pooler.dense"] and FORMAT_KEY == METADATA_KEY
    assert meta["outputs"] == ["last_hidden_state", "sentence_embedding"]


def test_pack_and_verify_skip_the_pooler(bert, dynamic, tmp_path):
    path, _ = dynamic
    packed = tmp_path / "dense.onnx_adapter"
    result = cli("pack", bert["dense"], "-o", packed, "--onnx", path)
    assert result.exit_code == 0, result.output
    assert POOLER_NOTE in result.stderr
    DynamicSession(path).load_adapter("dense", packed)  # fits the graph: no pooler parameters
    for extra in ([], ["--packed", packed]):
        result = cli("verify", bert["base"], bert["dense"], "--dynamic", path, *extra, "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        names = [c["name"] for c in report["checks"]]
        assert any("dynamic (adapter active) sentence_embedding" in n for n in names), names
        assert any("dynamic (adapter active) last_hidden_state" in n for n in names), names
        # Packed on the fly, the skipped module is reported as a skipped check.
        assert any(POOLER_NOTE in n for n in names) == (not extra), names


def test_a_file_packed_without_the_graph_says_how_to_pack_it(bert, dynamic, tmp_path):
    """Packed without --onnx, the file still holds pooler.dense: loading it says to pack against the graph."""
    from lora_deploy.errors import AdapterError

    path, _ = dynamic
    packed = tmp_path / "loose.onnx_adapter"
    assert cli("pack", bert["dense"], "-o", packed).exit_code == 0
    with pytest.raises(AdapterError, match=r"pooler.dense, which dynamic.onnx does not compute; pack it with --onnx"):
        DynamicSession(path).load_adapter("dense", packed)


def test_a_graph_exported_with_targets_takes_the_adapter(bert, targeted, tmp_path):
    """The regression: without --adapter, pack and verify refused pooler.dense."""
    packed = tmp_path / "dense.onnx_adapter"
    result = cli("pack", bert["dense"], "-o", packed, "--onnx", targeted)
    assert result.exit_code == 0, result.output
    assert POOLER_NOTE in result.stderr
    result = cli("verify", bert["base"], bert["dense"], "--dynamic", targeted)
    assert result.exit_code == 0, result.output


def test_modules_outside_the_graph_are_still_refused(bert, targeted, tmp_path):
    # Not in the model at all: pooler.dense renamed to pooler.other.
    odd = tmp_path / "odd"
    shutil.copytree(bert["dense"], odd)
    tensors = load_file(str(odd / "adapter_model.safetensors"))
    save_file(
        {k.replace("pooler.dense", "pooler.other"): v for k, v in tensors.items()},
        str(odd / "adapter_model.safetensors"),
    )
    result = cli("pack", odd, "-o", tmp_path / "odd.onnx_adapter", "--onnx", targeted)
    assert result.exit_code == 2 and "pooler.other" in result.output and "no LoRA input" in result.output
    # In the model and computed, but the graph was not exported to target it: key.
    keyed = save_adapter(bert["base"], tmp_path / "key", ["key"])
    result = cli("pack", keyed, "-o", tmp_path / "key.onnx_adapter", "--onnx", targeted)
    assert result.exit_code == 2 and "attention.self.key" in result.output
    assert not list(tmp_path.glob("*.onnx_adapter"))


def test_targets_that_only_name_the_pooler_are_refused(bert, tmp_path):
    result = cli(
        "export", "onnx", bert["base"], "-o", tmp_path / "p.onnx", "--dynamic-adapters", "--targets", "pooler.dense"
    )
    assert result.exit_code == 2 and "does not compute" in result.output
    assert not (tmp_path / "p.onnx").exists()


def test_multi_adapter_graph_skips_the_pooler(bert, tmp_path):
    path = tmp_path / "multi.onnx"
    result = cli("export", "onnx", bert["base"], "-o", path, "--multi-adapter", "--adapter", bert["dense"])
    assert result.exit_code == 0, result.output
    assert POOLER_NOTE in result.stderr
    result = cli("verify", bert["base"], bert["dense"], "--multi", path, "--batch", "3")
    assert result.exit_code == 0, result.output


def test_pack_dtype_flag(bert, dynamic, tmp_path):
    import onnxruntime as ort

    assert "[float32|float16]" in cli("pack", "--help").output
    packed = tmp_path / "half.onnx_adapter"
    result = cli("pack", bert["dense"], "-o", packed, "--dtype", "float16")
    assert result.exit_code == 0, result.output
    params = ort.AdapterFormat.read_adapter(str(packed)).get_parameters()
    assert {p.numpy().dtype for p in params.values()} == {np.dtype(np.float16)}
    # The graph's LoRA inputs are float32: a float16 file does not fit it.
    result = cli("pack", bert["dense"], "-o", tmp_path / "x.onnx_adapter", "--dtype", "float16", "--onnx", dynamic[0])
    assert result.exit_code == 2 and "float16" in result.output
    assert cli("pack", bert["dense"], "-o", tmp_path / "y.onnx_adapter", "--dtype", "bfloat16").exit_code == 2
