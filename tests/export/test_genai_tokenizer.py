"""The genai folder's tokenizer, exercised as a user does: `export genai` of a merged checkpoint
whose tokenizer is a byte-level BPE (trained here, nothing downloaded), then onnxruntime-genai's
own og.Tokenizer encodes a prompt, og generates greedily and og decodes. Oracles: transformers'
tokenizer of the checkpoint and PEFT's unmerged greedy generate."""

from __future__ import annotations

import pytest
import torch

from lora_deploy.export.genai import export_genai
from lora_deploy.merge import merge
from tests.oracle import load_model, peft_model

N_NEW = 12
PROMPTS = ["hello the lazy fox", "lora adapters merge into the base, quickly"]
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny tokenizer for a tiny model",
    "lora adapters merge into the base model and ship as one graph",
]


def bpe_tokenizer():
    """A byte-level BPE (GPT-2's scheme, which onnxruntime-genai's tokenizer reads), ~300 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS * 10, trainer)
    special = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=special, eos_token=special, pad_token=special)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(base dir with the BPE tokenizer, a random non-zero LoRA adapter on q/v)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("genai-tokenizer")
    tokenizer = bpe_tokenizer()
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft = get_peft_model(model, lora)
    with torch.no_grad():  # large enough to change greedy tokens
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    peft.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


@pytest.mark.slow
def test_genai_folder_tokenizes_generates_and_decodes_like_transformers_and_peft(checkpoint, tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    from transformers import AutoTokenizer

    base, adapter = checkpoint
    merge(base, adapter, tmp_path / "merged")
    folder = tmp_path / "genai"
    export_genai(tmp_path / "merged", folder)
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()

    hf = AutoTokenizer.from_pretrained(base)
    unmerged, base_model = peft_model(base, adapter), load_model(base)
    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    changed = False
    for prompt in PROMPTS:
        ids = [int(t) for t in tokenizer.encode(prompt)]
        assert ids == hf(prompt)["input_ids"], prompt
        assert tokenizer.decode(ids) == hf.decode(ids) == prompt

        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + N_NEW, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens([ids])
        while not generator.is_done():
            generator.generate_next_token()
        got = [int(t) for t in generator.get_sequence(0)][len(ids) :]

        prompt_ids = torch.tensor([ids])
        with torch.no_grad():
            out = unmerged.generate(
                input_ids=prompt_ids, max_new_tokens=N_NEW, do_sample=False, eos_token_id=None, pad_token_id=0
            )
            plain = base_model.generate(
                input_ids=prompt_ids, max_new_tokens=N_NEW, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        want = out[0, len(ids) :].tolist()
        changed = changed or want != plain[0, len(ids) :].tolist()
        # og stops at the end-of-text token (PEFT was told not to): the same tokens up to there
        assert got == want[: len(got)] and (len(got) == N_NEW or got[-1] == hf.eos_token_id), (got, want)
        text = hf.decode(got)
        if "\ufffd" not in text:
            assert tokenizer.decode(got) == text
        # else: a random model's tokens can be stray bytes of a multi-byte character, which the two
        # render differently (og's decode ends the text at the invalid byte); the table below
        # compares every token that is text on its own.
    assert changed  # the adapter changes the tokens, so the comparison can fail
    # Every token that is text on its own decodes alike, but two: og renders <|endoftext|> and
    # the NUL byte as U+FFFD where transformers writes "<|endoftext|>" and "\x00".
    for token in set(range(len(hf))) - set(hf.all_special_ids):
        text = hf.decode([token])
        if "\ufffd" not in text and text != "\x00":
            assert tokenizer.decode([token]) == text, token
