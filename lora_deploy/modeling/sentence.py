"""Sentence-transformers checkpoints: the pooled `sentence_embedding` beside `last_hidden_state`.

A sentence-transformers repository is an HF checkpoint plus `modules.json`, which lists
the pipeline `SentenceTransformer(dir).encode` runs: the Transformer (the checkpoint in
the same directory), a Pooling module (`1_Pooling/config.json`) and, often, Normalize.
Exports of the feature-extraction task add that pipeline's result as a second output,
`sentence_embedding`, as Optimum does.

Pooling follows sentence_transformers.models.Pooling for every mode it has (cls, max,
mean, mean_sqrt_len_tokens, weightedmean, lasttoken; several modes are concatenated in
the configured order), from the legacy `pooling_mode_*_tokens` flags or the newer
`pooling_mode` key. Pipelines with other modules (Dense, LayerNorm, a Transformer in a
subdirectory) are not reproduced: such checkpoints export `last_hidden_state` only.
Prompt exclusion (`include_prompt: false` with `encode(prompt=...)`) needs the prompt
length at run time, which the graph does not take: the whole sequence is pooled.

No torch at import: tasks and bench read configs without paying for it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_deploy.errors import BadInputError, CheckpointError
from lora_deploy.modeling.tasks import FEATURE_EXTRACTION

SENTENCE_EMBEDDING = "sentence_embedding"
MODULES_FILE = "modules.json"
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# sentence-transformers' legacy flags, in its concatenation order.
LEGACY_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True)
class SentencePooling:
    """Token embeddings [batch, sequence, hidden] + attention mask -> [batch, len(modes) * hidden]."""

    modes: tuple[str, ...]
    normalize: bool = False

    def __call__(self, hidden: Any, attention_mask: Any = None) -> Any:
        import torch

        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:-1], dtype=torch.int64, device=hidden.device)
        # Sums of half-precision values are taken in float32, as sentence-transformers does.
        wide = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
        vectors = [pool(mode, hidden, attention_mask, wide) for mode in self.modes]
        out = vectors[0] if len(vectors) == 1 else torch.cat(vectors, dim=-1)
        if self.normalize:
            out = torch.nn.functional.normalize(out, p=2, dim=-1)
        return out


def pool(mode: str, hidden: Any, attention_mask: Any, wide: Any) -> Any:
    """One pooling mode, as sentence-transformers computes it on a padded batch."""
    import torch

    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":  # the first real token (left padding skipped)
        first = attention_mask.to(torch.int32).argmax(dim=1)
        index = first.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
        return torch.gather(hidden, 1, index).squeeze(1)
    if mode == "max":
        return hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values
    if mode in ("mean", "mean_sqrt_len_tokens"):
        total = (hidden * mask).sum(dim=1, dtype=wide)
        count = torch.clamp(mask.sum(dim=1, dtype=wide), min=1e-9)
        return (total / (count if mode == "mean" else torch.sqrt(count))).to(hidden.dtype)
    if mode == "weightedmean":  # weights 1, 2, ... from the first real token
        weights = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=wide).view(1, -1, 1)
        weights = weights - attention_mask.to(torch.int32).argmax(dim=1).view(-1, 1, 1).to(wide)
        weighted = attention_mask.unsqueeze(-1).to(wide) * weights
        total = (hidden * weighted).sum(dim=1)
        return (total / torch.clamp(weighted.sum(dim=1), min=1e-9)).to(hidden.dtype)
    if mode == "lasttoken":  # the last real token (right padding skipped)
        seq = hidden.shape[1]
        values, flipped = attention_mask.to(torch.int32).flip(1).max(1)
        flipped = torch.where(values == 0, seq - 1, flipped)
        index = (seq - flipped - 1).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
        return torch.gather(hidden * mask, 1, index).squeeze(1)
    raise BadInputError(f"unknown pooling mode {mode!r}; expected one of {', '.join(POOLING_MODES)}")


def load_sentence_pooling(model_dir: str | os.PathLike) -> SentencePooling | None:
    """The pooling of a sentence-transformers checkpoint; None for a plain HF checkpoint,
    or one whose pipeline has modules other than Transformer, Pooling and Normalize."""
    directory = Path(model_dir)
    modules = read_json(directory / MODULES_FILE)
    if modules is None:
        return None
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise CheckpointError(f"{directory / MODULES_FILE}: expected a list of modules")
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        return None
    if str(modules[0].get("path", "")).strip("/.") != "":
        return None  # the transformer lives in a subdirectory, not in the exported checkpoint
    config_path = directory / str(modules[1].get("path", "")) / "config.json"
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: missing or not a JSON object (the Pooling module's config)")
    return SentencePooling(pooling_modes(config, config_path), normalize=len(kinds) == 3)


def pooling_modes(config: dict, where: Path) -> tuple[str, ...]:
    """The configured modes, in sentence-transformers' order; mean when none is set."""
    if "pooling_mode" in config:
        value = config["pooling_mode"]
        modes = (value,) if isinstance(value, str) else tuple(value or ())
    else:
        modes = tuple(mode for flag, mode in LEGACY_FLAGS.items() if config.get(flag))
    modes = modes or ("mean",)
    for mode in modes:
        if mode not in POOLING_MODES:
            raise BadInputError(f"{where}: unknown pooling mode {mode!r} (expected {', '.join(POOLING_MODES)})")
    return modes


def read_json(path: Path) -> Any:
    """A JSON file's value, None if it does not exist; CheckpointError if it cannot be read."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read it ({type(exc).__name__}: {exc})") from None


def pooling_for_task(model_dir: str | os.PathLike, task: str) -> SentencePooling | None:
    """The sentence pooling an export of `task` adds: feature-extraction only."""
    return load_sentence_pooling(model_dir) if task == FEATURE_EXTRACTION else None
