"""`bench` on KV-cache graphs: prefill shapes (BATCHxSEQ, an empty cache) and decode steps
(BATCHxSEQ+PAST: SEQ new tokens after PAST cached ones), fed with the right cache tensors."""

from __future__ import annotations

import pytest

from lora_deploy.bench import run as bench
from lora_deploy.bench.schema import validate_report
from lora_deploy.bench.shapes import parse_shapes, shape_key
from lora_deploy.errors import BadInputError
from tests.bench.test_bench import tiny_graph


def test_decode_shapes_parse_and_round_trip():
    assert parse_shapes("1x128, 8x1+512,1x1+0") == [(1, 128), (8, 1, 512), (1, 1)]
    assert [shape_key(s) for s in parse_shapes("8x1+512,1x16")] == ["8x1+512", "1x16"]
    with pytest.raises(BadInputError, match="listed twice"):
        parse_shapes("1x1,1x1+0")
    with pytest.raises(BadInputError, match=r"BATCHxSEQ\+PAST"):
        parse_shapes("1x1+")


def test_bench_feeds_a_kv_graph_prefill_and_decode_steps(kv_graph):
    graph = kv_graph("llama")
    report = bench.run_bench({"base": graph, "copy": graph}, shapes="2x8,3x1+20", rounds=3, warmup=1, threads=1)
    validate_report(report)
    prefill, decode = report["results"]["2x8"], report["results"]["3x1+20"]
    assert "past" not in prefill and decode["past"] == 20
    fed = decode["variants"]["base"]["fed"]
    assert fed["inputs"]["input_ids"] == [3, 1] and fed["inputs"]["attention_mask"] == [3, 21]
    assert fed["inputs"]["position_ids"] == [3, 1] and fed["past"] == 20
    assert fed["inputs"]["past_key_values.1.value"] == [3, 2, 20, 16]  # GQA: 2 key/value heads
    assert prefill["variants"]["base"]["fed"]["inputs"]["past_key_values.0.key"] == [2, 2, 0, 16]
    for block, new_tokens in ((prefill, 2 * 8), (decode, 3 * 1)):
        entry = block["variants"]["copy"]
        # tokens/s counts the new tokens of each call, not the cached ones
        assert entry["throughput"]["tokens_per_s"] == pytest.approx(new_tokens / (entry["p50_ms"] / 1000))


def test_a_decode_shape_on_a_graph_without_cache_is_refused(tmp_path):
    with pytest.raises(BadInputError, match=r"1x1\+8 is a decode step.*takes no past_key_values"):
        bench.run_bench({"base": tiny_graph(tmp_path / "t.onnx")}, shapes="1x1+8", rounds=1, warmup=0)
