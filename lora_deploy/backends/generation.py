"""What a greedy generator returns, whatever runs it (a KV-cache ONNX graph in ONNX Runtime,
an onnxruntime-genai folder, PEFT's `generate`).

A *generator* is any callable `gen(prompts, n_new) -> Generation`: `prompts` is a list of
token-id lists (lengths may differ: the generator left-pads them into one batch), and it
chooses `n_new` tokens per prompt greedily, never stopping early at an end-of-sequence
token. The type sits here, below proof/, so that backends can return it;
`lora_deploy.proof.generate` re-exports it and compares generations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from lora_deploy.errors import BadInputError


@dataclass
class Generation:
    """`tokens` int64 [batch, n_new]; `logits` float32 [batch, n_new, vocab]: at each step, the
    last position's logits from which that step's token was chosen."""

    tokens: np.ndarray
    logits: np.ndarray

    def __post_init__(self) -> None:
        self.tokens = np.asarray(self.tokens, dtype=np.int64)
        self.logits = np.asarray(self.logits, dtype=np.float32)
        if self.tokens.ndim != 2 or self.logits.ndim != 3 or self.logits.shape[:2] != self.tokens.shape:
            raise ValueError(
                f"Generation needs tokens [batch, n_new] and logits [batch, n_new, vocab]; "
                f"got {list(self.tokens.shape)} and {list(self.logits.shape)}"
            )


Generator = Callable[[list[list[int]], int], Generation]


def check_prompts(prompts: Sequence[Sequence[int]], n_new: int) -> list[list[int]]:
    """The prompts as lists of ints; a one-line BadInputError for an empty batch or prompt,
    or n_new < 1."""
    if n_new < 1:
        raise BadInputError(f"number of new tokens must be >= 1, got {n_new}")
    rows = [[int(t) for t in p] for p in prompts]
    if not rows or any(not p for p in rows):
        raise BadInputError("generation needs at least one prompt, each with at least one token")
    return rows


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int64 [batch, longest prompt], padded on the left so every
    row's next token follows its last column (how decoders generate in a batch)."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
    return ids, mask


def positions(mask: np.ndarray) -> np.ndarray:
    """Position ids of a left-padded mask: 0 at each row's first real token, counting up;
    padding gets 0 (any in-range value would do: it is masked), as transformers' `generate` does."""
    pos = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 0, pos).astype(np.int64)
