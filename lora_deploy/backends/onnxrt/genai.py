"""Greedy generation through onnxruntime-genai: a generator (lora_deploy.backends.generation)
over a model folder (`lora-deploy export genai`, or any folder with a genai_config.json).

onnxruntime-genai 0.18 runs the model, its KV cache and its greedy search; three of its
rules decide how a batch is fed (each checked against transformers' `generate` on the
reference LLaMA, tests/backends/test_genai.py):

- Padding goes on the right. Its prompt attention mask is `input_ids != pad_token_id`, and
  its GroupQueryAttention graphs take each row's length from that mask counted from the
  first column, so a left-padded row would be read as if the padding were its start.
  Right-padded, each row's positions start at 0, as transformers' left-padded rows do.
- A prompt token equal to pad_token_id would be masked as padding, and a row stops for good
  at eos_token_id, while a generator returns exactly n_new tokens per prompt. So each run
  overlays (og.Config.overlay) one *sentinel* id as both pad and eos: an id in no prompt and
  not chosen by an earlier run. If the greedy search chooses it after all, the run is
  repeated with another sentinel; tokens and logits are never edited.
- With batch > 1 the prompt can be appended once only, so the tokens are the search's own
  greedy choices (generate_next_token, sampling off, no penalties), and the logits are what
  get_logits() holds before each choice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lora_deploy.backends.generation import Generation, check_prompts
from lora_deploy.backends.onnxrt.genai_folder import GENAI_CONFIG, read_genai_config
from lora_deploy.errors import AdapterError, BadInputError, InternalError
from lora_deploy.util import first_line

GENAI_INSTALL = "pip install 'lora-deploy[genai]'"
# Where the builder puts a PEFT LoRA module: PEFT module path (of the *ForCausalLM) -> the
# builder's MatMul node path. Its weights are the node path, "/" as ".", with lora_A/lora_B
# before "MatMul" and ".weight" after: /model/layers.0/attn/q_proj/MatMul ->
# model.layers.0.attn.q_proj.lora_A.MatMul.weight. LLaMA-family decoders (Llama, Mistral,
# Qwen2/3, ...): their HF module paths are these.
LORA_NAMES = (
    ("model.layers.{i}.self_attn.q_proj", "/model/layers.{i}/attn/q_proj"),
    ("model.layers.{i}.self_attn.k_proj", "/model/layers.{i}/attn/k_proj"),
    ("model.layers.{i}.self_attn.v_proj", "/model/layers.{i}/attn/v_proj"),
    ("model.layers.{i}.self_attn.o_proj", "/model/layers.{i}/attn/o_proj"),
    ("model.layers.{i}.mlp.gate_proj", "/model/layers.{i}/mlp/gate_proj"),
    ("model.layers.{i}.mlp.up_proj", "/model/layers.{i}/mlp/up_proj"),
    ("model.layers.{i}.mlp.down_proj", "/model/layers.{i}/mlp/down_proj"),
)
# Sentinels tried per call before giving up (each retry avoids every token chosen so far).
SENTINEL_TRIES = 8
# Greedy, as transformers' generate(do_sample=False) with no logits processors.
GREEDY = {
    "do_sample": False,
    "num_beams": 1,
    "temperature": 1.0,
    "top_k": 1,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "min_length": 0,
}


def import_genai():
    """The onnxruntime_genai module, or a one-line BadInputError (exit 2) naming the extra."""
    try:
        import onnxruntime_genai
    except ImportError as exc:
        raise BadInputError(f"onnxruntime-genai is not installed: {GENAI_INSTALL} ({first_line(exc, 120)})") from None
    return onnxruntime_genai


def token_ids(value) -> set[int]:
    """An id or a list of ids from genai_config.json (eos_token_id may be either)."""
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, list) else {int(value)}


class GenaiGenerator:
    """`gen(prompts, n_new) -> Generation` over an onnxruntime-genai model folder.

    With `adapter_file` (an .onnx_adapter), it is loaded under `adapter_name` (default: the
    file's stem) and active on every run; without, the model runs with no adapter active.
    provider="cpu" runs on the CPU whatever genai_config.json names (an fp16 folder built
    for CUDA included); None keeps the folder's providers.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        adapter_file: str | os.PathLike | None = None,
        adapter_name: str | None = None,
        *,
        provider: str | None = "cpu",
    ):
        self.og = import_genai()
        self.model_dir = Path(model_dir)
        model = read_genai_config(self.model_dir)["model"]
        self.vocab_size = int(model["vocab_size"])
        self.context = int(model.get("context_length") or 0)
        if adapter_file is not None and not Path(adapter_file).is_file():
            raise AdapterError(f"{adapter_file}: adapter file not found")
        self.adapter_file = None if adapter_file is None else Path(adapter_file)
        self.adapter_name = adapter_name or (self.adapter_file.stem if self.adapter_file else None)
        if provider not in ("cpu", None):
            raise BadInputError(f"provider must be 'cpu' or None (the folder's own), got {provider!r}")
        self.provider = provider
        # Never a sentinel: the folder's own special tokens, and every token a run has chosen.
        self.avoid = token_ids(model.get("eos_token_id")) | token_ids(model.get("pad_token_id"))
        self.avoid |= token_ids(model.get("bos_token_id"))
        self._loaded: tuple[int, object, object] | None = None  # (sentinel, og.Model, og.Adapters)
        self.load(self.sentinel(set()))  # a folder that does not load fails here, not mid-verify

    def __call__(self, prompts: Sequence[Sequence[int]], n_new: int) -> Generation:
        rows = check_prompts(prompts, n_new)
        width = max(len(p) for p in rows)
        if self.context and width + n_new > self.context:
            raise BadInputError(
                f"generate: a prompt of {width} tokens plus {n_new} new tokens is longer than the "
                f"{self.context} positions of {self.model_dir / GENAI_CONFIG}"
            )
        used = {t for p in rows for t in p}
        outside = sorted(t for t in used if not 0 <= t < self.vocab_size)
        if outside:
            raise BadInputError(f"generate: token id {outside[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        for _ in range(SENTINEL_TRIES):
            sentinel = self.sentinel(used)
            result = self.run(sentinel, rows, n_new)
            if result is not None:
                return result
        raise InternalError(f"{self.model_dir}: greedy search chose each of {SENTINEL_TRIES} sentinel ids tried")

    def sentinel(self, used: set[int]) -> int:
        """The highest id in no prompt and not to be avoided (the previous one when it still fits)."""
        if self._loaded is not None and self._loaded[0] not in used | self.avoid:
            return self._loaded[0]
        for candidate in range(self.vocab_size - 1, -1, -1):
            if candidate not in used and candidate not in self.avoid:
                return candidate
        raise BadInputError(f"generate: the prompts use every id of the {self.vocab_size}-token vocabulary")

    def load(self, sentinel: int) -> tuple[object, object]:
        """og.Model with the sentinel as pad and eos (reloaded only when the sentinel changes),
        and its og.Adapters with the adapter file loaded."""
        if self._loaded is not None and self._loaded[0] == sentinel:
            return self._loaded[1], self._loaded[2]
        og = self.og
        try:
            config = og.Config(str(self.model_dir))
            if self.provider == "cpu":
                config.clear_providers()
            config.overlay(json.dumps({"model": {"pad_token_id": sentinel, "eos_token_id": sentinel}}))
            model = og.Model(config)
        except Exception as exc:  # onnxruntime-genai raises RuntimeError for every kind of failure
            raise BadInputError(
                f"{self.model_dir}: onnxruntime-genai cannot load it ({first_line(exc, 300)})"
            ) from None
        adapters = None
        if self.adapter_file is not None:
            adapters = og.Adapters(model)
            try:
                adapters.load(str(self.adapter_file), self.adapter_name)
            except Exception as exc:
                raise AdapterError(
                    f"{self.adapter_file}: onnxruntime-genai cannot load it into {self.model_dir} "
                    f"({first_line(exc, 300)})"
                ) from None
        self._loaded = (sentinel, model, adapters)
        return model, adapters

    def run(self, sentinel: int, rows: list[list[int]], n_new: int) -> Generation | None:
        """One batched greedy run; None when the search chose the sentinel (then avoided)."""
        og = self.og
        model, adapters = self.load(sentinel)
        width = max(len(p) for p in rows)
        ids = np.full((len(rows), width), sentinel, dtype=np.int32)
        for row, prompt in enumerate(rows):
            ids[row, : len(prompt)] = prompt  # right padding: see the module docstring
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=width + n_new, batch_size=len(rows), **GREEDY)
        generator = og.Generator(model, params)
        if adapters is not None:
            generator.set_active_adapter(adapters, self.adapter_name)
        tokens = np.zeros((len(rows), n_new), dtype=np.int64)
        logits = np.zeros((len(rows), n_new, self.vocab_size), dtype=np.float32)
        try:
            generator.append_tokens(ids)
            for step in range(n_new):
                logits[:, step] = np.asarray(generator.get_logits(), dtype=np.float32).reshape(len(rows), -1)
                generator.generate_next_token()
                tokens[:, step] = np.asarray(generator.get_next_tokens()).reshape(len(rows))
        except Exception as exc:
            raise BadInputError(
                f"{self.model_dir}: onnxruntime-genai failed to generate ({first_line(exc, 300)})"
            ) from None
        finally:
            del generator
        chosen = {int(t) for t in np.unique(tokens)}
        if sentinel in chosen:
            self.avoid |= chosen
            return None
        return Generation(tokens, logits)


def genai_generator(
    model_dir: str | os.PathLike,
    adapter_file: str | os.PathLike | None = None,
    adapter_name: str | None = None,
    *,
    provider: str | None = "cpu",
) -> GenaiGenerator:
    """A greedy generator over an onnxruntime-genai folder (see GenaiGenerator)."""
    return GenaiGenerator(model_dir, adapter_file, adapter_name, provider=provider)
