"""A decoder with its key/value cache as flat tensors: what a KV-cache ONNX graph computes.

transformers 5 passes the cache as a `DynamicCache` object (the forward's `cache=`
argument); an exported graph takes and returns plain tensors. `forward_with_cache` builds
the cache from the flat past tensors inside the traced function and flattens the
updated cache again, so torch.export sees tensors only (the torch 2.13 dynamo exporter
traces the DynamicCache's concatenations like any other op). A past length of 0 (the
prefill step) runs through the same graph.

Inputs and outputs follow Optimum's names (modeling.tasks.KvLayout): input_ids
[batch, sequence], attention_mask [batch, past + sequence], position_ids [batch,
sequence], past_key_values.{i}.key/.value [batch, kv_heads, past, head_size] -> logits
[batch, sequence, vocab], present.{i}.key/.value [batch, kv_heads, past + sequence,
head_size].
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from lora_deploy.errors import ExportError
from lora_deploy.modeling.hf import load_for_task
from lora_deploy.modeling.tasks import CAUSAL_LM, TEXT_GENERATION_WITH_PAST, KvLayout, kv_layout, load_config


def forward_with_cache(
    model: nn.Module, layout: KvLayout, inputs: Sequence[torch.Tensor], past: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """(logits, present.0.key, present.0.value, ...) for the model inputs (input_ids,
    attention_mask[, position_ids]) and the flat past (key, value per layer)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i in range(layout.layers):
        cache.update(past[2 * i], past[2 * i + 1], i)
    named = dict(zip(["input_ids", "attention_mask", "position_ids"], inputs))
    out = model(**named, cache=cache, use_cache=True, return_dict=True)
    present = getattr(out, "cache", None)
    if present is None:
        present = out.past_key_values
    flat: list[torch.Tensor] = []
    for layer in present.layers:
        flat += [layer.keys, layer.values]
    if len(flat) != 2 * layout.layers:
        raise ExportError(f"the model returned {len(flat) // 2} cache layers, expected {layout.layers}")
    return (out.logits, *flat)


class KvCacheWrapper(nn.Module):
    """The decoder called with flat past tensors; `forward(inputs, past)` takes two lists
    (the model inputs, then the past key/values in KvLayout order)."""

    PARAM_PREFIX = "model."  # the model's attribute: export strips it from initializer names
    task = TEXT_GENERATION_WITH_PAST

    def __init__(self, model: nn.Module, layout: KvLayout):
        super().__init__()
        self.model = model
        self.layout = layout
        self.input_names = layout.input_names
        self.output_names = layout.output_names

    def forward(self, inputs: list[torch.Tensor], past: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return forward_with_cache(self.model, self.layout, inputs, past)


def load_decoder(model_dir: str | os.PathLike, dtype: str | torch.dtype = "float32") -> tuple[nn.Module, KvLayout]:
    """A causal LM checkpoint (as every export loads it: eval, eager attention) and its
    cache layout; BadInputError for a family the KV-cache export does not handle, before
    any weight is read."""
    layout = kv_layout(load_config(model_dir))
    return load_for_task(model_dir, CAUSAL_LM, dtype), layout


def example_cache_inputs(
    model: nn.Module, layout: KvLayout, batch: int, seq: int, past: int, seed: int = 0, dtype=torch.float32
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Inputs of one cached step: `seq` new tokens after `past` cached ones, row 1 (when
    batch > 1) left-padded by a quarter of the total, as a batched generation has it."""
    gen = torch.Generator().manual_seed(seed)
    vocab = int(model.config.get_text_config().vocab_size)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    if batch > 1 and past + seq > 1:
        pad = min(max(1, (past + seq) // 4), past + seq - 1)
        mask[1, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    inputs = [ids, mask] + ([positions] if layout.position_ids else [])
    cache = [
        torch.randn(batch, layout.kv_heads, past, layout.head_size, generator=gen).to(dtype)
        for _ in range(2 * layout.layers)
    ]
    return inputs, cache
