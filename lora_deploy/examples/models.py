"""Reference models and adapters for tests, benchmarks and the README demo.

No model hub is reachable where this project is tested, so every checkpoint is
built here: tiny random-weight Hugging Face models (one per architecture family
the tool must handle) and small PEFT LoRA adapters that were genuinely trained,
so their ``lora_B`` matrices are non-zero and merging them changes outputs.

The one real model the tests use, all-MiniLM-L6-v2, and its adapter are the tests'
own (tests/minilm.py): nothing here that only tests need ships in the wheel.

Everything is deterministic for a given ``seed``: each builder runs on one
CPU thread under ``torch.random.fork_rng``, so its result neither depends on
nor disturbs the caller's random state, and does not vary with core count.

Requires ``peft`` (the ``reference`` extra) for the training functions.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from lora_deploy.dtypes import BY_NAME

FAMILIES = ("llama", "gpt2", "bert")

VARIANTS = (
    "plain",
    "rslora",
    "patterns",
    "lora_bias",
    "dora",
    "modules_to_save",
    "embedding",
    "all_linear",
)

# Base checkpoint dtypes (names in lora_deploy.dtypes).
DTYPES = ("float32", "float16", "bfloat16")

# Model vocabulary. The tokenizer below only uses the first ~100 ids (special
# tokens plus printable ASCII); the rest are valid but unused, as in real
# checkpoints whose embedding tables are padded.
VOCAB_SIZE = 256
MAX_POSITIONS = 128

# Special tokens per family, in id order (ids 0, 1, 2, ...).
_SPECIAL_TOKENS = {
    "llama": ["<unk>", "<s>", "</s>"],
    "gpt2": ["<|endoftext|>"],
    "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
}

# The synthetic tasks use ids from this range so they never collide with a
# special token of any family.
_TASK_FIRST_ID = 16
_TASK_SPAN = 32
# bert's task: "does the sequence contain this id?"
_BERT_MARKER_ID = _TASK_FIRST_ID + _TASK_SPAN  # 48, outside the filler range

_RANK = 8
_ALPHA = 16
_DEFAULT_STEPS = 40
_LEARNING_RATE = 1e-2


# --------------------------------------------------------------------------
# Base models
# --------------------------------------------------------------------------


def build_base(
    family: str,
    out_dir,
    *,
    dtype: str = "float32",
    max_shard_size: str | int | None = None,
    seed: int = 0,
) -> Path:
    """Build a tiny random ``family`` model and save it as an HF checkpoint.

    The weights are initialised in float32 from ``seed`` and only then cast to
    ``dtype``, so a float16/bfloat16 base is exactly the float32 base of the
    same seed, rounded. That is what lets one adapter serve every dtype.

    ``max_shard_size`` (e.g. ``"200KB"``) writes ``model-0000x-of-0000N``
    shards plus ``model.safetensors.index.json``; by default a single
    ``model.safetensors`` is written. A small character-level tokenizer is
    saved alongside so the directory looks like a real checkpoint.

    Returns ``out_dir`` as a Path.
    """
    _check_family(family)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    with _seeded(seed):
        model = _new_model(family)
    model = model.to(BY_NAME[dtype].torch()).eval()
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **save_kwargs)
    _build_tokenizer(family).save_pretrained(out)
    return out


def _new_model(family: str):
    """Instantiate the tiny model of ``family`` with fresh random weights."""
    import transformers as tf

    # Dropout is off so the few training steps below are not noisy; it has no
    # effect on inference, which is all the rest of the project does.
    if family == "llama":
        config = tf.LlamaConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,  # grouped-query attention, like real Llamas
            max_position_embeddings=MAX_POSITIONS,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        )
        return tf.LlamaForCausalLM(config)
    if family == "gpt2":
        # GPT-2 keeps its real quirks: Conv1D layers (weight stored as
        # [in, out]) and lm_head tied to wte.
        config = tf.GPT2Config(
            vocab_size=VOCAB_SIZE,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=MAX_POSITIONS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        return tf.GPT2LMHeadModel(config)
    config = tf.BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_POSITIONS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
        pad_token_id=0,
    )
    return tf.BertForSequenceClassification(config)


def _build_tokenizer(family: str):
    """A character-level tokenizer: the family's special tokens, then ASCII.

    Built from ``tokenizers`` in memory, so nothing is downloaded.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = _SPECIAL_TOKENS[family]
    chars = [chr(c) for c in range(32, 127)]
    vocab = {token: i for i, token in enumerate(specials + chars)}
    unk = {"llama": "<unk>", "gpt2": "<|endoftext|>", "bert": "[UNK]"}[family]

    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()

    kwargs = {"unk_token": unk, "model_max_length": MAX_POSITIONS}
    if family == "llama":
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
        kwargs.update(bos_token="<s>", eos_token="</s>", pad_token="</s>")
    elif family == "gpt2":
        kwargs.update(bos_token=unk, eos_token=unk, pad_token=unk)
    else:
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
        )
        kwargs.update(
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
            model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        )
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


