"""ONNX export: tasks, names, dynamic axes, parity with transformers, atomicity.

Every reference output here comes from the transformers model called
directly, never from lora_deploy code, and is computed at a batch/seq other
than the export's example inputs (2 x 16) to prove the axes are dynamic.
Each tiny model is exported once per module (exports take seconds).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from lora_deploy.errors import BadInputError, CheckpointError, ExportError
from lora_deploy.export import model as export_mod
from lora_deploy.export.model import ExportResult, export_checkpoint, export_module
from lora_deploy.modeling.hf import load_for_task
from lora_deploy.modeling.samples import sample_inputs
from lora_deploy.modeling.tasks import TASKS, detect_task, model_input_names

VOCAB = 128

# kind -> (builder, auto class used for the reference, task, output name)
MODELS = {
    "llama": (
        lambda: LlamaForCausalLM(
            LlamaConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=VOCAB,
                max_position_embeddings=64,
                pad_token_id=0,
            )
        ),
        "AutoModelForCausalLM",
        "causal-lm",
        "logits",
    ),
    "gpt2": (
        lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=VOCAB, n_positions=64)),
        "AutoModelForCausalLM",
        "causal-lm",
        "logits",
    ),
    "bert-cls": (
        lambda: BertForSequenceClassification(
            BertConfig(
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                intermediate_size=64,
                vocab_size=VOCAB,
                max_position_embeddings=64,
                num_labels=3,
            )
        ),
        "AutoModelForSequenceClassification",
        "sequence-classification",
        "logits",
    ),
    "bert": (
        lambda: BertModel(
            BertConfig(
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                intermediate_size=64,
                vocab_size=VOCAB,
                max_position_embeddings=64,
            )
        ),
        "AutoModel",
        "feature-extraction",
        "last_hidden_state",
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> checkpoint dir, saved once for the module."""
    root = tmp_path_factory.mktemp("ckpt")
    dirs = {}
    for kind, (build, *_rest) in MODELS.items():
        torch.manual_seed(0)
        model = build().eval()
        model.save_pretrained(root / kind)
        dirs[kind] = root / kind
    return dirs


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    """kind -> ExportResult; each model is exported at most once, on first use."""
    out = tmp_path_factory.mktemp("onnx")
    cache: dict[str, ExportResult] = {}

    def get(kind: str) -> ExportResult:
        if kind not in cache:
            cache[kind] = export_checkpoint(checkpoints[kind], out / f"{kind}.onnx")
        return cache[kind]

    return get


def _reference(model_dir: Path, auto_class: str, output: str, feed: dict[str, np.ndarray], dtype=torch.float32):
    """Run the transformers model directly, with its default attention."""
    model = getattr(transformers, auto_class).from_pretrained(model_dir, dtype=dtype).eval()
    with torch.inference_mode():
        result = model(**{name: torch.from_numpy(value) for name, value in feed.items()})
    return getattr(result, output).float().numpy()


def _dims(value_info) -> list:
    return [dim.dim_param or dim.dim_value for dim in value_info.type.tensor_type.shape.dim]


# ------------------------------------------------------------- parity ----


@pytest.mark.parametrize("kind", list(MODELS))
def test_export_matches_transformers_at_other_shape(kind, checkpoints, exported):
    _build, auto_class, task, output = MODELS[kind]
    result = exported(kind)
    assert result.task == task
    assert result.output_names == (output,)
    assert result.max_abs_error < 1e-4

    graph = onnx.load(result.path).graph
    expected_inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if kind.startswith("bert") else [])
    assert [value.name for value in graph.input] == expected_inputs
    assert list(result.input_names) == expected_inputs
    assert [value.name for value in graph.output] == [output]
    for value in graph.input:
        assert _dims(value) == ["batch", "sequence"]
    assert _dims(graph.output[0])[0] == "batch"

    feed = sample_inputs(checkpoints[kind], batch=3, seq=11, seed=7)  # export used 2 x 16
    assert feed["attention_mask"][1].min() == 0  # padding is exercised
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = session.run([output], feed)[0]
    want = _reference(checkpoints[kind], auto_class, output, feed)
    assert got.shape == want.shape
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)


