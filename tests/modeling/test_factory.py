"""The factory form: a plain torch module from importable code, a checkpoint loaded into it.

The oracle is torch itself: the module built directly, with its own weights, must give
the same outputs as the one the factory form builds and loads from each checkpoint kind.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_deploy.errors import BadInputError
from lora_deploy.modeling import factory
from tests import custom_layers

SPEC = "tests.custom_layers:AllLayers"


@pytest.fixture
def saved(tmp_path):
    """An AllLayers model with random weights, saved in every checkpoint kind."""
    torch.manual_seed(3)
    model = custom_layers.AllLayers().eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    (tmp_path / "dir").mkdir()
    save_file(state, tmp_path / "dir" / "model.safetensors")
    save_file(state, tmp_path / "weights.safetensors")
    torch.save(state, tmp_path / "weights.pt")
    return model, tmp_path


@pytest.mark.parametrize("kind", ["dir", "weights.safetensors", "weights.pt"])
def test_every_checkpoint_kind_loads_the_same_module(saved, kind):
    model, root = saved
    loaded = factory.load_module(SPEC, root / kind)
    assert not loaded.training
    x = custom_layers.inputs()
    with torch.no_grad():
        assert torch.equal(loaded(*x), model(*x))


def test_a_py_file_factory_and_tied_weights(tmp_path):
    """path/to/file.py:factory; a tensor tied to another and saved once (as safetensors
    and save_pretrained store tied weights) counts as present."""
    (tmp_path / "tied.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            class Tied(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.emb = nn.Embedding(5, 3)
                    self.out = nn.Linear(3, 5, bias=False)
                    self.out.weight = self.emb.weight

                def forward(self, ids):
                    return self.out(self.emb(ids))

            def build():
                return Tied()
            """
        )
    )
    source = factory.build_module(f"{tmp_path / 'tied.py'}:build")
    save_file({"emb.weight": source.emb.weight.detach().clone()}, tmp_path / "tied.safetensors")
    loaded = factory.load_module(f"{tmp_path / 'tied.py'}:build", tmp_path / "tied.safetensors")
    assert torch.equal(loaded.out.weight, source.emb.weight)


def test_a_module_that_does_not_fit_the_checkpoint_is_one_line(saved, tmp_path):
    _, root = saved
    state = torch.load(root / "weights.pt", weights_only=True)
    state["lin.weight"] = torch.zeros(4, 7)
    state["extra.weight"] = torch.zeros(1)
    del state["emb.weight"]
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(BadInputError) as err:
        factory.load_module(SPEC, tmp_path / "bad.safetensors")
    message = str(err.value)
    assert "\n" not in message and "does not fit the module from tests.custom_layers:AllLayers" in message
    assert "missing from the checkpoint (emb.weight)" in message and "1 not in the module (extra.weight)" in message
    assert "lin.weight [4, 7] in the checkpoint, [4, 6] in the module" in message


def test_a_state_dict_holding_objects_is_refused(tmp_path):
    torch.save({"lin": torch.nn.Linear(2, 2)}, tmp_path / "objects.pt")
    with pytest.raises(BadInputError, match="refused to load pickle"):
        factory.load_module(SPEC, tmp_path / "objects.pt")
    torch.save({"step": 3}, tmp_path / "plain.pt")  # loads weights-only, but holds no tensors
    with pytest.raises(BadInputError, match="not a mapping of tensor names to tensors"):
        factory.load_module(SPEC, tmp_path / "plain.pt")


@pytest.mark.parametrize(
    "spec, phrase",
    [
        ("tests.custom_layers", "expected package.module:factory"),
        ("tests.no_such_module:build", "cannot import tests.no_such_module (ModuleNotFoundError"),
        ("tests.custom_layers:NoSuch", "has no attribute 'NoSuch'"),
        ("tests.custom_layers:TARGETS", "is a list, not a callable"),
        ("tests.custom_layers:inputs", "returned a tuple, not a torch.nn.Module"),
        ("tests.custom_layers:load", "the factory raised TypeError"),
        ("/nonexistent/policy.py:build", "no such file"),
    ],
)
def test_a_bad_factory_is_one_line(saved, spec, phrase):
    _, root = saved
    with pytest.raises(BadInputError) as err:
        factory.load_module(spec, root / "weights.pt")
    assert phrase in str(err.value) and "\n" not in str(err.value)


def test_a_factory_whose_code_fails_to_import_is_bad_input(tmp_path):
    (tmp_path / "broken.py").write_text("import sys\nraise RuntimeError('no GPU here')\n")
    with pytest.raises(BadInputError, match=r"cannot import .*broken.py \(RuntimeError: no GPU here\)"):
        factory.import_factory(f"{tmp_path / 'broken.py'}:build")


def test_checkpoint_kinds_are_checked_before_torch_reads_them(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        factory.check_module_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(BadInputError, match="a .safetensors file or a .pt state dict"):
        factory.check_module_checkpoint(tmp_path / "w.ckpt")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "policy.pt").write_bytes(b"x")
    with pytest.raises(BadInputError, match="pass the state dict file itself, e.g. .*policy.pt"):
        factory.check_module_checkpoint(tmp_path / "pickled")
    (tmp_path / "short.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(BadInputError, match="short.safetensors"):
        factory.check_module_checkpoint(tmp_path / "short.safetensors")


def test_example_inputs_are_arrays_by_forward_argument(tmp_path):
    class Declares(torch.nn.Module):
        def forward(self, obs, mask):
            return obs * mask

        def example_inputs(self):
            return {"obs": torch.ones(2, 3, dtype=torch.bfloat16), "mask": np.ones((2, 3), np.int64)}

    got = factory.example_inputs(Declares())
    assert {k: (v.dtype, v.shape) for k, v in got.items()} == {
        "obs": (np.float32, (2, 3)),  # numpy has no native bfloat16
        "mask": (np.int64, (2, 3)),
    }
    assert factory.example_inputs(custom_layers.AllLayers()) is None
    wrong = Declares()
    wrong.example_inputs = lambda: {"image": np.ones(3)}
    with pytest.raises(BadInputError, match="'image' is not an argument of forward"):
        factory.example_inputs(wrong)
    wrong.example_inputs = lambda: {"obs": np.array(1.0)}
    with pytest.raises(BadInputError, match="numeric array of rank >= 1"):
        factory.example_inputs(wrong)