# --------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------

# Default LoRA targets per family. gpt2 names are Conv1D modules.
_ATTENTION_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
}
_ALL_LINEAR_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    # "dense" matches attention.output.dense, intermediate.dense,
    # output.dense and pooler.dense; the classifier is left alone.
    "bert": ["query", "key", "value", "dense"],
}
_EMBEDDING_MODULE = {"llama": "embed_tokens", "gpt2": "wte", "bert": "word_embeddings"}
# llama unties lm_head, so it can be saved whole. gpt2's lm_head is tied to
# wte, so saving it would silently untie the pair; ln_f (a LayerNorm) is used
# instead. bert's head is its classifier.
_SAVED_MODULE = {"llama": "lm_head", "gpt2": "ln_f", "bert": "classifier"}


def supported(family: str, variant: str) -> bool:
    """Whether ``variant`` makes sense for ``family``.

    Only ``lora_bias`` is excluded: it trains a bias on lora_B, which PEFT
    only allows where the base layer has a bias, and the llama attention
    projections have none.
    """
    _check_family(family)
    _check_variant(variant)
    return not (family == "llama" and variant == "lora_bias")


def lora_config(family: str, variant: str):
    """The ``peft.LoraConfig`` recipe of ``variant`` for ``family``.

    Raises ValueError for an unknown family/variant or an unsupported pair.
    """
    from peft import LoraConfig

    if not supported(family, variant):
        raise ValueError(
            f"variant {variant!r} is not supported for family {family!r}: "
            "lora_bias needs target layers with a bias, and llama's have none"
        )
    kwargs = {
        "r": _RANK,
        "lora_alpha": _ALPHA,
        "lora_dropout": 0.0,
        "target_modules": list(_ATTENTION_TARGETS[family]),
        # GPT-2's Conv1D stores weights as [in, out]; PEFT must be told.
        "fan_in_fan_out": family == "gpt2",
        # bert: no task type except for modules_to_save, because PEFT's
        # SEQ_CLS task silently adds the classifier to modules_to_save, and
        # the other variants are meant to be pure LoRA.
        "task_type": "CAUSAL_LM" if family != "bert" else None,
    }
    if variant == "rslora":
        kwargs["use_rslora"] = True  # scaling alpha/sqrt(r) instead of alpha/r
    elif variant == "patterns":
        kwargs.update(_patterns(family))
    elif variant == "lora_bias":
        kwargs["lora_bias"] = True
    elif variant == "dora":
        kwargs["use_dora"] = True
    elif variant == "modules_to_save":
        kwargs["modules_to_save"] = [_SAVED_MODULE[family]]
        if family == "bert":
            kwargs["task_type"] = "SEQ_CLS"
    elif variant == "embedding":
        kwargs["target_modules"] = [_EMBEDDING_MODULE[family]] + kwargs["target_modules"]
    elif variant == "all_linear":
        kwargs["target_modules"] = list(_ALL_LINEAR_TARGETS[family])
    return LoraConfig(**kwargs)


def _patterns(family: str) -> dict:
    """Per-module rank/alpha overrides; PEFT matches keys as name suffixes."""
    if family == "llama":
        return {
            "rank_pattern": {"v_proj": 4},
            "alpha_pattern": {"layers.1.self_attn.q_proj": 32},
        }
    if family == "gpt2":
        # attn.c_proj and mlp.c_proj share a name; only the first gets r=4.
        return {
            "target_modules": ["c_attn", "c_proj"],
            "rank_pattern": {"attn.c_proj": 4},
            "alpha_pattern": {"h.1.attn.c_attn": 64},
        }
    return {
        "rank_pattern": {"value": 4},
        "alpha_pattern": {"layer.1.attention.self.query": 32},
    }


