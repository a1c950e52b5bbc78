"""The unmerged reference (attach: forward hooks, no PEFT) against PEFT's own forward.

verify compares merged models and ONNX graphs with attach's outputs, and attach reuses the
merge's delta math, so the chain is only as good as this comparison with an independent
oracle: PeftModel running the same adapter, for every variant lora-deploy supports."""

from __future__ import annotations

import pytest
import torch

from lora_deploy.modeling.unmerged import attach
from tests import custom_layers
from tests.conftest import REFERENCE_CASES
from tests.oracle import load_model, logits_of, peft_model, token_batch


@pytest.mark.parametrize("family,variant", REFERENCE_CASES)
def test_attach_computes_what_peft_computes(reference, family, variant):
    """Every reference family (GPT-2: Conv1D with fan_in_fan_out, tied embeddings) and
    variant (rsLoRA, rank/alpha patterns, lora_bias, DoRA, embedding, modules_to_save)."""
    base, adapter = reference(family, variant)
    model = load_model(base)
    batch = token_batch(model.config.vocab_size)
    before = logits_of(model, batch)
    want = logits_of(peft_model(base, adapter), batch)
    assert (want - before).abs().max() > 1e-3  # the adapter changes the outputs (50x atol)
    with attach(model, adapter):
        got = logits_of(model, batch)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert torch.equal(logits_of(model, batch), before)  # detached: the base model again


@pytest.mark.filterwarnings("ignore:Adapter 'default'")  # PEFT takes lora_B biases for ZeRO-3 shards
@pytest.mark.parametrize("variant", list(custom_layers.VARIANTS))
def test_attach_on_convolutions_and_embeddings_computes_what_peft_computes(tmp_path, variant):
    """Conv1d/Conv2d/Conv3d (1x1 and kxk, strided, padded), Embedding and Linear, in a
    plain torch module, DoRA on the convolutions and the embedding included."""
    _, adapter, base_model, peft = custom_layers.build(tmp_path, variant)
    x = custom_layers.inputs()
    with torch.no_grad():
        before = base_model(*x)
        want = peft(*x)
        assert (want - before).abs().max() > 1e-2
        with attach(base_model, adapter):
            got = base_model(*x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        assert torch.equal(base_model(*x), before)


def test_attach_dora_per_layer_kind(tmp_path):
    """DoRA layer by layer, so a wrong norm axis in one kind cannot hide behind the others."""
    _, adapter, base_model, peft = custom_layers.build(tmp_path, "dora")
    x = custom_layers.inputs()
    outputs = {}

    def record(name):
        return lambda module, args, out: outputs.__setitem__(name, out.detach().clone())

    with torch.no_grad():
        hooks = [
            peft.get_submodule(f"base_model.model.{n}").register_forward_hook(record(n)) for n in custom_layers.TARGETS
        ]
        peft(*x)
        want = dict(outputs)
        for h in hooks:
            h.remove()
        outputs.clear()
        with attach(base_model, adapter):
            hooks = [base_model.get_submodule(n).register_forward_hook(record(n)) for n in custom_layers.TARGETS]
            base_model(*x)
            for h in hooks:
                h.remove()
    for name in custom_layers.TARGETS:
        torch.testing.assert_close(outputs[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
