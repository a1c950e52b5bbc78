"""The onnxruntime-genai generator against PEFT's unmerged `generate` (the oracle): a merged
folder generates base + adapter's tokens, a dynamic folder with an adapter file active that
adapter's, and with none the base's; on a padded batch, and on prompts holding the model's
pad/eos id (which onnxruntime-genai would otherwise mask or stop at)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from lora_deploy.backends.onnxrt.genai import genai_generator, import_genai
from lora_deploy.backends.onnxrt.genai_folder import read_genai_config
from lora_deploy.compare import tolerance
from lora_deploy.errors import BadInputError
from lora_deploy.proof.generate import reference_generation

N_NEW = 8
# Different lengths (a padded batch); ids 1 and 2 are the reference LLaMA's bos and eos/pad.
PROMPTS = [[1, 20, 21, 2, 22, 23, 24, 25, 26], [1, 30, 31], [1, 2, 40, 41, 42], [2, 17, 18, 19]]


def assert_same(got, want):
    tol = tolerance("float32")
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logits, want.logits, atol=tol.atol, rtol=tol.rtol)


def test_merged_folder_generates_pefts_tokens(genai_folder):
    folder, base, (adapter,) = genai_folder("merged")
    got = genai_generator(folder)(PROMPTS, N_NEW)
    want = reference_generation(base, adapter, PROMPTS, N_NEW)
    assert_same(got, want)
    assert not np.array_equal(want.tokens, reference_generation(base, None, PROMPTS, N_NEW).tokens)


@pytest.mark.parametrize("which", [0, 1], ids=["all_linear", "patterns"])
def test_dynamic_folder_with_each_adapter_active(genai_folder, which):
    folder, base, adapters = genai_folder("dynamic")
    adapter = adapters[which]
    got = genai_generator(folder, folder / f"{adapter.name}.onnx_adapter")(PROMPTS, N_NEW)
    assert_same(got, reference_generation(base, adapter, PROMPTS, N_NEW))


def test_dynamic_folder_with_no_adapter_is_the_base(genai_folder):
    folder, base, _ = genai_folder("dynamic")
    assert_same(genai_generator(folder)(PROMPTS, N_NEW), reference_generation(base, None, PROMPTS, N_NEW))


def test_generation_goes_on_past_eos(genai_folder):
    """The base chooses eos (2) right after this prompt and then again; each step's token and
    logits are checked against transformers' forward over the whole sequence so far."""
    import torch

    from lora_deploy.modeling.hf import load_for_task

    folder, base, _ = genai_folder("dynamic")
    prompt = [2, 17, 18, 19, 2]
    got = genai_generator(folder)([prompt], N_NEW)
    assert got.tokens[0, 0] == 2
    model = load_for_task(base, "causal-lm", "float32")
    sequence = torch.tensor([prompt + got.tokens[0].tolist()])
    with torch.no_grad():
        logits = model(input_ids=sequence).logits[0, len(prompt) - 1 : -1].numpy()
    np.testing.assert_array_equal(got.tokens[0], logits.argmax(-1))
    tol = tolerance("float32")
    np.testing.assert_allclose(got.logits[0], logits, atol=tol.atol, rtol=tol.rtol)


def test_a_sentinel_the_search_chooses_is_replaced(genai_folder):
    folder, base, (adapter,) = genai_folder("merged")
    generator = genai_generator(folder)
    want = reference_generation(base, adapter, PROMPTS, N_NEW)
    chosen = int(want.tokens[0, 0])
    assert generator.run(chosen, PROMPTS, N_NEW) is None  # stopped at it: not a result
    assert chosen in generator.avoid
    assert_same(generator(PROMPTS, N_NEW), want)


def test_prompt_longer_than_the_context_is_refused(genai_folder):
    folder, _, _ = genai_folder("merged")
    context = read_genai_config(folder)["model"]["context_length"]
    with pytest.raises(BadInputError, match="positions"):
        genai_generator(folder)([[5] * (context - 2)], 3)


def test_missing_extra_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)
    with pytest.raises(BadInputError, match=r"pip install 'lora-deploy\[genai\]'"):
        import_genai()
