"""Deterministic sample inputs for export checks, parity checks and benchmarks.

Every array comes from a seeded ``numpy.random.Generator``, so the same
(spec, batch, seq, seed) always gives the same bytes on any machine. That is
what lets an export check, a verify run and a benchmark talk about "the same
inputs" without shipping them around.

Two kinds of spec are accepted:

* a Hugging Face config (or a checkpoint directory holding ``config.json``):
  the input names come from :func:`model_input_names` and token ids stay
  inside the vocabulary;
* an input-metadata dict as returned by ``Runner.input_metadata()``:
  ``{name: (numpy dtype or None, shape)}`` where a shape entry is an int for a
  fixed dim and a str for a dynamic one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from lora_deploy.errors import BadInputError
from lora_deploy.modeling.tasks import (
    ATTENTION_MASK,
    INPUT_IDS,
    TOKEN_TYPE_IDS,
    load_config,
    model_input_names,
    text_config,
)

# Used for ``input_ids`` when only a metadata dict is given (no config, so no
# vocabulary size): every real vocabulary is at least this big.
DEFAULT_VOCAB_SIZE = 100


def sample_inputs(
    input_specs_or_config: Any,
    batch: int = 2,
    seq: int = 16,
    seed: int = 0,
    *,
    vocab_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Build deterministic inputs for a model.

    ``input_specs_or_config`` is a transformers config, a checkpoint directory,
    or a ``{name: (dtype, shape)}`` metadata dict (see the module docstring).
    Dynamic dims whose name contains "batch" become ``batch``; every other
    dynamic dim becomes ``seq``.

    For token models: ``input_ids`` are int64 in ``[0, vocab)``; the
    ``attention_mask`` is all ones except that row 1 (when ``batch > 1``) has
    its last quarter padded. Padding is on the right and at least one real
    token is kept, so every query position can attend to some real key and
    decoders stay finite (left padding would leave fully masked rows).
    Padded positions hold the pad token id, and real positions never do,
    because some heads (e.g. LlamaForSequenceClassification) find the last
    real token by looking for the pad id.
    """
    if batch < 1 or seq < 1:
        raise BadInputError(f"batch and seq must be >= 1, got batch={batch} seq={seq}")
    rng = np.random.default_rng(seed)
    if isinstance(input_specs_or_config, Mapping):
        return _from_metadata(input_specs_or_config, batch, seq, rng, vocab_size)
    config = _as_config(input_specs_or_config)
    text = text_config(config)
    vocab = vocab_size or getattr(text, "vocab_size", None)
    if not vocab:
        raise BadInputError("config has no vocab_size; pass vocab_size=")
    pad_id = getattr(text, "pad_token_id", None)
    specs = {name: (np.dtype(np.int64), ("batch", "sequence")) for name in model_input_names(config)}
    return _from_metadata(specs, batch, seq, rng, int(vocab), pad_id=pad_id)


def sample_prompts(config: Any, lengths: list[int] | tuple[int, ...], seed: int = 0) -> list[list[int]]:
    """Deterministic prompts for generation checks: one list of token ids per length, ids in
    the vocabulary and never the pad id (padding is the generator's business)."""
    if not lengths or min(lengths) < 1:
        raise BadInputError(f"prompt lengths must be >= 1, got {list(lengths)}")
    text = text_config(_as_config(config))
    vocab = int(getattr(text, "vocab_size", 0) or DEFAULT_VOCAB_SIZE)
    rng = np.random.default_rng(seed)
    pad_id = getattr(text, "pad_token_id", None)
    ones = np.ones((1, max(lengths)), dtype=np.int64)
    return [_token_ids(rng, (1, n), vocab, pad_id, ones[:, :n])[0].tolist() for n in lengths]


def _from_metadata(
    specs: Mapping[str, Any],
    batch: int,
    seq: int,
    rng: np.random.Generator,
    vocab_size: int | None,
    pad_id: int | None = None,
) -> dict[str, np.ndarray]:
    """Fill every input of a metadata dict, in the dict's order."""
    feed: dict[str, np.ndarray] = {}
    # The mask is built first so input_ids can put pad ids where it is 0.
    mask = _attention_mask(batch, seq)
    for name, spec in specs.items():
        dtype, shape = _unpack_spec(name, spec)
        dims = tuple(_resolve_dim(d, batch, seq) for d in shape)
        if name == ATTENTION_MASK:
            # A mask of any other shape cannot be padded meaningfully: all ones.
            value = mask if dims == mask.shape else np.ones(dims, dtype=np.int64)
            feed[name] = value.astype(dtype or np.int64)
        elif name == INPUT_IDS:
            vocab = vocab_size or DEFAULT_VOCAB_SIZE
            feed[name] = _token_ids(rng, dims, vocab, pad_id, mask).astype(dtype or np.int64)
        elif name == TOKEN_TYPE_IDS:
            feed[name] = _token_types(dims).astype(dtype or np.int64)
        else:
            feed[name] = _generic(rng, dims, dtype)
    return feed


