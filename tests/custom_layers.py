"""A plain torch model with every layer kind lora-deploy supports outside transformers
(Conv1d, Conv2d, Conv3d with 1x1 and kxk kernels, strides and padding, Embedding,
Linear), and PEFT adapters on it for every LoRA variant. PEFT is the oracle: its
unmerged forward and its merge_and_unload are what lora-deploy must reproduce."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn

from tests.oracle import read_checkpoint

TARGETS = ["seq", "pw", "img", "mix", "vol", "emb", "lin"]

# variant -> LoraConfig keywords. lora_bias needs a base bias, and PEFT has no lora_bias
# for embeddings, so that variant leaves the embedding out.
VARIANTS = {
    "plain": {},
    "rslora": {"use_rslora": True, "r": 4},
    "patterns": {"rank_pattern": {"vol": 3, "emb": 1}, "alpha_pattern": {"seq": 7, "lin": 3}},
    "lora_bias": {"lora_bias": True, "target_modules": [t for t in TARGETS if t != "emb"]},
    "dora": {"use_dora": True},
    "modules_to_save": {"target_modules": [t for t in TARGETS if t != "lin"], "modules_to_save": ["lin"]},
}


class AllLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Conv1d(3, 6, 3, padding=1)
        self.pw = nn.Conv1d(6, 6, 1)
        self.img = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.mix = nn.Conv2d(6, 6, 1)
        self.vol = nn.Conv3d(3, 6, (3, 1, 3), padding=(1, 0, 1))
        self.emb = nn.Embedding(10, 6)
        self.lin = nn.Linear(6, 4)

    def forward(self, signal, image, volume, ids):
        a = self.pw(torch.relu(self.seq(signal))).mean(-1)
        b = self.mix(torch.relu(self.img(image))).mean((-1, -2))
        c = self.vol(volume).mean((-1, -2, -3))
        return self.lin(torch.tanh(a + b + c + self.emb(ids)))


def inputs(seed: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 3, 7, generator=g),
        torch.randn(2, 3, 6, 5, generator=g),
        torch.randn(2, 3, 4, 3, 5, generator=g),
        torch.tensor([1, 7]),
    )


def build(tmp: Path, variant: str, seed: int = 0):
    """Save a random AllLayers base and a PEFT adapter of `variant` for it under tmp.

    Every LoRA tensor is randomised (A, B, lora_B bias, and the DoRA magnitude, which PEFT
    initialises to ||W0 + s B A||, so that DoRA's rescaling is not the identity), as
    training would leave them. Returns (base_dir, adapter_dir, base model, PEFT model).
    """
    torch.manual_seed(seed)
    model = AllLayers().eval()
    base_dir = tmp / "base"
    base_dir.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, base_dir / "model.safetensors")
    kwargs = {"r": 2, "lora_alpha": 4, "target_modules": list(TARGETS), "init_lora_weights": False}
    kwargs.update(VARIANTS[variant])
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(**kwargs)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(0.5 + torch.rand(param.shape, generator=g))
            elif "lora_" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=g))
            elif "modules_to_save" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=g))
    adapter_dir = tmp / "adapter"
    peft.save_pretrained(adapter_dir)
    return base_dir, adapter_dir, model, peft


def load(model_dir: Path) -> AllLayers:
    model = AllLayers().eval()
    model.load_state_dict(read_checkpoint(model_dir))
    return model
