"""`export onnx --task text-generation-with-past --stream-weights`: the KV-cache graph traced
without weights, its initializers streamed from the checkpoint. Oracles: transformers' cached
forward, and the ordinary (loaded) KV-cache export of the same checkpoint."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from lora_deploy.cli import main
from lora_deploy.export.generation import export_generation
from tests.export.test_generation import assert_describes
from tests.export.test_generation import test_kv_graph_equals_transformers_cached_forward as cached_forward_check


def signature(path):
    """Inputs and outputs with their dims, initializer names, metadata: what a user of the graph sees."""
    proto = onnx.load(str(path), load_external_data=False)
    values = [
        (v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
        for v in [*proto.graph.input, *proto.graph.output]
    ]
    return values, sorted(i.name for i in proto.graph.initializer), list(proto.metadata_props)


def test_streamed_kv_graph_equals_transformers_and_the_loaded_export(reference, kv_graph, tmp_path):
    base_dir, _ = reference("llama")
    out = tmp_path / "streamed.onnx"
    argv = ["export", "onnx", str(base_dir), "-o", str(out), "--task", "text-generation-with-past"]
    result = CliRunner().invoke(main, [*argv, "--stream-weights", "--parity", "full"])
    assert result.exit_code == 0, result.output
    assert "weights streamed" in result.output and "max abs error" in result.output
    assert (tmp_path / "streamed.onnx.data").is_file()
    # transformers' cached forward at a padded prefill and a decode step (GQA cache)
    cached_forward_check(reference, lambda family: out, "llama")
    # the same graph, as a user sees it, as the loaded export
    loaded = kv_graph("llama")
    assert signature(out) == signature(loaded)
    rng = np.random.default_rng(0)
    feed = {
        "input_ids": rng.integers(0, 200, (3, 1)),
        "attention_mask": np.ones((3, 10), np.int64),
        "position_ids": np.full((3, 1), 9),
    }
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for value in session.get_inputs()[3:]:
        feed[value.name] = rng.standard_normal((3, value.shape[1], 9, value.shape[3])).astype(np.float32)
    want = ort.InferenceSession(str(loaded), providers=["CPUExecutionProvider"]).run(None, feed)
    for got, expected in zip(session.run(None, feed), want):
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_streamed_kv_graph_with_proxy_parity_gpt2(reference, tmp_path):
    """GPT-2 (tied embeddings) with the parity check on a one-layer proxy: the proxy is
    proven, and the real graph still equals transformers."""
    base_dir, _ = reference("gpt2")
    out = tmp_path / "gpt2.onnx"
    result = export_generation(base_dir, out, stream_weights=True, parity="proxy")
    assert result.weights == "streamed" and result.parity.startswith("checked on a 1-layer proxy")
    assert result.max_abs_error is not None and result.max_abs_error < 1e-4
    assert_describes(result, out, weights="streamed")
    cached_forward_check(reference, lambda family: out, "gpt2")
