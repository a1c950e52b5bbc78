"""LoRA and DoRA on Conv1d, Conv2d, Conv3d and Embedding layers of a plain torch module
(README: "Supported: ... Embedding, Conv1d/2d/3d (1x1 and kxk) ... DoRA"): the merged
checkpoint equals PEFT's merge_and_unload and computes PEFT's unmerged forward."""

from __future__ import annotations

import pytest
import torch

from lora_deploy.merge.streaming import merge
from tests import custom_layers
from tests.oracle import read_checkpoint


@pytest.mark.filterwarnings("ignore:Adapter 'default'")  # PEFT takes lora_B biases for ZeRO-3 shards
@pytest.mark.parametrize("variant", list(custom_layers.VARIANTS))
def test_merge_equals_peft_on_convolutions_and_embeddings(tmp_path, variant):
    base, adapter, base_model, peft = custom_layers.build(tmp_path, variant)
    x = custom_layers.inputs()
    with torch.no_grad():
        unmerged = peft(*x)
        assert (unmerged - base_model(*x)).abs().max() > 1e-2
    peft_merged = peft.merge_and_unload().state_dict()

    merge(base, adapter, tmp_path / "out")
    ours = read_checkpoint(tmp_path / "out")
    original = read_checkpoint(base)
    assert set(ours) == set(peft_merged)
    changed = {k for k in ours if not torch.equal(ours[k], original[k])}
    targets = custom_layers.VARIANTS[variant].get("target_modules", custom_layers.TARGETS)
    assert {f"{t}.weight" for t in targets} <= changed  # every adapted layer; the rest are exact copies:
    for key, tensor in peft_merged.items():
        torch.testing.assert_close(ours[key], tensor, atol=1e-6, rtol=1e-5, msg=key)
        if torch.equal(tensor, original[key]):
            assert torch.equal(ours[key], original[key]), key
    with torch.no_grad():
        torch.testing.assert_close(custom_layers.load(tmp_path / "out")(*x), unmerged, atol=1e-5, rtol=1e-4)
