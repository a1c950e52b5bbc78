"""Which task a Hugging Face checkpoint serves and which inputs it takes, from its config alone.

No torch here: bench and the sample-input generator read configs without paying for it.
Names follow Optimum's ONNX exports so artifacts are interchangeable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_deploy.errors import BadInputError, CheckpointError
from lora_deploy.util import first_line

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
TOKEN_TYPE_IDS = "token_type_ids"

CAUSAL_LM = "causal-lm"
SEQUENCE_CLASSIFICATION = "sequence-classification"
TOKEN_CLASSIFICATION = "token-classification"
FEATURE_EXTRACTION = "feature-extraction"
AUTO = "auto"
TASKS = (CAUSAL_LM, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, FEATURE_EXTRACTION)
# Optimum's name for a decoder with its key/value cache as inputs and outputs. Not one of
# TASKS (the full-sequence exports): its graph has other inputs and outputs (kv_layout).
TEXT_GENERATION_WITH_PAST = "text-generation-with-past"
EXPORT_TASKS = (*TASKS, TEXT_GENERATION_WITH_PAST)

# Output names follow Optimum's exports.
TASK_OUTPUT = {
    CAUSAL_LM: "logits",
    SEQUENCE_CLASSIFICATION: "logits",
    TOKEN_CLASSIFICATION: "logits",
    FEATURE_EXTRACTION: "last_hidden_state",
}

# transformers auto class per task, looked up by name so importing this module
# stays cheap until a checkpoint is actually loaded.
AUTO_CLASS = {
    CAUSAL_LM: "AutoModelForCausalLM",
    SEQUENCE_CLASSIFICATION: "AutoModelForSequenceClassification",
    TOKEN_CLASSIFICATION: "AutoModelForTokenClassification",
    FEATURE_EXTRACTION: "AutoModel",
}

# Architecture-name suffixes, most specific first ("GPT2LMHeadModel" also ends in "Model").
_ARCH_SUFFIX_TASK = (
    ("ForCausalLM", CAUSAL_LM),
    ("LMHeadModel", CAUSAL_LM),
    ("ForSequenceClassification", SEQUENCE_CLASSIFICATION),
    ("ForTokenClassification", TOKEN_CLASSIFICATION),
)


def load_config(model_dir: str | os.PathLike) -> Any:
    """Load config.json of a checkpoint directory, with one-line errors."""
    from transformers import AutoConfig

    directory = Path(model_dir)
    if not directory.is_dir():
        raise BadInputError(f"model directory not found: {directory}")
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"no config.json in {directory}")
    try:
        return AutoConfig.from_pretrained(directory)
    except (ValueError, KeyError) as err:
        # transformers says "...has model type `x` but Transformers does not recognize..."
        raise BadInputError(f"unsupported architecture in {directory / 'config.json'}: {first_line(err)}") from err
    except OSError as err:
        raise CheckpointError(f"cannot read {directory / 'config.json'}: {first_line(err)}") from err
    except RecursionError:
        raise CheckpointError(f"{directory / 'config.json'}: corrupt config (JSON nested too deeply)") from None


def detect_task(config: Any) -> str:
    """Infer the export task from ``config.architectures``.

    ``...ForCausalLM`` / ``...LMHeadModel`` -> causal-lm,
    ``...ForSequenceClassification`` -> sequence-classification,
    ``...ForTokenClassification`` -> token-classification, a bare
    ``...Model`` (BertModel, LlamaModel) -> feature-extraction.
    """
    archs = list(getattr(config, "architectures", None) or [])
    if not archs:
        raise BadInputError("config.json lists no architectures; pass an explicit --task")
    arch = archs[0]
    for suffix, task in _ARCH_SUFFIX_TASK:
        if arch.endswith(suffix):
            return task
    if _is_bare_model(arch):
        return FEATURE_EXTRACTION
    raise BadInputError(f"cannot infer a task from architecture {arch}; pass --task (one of {', '.join(TASKS)})")


def resolve_task(task: str, config: Any) -> str:
    """Return a concrete task: detect it for "auto", validate it otherwise."""
    if task == AUTO:
        return detect_task(config)
    if task == TEXT_GENERATION_WITH_PAST:
        raise BadInputError(
            f"task {task} (the key/value cache as inputs and outputs) is exported by lora_deploy.export."
            "export_generation / export_generation_adapters and checked by verify --generate N"
        )
    if task not in TASKS:
        raise BadInputError(f"unknown task {task!r}; expected auto or one of {', '.join(TASKS)}")
    return task


def _is_bare_model(arch: str) -> bool:
    """BertModel, LlamaModel: yes. BertForMaskedLM, GPT2DoubleHeadsModel: no."""
    return arch.endswith("Model") and "For" not in arch and not arch.endswith(("HeadModel", "HeadsModel"))


def model_input_names(config: Any) -> list[str]:
    """Return the ONNX input names a Hugging Face model family takes.

    Every supported model takes ``input_ids`` and ``attention_mask``.
    ``token_type_ids`` is added when the config has ``type_vocab_size >= 2``:
    that is how BERT, ALBERT, ELECTRA and friends are built, while RoBERTa
    (``type_vocab_size == 1``) and decoders (no such field) do not use it. This
    matches which models Optimum exports with ``token_type_ids``.
    """
    if getattr(config, "is_encoder_decoder", False):
        raise BadInputError(f"encoder-decoder models ({getattr(config, 'model_type', '?')}) are not supported")
    names = [INPUT_IDS, ATTENTION_MASK]
    if (getattr(text_config(config), "type_vocab_size", 0) or 0) >= 2:
        names.append(TOKEN_TYPE_IDS)
    return names


def text_config(config: Any) -> Any:
    """The text part of a multimodal config; the config itself otherwise."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


