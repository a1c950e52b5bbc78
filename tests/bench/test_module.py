"""`bench --backend torch --module package.module:factory`: plain torch modules timed from
a checkpoint, fed from an .npz or from the module's own example_inputs()."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lora_deploy.bench import run as bench
from lora_deploy.bench.report import to_markdown
from lora_deploy.cli import main
from lora_deploy.errors import BadInputError
from tests import custom_layers

FEW = {"rounds": 3, "warmup": 1, "threads": 1}

POLICY = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Policy(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))

        def forward(self, obs, proprio):
            return self.net(obs + proprio)

        def example_inputs(self):
            return {"obs": torch.ones(3, 6), "proprio": torch.zeros(3, 6, dtype=torch.float64).float()}

    class Blind(nn.Module):  # declares nothing about its inputs
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))

        def forward(self, obs):
            return self.net(obs)
    """
)


@pytest.fixture
def policy(tmp_path):
    (tmp_path / "policy.py").write_text(POLICY)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    save_file(state, tmp_path / "policy.safetensors")
    torch.save(state, tmp_path / "policy.pt")
    return tmp_path


def test_a_plain_module_with_an_adapter_from_an_npz(tmp_path):
    """The reference plain model of the unmerged tests, its PEFT adapter attached unmerged."""
    base_dir, adapter_dir, _, _ = custom_layers.build(tmp_path, "plain")
    names = ("signal", "image", "volume", "ids")
    np.savez(tmp_path / "obs.npz", **{n: t.numpy() for n, t in zip(names, custom_layers.inputs())})
    report = bench.run_bench(
        {"base": base_dir, "lora": base_dir},
        adapters={"lora": adapter_dir},
        backend="torch",
        module="tests.custom_layers:AllLayers",
        inputs_path=tmp_path / "obs.npz",
        **FEW,
    )
    assert report["config"]["module"] == "tests.custom_layers:AllLayers"
    (key,) = report["results"]
    variants = report["results"][key]["variants"]
    assert variants["lora"]["fed"]["source"] == "file" and variants["lora"]["fed"]["batch"] == 2
    assert "unmerged LoRA hooks" in report["config"]["variants"]["lora"]["mode"]
    assert report["config"]["variants"]["base"]["module"] == "tests.custom_layers:AllLayers"


def test_a_module_times_on_its_own_example_inputs(policy):
    spec = f"{policy / 'policy.py'}:Policy"
    models = {"base": policy / "policy.safetensors", "merged": policy / "policy.pt"}
    report = bench.run_bench(models, backend="torch", module=spec, **FEW)
    assert report["config"]["shapes"] == ["3x6"]
    fed = report["results"]["3x6"]["variants"]["merged"]["fed"]
    assert fed["source"] == "example" and fed["inputs"] == {"obs": [3, 6], "proprio": [3, 6]} and not fed["tokens"]
    assert "batch 3 (example_inputs)" in to_markdown(report)
    # --shapes: their dtypes and sizes at another batch.
    report = bench.run_bench(models, backend="torch", module=spec, shapes="5x1", **FEW)
    assert report["results"]["5x1"]["variants"]["base"]["fed"]["inputs"] == {"obs": [5, 6], "proprio": [5, 6]}


def test_a_module_that_declares_no_inputs_needs_an_npz(policy):
    spec = f"{policy / 'policy.py'}:Blind"
    for shapes in (None, "2x6"):
        with pytest.raises(BadInputError, match="declares no inputs: pass --inputs FILE.npz"):
            bench.run_bench({"base": policy / "policy.pt"}, backend="torch", module=spec, shapes=shapes, **FEW)
    with pytest.raises(BadInputError, match="it is input .*policy.py"):  # the factory's source is an input
        bench.bench({"base": policy / "policy.pt"}, backend="torch", module=spec, json_path=policy / "policy.py")
    np.savez(policy / "obs.npz", obs=np.ones((4, 6), np.float32))
    report = bench.run_bench(
        {"base": policy / "policy.pt"}, backend="torch", module=spec, inputs_path=policy / "obs.npz", **FEW
    )
    assert report["results"]["4x6"]["variants"]["base"]["n"] == 3


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--module", "policy_nowhere:build"], "cannot import policy_nowhere"),
        (["--module", "{root}/policy.py:Blind", "--model", "x={root}/policy.py"], "with --module a checkpoint is"),
        (["--module", "{root}/policy.py:Policy", "--backend", "onnxruntime"], "needs --backend torch"),
        (["--module", "{root}/policy.py:torch"], "not a callable"),
        (["--module", "{root}/policy.py:Policy", "--model", "o={root}/objects.pt"], "refused to load pickle"),
    ],
)
def test_bad_factories_and_checkpoints_exit_2_in_one_line(policy, args, phrase):
    torch.save({"layer": torch.nn.Linear(1, 1)}, policy / "objects.pt")
    args = [a.format(root=policy) for a in args]
    models = [] if "--model" in args else ["--model", f"base={policy / 'policy.pt'}"]
    backend = [] if "--backend" in args else ["--backend", "torch"]
    result = CliRunner().invoke(main, ["bench", *backend, *models, *args, "--rounds", "2", "--quiet"])
    assert result.exit_code == 2, result.output
    assert phrase in result.output and len(result.output.strip().splitlines()) == 1, result.output
