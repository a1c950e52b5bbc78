"""lora_bias (a trained bias on lora_B) on every layer kind, with and without a base bias,
against PEFT: the merge, verify's unmerged reference, and verify itself (issue 9: verify
--merged crashed with "'Target' object has no attribute 'bias'")."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, get_peft_model
from torch import nn

from lora_deploy.cli import main
from lora_deploy.errors import AdapterError
from lora_deploy.merge.streaming import merge
from lora_deploy.modeling.unmerged import attach
from lora_deploy.proof.verify import verify
from tests.oracle import read_checkpoint
from tests.proof.test_custom_modules import save_base

# PEFT's save warns that a 1-D lora_B.bias may be an unsharded FSDP tensor: it is not.
pytestmark = pytest.mark.filterwarnings("ignore:.*invalid shape")


def with_lora_bias(model: nn.Module, targets: list[str], **config):
    """PEFT model with random A, B and a clearly non-zero lora_B bias (as after training)."""
    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=targets, lora_bias=True, init_lora_weights=False, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns when the base layer has no bias
        lora = get_peft_model(copy.deepcopy(model), config).eval()
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name and name.endswith(".bias"):
                param.normal_()
    return lora


def assert_reference_is_peft(model: nn.Module, lora, adapter_dir, *inputs) -> None:
    """verify's reference (hooks on the base, no PEFT) computes what PEFT computes unmerged."""
    with torch.no_grad():
        want = lora(*inputs)
        with attach(copy.deepcopy(model).eval(), adapter_dir) as handle:
            got = handle.model(*inputs)
    want = getattr(want, "logits", want)
    got = getattr(got, "logits", got)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def assert_merge_is_peft(lora, out_dir) -> None:
    merged_state = lora.merge_and_unload().state_dict()
    ours = read_checkpoint(out_dir)
    for key, tensor in merged_state.items():
        if key in ours:
            torch.testing.assert_close(ours[key], tensor, atol=1e-6, rtol=1e-5, msg=key)


# ------------------------------------------------------- Linear (LLaMA) ----


def tiny_llama(attention_bias: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        attention_bias=attention_bias,
    )
    return LlamaForCausalLM(config).eval()


def test_linear_with_a_base_bias_merges_and_verifies(tmp_path):
    model = tiny_llama(attention_bias=True)
    model.save_pretrained(tmp_path / "base")
    lora = with_lora_bias(model, ["q_proj", "v_proj"])
    lora.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 64, (2, 7))
    assert_reference_is_peft(model, lora, tmp_path / "adapter", ids)
    merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert_merge_is_peft(lora, tmp_path / "out")

    result = CliRunner().invoke(
        main, ["verify", str(tmp_path / "base"), str(tmp_path / "adapter"), "--merged", str(tmp_path / "out"), "--json"]
    )
    assert result.exit_code == 0, result.output  # was exit 3: AttributeError on Target.bias
    report = json.loads(result.stdout)
    assert report["checks"][0]["name"].startswith("weights: 4 merged tensors")  # 2 weights + 2 biases
    assert all(c["status"] == "passed" for c in report["checks"])


def test_linear_without_a_base_bias_cannot_merge_but_the_reference_is_peft(tmp_path):
    model = tiny_llama(attention_bias=False)
    model.save_pretrained(tmp_path / "base")
    lora = with_lora_bias(model, ["q_proj", "v_proj"])
    lora.save_pretrained(tmp_path / "adapter")
    assert_reference_is_peft(model, lora, tmp_path / "adapter", torch.randint(0, 64, (2, 7)))
    # Neither can merge a bias into a layer that has none: PEFT raises, we refuse clearly.
    with pytest.raises(RuntimeError, match="no bias"):
        copy.deepcopy(lora).merge_and_unload()
    with pytest.raises(AdapterError, match="has no bias"):
        merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")


# -------------------------------------------------- GPT-2 Conv1D (fan_in_fan_out) ----


def test_gpt2_conv1d_merges_and_verifies(tmp_path):
    """transformers' Conv1D always has a bias, so there is no bias-less case to test."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0))
    model.eval().save_pretrained(tmp_path / "base")
    lora = with_lora_bias(model, ["c_attn", "c_proj"], fan_in_fan_out=True)
    lora.save_pretrained(tmp_path / "adapter")
    assert_reference_is_peft(model, lora, tmp_path / "adapter", torch.randint(0, 64, (2, 7)))
    merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert_merge_is_peft(lora, tmp_path / "out")
    report = verify(tmp_path / "base", tmp_path / "adapter", merged_dir=tmp_path / "out")
    assert report.equivalent, [c for c in report.checks if not c.passed]
    assert report.checks[0].name.startswith("weights: 6 merged tensors")  # c_attn, attn.c_proj, mlp.c_proj


# --------------------------------------------------------- Conv2d 1x1 / kxk ----


class Convs(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.wide = nn.Conv2d(3, 6, 3, padding=1, bias=bias)  # kxk
        self.point = nn.Conv2d(6, 4, 1, bias=bias)  # 1x1

    def forward(self, image):
        return self.point(torch.relu(self.wide(image)))


@pytest.mark.parametrize("bias", [True, False], ids=["base-bias", "no-base-bias"])
def test_conv2d_1x1_and_kxk(tmp_path, bias):
    torch.manual_seed(0)
    model = Convs(bias).eval()
    save_base(model, tmp_path / "base")
    lora = with_lora_bias(model, ["wide", "point"])
    lora.save_pretrained(tmp_path / "adapter")
    assert_reference_is_peft(model, lora, tmp_path / "adapter", torch.randn(2, 3, 5, 5))
    if not bias:
        with pytest.raises(RuntimeError, match="no bias"):
            copy.deepcopy(lora).merge_and_unload()
        with pytest.raises(AdapterError, match="has no bias"):
            merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
        return
    merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert_merge_is_peft(lora, tmp_path / "out")
    report = verify(tmp_path / "base", tmp_path / "adapter", merged_dir=tmp_path / "out")
    assert report.equivalent and report.checks[0].name.startswith("weights: 4 merged tensors")
    assert report.checks[-1].skipped  # no config.json: weights are the proof


# ------------------------------------------------------------------ Embedding ----


def test_embedding_lora_bias_is_refused_by_peft():
    """PEFT has no lora_bias for embeddings (its B is a Parameter, not a layer): nothing to
    merge or verify, so nothing of ours to test beyond PEFT refusing it."""
    model = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(ValueError, match="lora_bias"):
        get_peft_model(model, LoraConfig(r=2, target_modules=["0"], lora_bias=True))
