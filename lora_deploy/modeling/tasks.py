"""Which task a Hugging Face checkpoint serves and which inputs it takes, from its config alone.

No torch here: bench and the sample-input generator read configs without paying for it.
Names follow Optimum's ONNX exports so artifacts are interchangeable.
"""

from __future__ import annotations

import os
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
