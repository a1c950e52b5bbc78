"""export onnx --module: plain torch modules through a factory, float16 and static shapes,
example inputs from an .npz of recorded observations. ONNX Runtime's own session and
PEFT's merged module are the oracles."""

from __future__ import annotations

import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel

from lora_deploy.cli import main
from lora_deploy.errors import BadInputError
from lora_deploy.examples import robot as robots

POLICY = "lora_deploy.examples.robot:build_policy"


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def peft_policy(paths):
    model = robots.build_policy()
    model.load_state_dict(torch.load(paths["base"], weights_only=True))
    return PeftModel.from_pretrained(model, paths["adapter"]).eval()


def test_static_float16_graph_of_the_merged_policy(robot, tmp_path):
    paths = robot("policy")
    out = tmp_path / "policy.onnx"
    result = run_cli(
        "export", "onnx", paths["merged"], "-o", out, "--module", POLICY, "--inputs", paths["obs1"],
        "--dtype", "float16", "--static",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    graph = onnx.load(str(out))
    for value in graph.graph.input:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
        assert all(d.HasField("dim_value") for d in value.type.tensor_type.shape.dim)  # static
    assert [v.name for v in graph.graph.input] == ["image", "proprio"]
    assert [v.name for v in graph.graph.output] == ["actions"]
    with np.load(paths["obs1"]) as data:
        obs = {k: data[k] for k in data.files}
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {k: v.astype(np.float16) for k, v in obs.items()})
    with torch.no_grad():
        want = peft_policy(paths)(**{k: torch.from_numpy(v) for k, v in obs.items()}).numpy()
    assert got.dtype == np.float16 and got.shape == (1, robots.CHUNK, robots.ACTION_DIM)
    assert np.abs(got.astype(np.float32) - want).max() < 2e-2  # float16 rounding, not a lost adapter


def test_dynamic_batch_from_a_pt_checkpoint_and_the_modules_own_inputs(robot, tmp_path):
    paths = robot("policy")
    out = tmp_path / "policy.onnx"
    result = run_cli("export", "onnx", paths["base"], "-o", out, "--module", POLICY)
    assert result.exit_code == 0, result.output
    obs = robots.example_observations(batch=3, seed=5)
    (got,) = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, obs)
    model = robots.build_policy()
    model.load_state_dict(torch.load(paths["base"], weights_only=True))
    with torch.no_grad():
        want = model.eval()(**{k: torch.from_numpy(v) for k, v in obs.items()}).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)


OVERFLOW = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Loud(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) * 1e5

    def build():
        return Loud()

    class Hidden(nn.Module):  # overflows inside forward, where no module output shows it
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            h = self.fc(x) * 300
            return h * h - h * h

    def build_hidden():
        return Hidden()
    """
)


def test_bad_input_is_one_line_and_writes_nothing(robot, tmp_path):
    paths = robot("policy")
    (tmp_path / "loud.py").write_text(OVERFLOW)
    torch.save({"fc.weight": torch.ones(2, 4), "fc.bias": torch.zeros(2)}, tmp_path / "loud.pt")
    np.savez(tmp_path / "x.npz", x=np.ones((1, 4), np.float32))
    np.savez(tmp_path / "wrong.npz", image=np.ones((1, 3, 32, 32), np.float32), camera=np.ones((1, 8), np.float32))
    np.savez(tmp_path / "small.npz", image=np.ones((1, 3, 16, 16), np.float32), proprio=np.ones((1, 8), np.float32))
    cases = [
        ([tmp_path / "loud.pt", "--module", f"{tmp_path / 'loud.py'}:build", "--inputs", tmp_path / "x.npz",
          "--dtype", "float16"], "float16 overflow"),
        ([tmp_path / "loud.pt", "--module", f"{tmp_path / 'loud.py'}:build_hidden", "--inputs", tmp_path / "x.npz",
          "--dtype", "float16"], "output 0 is not finite in float16"),
        ([paths["base"], "--module", POLICY, "--inputs", tmp_path / "wrong.npz"], "does not fit"),
        ([paths["base"], "--module", POLICY, "--inputs", tmp_path / "small.npz"], "does not fit"),
        ([paths["base"], "--module", "lora_deploy.examples.robot:build_vla"], "does not fit the module"),
        ([paths["base"], "--module", "no_such_package.mod:build"], "cannot import"),
        ([paths["base"], "--module", "lora_deploy.examples.robot:CHUNK"], "not a callable"),
        ([paths["base"], "--static"], "--module"),
    ]  # fmt: skip
    for args, phrase in cases:
        out = tmp_path / "out.onnx"
        result = run_cli("export", "onnx", args[0], "-o", out, *args[1:])
        assert result.exit_code == 2, (args, result.output)
        assert phrase in result.output and len(result.output.strip().splitlines()) == 1, (args, result.output)
        assert not out.exists()
        assert not list(tmp_path.glob(".*out.onnx*"))  # no staging left behind


def test_recorded_float16_and_float64_observations_feed_the_float32_module(tmp_path):
    """A robot logs float16 observations (what its float16 graph takes): the float32
    module is exported and verified on them, widened exactly; float64 is rounded once."""
    from lora_deploy.export.plain import module_feed

    module = robots.build_policy()
    obs = robots.example_observations(batch=2, seed=3)
    for dtype in (np.float16, np.float64):
        path = tmp_path / f"obs-{np.dtype(dtype).name}.npz"
        np.savez(path, **{k: v.astype(dtype) for k, v in obs.items()})
        feed = module_feed(module, path, POLICY)
        assert list(feed) == ["image", "proprio"]
        for name, arr in feed.items():
            assert arr.dtype == np.float32
            np.testing.assert_array_equal(arr, obs[name].astype(dtype).astype(np.float32))


CAMERA = """
import torch
from torch import nn


