"""export_checkpoint(stream_weights=True): traced on fake tensors, weights streamed from the
checkpoint by name; and --dtype auto, which follows the checkpoint (float16 stays float16)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from safetensors.numpy import load_file

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


def test_parity_is_skipped_when_the_model_does_not_fit(monkeypatch):
    monkeypatch.setattr(streamed, "memory_available", lambda: 10**9)
    fits, status = streamed.parity_fits(2 * 10**9)
    assert not fits and status.startswith("skipped: needs ~4.0 GB")
    assert streamed.parity_fits(10**6) == (True, "checked")


@pytest.mark.parametrize("stored, expected", [("float32", "float32"), ("float16", "float16"), ("bfloat16", "float32")])
def test_dtype_auto_follows_the_checkpoint(reference, stored, expected):
    base, _ = reference("llama", "plain", dtype=stored)
    dtype, why = resolve_dtype(base, "auto")
    assert dtype == expected and why.startswith(f"auto: the checkpoint is {stored}")
    assert resolve_dtype(base, "float32") == ("float32", "requested")
