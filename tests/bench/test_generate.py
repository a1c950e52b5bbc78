"""`bench --generate N`: every round one greedy generation per KV-cache graph, interleaved and
paired like the other modes, with prefill / per-token decode figures and tokens/s."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from lora_deploy.backends import registry
from lora_deploy.backends.onnxrt.decode import onnx_generator
from lora_deploy.backends.onnxrt.lora_format import pack_adapter
from lora_deploy.bench import generation, measure
from lora_deploy.bench import run as bench
from lora_deploy.bench.report import to_markdown
from lora_deploy.bench.schema import validate_report
from lora_deploy.cli import main
from lora_deploy.errors import BadInputError
from tests.bench.test_bench import tiny_graph

N_NEW = 5


@pytest.fixture(scope="module")
def graphs(reference, kv_graph, tmp_path_factory):
    """(base KV graph, dynamic KV graph, the adapter packed for it)."""
    _, adapter_dir = reference("llama")
    dynamic = kv_graph("llama", "dynamic")
    packed = pack_adapter(adapter_dir, tmp_path_factory.mktemp("gen") / "task.onnx_adapter", onnx_path=dynamic)
    return kv_graph("llama"), dynamic, packed


def test_the_timed_generation_is_the_adapters_generation(graphs):
    """What bench times on a dynamic graph with --adapter is the adapter's greedy generation
    (the generator verify --generate checks against PEFT), and it records one time per step."""
    _, dynamic, packed = graphs
    prompt = [[5, 61, 23, 99, 41, 17]]
    want = onnx_generator(dynamic, adapter=packed)(prompt, N_NEW).tokens
    base = onnx_generator(dynamic)(prompt, N_NEW).tokens
    assert (want != base).any()  # the adapter changes the tokens, so the check can fail
    variant = registry.open_timed("dynamic", dynamic, "onnxruntime", threads=1, adapter=packed)
    try:
        recorded = []
        ids = np.asarray(prompt, np.int64)
        got = variant.bind_generation(ids, np.ones_like(ids), N_NEW, recorded.append)()
    finally:
        variant.close()
    np.testing.assert_array_equal(got.tokens, want)
    assert len(recorded) == 1 and len(recorded[0]) == N_NEW and all(t > 0 for t in recorded[0])


def test_bench_generate_reports_prefill_decode_and_tokens_per_s(graphs):
    base, dynamic, packed = graphs
    rounds = 4
    report = bench.run_bench(
        {"base": base, "dynamic": dynamic},
        adapters={"dynamic": packed},
        shapes="1x6,2x3",
        generate=N_NEW,
        rounds=rounds,
        warmup=2,
        threads=1,
        max_overhead="100%",
    )
    validate_report(report)
    assert report["config"]["generate"] == N_NEW
    # Three sessions per variant (the default): 4 generations split 2 + 1 + 1, each one's steps kept.
    assert report["config"]["sessions"] == 3
    assert report["results"]["1x6"]["variants"]["dynamic"]["sample_sessions"] == [0, 0, 1, 2]
    for key, batch in (("1x6", 1), ("2x3", 2)):
        block = report["results"][key]
        assert block["generate"] == N_NEW
        for name, entry in block["variants"].items():
            gen = entry["generation"]
            assert entry["fed"]["generated"] == N_NEW and entry["fed"]["inputs"]["input_ids"] == [batch, int(key[2:])]
            assert len(gen["prefill_s"]) == rounds and all(len(r) == N_NEW - 1 for r in gen["decode_step_s"])
            # Round i's steps are round i's timed generation: they add up to (just under) its sample.
            for sample, prefill, steps in zip(entry["samples_s"], gen["prefill_s"], gen["decode_step_s"]):
                inside = prefill + sum(steps)
                assert 0.5 * sample < inside <= sample
            pooled = [t for r in gen["decode_step_s"] for t in r]
            assert gen["decode_p50_ms"] == pytest.approx(1000 * np.median(pooled))
            assert gen["prefill_p50_ms"] == pytest.approx(1000 * np.median(gen["prefill_s"]))
            assert gen["decode_tokens_per_s"] == pytest.approx(batch / np.median(pooled))
            # tokens/s counts the generated tokens of each whole generation, not the prompt
            assert entry["throughput"]["tokens_per_s"] == pytest.approx(batch * N_NEW / (entry["p50_ms"] / 1000))
            assert (gen["decode_ratio"] is None) == (name == "base")
        ratio = block["variants"]["dynamic"]["generation"]["decode_ratio"]
        assert ratio["vs"] == "base" and ratio["low"] <= ratio["median"] <= ratio["high"]
    # The gates are those of whole generations, as in every other mode.
    assert {g["subject"] for g in report["gates"]} == {"1x6/dynamic", "2x3/dynamic"}
    markdown = to_markdown(report)
    assert f"Greedy generation of {N_NEW} new tokens" in markdown and f"{N_NEW} generated" in markdown


def test_recorders_keep_exactly_the_timed_calls():
    """Warm-up and check calls are dropped; round i keeps round i's call, in every mode that
    adds rounds (adaptive)."""
    calls = {"a": 0, "b": 0}
    recorders = {"k": {"a": generation.StepRecorder(), "b": generation.StepRecorder()}}

    def call(name):
        def run():
            calls[name] += 1
            recorders["k"][name]([float(calls[name])])

        return run

    for name in calls:  # the check run of prepare_generation
        call(name)()
    tick = generation.closing_rounds(recorders, None)
    results = measure.measure_shapes({"k": {n: call(n) for n in calls}}, rounds=3, warmup=2, inner=1, progress=tick)
    assert len(results["k"]["a"]) == 3
    # call 1 is the check, 2-3 warm-up: the timed ones are 4, 5, 6
    assert recorders["k"]["a"].rounds == [[4.0], [5.0], [6.0]] and recorders["k"]["b"].rounds == [[4.0], [5.0], [6.0]]


def test_generate_bad_input_is_one_line(graphs, tmp_path):
    base, _, _ = graphs
    cases = [
        ({"base": base}, {"shapes": "1x1+8"}, "prompt shapes"),
        ({"base": base}, {"shapes": "1x4", "inner": 2}, "drop --inner"),
        ({"base": base}, {"shapes": "1x4", "rate": "10hz"}, "drop --rate"),
        ({"base": base, "plain": tiny_graph(tmp_path / "t.onnx")}, {"shapes": "1x4"}, "'plain'.*cannot generate"),
    ]
    for models, extra, message in cases:
        with pytest.raises(BadInputError, match=message):
            bench.run_bench(models, generate=3, rounds=1, warmup=0, **extra)


def test_cli_generate_and_a_baseline_without_it_is_refused(graphs, tmp_path):
    base, _, _ = graphs
    out = tmp_path / "gen.json"
    argv = ["bench", "--model", f"base={base}", "--model", f"copy={base}", "--shapes", "1x4", "--rounds", "2"]
    argv += ["--warmup", "0", "--threads", "1", "--quiet"]
    result = CliRunner().invoke(main, [*argv, "--generate", "3", "--json", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["results"]["1x4"]["variants"]["copy"]["generation"]["new_tokens"] == 3
    # A one-step prefill on the same shape is another measurement: not comparable with generations.
    result = CliRunner().invoke(main, [*argv, "--baseline", str(out)])
    assert result.exit_code == 2 and "generate 3 in the baseline, None here" in result.output


def test_generate_with_baseline_model_gates_whole_generations(graphs):
    base, _, _ = graphs
    report = bench.run_bench(
        {"new": base}, baseline_model=base, shapes="1x4", generate=3, rounds=3, warmup=1, threads=1
    )
    (gate,) = report["gates"]
    assert gate["gate"] == "regression" and gate["subject"] == "1x4/new vs previous"
    ratio = report["results"]["1x4"]["variants"]["new"]["generation"]["decode_ratio"]
    assert ratio["vs"] == "previous"
