"""Runners: one interface over ONNX Runtime and torch, with feed checking."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import transformers
from torch import nn
from transformers import BertConfig, BertModel

from lora_deploy.backends import OnnxrtRunner, Runner, TorchRunner, check_feed
from lora_deploy.errors import BadInputError
from lora_deploy.export.model import export_checkpoint, export_module
from lora_deploy.modeling.samples import sample_inputs


class Controller(nn.Module):
    """Observation + goal in, action out: a stand-in for a robot policy."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, obs, goal):
        return self.net(obs) + goal


@pytest.fixture(scope="module")
def controller(tmp_path_factory):
    """(module, onnx path) exported once with a dynamic batch."""
    torch.manual_seed(0)
    module = Controller().eval()
    path = tmp_path_factory.mktemp("ctrl") / "controller.onnx"
    example = {"obs": torch.randn(3, 6), "goal": torch.randn(3, 2)}
    export_module(
        module, example, path, output_names=["action"], dynamic_axes={"obs": {0: "batch"}, "goal": {0: "batch"}}
    )
    return module, path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=64,
    )
    path = tmp_path_factory.mktemp("bert") / "bert"
    BertModel(config).save_pretrained(path)
    return path


def _feed(batch=5, dtype=np.float32):
    rng = np.random.default_rng(0)
    return {"obs": rng.standard_normal((batch, 6)).astype(dtype), "goal": rng.standard_normal((batch, 2)).astype(dtype)}


def test_onnxrt_runner_metadata_and_infer(controller):
    module, path = controller
    runner = OnnxrtRunner(path, threads=1, name="ctrl")
    assert runner.name == "ctrl" and not runner.is_active
    with runner:
        assert runner.is_active
        assert runner.input_metadata() == {
            "obs": (np.dtype(np.float32), ("batch", 6)),
            "goal": (np.dtype(np.float32), ("batch", 2)),
        }
        feed = _feed()
        got = runner.infer(feed)
    assert not runner.is_active
    assert list(got) == ["action"]
    with torch.inference_mode():
        want = module(torch.from_numpy(feed["obs"]), torch.from_numpy(feed["goal"])).numpy()
    np.testing.assert_allclose(got["action"], want, atol=1e-5, rtol=1e-4)


def test_onnxrt_runner_run_options_hook(controller):
    _, path = controller
    with OnnxrtRunner(path) as runner:
        options = ort.RunOptions()
        options.logid = "lora-adapter-hook"
        runner.run_options = options  # where later code adds active LoRA adapters
        first = runner.infer(_feed())
        second = runner.infer(_feed(), run_options=ort.RunOptions())
    np.testing.assert_array_equal(first["action"], second["action"])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f.pop("goal"), "missing input 'goal'"),
        (lambda f: f.update(extra=np.zeros(1, np.float32)), "unexpected input 'extra'"),
        (lambda f: f.update(obs=f["obs"].astype(np.float64)), "'obs' has dtype float64"),
        (lambda f: f.update(obs=f["obs"][None]), "'obs' has rank 3"),
        (lambda f: f.update(obs=np.zeros((5, 7), np.float32)), "'obs' dim 1 is 7"),
        (lambda f: f.update(goal=np.zeros((4, 2), np.float32)), "'goal' dim 0 .* is 4"),
        (lambda f: f.update(obs=[[0.0] * 6] * 5), "'obs' is a list"),
    ],
    ids=["missing", "extra", "dtype", "rank", "static-dim", "batch-mismatch", "not-array"],
)
def test_bad_feeds_name_the_input(controller, change, message):
    _, path = controller
    feed = _feed()
    change(feed)
    with OnnxrtRunner(path) as runner, pytest.raises(BadInputError, match=message):
        runner.infer(feed)


def test_runner_lifecycle_errors(controller, tmp_path):
    _, path = controller
    with pytest.raises(BadInputError, match="not active"):
        OnnxrtRunner(path).infer(_feed())
    with pytest.raises(BadInputError, match="not found"):
        OnnxrtRunner(tmp_path / "nope.onnx").activate()
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf")
    with pytest.raises(BadInputError, match="cannot load"):
        OnnxrtRunner(garbage).activate()
    with pytest.raises(BadInputError, match="provider"):
        OnnxrtRunner(path, providers=["NoSuchExecutionProvider"]).activate()