def test_initializers_keep_checkpoint_names(checkpoints, exported):
    """A later feature finds weights by name: they must equal the state-dict keys."""
    result = exported("llama")
    names = {init.name for init in onnx.load(result.path).graph.initializer}
    keys = set(load_file(checkpoints["llama"] / "model.safetensors"))
    assert keys <= names
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert not any(name.startswith("val_") for name in names)

    # GPT-2 ties lm_head.weight to transformer.wte.weight: one initializer,
    # under the name the checkpoint uses.
    gpt2_names = {init.name for init in onnx.load(exported("gpt2").path).graph.initializer}
    assert set(load_file(checkpoints["gpt2"] / "model.safetensors")) == gpt2_names
    assert "lm_head.weight" not in gpt2_names


def test_the_graph_names_no_path_of_this_machine(exported):
    """The exporter's per-node stack traces (absolute paths of the exporting machine) are
    dropped: the same export gives the same bytes anywhere; module names stay."""
    import lora_deploy

    raw = exported("llama").path.read_bytes()
    for path in (Path(lora_deploy.__file__).parent.parent, Path(transformers.__file__).parent, Path.home()):
        assert str(path).encode() not in raw, path
    nodes = onnx.load(exported("llama").path).graph.node
    assert all("pkg.torch.onnx.stack_trace" not in {p.key for p in n.metadata_props} for n in nodes)
    assert any(p.key == "namespace" and "LlamaModel" in p.value for n in nodes for p in n.metadata_props)


def test_float16_export(checkpoints, tmp_path):
    result = export_checkpoint(checkpoints["gpt2"], tmp_path / "gpt2-fp16.onnx", dtype="float16")
    assert result.dtype == "float16"
    graph = onnx.load(result.path).graph
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    feed = sample_inputs(checkpoints["gpt2"], batch=3, seq=9, seed=3)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], feed)[0]
    assert got.dtype == np.float16
    want = _reference(checkpoints["gpt2"], "AutoModelForCausalLM", "logits", feed)  # float32 reference
    # What float16 costs, measured by an oracle: PyTorch running the same model in float16
    # (3e-4 here, about one float16 ulp of these logits). The graph may lose as much, twice
    # over for other kernels and summation orders; not the 1e-2 + 1e-2|x| once allowed (57x).
    half = _reference(checkpoints["gpt2"], "AutoModelForCausalLM", "logits", feed, dtype=torch.float16)
    budget = np.abs(half - want).max()
    assert 0 < budget < 1e-3
    error = np.abs(got.astype(np.float32) - want)
    assert 0 < error.max() <= 2 * budget, (error.max(), budget)


# ----------------------------------------------------- any nn.Module ----