def synthetic_batch(family: str, *, batch_size: int = 16, seq_len: int = 16, seed: int = 0) -> dict:
    """One batch of the family's built-in task, as model keyword arguments.

    Decoders (llama, gpt2): counting sequences ``s, s+1, s+2, ...`` (wrapping
    within a 32-id range) with ``labels = input_ids``, i.e. next-token
    prediction. bert: random sequences labelled 1 when they contain a marker
    id, else 0. Training uses seeds of 1,000,000 and up, so any smaller
    ``seed`` gives a held-out batch.
    """
    _check_family(family)
    gen = torch.Generator().manual_seed(seed)
    if family == "bert":
        ids = torch.randint(_TASK_FIRST_ID, _TASK_FIRST_ID + _TASK_SPAN, (batch_size, seq_len), generator=gen)
        labels = torch.arange(batch_size) % 2  # balanced classes
        positions = torch.randint(1, seq_len, (batch_size,), generator=gen)
        ids[labels == 1, positions[labels == 1]] = _BERT_MARKER_ID
        ids[:, 0] = 2  # [CLS]
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "token_type_ids": torch.zeros_like(ids),
            "labels": labels,
        }
    starts = torch.randint(0, _TASK_SPAN, (batch_size, 1), generator=gen)
    ids = _TASK_FIRST_ID + (starts + torch.arange(seq_len)) % _TASK_SPAN
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def train_adapter(
    base_dir,
    out_dir,
    *,
    variant: str = "plain",
    steps: int = _DEFAULT_STEPS,
    seed: int = 0,
) -> Path:
    """Train a LoRA ``variant`` on the base in ``base_dir`` and save it.

    The family comes from the base's config.json. The base is loaded in
    float32 whatever its saved dtype (training in half precision on CPU is
    slow and unstable). Since a float16/bfloat16 base from :func:`build_base`
    is the float32 base rounded, an adapter trained on the float32 base of a
    seed is valid for every dtype of that seed; it only depends on module
    names and shapes.

    ``out_dir`` receives exactly what ``PeftModel.save_pretrained`` writes
    (adapter_config.json, adapter_model.safetensors, README.md); nothing is
    altered afterwards. Returns ``out_dir`` as a Path.
    """
    family = family_of(base_dir)
    config = lora_config(family, variant)  # validates the pair before any work
    out = Path(out_dir)
    with _seeded(seed):
        model = _wrap(_load_base(family, base_dir), config)
        _fit(model, lambda step: synthetic_batch(family, seed=_batch_seed(seed, step)), steps, _LEARNING_RATE)
    model.save_pretrained(out)
    return out


def _batch_seed(seed: int, step: int) -> int:
    """Seed of the training batch of ``step``: a fresh batch every step, and
    never one of the small seeds (< 1,000,000) left for held-out batches."""
    return 1_000_000 * (seed + 1) + step


def family_of(base_dir) -> str:
    """The reference family of a checkpoint directory, from config.json."""
    config = json.loads((Path(base_dir) / "config.json").read_text())
    family = config.get("model_type")
    _check_family(family)
    return family


def _load_base(family: str, base_dir):
    """Load a reference base in float32."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if family == "bert" else AutoModelForCausalLM
    return auto.from_pretrained(base_dir, dtype=torch.float32)


def _wrap(model, config):
    """Wrap ``model`` with a fresh LoRA adapter (initialised from torch's RNG)."""
    from peft import get_peft_model

    return get_peft_model(model, config)


def _fit(model, make_batch, steps: int, lr: float) -> list[float]:
    """A plain AdamW loop over the trainable (adapter) parameters.

    ``make_batch(step)`` returns model keyword arguments including labels.
    Returns the loss of every step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**make_batch(step)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


# --------------------------------------------------------------------------


@contextmanager
def _seeded(seed: int):
    """Run a block from torch seed ``seed`` on one CPU thread, then restore
    the caller's random state and thread count.

    One thread because these matrices are tiny (extra threads only add
    synchronisation, badly so on a busy machine) and because the float
    results then do not depend on the machine's core count. The thread count
    is process-wide, so do not build references while another thread of the
    same process runs torch work.
    """
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _check_family(family) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def _check_variant(variant) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
