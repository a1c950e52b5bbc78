"""KV-cache graphs (export --task text-generation-with-past) against transformers' cached forward
and PEFT's generate: the oracles are the model itself and PEFT, never our wrapper."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from lora_deploy.backends.onnxrt.decode import onnx_generator
from lora_deploy.backends.onnxrt.lora_format import pack_adapter
from lora_deploy.cli import main
from lora_deploy.errors import BadInputError
from lora_deploy.examples.models import build_base
from lora_deploy.export.generation import export_generation
from tests.oracle import load_model, peft_model

N_NEW = 8


def run(session, feed):
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feed)))


def at(cache: np.ndarray, real: np.ndarray) -> np.ndarray:
    """A cache tensor [batch, heads, positions, head_size] at the real (unpadded) positions."""
    return cache.transpose(0, 2, 1, 3)[real]


def assert_describes(result, path, weights="loaded") -> None:
    """An ExportResult of a float32 KV-cache export against the graph it names, read back by onnx."""
    proto = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in proto.graph.initializer}
    assert result.path == path and result.task == "text-generation-with-past" and result.weights == weights
    assert list(result.input_names) == [v.name for v in proto.graph.input if v.name not in initializers]
    assert list(result.output_names) == [v.name for v in proto.graph.output]
    assert result.opset == next(o.version for o in proto.opset_import if o.domain == "")
    assert result.dtype == "float32" and result.dtype_source == "requested"
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def layers(model):
    cfg = model.config
    return cfg.num_hidden_layers


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_kv_graph_equals_transformers_cached_forward(reference, kv_graph, family):
    base_dir, _ = reference(family)
    model = load_model(base_dir)
    session = ort.InferenceSession(str(kv_graph(family)), providers=["CPUExecutionProvider"])
    n = layers(model)
    past_names = [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "position_ids", *past_names]
    presents = [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    assert [o.name for o in session.get_outputs()] == ["logits", *presents]
    cfg = model.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head = cfg.hidden_size // cfg.num_attention_heads
    past_shape = session.get_inputs()[3].shape
    assert past_shape[1:] == [kv_heads, "past_sequence", head] and isinstance(past_shape[0], str)
    if family == "llama":
        assert kv_heads < cfg.num_attention_heads  # GQA: the cache holds the fewer key/value heads

    # Prefill: two prompts of 7 and 4 tokens, left-padded, past length 0.
    ids = torch.tensor([[17, 40, 33, 81, 29, 64, 21], [0, 0, 0, 55, 23, 90, 37]])
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    empty = np.zeros((2, kv_heads, 0, head), np.float32)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
    got = run(session, {**feed, **{name: empty for name in past_names}})
    real = mask.numpy().astype(bool)
    np.testing.assert_allclose(got["logits"][real], want.logits.numpy()[real], atol=1e-4, rtol=1e-3)
    cache = [t for layer in want.cache.layers for t in (layer.keys, layer.values)]
    for name, tensor in zip(presents, cache):
        # Padded positions are undefined past the first layer (their attention rows are fully masked).
        np.testing.assert_allclose(at(got[name], real), at(tensor.numpy(), real), atol=1e-4, rtol=1e-3)

    # Decode step: one token per row after the 7 cached ones, the past taken from transformers' cache.
    nxt = want.logits[:, -1].argmax(-1, keepdim=True)
    mask2 = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
    pos2 = pos[:, -1:] + 1
    past = {name: tensor.numpy().copy() for name, tensor in zip(past_names, cache)}
    with torch.no_grad():
        want2 = model(input_ids=nxt, attention_mask=mask2, position_ids=pos2, cache=want.cache, use_cache=True)
    got2 = run(
        session, {"input_ids": nxt.numpy(), "attention_mask": mask2.numpy(), "position_ids": pos2.numpy(), **past}
    )
    assert got2["logits"].shape == (2, 1, cfg.vocab_size)
    np.testing.assert_allclose(got2["logits"], want2.logits.numpy(), atol=1e-4, rtol=1e-3)
    cache2 = [t for layer in want2.cache.layers for t in (layer.keys, layer.values)]
    real2 = mask2.numpy().astype(bool)
    for name, tensor in zip(presents, cache2):
        assert got2[name].shape[2] == 8
        np.testing.assert_allclose(at(got2[name], real2), at(tensor.numpy(), real2), atol=1e-4, rtol=1e-3)


def peft_tokens(base_dir, adapter_dir, prompts, adapter=True):
    """PEFT's greedy generate (transformers' generate, left padding), N_NEW tokens, no EOS stop."""
    model = peft_model(base_dir, adapter_dir) if adapter else load_model(base_dir)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[:, width:].numpy()


PROMPTS = [[5, 61, 23, 99, 41, 17, 8, 30, 77], [12, 45, 88], [70, 3, 54, 19, 26]]


def test_dynamic_kv_graph_switches_between_adapter_and_base(reference, kv_graph, tmp_path):
    base_dir, adapter_dir = reference("llama")
    graph = kv_graph("llama", "dynamic")
    packed = pack_adapter(adapter_dir, tmp_path / "task.onnx_adapter", onnx_path=graph)
    with_adapter = onnx_generator(graph, adapter=packed)(PROMPTS, N_NEW)
    np.testing.assert_array_equal(with_adapter.tokens, peft_tokens(base_dir, adapter_dir, PROMPTS))
    base = onnx_generator(graph)(PROMPTS, N_NEW)
    np.testing.assert_array_equal(base.tokens, peft_tokens(base_dir, adapter_dir, PROMPTS, adapter=False))
    assert (with_adapter.tokens != base.tokens).any()  # the adapter is seen, so the test can fail


def test_kv_graph_of_the_base_generates_the_base(reference, kv_graph):
    base_dir, adapter_dir = reference("gpt2")
    got = onnx_generator(kv_graph("gpt2"))(PROMPTS, N_NEW)
    assert_describes(kv_graph.results["gpt2"], kv_graph("gpt2"))
    np.testing.assert_array_equal(got.tokens, peft_tokens(base_dir, adapter_dir, PROMPTS, adapter=False))
    assert got.logits.shape == (3, N_NEW, load_model(base_dir).config.vocab_size)


@pytest.mark.slow
def test_multi_adapter_kv_graph_rows(reference, kv_graph):
    base_dir, adapter_dir = reference("gpt2")
    graph = kv_graph("gpt2", "multi")
    np.testing.assert_array_equal(
        onnx_generator(graph, adapter_id=0)(PROMPTS, N_NEW).tokens, peft_tokens(base_dir, adapter_dir, PROMPTS)
    )
    np.testing.assert_array_equal(
        onnx_generator(graph, adapter_id=-1)(PROMPTS, N_NEW).tokens,
        peft_tokens(base_dir, adapter_dir, PROMPTS, adapter=False),
    )


def test_unsupported_family_is_refused_in_one_line_nothing_written(tmp_path):
    base_dir = build_base("bert", tmp_path / "in" / "bert")
    out = tmp_path / "out" / "bert.onnx"
    for extra in ([], ["--dynamic-adapters", "--targets", "query"]):
        argv = ["export", "onnx", str(base_dir), "-o", str(out), "--task", "text-generation-with-past", *extra]
        result = CliRunner().invoke(main, argv)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "model family 'bert'" in lines[0], result.stderr
        assert not out.parent.exists()
    with pytest.raises(BadInputError, match="model family 'bert'"):
        export_generation(base_dir, out, stream_weights=True)
    assert not out.parent.exists()