def test_torch_runner_plain_module(controller):
    module, _ = controller
    feed = _feed(batch=4)
    with TorchRunner(module, output_names=["action"]) as runner:
        assert set(runner.input_metadata()) == {"obs", "goal"}
        got = runner.infer(feed)
    with torch.inference_mode():
        want = module(torch.from_numpy(feed["obs"]), torch.from_numpy(feed["goal"])).numpy()
    np.testing.assert_array_equal(got["action"], want)
    with TorchRunner(module) as runner:
        assert list(runner.infer(feed)) == ["output"]
        with pytest.raises(BadInputError, match="missing input 'goal'"):
            runner.infer({"obs": feed["obs"]})


def test_torch_runner_checkpoint_dir(bert_dir):
    feed = sample_inputs(bert_dir, batch=3, seq=7)
    with TorchRunner(bert_dir) as runner:
        meta = runner.input_metadata()
        assert meta == {
            name: (np.dtype(np.int64), ("batch", "sequence"))
            for name in ("input_ids", "attention_mask", "token_type_ids")
        }
        got = runner.infer(feed)
        with pytest.raises(BadInputError, match="'input_ids' has dtype int32"):
            runner.infer({**feed, "input_ids": feed["input_ids"].astype(np.int32)})
    model = transformers.AutoModel.from_pretrained(bert_dir).eval()
    with torch.inference_mode():
        want = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()
    np.testing.assert_allclose(got["last_hidden_state"], want, atol=1e-5, rtol=1e-4)


def test_onnxrt_and_torch_runners_agree_on_checkpoint(bert_dir, tmp_path):
    """The point of one interface: the same feed dict through both backends."""
    result = export_checkpoint(bert_dir, tmp_path / "bert.onnx")
    feed = sample_inputs(bert_dir, batch=4, seq=9, seed=2)
    runners: list[Runner] = [OnnxrtRunner(result.path), TorchRunner(bert_dir)]
    metadata, outputs = [], []
    for runner in runners:
        with runner:
            metadata.append(runner.input_metadata())
            outputs.append(runner.infer(feed))
    assert metadata[0] == metadata[1]
    assert list(outputs[0]) == list(outputs[1]) == ["last_hidden_state"]
    np.testing.assert_allclose(outputs[0]["last_hidden_state"], outputs[1]["last_hidden_state"], atol=1e-4, rtol=1e-3)


def test_check_feed_skips_unknown_parts():
    check_feed({"x": np.zeros((2, 3), np.float32)}, {"x": (None, None)})
    check_feed({"x": np.zeros((2, 3), np.int8)}, {"x": (None, ("n", 3))})
    with pytest.raises(BadInputError, match="'x' dim 1 is 3, expected 4"):
        check_feed({"x": np.zeros((2, 3), np.int8)}, {"x": (None, ("n", 4))})


def test_a_runner_takes_a_path_a_session_or_a_loader(controller):
    """polygraphy's contract: the same runner over a path, a ready session, or a lazy loader."""
    from lora_deploy.backends import SessionFromOnnx

    _, path = controller
    feed = _feed()
    calls = []

    def counting_loader():
        calls.append(1)
        return SessionFromOnnx(path, threads=1)()

    ready = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = ready.run(["action"], feed)[0]
    # The counting loader comes last: before it, nothing may have called it.
    for source in (path, ready, SessionFromOnnx(path, threads=1), counting_loader):
        runner = OnnxrtRunner(source)
        assert calls == []  # the loader is called on activate(), not before
        with runner:
            np.testing.assert_array_equal(runner.infer(feed)["action"], want)
    assert calls == [1]


def test_the_loader_is_lazy_and_checks_once(tmp_path):
    """A loader for a missing file is cheap to build; the error comes, as one line, when called."""
    from lora_deploy.backends import SessionFromOnnx

    loader = SessionFromOnnx(tmp_path / "missing.onnx")
    with pytest.raises(BadInputError, match="missing.onnx: ONNX file not found"):
        loader()


def test_overridable_inputs_are_optional_feeds_checked_like_inputs(tmp_path):
    """A graph input with a default (ONNX Runtime's overridable initializer) may be left out;
    fed, its fixed dims are checked before ONNX Runtime sees it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [x, w],
        [y],
        initializer=[numpy_helper.from_array(np.ones(4, np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "g.onnx")
    feed = {"x": np.zeros((2, 4), np.float32)}
    with OnnxrtRunner(tmp_path / "g.onnx") as runner:
        np.testing.assert_array_equal(runner.infer(feed)["y"], np.ones((2, 4), np.float32))
        np.testing.assert_array_equal(runner.infer({**feed, "w": np.full(4, 2, np.float32)})["y"], np.full((2, 4), 2))
        with pytest.raises(BadInputError, match="'w' dim 0 is 3, expected 4"):
            runner.infer({**feed, "w": np.ones(3, np.float32)})
