"""Layers and layouts beyond the reference families: convolutions, a controller that is
not a transformers model, and adapters whose module paths differ from the base's by a
model prefix. PEFT is the oracle throughout."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn

from lora_deploy.merge.streaming import merge
from lora_deploy.modeling.unmerged import attach
from tests.oracle import read_checkpoint


class VisionController(nn.Module):
    """A small vision-action policy: conv stem (1x1 and 3x3), MLP head, embedding of the task."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 1)
        self.task = nn.Embedding(5, 8)
        self.head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, image, task_id):
        x = torch.relu(self.mix(torch.relu(self.stem(image)))).mean(dim=(2, 3))
        return self.head(x + self.task(task_id))


def save_base(model: nn.Module, path):
    path.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")


def trained_lora(model: nn.Module, config: LoraConfig, seed: int = 0):
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    # Random non-zero B, as after training (init_lora_weights=False does that for A and B).
    return peft_model


@pytest.mark.parametrize("use_dora", [False, True])
def test_conv_embedding_linear_controller_matches_peft(tmp_path, use_dora):
    torch.manual_seed(0)
    model = VisionController().eval()
    save_base(model, tmp_path / "base")
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["stem", "mix", "head.0", "head.2"] + ([] if use_dora else ["task"]),
        init_lora_weights=False,
        use_dora=use_dora,
    )
    peft_model = trained_lora(model, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    image, task_id = torch.randn(2, 3, 6, 6), torch.tensor([1, 3])
    with torch.no_grad():
        unmerged_out = peft_model(image, task_id)
    merged_state = peft_model.merge_and_unload().state_dict()

    merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    ours = read_checkpoint(tmp_path / "out")
    assert set(ours) == set(merged_state)
    for key, tensor in merged_state.items():
        torch.testing.assert_close(ours[key], tensor, atol=1e-6, rtol=1e-5, msg=key)

    fresh = VisionController().eval()
    fresh.load_state_dict(ours)
    with torch.no_grad():
        torch.testing.assert_close(fresh(image, task_id), unmerged_out, atol=1e-5, rtol=1e-4)

    # The unmerged reference (hooks, no PEFT) computes the same thing on the user's own module.
    base_model = VisionController().eval()
    base_model.load_state_dict(read_checkpoint(tmp_path / "base"))
    with torch.no_grad(), attach(base_model, tmp_path / "adapter"):
        torch.testing.assert_close(base_model(image, task_id), unmerged_out, atol=1e-5, rtol=1e-4)


def test_adapter_from_task_model_onto_bare_backbone(tmp_path):
    """Adapter trained on BertForSequenceClassification ("bert.encoder..."), base saved as BertModel."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    task_model = BertForSequenceClassification(config).eval()
    task_model.bert.save_pretrained(tmp_path / "backbone")
    peft_model = get_peft_model(
        task_model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    merged_backbone = peft_model.merge_and_unload().bert.state_dict()

    merge(tmp_path / "backbone", tmp_path / "adapter", tmp_path / "out")
    ours = read_checkpoint(tmp_path / "out")
    for key, tensor in ours.items():
        torch.testing.assert_close(tensor, merged_backbone[key], atol=1e-6, rtol=1e-5, msg=key)
    BertModel.from_pretrained(tmp_path / "out")  # an ordinary checkpoint


def test_adapter_from_backbone_onto_task_checkpoint(tmp_path):
    """Adapter trained on LlamaModel ("layers.0..."), base saved as LlamaForCausalLM ("model.layers.0...")."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    full = LlamaForCausalLM(config).eval()
    full.save_pretrained(tmp_path / "base")
    peft_backbone = get_peft_model(
        copy.deepcopy(full.model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    )
    peft_backbone.save_pretrained(tmp_path / "adapter")
    merged_backbone = peft_backbone.merge_and_unload().state_dict()

    merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    ours = read_checkpoint(tmp_path / "out")
    for key, tensor in merged_backbone.items():
        torch.testing.assert_close(ours[f"model.{key}"], tensor, atol=1e-6, rtol=1e-5, msg=key)
    torch.testing.assert_close(ours["lm_head.weight"], full.lm_head.weight)


def test_verify_checks_a_custom_module_checkpoint_at_weight_level(tmp_path):
    from lora_deploy.proof.verify import verify

    torch.manual_seed(0)
    model = VisionController().eval()
    save_base(model, tmp_path / "base")
    trained_lora(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["stem", "head.0"], init_lora_weights=False)
    ).save_pretrained(tmp_path / "adapter")
    merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    report = verify(tmp_path / "base", tmp_path / "adapter", merged_dir=tmp_path / "out")
    assert report.equivalent and report.checks[-1].skipped and "config.json" in report.checks[-1].detail
    tensors = read_checkpoint(tmp_path / "out")
    tensors["stem.weight"][0, 0, 0, 0] += 1e-3
    save_file(tensors, tmp_path / "out" / "model.safetensors")
    assert not verify(tmp_path / "base", tmp_path / "adapter", merged_dir=tmp_path / "out").equivalent
