"""Parts of a plain module: inputs recorded in the whole forward, the part as a module of
named inputs, and a part's output substituted (what verify --part chains)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from torch import nn

from lora_deploy.errors import BadInputError
from lora_deploy.examples.robot import ContinuousPolicy, example_observations, patchify
from lora_deploy.modeling.parts import make_part_call, record_part, substituted


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return ContinuousPolicy().eval()


@pytest.fixture(scope="module")
def feed():
    return example_observations(3, seed=1)


def test_recorded_inputs_are_what_the_part_receives(policy, feed):
    signature, inputs, outputs = record_part(policy, "patch_embed", feed, "policy")
    assert signature.input_names == ["input"]
    expected = patchify(torch.from_numpy(feed["image"]))  # what forward feeds patch_embed, computed here
    torch.testing.assert_close(inputs["input"], expected, rtol=0, atol=0)
    torch.testing.assert_close(outputs[0], policy.patch_embed(expected), rtol=0, atol=0)


def test_the_part_call_reproduces_the_recorded_output(policy, feed):
    signature, inputs, outputs = record_part(policy, "blocks.1", feed, "policy")
    call = make_part_call(policy.blocks[1], signature)
    assert list(inspect.signature(call.forward).parameters) == ["x"]  # named as Block.forward's argument
    with torch.inference_mode():
        again = call(**inputs)
    torch.testing.assert_close(again, outputs[0], rtol=0, atol=0)


def test_substituting_a_part_changes_only_that_part(policy, feed):
    tensors = {k: torch.from_numpy(v) for k, v in feed.items()}
    signature, _, _ = record_part(policy, "action_head", feed, "policy")
    with torch.inference_mode():
        want = policy(**tensors)
        seen = []

        def same(flat):  # the part's own math, outside the module: the chain is unchanged
            seen.append(list(flat))
            return [nn.functional.linear(flat["input"], policy.action_head.weight, policy.action_head.bias)]

        with substituted(policy, {"action_head": (signature, same)}):
            torch.testing.assert_close(policy(**tensors), want, rtol=1e-6, atol=1e-6)
        assert seen == [["input"]]
        with substituted(policy, {"action_head": (signature, lambda flat: [torch.zeros_like(want)])}):
            assert float(policy(**tensors).abs().max()) == 0.0
        torch.testing.assert_close(policy(**tensors), want, rtol=0, atol=0)  # restored
    assert "forward" not in vars(policy.action_head)


def test_hooks_on_a_substituted_part_are_suspended_then_restored(policy, feed):
    tensors = {k: torch.from_numpy(v) for k, v in feed.items()}
    signature, _, outputs = record_part(policy, "action_head", feed, "policy")
    calls = []
    handle = policy.action_head.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.inference_mode():
            with substituted(policy, {"action_head": (signature, lambda flat: [outputs[0]])}):
                policy(**tensors)
            assert calls == []
            policy(**tensors)
        assert calls == [1]
    finally:
        handle.remove()


class _Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(2, 2)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.inner(x) if not isinstance(x, dict) else x


class _TakesMapping(nn.Module):
    def __init__(self):
        super().__init__()
        self.part = _Odd()

    def forward(self, x):
        return self.part({"x": x})["x"]


def test_bad_parts_are_refused_in_one_line():
    feed = {"x": np.ones((2, 2), np.float32)}
    with pytest.raises(BadInputError, match="has no part 'nope'.*top level: inner, unused"):
        record_part(_Odd(), "nope", feed, "odd")
    with pytest.raises(BadInputError, match="never calls it"):
        record_part(_Odd(), "unused", feed, "odd")
    with pytest.raises(BadInputError, match="argument 'x' is a dict"):
        record_part(_TakesMapping(), "part", feed, "m")
