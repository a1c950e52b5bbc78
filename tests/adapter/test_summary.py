"""`inspect`'s parameter counts against PEFT's own (get_nb_trainable_parameters)."""

from __future__ import annotations

import pytest
import torch

from lora_deploy.adapter.read import load_adapter
from lora_deploy.adapter.summary import describe_adapter
from lora_deploy.adapter.variants import refuse_non_additive
from lora_deploy.errors import AdapterError
from tests.lora_factory import random_adapter
from tests.oracle import load_model

# (family, LoraConfig keywords, the variant inspect names). An adapted embed_tokens or
# lm_head makes PEFT save that layer's base weight too (save_embedding_layers="auto"):
# a copy, not trained, so neither counted nor a modules_to_save.
CASES = {
    "embedding": ("llama", {"targets": ["q_proj", "embed_tokens"]}, "lora+embedding"),
    "lm_head": ("llama", {"targets": ["lm_head"]}, "lora"),
    "embedding+modules_to_save": (
        "llama",
        {"targets": ["embed_tokens"], "modules_to_save": ["lm_head"]},
        "lora+embedding+modules_to_save",
    ),
    "bias_all": ("gpt2", {"targets": ["c_attn"], "fan_in_fan_out": True, "bias": "all"}, "lora+modules_to_save"),
}


def peft_trainable(base, adapter_dir) -> int:
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base), adapter_dir, is_trainable=True)
    return model.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_trainable_parameters_are_peft_s(reference, tmp_path, case):
    family, config, variant = CASES[case]
    base, _ = reference(family)
    adapter_dir = random_adapter(base, tmp_path / "a", 0, r=2, lora_alpha=4, **config)
    info = describe_adapter(adapter_dir, base)
    assert info["trainable_parameters"] == peft_trainable(base, adapter_dir)
    assert info["variant"] == variant
    saved = bool(info["saved_base_tensors"])
    assert saved == bool({"embed_tokens", "lm_head"} & set(config["targets"]))
    if saved:  # still what PEFT loads as the base: the merge uses it, export refuses it
        adapter = load_adapter(adapter_dir)
        assert set(info["saved_base_tensors"]) <= set(adapter.replacements)
        with pytest.raises(AdapterError):
            refuse_non_additive(adapter)
    torch.manual_seed(0)  # random_adapter seeds torch globally; leave it as other tests expect