class Controller(nn.Module):
    """A robot-controller-like MLP: observation in, action out."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, obs):
        return self.net(obs)


@pytest.fixture(scope="module")
def controller_onnx(tmp_path_factory):
    torch.manual_seed(0)
    module = Controller().eval()
    path = tmp_path_factory.mktemp("ctrl") / "controller.onnx"
    written = export_module(
        module, {"obs": torch.randn(4, 6)}, path, output_names=["action"], dynamic_axes={"obs": {0: "batch"}}
    )
    return module, written


def test_export_module_controller(controller_onnx):
    module, path = controller_onnx
    assert path.is_file()
    model = onnx.load(path)
    assert [value.name for value in model.graph.input] == ["obs"]
    assert [value.name for value in model.graph.output] == ["action"]
    assert _dims(model.graph.input[0]) == ["batch", 6]
    assert {init.name for init in model.graph.initializer} == {
        "net.0.weight",
        "net.0.bias",
        "net.2.weight",
        "net.2.bias",
    }
    obs = np.random.default_rng(1).standard_normal((7, 6)).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"obs": obs})[0]
    with torch.inference_mode():
        want = module(torch.from_numpy(obs)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_external_data_is_one_file_next_to_model(tmp_path):
    torch.manual_seed(0)
    path = export_module(
        Controller().eval(),
        {"obs": torch.randn(2, 6)},
        tmp_path / "c.onnx",
        output_names=["action"],
        external_data=True,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.onnx", "c.onnx.data"]
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.run(None, {"obs": np.zeros((2, 6), np.float32)})[0].shape == (2, 2)


def test_a_full_disk_is_a_failed_write_naming_the_output(tmp_path, monkeypatch):
    """A write error while saving is exit 3 (OutputError) naming the path the user gave,
    not exit 2 (ExportError: "the model cannot be exported") naming a file name."""
    import errno

    import onnx_ir as ir

    from lora_deploy.errors import OutputError

    def full(model, path, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ir, "save", full)
    target = tmp_path / "c.onnx"
    with pytest.raises(OutputError, match="No space left on device") as caught:
        export_module(Controller().eval(), {"obs": torch.randn(2, 6)}, target, output_names=["action"])
    assert str(caught.value).startswith(f"{target}: cannot write")
    assert list(tmp_path.iterdir()) == []


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    def reject(path):
        raise ExportError("forced failure")

    monkeypatch.setattr(export_mod, "_check_onnx", reject)
    target = tmp_path / "c.onnx"
    target.write_bytes(b"previous export")
    with pytest.raises(ExportError, match="forced failure"):
        export_module(Controller().eval(), {"obs": torch.randn(2, 6)}, target, output_names=["action"], overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.onnx"]  # no temp dir, no data file
    assert target.read_bytes() == b"previous export"


def test_parity_failure_is_export_error_and_cleaned_up(tmp_path, monkeypatch):
    """Torch and ORT disagree -> ExportError with the error size; nothing written."""
    real = export_mod._torch_outputs
    monkeypatch.setattr(export_mod, "_torch_outputs", lambda m, x: [t + 1.0 for t in real(m, x)])
    with pytest.raises(ExportError, match="max abs error 1"):
        export_module(Controller().eval(), {"obs": torch.randn(2, 6)}, tmp_path / "c.onnx", output_names=["action"])
    assert list(tmp_path.iterdir()) == []


def test_export_module_bad_arguments(tmp_path):
    module = Controller().eval()
    with pytest.raises(BadInputError, match="obs"):
        export_module(module, {"obs": [1.0] * 6}, tmp_path / "a.onnx", output_names=["action"])
    with pytest.raises(BadInputError, match="goal"):
        export_module(
            module,
            {"obs": torch.randn(2, 6)},
            tmp_path / "a.onnx",
            output_names=["action"],
            dynamic_axes={"goal": {0: "batch"}},
        )
    with pytest.raises(BadInputError, match="must map axis"):
        export_module(
            module, {"obs": torch.randn(2, 6)}, tmp_path / "a.onnx", output_names=["action"], dynamic_axes={"obs": [0]}
        )
    with pytest.raises(BadInputError, match="output name"):
        export_module(module, {"obs": torch.randn(2, 6)}, tmp_path / "a.onnx", output_names=["a", "b"])
    with pytest.raises(BadInputError, match="directory"):
        export_module(module, {"obs": torch.randn(2, 6)}, tmp_path, output_names=["action"])
    assert list(tmp_path.iterdir()) == []


def test_an_opset_below_18_is_refused_before_the_model_is_loaded(reference, tmp_path, monkeypatch):
    """torch 2.13's exporter writes opset 18 and up: a lower one (or one past onnx's) is one
    line up front, not a failure after the trace (the exporter is never called)."""
    from click.testing import CliRunner

    from lora_deploy.cli import main

    base, adapter = reference("llama", "plain")

    def no_trace(*args, **kwargs):
        raise AssertionError("the exporter ran")

    monkeypatch.setattr(torch.onnx, "export", no_trace)
    top = onnx.defs.onnx_opset_version()
    for opset in (9, 17, top + 1):
        kinds = ([], ["--dynamic-adapters", "--adapter", adapter], ["--task", "text-generation-with-past"])
        for extra in kinds:
            args = ["export", "onnx", base, "-o", tmp_path / "m.onnx", "--opset", opset, *extra]
            result = CliRunner().invoke(main, [str(a) for a in args])
            assert result.exit_code == 2, result.output
            assert result.stderr == f"error: opset {opset} is not supported: the exporter writes opsets 18..{top}\n"
    with pytest.raises(BadInputError, match="opsets 18"):
        export_module(
            Controller().eval(), {"obs": torch.randn(2, 6)}, tmp_path / "a.onnx", output_names=["action"], opset=17
        )
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------ tasks, inputs ----


@pytest.mark.parametrize(
    "arch, task",
    [
        ("LlamaForCausalLM", "causal-lm"),
        ("GPT2LMHeadModel", "causal-lm"),
        ("BertForSequenceClassification", "sequence-classification"),
        ("BertForTokenClassification", "token-classification"),
        ("BertModel", "feature-extraction"),
        ("LlamaModel", "feature-extraction"),
    ],
)
def test_detect_task(arch, task):
    assert detect_task(BertConfig(architectures=[arch])) == task
    assert task in TASKS


@pytest.mark.parametrize("archs", [None, ["BertForMaskedLM"], ["GPT2DoubleHeadsModel"]])
def test_detect_task_refuses(archs):
    with pytest.raises(BadInputError):
        detect_task(BertConfig(architectures=archs))


def test_model_input_names():
    assert model_input_names(BertConfig()) == ["input_ids", "attention_mask", "token_type_ids"]
    assert model_input_names(LlamaConfig()) == ["input_ids", "attention_mask"]
    assert model_input_names(GPT2Config()) == ["input_ids", "attention_mask"]
    # roberta-base ships type_vocab_size=1 (the class default is 2)
    assert model_input_names(transformers.RobertaConfig(type_vocab_size=1)) == ["input_ids", "attention_mask"]


def test_sample_inputs_deterministic_and_in_range():
    config = LlamaConfig(vocab_size=50, pad_token_id=3)
    first = sample_inputs(config, batch=3, seq=8, seed=5)
    again = sample_inputs(config, batch=3, seq=8, seed=5)
    other = sample_inputs(config, batch=3, seq=8, seed=6)
    assert list(first) == ["input_ids", "attention_mask"]
    for name in first:
        assert first[name].dtype == np.int64 and first[name].shape == (3, 8)
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["input_ids"], other["input_ids"])
    ids, mask = first["input_ids"], first["attention_mask"]
    assert ids.min() >= 0 and ids.max() < 50
    assert mask[0].all() and mask[2].all()
    assert mask[1, 0] == 1 and mask[1, -1] == 0  # right padding, real tokens kept
    assert (ids[mask == 0] == 3).all() and not (ids[mask == 1] == 3).any()
    single = sample_inputs(config, batch=1, seq=8)
    assert single["attention_mask"].all()


def test_sample_inputs_from_metadata():
    feed = sample_inputs(
        {"obs": (np.float32, ("batch", 6)), "input_ids": (np.int64, ("batch", "sequence"))},
        batch=4,
        seq=5,
        vocab_size=10,
    )
    assert feed["obs"].shape == (4, 6) and feed["obs"].dtype == np.float32
    assert feed["input_ids"].shape == (4, 5) and feed["input_ids"].max() < 10
    bert = sample_inputs(BertConfig(vocab_size=30), batch=2, seq=6)
    np.testing.assert_array_equal(bert["token_type_ids"][0], [0, 0, 0, 1, 1, 1])


# ---------------------------------------------------------- bad input ----


def test_bad_inputs(tmp_path, checkpoints):
    with pytest.raises(BadInputError, match="not found"):
        export_checkpoint(tmp_path / "missing", tmp_path / "m.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        export_checkpoint(tmp_path / "empty", tmp_path / "m.onnx")
    with pytest.raises(BadInputError, match="unknown task"):
        export_checkpoint(checkpoints["bert"], tmp_path / "m.onnx", task="translation")
    with pytest.raises(BadInputError, match="dtype"):
        export_checkpoint(checkpoints["bert"], tmp_path / "m.onnx", dtype="int8")
    weird = tmp_path / "weird"
    weird.mkdir()
    (weird / "config.json").write_text(json.dumps({"model_type": "no-such-model", "architectures": ["NoSuchModel"]}))
    with pytest.raises(BadInputError, match="unsupported architecture"):
        export_checkpoint(weird, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_load_for_task(checkpoints):
    model = load_for_task(checkpoints["bert-cls"], "auto")
    assert isinstance(model, BertForSequenceClassification) and not model.training
    assert model.config._attn_implementation == "eager"
    bare = load_for_task(checkpoints["bert-cls"], "feature-extraction")
    assert isinstance(bare, BertModel)
    half = load_for_task(checkpoints["llama"], "auto", "float16")
    assert next(half.parameters()).dtype == torch.float16
