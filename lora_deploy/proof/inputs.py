"""The input sets verify runs its output checks on.

Always the generated set: deterministic random token ids (lora_deploy.modeling.samples),
which exercise every position and padding but are not text. With `--inputs FILE.npz`, a
golden set too: arrays the user saved from a real tokenizer (``np.savez(path,
**tokenizer(texts, padding=True, return_tensors="np"))``), so the checks also see the
token distribution the model will meet.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lora_deploy.arrays import int_range, ints_fit
from lora_deploy.backends.base import check_feed
from lora_deploy.errors import BadInputError
from lora_deploy.io.npz import read_npz
from lora_deploy.modeling.samples import check_input_size
from lora_deploy.modeling.tasks import ATTENTION_MASK, INPUT_IDS, TOKEN_TYPE_IDS, model_input_names, text_config

GENERATED = "generated"


@dataclass
class InputSet:
    """One feed the output checks run on, and the label its checks carry."""

    label: str
    feed: dict[str, np.ndarray]

    @property
    def mask(self) -> np.ndarray | None:
        return self.feed.get(ATTENTION_MASK)


def load_golden_inputs(path: str | os.PathLike, config: Any) -> InputSet:
    """Arrays from an .npz file, checked against the model's inputs (names, dtype, rank,
    one batch and sequence size for all) by the feed check every runner uses; token ids
    must be in the vocabulary, every row needs a real token, and the size must fit the
    model's positions and this machine's memory. The file is read by io.npz (never unpickled)."""
    path = Path(path)
    saved = read_npz(path)
    # Ids are checked as saved: a uint64 past int64's range would wrap negative in the cast.
    check_ids(path, {k: v for k, v in saved.items() if v.dtype.kind in "iu"}, text_config(config))
    for name, arr in saved.items():
        if arr.dtype.kind == "u" and not ints_fit(arr, np.int64):
            raise BadInputError(f"{path}: {name} holds {int_range(arr)[1]}, past int64 (the model takes int64)")
    # Tokenizers and users save int32 or int64 alike; the model takes int64.
    feed = {k: v.astype(np.int64) if v.dtype.kind in "iu" else v for k, v in saved.items()}
    metadata = {name: (np.int64, ("batch", "sequence")) for name in model_input_names(config)}
    try:
        check_feed(feed, metadata)
    except BadInputError as exc:
        raise BadInputError(f"{path}: {exc}") from None
    check_values(path, feed)
    batch, seq = feed[INPUT_IDS].shape  # [batch, sequence]: check_feed saw to it
    # Longer than the model's positions, or more than this machine holds: refused now, in one line.
    check_input_size(batch, seq, config, what=str(path), copies=2)
    return InputSet(path.name, feed)


def check_values(path: Path, feed: dict[str, np.ndarray]) -> None:
    """Values the model can take: an out-of-range id would fail deep inside torch (ids:
    check_ids, on the arrays as saved)."""
    mask = feed.get(ATTENTION_MASK)
    if mask is not None and mask.size:
        if not np.isin(mask, (0, 1)).all():
            raise BadInputError(f"{path}: {ATTENTION_MASK} must hold only 0 and 1")
        empty = np.flatnonzero(mask.reshape(mask.shape[0], -1).max(axis=1) == 0)
        if empty.size:
            raise BadInputError(f"{path}: {ATTENTION_MASK} row {int(empty[0])} has no real token")


def check_ids(path: Path, feed: dict[str, np.ndarray], config: Any) -> None:
    """Token ids (and token type ids) inside the model's vocabulary, reported as saved."""
    limits = {INPUT_IDS: getattr(config, "vocab_size", None), TOKEN_TYPE_IDS: getattr(config, "type_vocab_size", None)}
    for name, limit in limits.items():
        ids = feed.get(name)
        if ids is None or not ids.size or not limit:
            continue
        low, high = int_range(ids)
        if low < 0 or high >= limit:
            raise BadInputError(f"{path}: {name} holds ids from {low} to {high}, outside the model's 0..{limit - 1}")
