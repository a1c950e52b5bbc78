"""The reference models and adapters are what every other test stands on."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from lora_deploy.examples import models as ref
from tests import minilm as minilm_models

REFERENCE_CASES = [(f, v) for f in ref.FAMILIES for v in ref.VARIANTS if ref.supported(f, v)]


def _tensors(directory):
    """All tensors of a checkpoint directory (single file or shards)."""
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


def _lora_deltas(adapter_dir):
    """``{module: B @ A}`` for every LoRA module of a saved adapter."""
    tensors = _tensors(adapter_dir)
    deltas = {}
    for key, a in tensors.items():
        for a_name, b_name in ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")):
            if key.endswith(a_name):
                module = key[: -len(a_name)]
                deltas[module] = tensors[module + b_name] @ a
    return deltas


def _load_base(family, base_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if family == "bert" else AutoModelForCausalLM
    return auto.from_pretrained(base_dir, dtype=dtype).eval()


def _with_adapter(model, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir).eval()


# ---------------------------------------------------------------- API


def test_public_names():
    assert ref.FAMILIES == ("llama", "gpt2", "bert")
    assert set(ref.VARIANTS) == {
        "plain",
        "rslora",
        "patterns",
        "lora_bias",
        "dora",
        "modules_to_save",
        "embedding",
        "all_linear",
    }
    assert not ref.supported("llama", "lora_bias")
    assert all(ref.supported(f, v) for f, v in REFERENCE_CASES)
    assert len(REFERENCE_CASES) == 3 * len(ref.VARIANTS) - 1


def test_unsupported_pairs_raise(tmp_path):
    with pytest.raises(ValueError, match="lora_bias"):
        ref.lora_config("llama", "lora_bias")
    with pytest.raises(ValueError, match="family"):
        ref.supported("t5", "plain")
    with pytest.raises(ValueError, match="variant"):
        ref.supported("llama", "ia3")
    with pytest.raises(ValueError, match="dtype"):
        ref.build_base("llama", tmp_path / "x", dtype="int8")
    base = ref.build_base("llama", tmp_path / "base")
    with pytest.raises(ValueError, match="lora_bias"):
        ref.train_adapter(base, tmp_path / "adapter", variant="lora_bias")
    assert not (tmp_path / "adapter").exists()


# ---------------------------------------------------------------- bases


@pytest.mark.parametrize("family", ref.FAMILIES)
def test_base_is_a_loadable_hf_checkpoint(reference, family):
    from transformers import AutoConfig, AutoTokenizer

    base_dir, _ = reference(family)
    names = {p.name for p in base_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert ("generation_config.json" in names) == (family != "bert")
    assert AutoConfig.from_pretrained(base_dir).model_type == family

    model = _load_base(family, base_dir)
    expected = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "bert": "BertForSequenceClassification"}
    assert type(model).__name__ == expected[family]
    assert model.config.vocab_size == ref.VOCAB_SIZE
    assert sum(p.numel() for p in model.parameters()) < 200_000  # tiny on purpose

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    batch = tokenizer(["hello world", "LoRA!"], padding=True, return_tensors="pt")
    assert int(batch["input_ids"].max()) < ref.VOCAB_SIZE
    assert tokenizer.decode(tokenizer("hello world")["input_ids"], skip_special_tokens=True) == "hello world"
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()


def test_checkpoint_key_prefixes(reference):
    llama = _tensors(reference("llama")[0])
    gpt2 = _tensors(reference("gpt2")[0])
    bert = _tensors(reference("bert")[0])
    assert "model.layers.0.self_attn.q_proj.weight" in llama and "lm_head.weight" in llama
    # GPT-2: tied lm_head is not stored; Conv1D weights are [in, out].
    assert "transformer.h.0.attn.c_attn.weight" in gpt2 and "lm_head.weight" not in gpt2
    assert gpt2["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)
    assert "bert.encoder.layer.0.attention.self.query.weight" in bert and "classifier.weight" in bert


@pytest.mark.parametrize("family", ref.FAMILIES)
def test_base_is_deterministic(tmp_path, family):
    a = _tensors(ref.build_base(family, tmp_path / "a", seed=3))
    b = _tensors(ref.build_base(family, tmp_path / "b", seed=3))
    c = _tensors(ref.build_base(family, tmp_path / "c", seed=4))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("family", ref.FAMILIES)
def test_half_base_is_the_float32_base_rounded(reference, family, dtype):
    full = _tensors(reference(family)[0])
    half_dir, adapter_dir = reference(family, dtype=dtype)
    half = _tensors(half_dir)
    assert half.keys() == full.keys()
    for key, tensor in half.items():
        assert tensor.dtype == getattr(torch, dtype), key
        assert torch.equal(tensor, full[key].to(tensor.dtype)), key
    # The shared adapter applies to the half-precision base.
    model = _with_adapter(_load_base(family, half_dir, getattr(torch, dtype)), adapter_dir)
    batch = ref.synthetic_batch(family, batch_size=2, seq_len=8)
    batch.pop("labels")
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits.float()).all()


@pytest.mark.parametrize("family", ref.FAMILIES)
def test_sharded_base(reference, family):
    base_dir, _ = reference(family, sharded=True)
    shards = sorted(base_dir.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2
    assert not (base_dir / "model.safetensors").exists()
    index = json.loads((base_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}

    single = _tensors(reference(family)[0])
    sharded = _tensors(base_dir)
    assert set(index["weight_map"]) == set(sharded) == set(single)
    assert all(torch.equal(sharded[k], single[k]) for k in single)
    assert _load_base(family, base_dir) is not None


def test_sharded_half_base_has_several_shards(reference):
    base_dir, _ = reference("llama", dtype="bfloat16", sharded=True)
    assert len(list(base_dir.glob("model-*-of-*.safetensors"))) >= 2


# ---------------------------------------------------------------- adapters


@pytest.mark.parametrize("family,variant", REFERENCE_CASES)
def test_adapter_is_trained(reference, family, variant):
    base_dir, adapter_dir = reference(family, variant)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter_dir.iterdir()}

    deltas = _lora_deltas(adapter_dir)
    assert deltas, "no LoRA tensors saved"
    for module, delta in deltas.items():
        assert delta.abs().max() > 1e-4, f"{module}: B @ A is zero, the adapter did not train"
    for key, tensor in _tensors(adapter_dir).items():
        if ".lora_B" in key:
            assert tensor.abs().max() > 0, key

    # Loads with PEFT, and lowers the task loss on a held-out batch.
    held_out = ref.synthetic_batch(family, batch_size=32, seed=987_654)
    base = _load_base(family, base_dir)
    with torch.no_grad():
        before = base(**held_out).loss.item()
        after = _with_adapter(base, adapter_dir)(**held_out).loss.item()
    assert after < before - 1e-3, (before, after)


@pytest.mark.parametrize("family,variant", REFERENCE_CASES)
def test_adapter_config_matches_variant(reference, family, variant):
    config = json.loads((reference(family, variant)[1] / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == 8 and config["lora_alpha"] == 16
    assert config["fan_in_fan_out"] == (family == "gpt2")
    assert config["use_rslora"] == (variant == "rslora")
    assert config["use_dora"] == (variant == "dora")
    assert config["lora_bias"] == (variant == "lora_bias")
    assert bool(config["rank_pattern"]) == bool(config["alpha_pattern"]) == (variant == "patterns")
    assert bool(config["modules_to_save"]) == (variant == "modules_to_save")

    keys = set(_tensors(reference(family, variant)[1]))
    assert all(k.startswith("base_model.model.") for k in keys)
    assert any(k.endswith("lora_magnitude_vector") for k in keys) == (variant == "dora")
    assert any(k.endswith("lora_B.bias") for k in keys) == (variant == "lora_bias")
    assert any("lora_embedding_A" in k for k in keys) == (variant == "embedding")


def test_pattern_ranks(reference):
    keys = _tensors(reference("llama", "patterns")[1])
    assert keys["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"].shape[0] == 4
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 8
    gpt2 = _tensors(reference("gpt2", "patterns")[1])
    assert gpt2["base_model.model.transformer.h.0.attn.c_proj.lora_A.weight"].shape[0] == 4
    assert gpt2["base_model.model.transformer.h.0.mlp.c_proj.lora_A.weight"].shape[0] == 8


def test_modules_to_save_keys(reference):
    saved = {
        "llama": "base_model.model.lm_head.weight",
        "gpt2": "base_model.model.transformer.ln_f.weight",
        "bert": "base_model.model.classifier.weight",
    }
    for family, key in saved.items():
        base = _tensors(reference(family)[0])
        adapter = _tensors(reference(family, "modules_to_save")[1])
        assert key in adapter
        base_key = key.removeprefix("base_model.model.")
        assert not torch.equal(adapter[key], base[base_key]), "the saved module did not train"


def test_adapter_is_deterministic(tmp_path, reference):
    base_dir, adapter_dir = reference("gpt2", "dora")
    again = ref.train_adapter(base_dir, tmp_path / "again", variant="dora")
    first, second = _tensors(adapter_dir), _tensors(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_training_leaves_global_torch_state_alone(tmp_path, reference):
    base_dir, _ = reference("bert")
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ref.train_adapter(base_dir, tmp_path / "adapter", steps=2)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads


# ---------------------------------------------------------------- MiniLM


def _minilm_embed(model, tokenizer, sentences):
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    return torch.nn.functional.normalize(minilm_models.mean_pool(hidden, batch["attention_mask"]), dim=-1)


def test_minilm_is_the_real_pretrained_model(minilm):
    from transformers import AutoModel, AutoTokenizer

    base_dir, _ = minilm
    assert (base_dir / "model.safetensors").is_file() and (base_dir / "tokenizer.json").is_file()
    keys = set(_tensors(base_dir))
    # A bare BertModel: no "bert." prefix.
    assert "encoder.layer.0.attention.self.query.weight" in keys
    assert not any(k.startswith("bert.") for k in keys)

    model = AutoModel.from_pretrained(base_dir).eval()
    assert type(model).__name__ == "BertModel"
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    cat, kitten, tax = _minilm_embed(
        model,
        tokenizer,
        ["A cat is sleeping on the sofa.", "A kitten naps on the couch.", "The quarterly tax return is due."],
    )
    assert float(cat @ kitten) > float(cat @ tax) + 0.3


def test_minilm_adapter(minilm):
    from transformers import AutoModel, AutoTokenizer

    base_dir, adapter_dir = minilm
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["query", "value"]
    keys = set(_tensors(adapter_dir))
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert len(keys) == 6 * 2 * 2
    assert all(delta.abs().max() > 1e-4 for delta in _lora_deltas(adapter_dir).values())

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModel.from_pretrained(base_dir).eval()
    before = minilm_models.group_separation(model, tokenizer)
    after = minilm_models.group_separation(_with_adapter(model, adapter_dir), tokenizer)
    assert after > before + 0.2, (before, after)
