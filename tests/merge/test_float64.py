"""A float64 base is merged in float64 (A and B widened, the product in float64), as PEFT's
merge_and_unload does it: the two agree to float64 precision, not float32's."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from lora_deploy.merge import merge
from tests.oracle import read_checkpoint


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 16)
        self.proj = nn.Linear(16, 24)
        self.head = nn.Linear(24, 5)
        self.norm = nn.LayerNorm(24)
        self.conv = nn.Conv2d(3, 6, 3)


def build() -> Tiny:
    torch.manual_seed(0)
    return Tiny().double()


@pytest.mark.filterwarnings("ignore:Adapter 'default'")  # PEFT's check takes lora_B.bias for a sharded tensor
@pytest.mark.parametrize("variant", ["lora", "dora", "lora_bias"])
def test_a_float64_base_merges_like_peft_in_float64(tmp_path, variant):
    model = build()
    base = tmp_path / "base.pt"
    torch.save(model.state_dict(), base)
    targets = ["proj", "head", "conv"] if variant != "lora" else ["emb", "proj", "head", "conv"]
    extra = {"use_dora": True} if variant == "dora" else {"lora_bias": True} if variant == "lora_bias" else {}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **extra)
    torch.manual_seed(1)
    get_peft_model(build(), config).save_pretrained(tmp_path / "adapter")

    result = merge(base, tmp_path / "adapter", tmp_path / "out")
    ours = read_checkpoint(tmp_path / "out")
    want = PeftModel.from_pretrained(build(), tmp_path / "adapter").merge_and_unload().state_dict()
    assert set(ours) == set(want)
    changed = 0
    for key, tensor in want.items():
        assert ours[key].dtype == torch.float64, key
        torch.testing.assert_close(ours[key], tensor, atol=1e-12, rtol=1e-12, msg=key)
        changed += not torch.equal(ours[key], model.state_dict()[key])
    assert changed >= len(targets)
    merged = ours["proj.weight"]
    assert not torch.equal(merged, merged.float().double())  # not float32 numbers written as float64
    for entry in result.manifest["modules"]:  # ||W - W0||, at float64 precision too
        change = torch.linalg.norm(want[entry["weight"]] - model.state_dict()[entry["weight"]]).item()
        assert entry["delta_norm"] == pytest.approx(change, rel=1e-10), entry["weight"]