def _attention_mask(batch: int, seq: int) -> np.ndarray:
    """Ones, with right padding on row 1 so masking is exercised."""
    mask = np.ones((batch, seq), dtype=np.int64)
    if batch > 1 and seq > 1:
        pad = max(1, seq // 4)
        pad = min(pad, seq - 1)  # keep one real token: fully masked rows go NaN
        mask[1, seq - pad :] = 0
    return mask


def _token_ids(
    rng: np.random.Generator,
    dims: tuple[int, ...],
    vocab: int,
    pad_id: int | None,
    mask: np.ndarray,
) -> np.ndarray:
    """Random ids in range; pad id only where the mask is 0."""
    if pad_id is None or not 0 <= pad_id < vocab or vocab < 2:
        return rng.integers(0, vocab, size=dims, dtype=np.int64)
    # Draw from vocab-1 values and skip over pad_id so it never appears by chance.
    ids = rng.integers(0, vocab - 1, size=dims, dtype=np.int64)
    ids[ids >= pad_id] += 1
    if ids.shape == mask.shape:
        ids[mask == 0] = pad_id
    return ids


def _token_types(dims: tuple[int, ...]) -> np.ndarray:
    """Segment 0 for the first half of each row, 1 for the rest (a sentence pair)."""
    types = np.zeros(dims, dtype=np.int64)
    if len(dims) == 2 and dims[1] > 1:
        types[:, dims[1] // 2 :] = 1
    return types


def _generic(rng: np.random.Generator, dims: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Standard normal floats, small ints, or random bools for any other input."""
    dtype = np.dtype(dtype or np.float32)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=dims).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 2, size=dims).astype(dtype)
    return rng.standard_normal(size=dims).astype(dtype)


def _unpack_spec(name: str, spec: Any) -> tuple[Any, tuple]:
    """Accept (dtype, shape) pairs; shape None means a (batch, seq) matrix."""
    try:
        dtype, shape = spec
    except (TypeError, ValueError) as err:
        raise BadInputError(f"input spec for {name!r} must be (dtype, shape), got {spec!r}") from err
    if shape is None:
        shape = ("batch", "sequence")
    return dtype, tuple(shape)


def _resolve_dim(dim: Any, batch: int, seq: int) -> int:
    """Map a symbolic dim to batch or seq; keep fixed ints."""
    if isinstance(dim, (int, np.integer)) and dim >= 0:
        return int(dim)
    if isinstance(dim, str) and "batch" in dim.lower():
        return batch
    return seq


def _as_config(obj: Any) -> Any:
    """Return a transformers config for a config object or a checkpoint path."""
    if isinstance(obj, (str, Path)):
        return load_config(obj)
    if not hasattr(obj, "model_type"):
        raise BadInputError(
            f"expected a transformers config, a checkpoint dir or an input-spec dict, got {type(obj).__name__}"
        )
    return obj


# ---------------------------------------------------------------- sizes

# Config keys, as transformers families spell them.
_POSITION_KEYS = ("max_position_embeddings", "n_positions")
_HEAD_KEYS = ("num_attention_heads", "n_head")
_WIDTH_KEYS = ("hidden_size", "n_embd", "d_model")
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def forward_bytes(batch: int, seq: int, *, heads: int = 1, width: int = 0, token_inputs: int = 3) -> int:
    """A lower bound on the memory one forward pass over (batch, seq) tokens needs: the
    int64 token inputs, one float32 attention-score matrix per head and row (eager
    attention and ONNX Runtime on CPU both build it), and float32 hidden states `width`
    wide (a language-model head's logits are wider still)."""
    tokens = batch * seq
    return tokens * 8 * token_inputs + batch * heads * seq * seq * 4 + tokens * width * 4


def memory_limit() -> int | None:
    """Bytes this process can have at most: physical memory, or a smaller cgroup limit."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # not a POSIX system
        pass
    for path in _CGROUP_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    return min(limits) if limits else None


def check_input_size(
    batch: int, seq: int, config: Any = None, *, what: str = "inputs", copies: int = 1, where: str = "config.json"
) -> None:
    """Refuse, early and in one line, inputs the model cannot take or this machine cannot hold.

    `config` (a config.json dict or a transformers config, or None) bounds `seq` by the
    model's positions (max_position_embeddings / n_positions) and sizes the estimate;
    `copies` is how many forward passes' memory are held at once. What is refused would
    otherwise end in a MemoryError, or the kernel's OOM killer, minutes later.
    """
    text = text_config(config) if config is not None and not isinstance(config, Mapping) else config
    if isinstance(text, Mapping) and isinstance(text.get("text_config"), Mapping):
        text = text["text_config"]
    positions = _config_int(text, _POSITION_KEYS)
    if positions is not None and seq > positions:
        raise BadInputError(
            f"{what}: sequence length {seq} is longer than the model's {positions} positions "
            f"({next(k for k in _POSITION_KEYS if _config_int(text, (k,)) is not None)} in {where})"
        )
    estimate = copies * forward_bytes(
        batch, seq, heads=_config_int(text, _HEAD_KEYS) or 1, width=_config_int(text, _WIDTH_KEYS) or 0
    )
    limit = memory_limit()
    if limit is not None and estimate > limit:
        raise BadInputError(
            f"{what}: batch {batch} x sequence {seq} needs at least {_gigabytes(estimate)} of memory "
            f"(token inputs, attention scores, hidden states); this machine has {_gigabytes(limit)}"
        )


def read_config_dict(path: str | os.PathLike) -> dict | None:
    """config.json as a plain dict, or None when it is missing or unreadable (its own
    loader reports that, in one line, where the config is needed)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _config_int(config: Any, keys: tuple[str, ...]) -> int | None:
    """The first of `keys` that config holds as a positive int (dict or attribute)."""
    for key in keys:
        value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _gigabytes(n: int) -> str:
    return f"{n / 1e9:,.1f} GB"
