"""The reference robot controllers: plain modules, plain state dicts, PEFT adapters that
really change the actions, and the OpenVLA-style bin decoding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel

from lora_deploy.examples import robot as robots
from lora_deploy.modeling.unmerged import attach


def _module(paths):
    model = robots.build_policy() if paths["spec"].endswith("policy") else robots.build_vla()
    model.load_state_dict(torch.load(paths["base"], weights_only=True))
    return model.eval()


def _observations(paths):
    with np.load(paths["observations"]) as data:
        return {k: torch.from_numpy(data[k]) for k in data.files}


@pytest.mark.parametrize("kind", ["policy", "vla"])
def test_adapter_is_peft_lora_on_every_linear_layer_and_changes_the_actions(robot, kind):
    paths = robot(kind)
    obs = _observations(paths)
    model = _module(paths)
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    config = json.loads((paths["adapter"] / "adapter_config.json").read_text())
    assert linear - {"lm_head"} <= set(config["target_modules"])  # every linear layer (the VLA's head excepted)
    with torch.no_grad():
        base = model(**obs)
        with attach(model, paths["adapter"]):
            ours = model(**obs)
        peft = PeftModel.from_pretrained(_module(paths), paths["adapter"]).eval()(**obs)
    torch.testing.assert_close(ours, peft, atol=1e-5, rtol=1e-4)  # the unmerged reference is PEFT's forward
    if kind == "policy":
        assert ours.shape == (64, robots.CHUNK, robots.ACTION_DIM)
        assert (ours - base).abs().max() > 0.5  # the adapter moves the arm, not a rounding
    else:
        assert ours.shape == (64, robots.ACTION_DIM, robots.N_BINS)
        assert (ours.argmax(-1) != base.argmax(-1)).float().mean() > 0.5  # most decoded bins change


def test_base_is_a_plain_state_dict_of_tensors(robot):
    state = torch.load(robot("vla")["base"], weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert "llm.model.layers.0.self_attn.q_proj.weight" in state  # a LLaMA decoder inside


def test_decode_actions_maps_bins_onto_the_dataset_statistics(robot):
    stats = json.loads(robot("vla")["statistics"].read_text())
    q01 = np.array(stats[robots.DATASET]["action"]["q01"])
    q99 = np.array(stats[robots.DATASET]["action"]["q99"])
    logits = np.zeros((1, robots.ACTION_DIM, robots.N_BINS))
    bins = [0, 255, 128, 127, 64, 200, 255]
    for dof, b in enumerate(bins):
        logits[0, dof, b] = 1.0
    actions = robots.decode_actions(logits, stats)[0]
    # Bin b covers [-1 + 2b/256, -1 + 2(b+1)/256]; its center, rescaled from [-1, 1] onto [q01, q99].
    for dof, b in enumerate(bins[:6]):
        center = -1 + (2 * b + 1) / 256
        assert actions[dof] == pytest.approx(q01[dof] + (center + 1) / 2 * (q99[dof] - q01[dof]))
    assert actions[6] == pytest.approx(-1 + (2 * 255 + 1) / 256)  # the gripper is not un-normalized (mask)
