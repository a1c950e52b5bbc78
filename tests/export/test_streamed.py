"""export_checkpoint(stream_weights=True): traced on fake tensors, weights streamed from the
checkpoint by name; and --dtype auto, which follows the checkpoint (float16 stays float16)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from safetensors.numpy import load_file

from lora_deploy.compare import TOLERANCES
from lora_deploy.errors import BadInputError
from lora_deploy.export import streamed
from lora_deploy.export.model import export_checkpoint, resolve_dtype
from lora_deploy.modeling.samples import sample_inputs
from lora_deploy.modeling.tasks import load_config


@pytest.fixture(scope="module")
def exported(reference, tmp_path_factory):
    base, _ = reference("llama", "plain", dtype="float16")
    out = tmp_path_factory.mktemp("streamed") / "model.onnx"
    return base, export_checkpoint(base, out, dtype="auto", stream_weights=True)


def test_streamed_export_keeps_the_checkpoint_and_passes_parity(exported):
    base, result = exported
    assert (result.weights, result.parity, result.dtype) == ("streamed", "checked", "float16")
    assert result.dtype_source == "auto: the checkpoint is float16"
    assert result.max_abs_error is not None and result.path.with_name("model.onnx.data").is_file()
    stored = load_file(str(base / "model.safetensors"))
    model = onnx.load(str(result.path))
    inits = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for name, tensor in stored.items():  # byte for byte, in the checkpoint's dtype
        assert inits[name].dtype == np.float16 and inits[name].tobytes() == tensor.tobytes(), name
    assert set(inits) - set(stored) == {"model.rotary_emb.inv_freq"}  # a buffer, from the real build
    assert np.all(inits["model.rotary_emb.inv_freq"] > 0)
    dims = [[d.dim_param for d in value.type.tensor_type.shape.dim[:2]] for value in model.graph.input]
    assert dims == [["batch", "sequence"]] * len(model.graph.input)
    feed = sample_inputs(load_config(base), batch=3, seq=7)  # another shape than the trace's
    logits = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]
    assert logits.shape == (3, 7, 256) and np.isfinite(logits).all()


def test_parity_runs_on_the_model_when_it_fits_else_on_a_proxy(monkeypatch):
    monkeypatch.setattr(streamed, "memory_available", lambda: 10**9)
    where, why = streamed.parity_plan(2 * 10**9)
    assert where == "proxy" and why.startswith("the model itself would need ~4.0 GB")
    assert streamed.parity_plan(10**6) == ("full", "checked")
    monkeypatch.setattr(streamed, "memory_available", lambda: 10**12)  # a big machine: the budget decides
    assert streamed.parity_plan(streamed.PARITY_BUDGET)[0] == "proxy"
    assert streamed.parity_plan(10**12, "full")[0] == "full" and streamed.parity_plan(1, "skip")[0] == "skip"
    with pytest.raises(BadInputError, match="parity must be one of"):
        streamed.parity_plan(1, "sometimes")


def test_proxy_parity_exports_a_one_layer_copy_of_the_config_and_checks_it(reference, tmp_path, monkeypatch):
    base, _ = reference("llama", "plain", dtype="float16")
    monkeypatch.setattr(streamed, "PARITY_BUDGET", 1)  # as for a model too big to check itself
    result = export_checkpoint(base, tmp_path / "m.onnx", dtype="auto", stream_weights=True)
    assert result.parity.startswith("checked on a 1-layer proxy of the config") and "would need" in result.parity
    assert result.max_abs_error is not None and result.max_abs_error < TOLERANCES["float16"].atol
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # the proxy left nothing


def test_missing_parent_directories_are_made_as_for_a_loaded_export(reference, tmp_path, monkeypatch):
    base, _ = reference("llama", "plain", dtype="float16")
    out = tmp_path / "new" / "deeper" / "m.onnx"
    result = export_checkpoint(base, out, dtype="auto", stream_weights=True, parity="skip")
    assert result.path == out and sorted(p.name for p in out.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    (tmp_path / "a-file").write_text("")

    def trace_fake(*args, **kwargs):
        raise AssertionError("traced before the output's parent was checked")

    monkeypatch.setattr(streamed, "trace_fake", trace_fake)
    with pytest.raises(BadInputError, match=r"a-file: not a directory \(the output .* would be inside it\)"):
        export_checkpoint(base, tmp_path / "a-file" / "sub" / "m.onnx", dtype="auto", stream_weights=True)


def test_proxy_config_keeps_the_architecture_and_a_vocabulary_its_token_ids_need():
    from transformers import GPT2Config, LlamaConfig

    llama = streamed.proxy_config(LlamaConfig(num_hidden_layers=4, vocab_size=32000, bos_token_id=1, eos_token_id=2))
    assert (llama.num_hidden_layers, llama.vocab_size, llama.hidden_size) == (1, 512, 4096)
    gpt2 = streamed.proxy_config(GPT2Config(n_layer=12))  # eos 50256: the vocabulary stays
    assert (gpt2.n_layer, gpt2.vocab_size) == (1, 50257)


@pytest.mark.parametrize("stored, expected", [("float32", "float32"), ("float16", "float16"), ("bfloat16", "float32")])
def test_dtype_auto_follows_the_checkpoint(reference, stored, expected):
    base, _ = reference("llama", "plain", dtype=stored)
    dtype, why = resolve_dtype(base, "auto")
    assert dtype == expected and why.startswith(f"auto: the checkpoint is {stored}")
    assert resolve_dtype(base, "float32") == ("float32", "requested")