# ------------------------------------------------------------ key/value cache

POSITION_IDS = "position_ids"
LOGITS = "logits"
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
# Dim names of a KV-cache graph (Optimum's meaning): new tokens, cached tokens, both.
BATCH_DIM, SEQUENCE_DIM, PAST_DIM, TOTAL_DIM = "batch", "sequence", "past_sequence", "total_sequence"

# model_type -> the config attribute its families use for the cache's head count when it
# has fewer key/value heads than query heads (GQA); None: as many as attention heads.
# Families here are exported and checked against transformers' cached forward (tests);
# any other is refused in one line, never exported untested.
KV_CACHE_FAMILIES = {"llama": "num_key_value_heads", "gpt2": None}


@dataclass(frozen=True)
class KvLayout:
    """The cache of a decoder: `layers` x (key, value) of [batch, kv_heads, past, head_size]."""

    layers: int
    kv_heads: int
    head_size: int
    position_ids: bool  # the graph takes position_ids (left padding needs them)

    @property
    def input_names(self) -> list[str]:
        """The model inputs, then the past key/values: input_ids, attention_mask, position_ids, past..."""
        return [INPUT_IDS, ATTENTION_MASK] + ([POSITION_IDS] if self.position_ids else []) + self.past_names

    @property
    def past_names(self) -> list[str]:
        return [f"{PAST_PREFIX}{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"{PRESENT_PREFIX}{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    @property
    def output_names(self) -> list[str]:
        return [LOGITS] + self.present_names

    def to_dict(self) -> dict:
        return {
            "layers": self.layers,
            "kv_heads": self.kv_heads,
            "head_size": self.head_size,
            "position_ids": self.position_ids,
        }


def kv_layout(config: Any) -> KvLayout:
    """The cache layout of a decoder checkpoint's config; BadInputError for a family the
    KV-cache export does not handle (KV_CACHE_FAMILIES) or a config that is not a decoder."""
    text = text_config(config)
    family = getattr(text, "model_type", None)
    if family not in KV_CACHE_FAMILIES:
        supported = ", ".join(sorted(KV_CACHE_FAMILIES))
        raise BadInputError(
            f"--task {TEXT_GENERATION_WITH_PAST}: model family {family!r} is not supported by the KV-cache export "
            f"(supported: {supported})"
        )
    heads = int(text.num_attention_heads)
    kv_attr = KV_CACHE_FAMILIES[family]
    kv_heads = int(getattr(text, kv_attr, None) or heads) if kv_attr else heads
    head_size = getattr(text, "head_dim", None) or text.hidden_size // heads
    return KvLayout(int(text.num_hidden_layers), kv_heads, int(head_size), position_ids=True)