class Camera(nn.Module):
    output_names = ["action"]

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(12, 4)

    def forward(self, image):
        return self.enc(image.float() / 255.0)

    def example_inputs(self):
        return {"image": torch.arange(12, dtype=torch.uint8).reshape(1, 12) * 20}


def build():
    return Camera()
"""


def test_a_module_declaring_uint8_frames_is_exported_and_verified_on_uint8_inputs(tmp_path):
    """Camera frames stay uint8 (saved as int64 too, when every value fits uint8): the
    graph takes uint8 and matches PEFT's unmerged module on them. Values past uint8, or a
    float array, are refused naming what was saved; so is a uint8 array for a float input."""
    from peft import LoraConfig, get_peft_model

    from lora_deploy.export.plain import module_feed

    (tmp_path / "camera.py").write_text(textwrap.dedent(CAMERA))
    spec = f"{tmp_path / 'camera.py'}:build"
    torch.manual_seed(0)
    namespace: dict = {}
    exec(CAMERA, namespace)  # the same class the CLI loads from camera.py
    model = namespace["build"]().eval()
    torch.save(model.state_dict(), tmp_path / "base.pt")
    lora = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["enc"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    frames = np.random.default_rng(0).integers(0, 256, (3, 12)).astype(np.uint8)
    np.savez(tmp_path / "frames.npz", image=frames)
    np.savez(tmp_path / "frames-int64.npz", image=frames.astype(np.int64))

    assert run_cli("merge", tmp_path / "base.pt", tmp_path / "adapter", "-o", tmp_path / "merged").exit_code == 0
    out = tmp_path / "camera.onnx"
    frames_npz = tmp_path / "frames.npz"
    result = run_cli("export", "onnx", tmp_path / "merged", "-o", out, "--module", spec, "--inputs", frames_npz)
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    (got,) = session.run(None, {"image": frames})
    with torch.no_grad():
        want = lora(torch.from_numpy(frames)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for inputs in ("frames.npz", "frames-int64.npz"):
        result = run_cli(
            "verify", tmp_path / "base.pt", tmp_path / "adapter", "--module", spec, "--onnx", out,
            "--merged", tmp_path / "merged", "--inputs", tmp_path / inputs,
        )  # fmt: skip
        assert result.exit_code == 0, result.output

    camera = namespace["build"]()
    feed = module_feed(camera, tmp_path / "frames-int64.npz", spec)
    assert feed["image"].dtype == np.uint8 and np.array_equal(feed["image"], frames)
    refusals = {
        "image.npz": (np.arange(24).reshape(2, 12) * 13, "holds int64 values 0..299, which do not fit uint8"),
        "float.npz": (np.zeros((2, 12)), "has dtype float64, expected uint8"),
    }
    for name, (array, words) in refusals.items():
        np.savez(tmp_path / name, image=array)
        result = run_cli("export", "onnx", tmp_path / "merged", "-o", tmp_path / "x.onnx", "--module", spec,
                         "--inputs", tmp_path / name)  # fmt: skip
        assert result.exit_code == 2 and result.stderr.count("\n") == 1 and words in result.stderr, result.output
    assert not (tmp_path / "x.onnx").exists()
    np.savez(tmp_path / "obs-u8.npz", image=np.zeros((2, 3, 32, 32), np.uint8), proprio=np.zeros((2, 8), np.uint8))
    with pytest.raises(BadInputError, match="'image' has dtype uint8, expected float32"):
        module_feed(robots.build_policy(), tmp_path / "obs-u8.npz", POLICY)
