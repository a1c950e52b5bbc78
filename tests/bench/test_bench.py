"""`lora-deploy bench` engine: end to end on a tiny model, gates, and bad input.

The slow part is one module fixture (export base and merged Llama to ONNX).
Everything else runs on hand-built ONNX graphs of a few nodes, and gate
verdicts come from injected synthetic timings, so they are deterministic.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lora_deploy.backends import registry
from lora_deploy.bench import measure, plan
from lora_deploy.bench import run as bench
from lora_deploy.bench.feeds import build_feeds, shared_feed
from lora_deploy.bench.schema import load_report, validate_report
from lora_deploy.bench.stats import GateFailed
from lora_deploy.errors import BadInputError
from lora_deploy.export.model import export_checkpoint
from lora_deploy.merge.streaming import merge

FEW = {"rounds": 5, "warmup": 1, "threads": 1}


# ---------------------------------------------------------------- helpers


def tiny_graph(path, dims=("batch", "sequence"), multi=False):
    """logits[b, s] = ids * mask + sum(w + c) (+ adapter_ids[b] + sum(bank) when multi).

    `w` is an overridable initializer with a symbolic dim (so an adapter can
    replace it); adding the fixed-size `c` makes a wrong-length `w` fail only
    at run time, like a LoRA of mismatched rank.
    """
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, list(dims)) for n in ("input_ids", "attention_mask")]
    inits = [numpy_helper.from_array(np.zeros(4, np.float32), name) for name in ("w", "c")]
    inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, ["k"]))
    nodes = [
        helper.make_node("Mul", ["input_ids", "attention_mask"], ["prod"]),
        helper.make_node("Cast", ["prod"], ["prod_f"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["w", "c"], ["wc"]),
        helper.make_node("ReduceSum", ["wc"], ["s"], keepdims=0),
        helper.make_node("Add", ["prod_f", "s"], ["logits" if not multi else "partial"]),
    ]
    if multi:
        inputs.append(helper.make_tensor_value_info("adapter_ids", TensorProto.INT64, ["batch"]))
        inputs.append(helper.make_tensor_value_info("m.lora_A.bank", TensorProto.FLOAT, [3, 2, "rank"]))
        inits.append(numpy_helper.from_array(np.zeros((3, 2, 1), np.float32), "m.lora_A.bank"))
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "one"))
        nodes += [
            helper.make_node("Cast", ["adapter_ids"], ["ids_f"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["ids_f", "one"], ["ids_col"]),
            helper.make_node("ReduceSum", ["m.lora_A.bank"], ["bank_sum"], keepdims=0),
            helper.make_node("Add", ["partial", "ids_col"], ["partial2"]),
            helper.make_node("Add", ["partial2", "bank_sum"], ["logits"]),
        ]
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence"])
    graph = helper.make_graph(nodes, "tiny", inputs, [output], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def ort_adapter(path, **params):
    """Write an ONNX Runtime .onnx_adapter holding `params`."""
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.asarray(v, np.float32)) for k, v in params.items()})
    fmt.export_adapter(str(path))
    return path


def synthetic(factors, *, noise=0.01, seed=0):
    """A stand-in for measure_interleaved: variant = factor x a shared noisy base."""

    def measure(variants, *, warmup, rounds, inner=1, progress=None, **_):
        rng = np.random.default_rng(seed)
        base = 1e-3 * (1 + noise * rng.standard_normal(rounds))
        out = {name: list(base * factors[name] * (1 + noise * rng.standard_normal(rounds))) for name in variants}
        for i in range(rounds):
            if progress:
                progress(i, rounds)
        return out

    return measure


@pytest.fixture
def pair(tmp_path):
    """Two copies of one tiny graph: base and merged."""
    base = tiny_graph(tmp_path / "base.onnx")
    merged = tmp_path / "merged.onnx"
    shutil.copy(base, merged)
    return {"base": base, "merged": merged}


@pytest.fixture(scope="module")
def llama(reference, tmp_path_factory):
    """(base_dir, adapter_dir, merged_dir, base.onnx, merged.onnx) for the tiny Llama."""
    base_dir, adapter_dir = reference("llama", "plain")
    out = tmp_path_factory.mktemp("bench")
    merged_dir = out / "merged"
    merge(base_dir, adapter_dir, merged_dir)
    base_onnx = export_checkpoint(base_dir, out / "base.onnx").path
    merged_onnx = export_checkpoint(merged_dir, out / "merged.onnx").path
    return base_dir, adapter_dir, merged_dir, base_onnx, merged_onnx


# ---------------------------------------------------------------- end to end


def test_onnxruntime_bench_end_to_end(llama, tmp_path):
    _, _, _, base_onnx, merged_onnx = llama
    seen = []
    report = bench.run_bench(
        {"base": base_onnx, "merged": merged_onnx},
        shapes="1x8,2x8",
        max_overhead="50%",
        progress=lambda key, done, total: seen.append((key, done, total)),
        **FEW,
    )
    files = bench.write_outputs(
        report, json_path=tmp_path / "r.json", markdown_path=tmp_path / "r.md", plot_path=tmp_path / "r.png"
    )
    assert [f.name for f in files] == ["r.json", "r.md", "r.png"]
    validate_report(report)
    loaded = load_report(tmp_path / "r.json")
    assert list(loaded["results"]) == ["1x8", "2x8"]
    for block in loaded["results"].values():
        assert list(block["variants"]) == ["base", "merged"]
        assert all(entry["n"] == 5 for entry in block["variants"].values())
    config = loaded["config"]
    assert config["reference"] == "base" and config["backend"] == "onnxruntime" and config["threads"] == 1
    assert config["models"] == {"base": str(base_onnx), "merged": str(merged_onnx)}
    assert config["variants"]["merged"]["providers"] == ["CPUExecutionProvider"]
    assert config["variants"]["merged"]["inter_op_threads"] == 1
    assert "onnxruntime" in config["libraries"] and loaded["machine"]["threads"]["requested"] == 1
    assert [g["subject"] for g in loaded["gates"]] == ["1x8/merged", "2x8/merged"]
    assert "| 2x8 | merged |" in (tmp_path / "r.md").read_text()
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert seen[-1] == ("2x8", 5, 5) and len(seen) == 10
    # Three sessions per variant by default: 5 rounds split 2 + 2 + 1, every sample labelled.
    assert config["sessions"] == 3 and config["bootstrap"].startswith("two-level")
    merged = loaded["results"]["1x8"]["variants"]["merged"]
    assert merged["sample_sessions"] == [0, 0, 1, 1, 2] and len(merged["ratio"]["per_session"]) == 3
    assert "3 sessions per variant" in (tmp_path / "r.md").read_text()


def test_torch_bench_with_unmerged_variant(llama):
    base_dir, adapter_dir, merged_dir, _, _ = llama
    report = bench.run_bench(
        {"base": base_dir, "merged": merged_dir, "unmerged": base_dir},
        adapters={"unmerged": adapter_dir},
        backend="torch",
        shapes="2x8",
        rounds=3,
        warmup=1,
        threads=1,
    )
    assert list(report["results"]["2x8"]["variants"]) == ["base", "merged", "unmerged"]
    assert report["config"]["adapters"] == {"unmerged": str(adapter_dir)}
    assert "unmerged LoRA" in report["config"]["variants"]["unmerged"]["mode"]
    # The unmerged variant really runs the adapter: it computes what the merged model computes.
    feed = shared_feed([{"input_ids": (np.int64, None), "attention_mask": (np.int64, None)}], (2, 8), 0)
    outputs = {}
    cases = (("base", base_dir, None), ("merged", merged_dir, None), ("unmerged", base_dir, adapter_dir))
    for name, path, adapter in cases:
        variant = registry.open_timed(name, path, "torch", adapter=adapter)
        outputs[name] = variant.runner.infer(feed)["logits"]
        variant.close()
    assert not np.allclose(outputs["base"], outputs["merged"], atol=1e-4)
    np.testing.assert_allclose(outputs["unmerged"], outputs["merged"], atol=1e-4, rtol=1e-3)


def test_dynamic_adapter_is_active_every_run(tmp_path):
    graph = tiny_graph(tmp_path / "dyn.onnx")
    adapter = ort_adapter(tmp_path / "a.onnx_adapter", w=np.ones(4))
    report = bench.run_bench({"base": graph, "dynamic": graph}, adapters={"dynamic": adapter}, shapes="2x4", **FEW)
    assert report["config"]["variants"]["dynamic"]["adapter"] == str(adapter)
    variant = registry.open_timed("dynamic", graph, "onnxruntime", adapter=adapter)
    feed = build_feeds({"dynamic": variant}, (2, 4), 0)[0]["dynamic"]
    logits = variant.runner.infer(feed)["logits"]
    np.testing.assert_allclose(logits, feed["input_ids"] * feed["attention_mask"] + 4.0)
    variant.close()


def test_multi_adapter_graph_gets_adapter_ids(tmp_path):
    multi = tiny_graph(tmp_path / "multi.onnx", multi=True)
    plain = tiny_graph(tmp_path / "plain.onnx")
    variants = {n: registry.open_timed(n, p, "onnxruntime") for n, p in (("base", plain), ("multi", multi))}
    try:
        feeds, fed = build_feeds(variants, (4, 3), 0)
        assert fed["multi"]["batch"] == 4 and fed["multi"]["seq"] == 3 and fed["multi"]["tokens"]
        assert feeds["multi"]["adapter_ids"].tolist() == [0, 1, 2, 0]  # 3 adapters in the bank
        assert "adapter_ids" not in feeds["base"]
        # Identical arrays (the same objects) for every variant.
        assert feeds["multi"]["input_ids"] is feeds["base"]["input_ids"]
        assert variants["multi"].details["adapter_ids"] == {"n_adapters": 3}
    finally:
        for v in variants.values():
            v.close()
    report = bench.run_bench({"base": plain, "multi": multi}, shapes="4x3", **FEW)
    assert set(report["results"]["4x3"]["variants"]) == {"base", "multi"}


def test_inputs_array_no_model_takes_is_refused(tmp_path, monkeypatch):
    """A misnamed --inputs array is refused in one line (it was ignored and its input
    drawn at random, under "batch 4 (file)"); one only some variants take is fine."""
    monkeypatch.setattr(measure, "measure_interleaved", synthetic({"base": 1.0, "multi": 1.0}))
    multi = tiny_graph(tmp_path / "multi.onnx", multi=True)
    plain = tiny_graph(tmp_path / "plain.onnx")
    ids = np.ones((4, 3), np.int64)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, input_ids=ids, mask=ids)
    with pytest.raises(BadInputError, match=r"--inputs array\(s\) 'mask' fed to no model \(model 'base' takes"):
        bench.run_bench({"base": plain}, inputs_path=wrong, **FEW)
    from click.testing import CliRunner

    from lora_deploy.cli import main

    result = CliRunner().invoke(main, ["bench", "--model", f"base={plain}", "--inputs", str(wrong), "--quiet"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "'mask'" in result.stderr, result.output
    some = tmp_path / "some.npz"
    np.savez(some, input_ids=ids, attention_mask=ids, adapter_ids=np.zeros(4, np.int64))
    report = bench.run_bench({"base": plain, "multi": multi}, inputs_path=some, **FEW)
    assert report["results"]["4x3"]["variants"]["base"]["fed"]["source"] == "file"


# ---------------------------------------------------------------- gates


def test_failing_gate_raises_after_files_are_written(pair, tmp_path, monkeypatch):
    monkeypatch.setattr(measure, "measure_interleaved", synthetic({"base": 1.0, "merged": 1.10}))
    out = {"json_path": tmp_path / "r.json", "markdown_path": tmp_path / "r.md", "plot_path": tmp_path / "r.png"}
    with pytest.raises(GateFailed, match="1x4/merged") as info:
        bench.bench(pair, shapes="1x4", rounds=30, warmup=0, max_overhead="2%", **out)
    assert info.value.exit_code == 1
    assert all(path.is_file() for path in out.values())
    gates = json.loads(out["json_path"].read_text())["gates"]
    assert [g["passed"] for g in gates] == [False]
    assert "FAIL" in out["markdown_path"].read_text()


def test_identical_pair_passes(pair, monkeypatch):
    monkeypatch.setattr(measure, "measure_interleaved", synthetic({"base": 1.0, "merged": 1.0}, noise=0.05))
    report = bench.bench(pair, shapes="1x4,2x4", rounds=30, warmup=0, max_overhead="2%")
    assert [g["passed"] for g in report["gates"]] == [True, True]


def test_regression_gate_against_baseline(pair, tmp_path, monkeypatch):
    monkeypatch.setattr(measure, "measure_interleaved", synthetic({"base": 1.0, "merged": 1.0}))
    bench.bench(pair, shapes="1x4", rounds=30, warmup=0, json_path=tmp_path / "before.json")
    # The reference (base, unchanged) is the machine's yardstick: only merged slows down.
    monkeypatch.setattr(measure, "measure_interleaved", synthetic({"base": 1.0, "merged": 1.3}, seed=1))
    with pytest.raises(GateFailed, match="regression"):
        bench.bench(
            pair,
            shapes="1x4",
            rounds=30,
            warmup=0,
            baseline_path=tmp_path / "before.json",
            max_regression="5%",
            json_path=tmp_path / "after.json",
        )
    gates = load_report(tmp_path / "after.json")["gates"]
    assert {g["gate"] for g in gates} == {"regression"}
    assert [(g["subject"], g["verdict"]) for g in gates] == [("1x4/base", "pass"), ("1x4/merged", "fail")]


def bench_cli(pair, tmp_path, *extra):
    from click.testing import CliRunner

    from lora_deploy.cli import main

    args = ["bench", "--model", f"base={pair['base']}", "--model", f"merged={pair['merged']}", "--shapes", "1x4"]
    args += ["--rounds", "30", "--warmup", "0", "--quiet", *extra]
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_exit_codes_of_the_gates(pair, tmp_path, monkeypatch):
    """README: exit 1 when a latency gate fails, 0 when it passes; the report is written
    either way."""
    monkeypatch.setattr(measure, "measure_interleaved", synthetic({"base": 1.0, "merged": 1.10}))
    result = bench_cli(pair, tmp_path, "--max-overhead", "2%", "--json", tmp_path / "fail.json")
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: 1 latency gate(s) failed: 1x4/merged") and result.stderr.count("\n") == 1
    assert [g["passed"] for g in load_report(tmp_path / "fail.json")["gates"]] == [False]

    result = bench_cli(pair, tmp_path, "--max-overhead", "20%", "--json", tmp_path / "pass.json")
    assert result.exit_code == 0, result.output
    assert [g["passed"] for g in load_report(tmp_path / "pass.json")["gates"]] == [True]


def test_cli_exit_code_of_a_model_that_cannot_be_benched(pair, tmp_path, monkeypatch):
    monkeypatch.setattr(measure, "measure_interleaved", synthetic({}))  # would KeyError if reached
    missing = tmp_path / "missing.onnx"
    result = bench_cli({"base": pair["base"], "merged": missing}, tmp_path)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and str(missing) in result.stderr and result.stderr.count("\n") == 1


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("specs", [["base"], ["=x.onnx"], ["base="], ["a/b=x.onnx"], ["m=a", "m=b"], []])
def test_bad_model_specs(specs):
    with pytest.raises(BadInputError):
        plan.parse_model_specs(specs)


def test_specs_parse_in_order():
    assert plan.parse_model_specs(["base=a.onnx", "merged=b=c.onnx"]) == {
        "base": Path("a.onnx"),
        "merged": Path("b=c.onnx"),
    }
    assert plan.parse_adapter_specs([]) == {}
    with pytest.raises(BadInputError, match="twice"):
        plan.parse_adapter_specs(["d=x", "d=y"])


def test_bad_plans_fail_before_loading(pair, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("nothing may be loaded for bad input")

    monkeypatch.setitem(
        registry.BACKENDS,
        "onnxruntime",
        registry.Backend(registry.BACKENDS["onnxruntime"].model, registry.BACKENDS["onnxruntime"].adapter, no_loading),
    )
    cases = [
        ({"base": tmp_path / "missing.onnx"}, {}, "not found"),
        (pair, {"reference": "nope"}, "reference 'nope' is not among"),
        (pair, {"adapters": {"dynamic": pair["base"]}}, "no model named 'dynamic'"),
        ({"base": tmp_path}, {}, "needs --backend torch"),
        (pair, {"adapters": {"merged": tmp_path}}, "takes an .onnx_adapter file"),
        (pair, {"backend": "nosuch"}, "unknown backend"),
        (pair, {"device": "tpu"}, "unknown device"),
        (pair, {"shapes": "8"}, "bad shape"),
        (pair, {"rounds": 0}, "rounds"),
        (pair, {"max_overhead": "2"}, "did you mean"),
        (pair, {"max_regression": "5%"}, "needs a baseline"),
        ({}, {}, "no models"),
    ]
    for models, options, message in cases:
        with pytest.raises(BadInputError, match=message):
            bench.run_bench(models, **options)


def test_torch_backend_rejects_onnx_files(pair, tmp_path):
    with pytest.raises(BadInputError, match="needs --backend onnxruntime"):
        bench.run_bench(pair, backend="torch")
    with pytest.raises(BadInputError, match="no config.json"):
        bench.run_bench({"base": tmp_path}, backend="torch")


def test_shapes_that_do_not_fit_the_graph_fail_before_timing(tmp_path, monkeypatch):
    monkeypatch.setattr(measure, "measure_interleaved", synthetic({}))  # would KeyError if reached
    fixed = tiny_graph(tmp_path / "fixed.onnx", dims=(1, 8))
    plain = tiny_graph(tmp_path / "plain.onnx")
    with pytest.raises(BadInputError, match=r"shape 2x8 does not fit model 'fixed'.*dim 0 is 2, expected 1"):
        bench.run_bench({"base": plain, "fixed": fixed}, shapes="1x8,2x8")
    with pytest.raises(BadInputError, match=r"shape 1x4 does not fit model 'fixed'"):
        bench.run_bench({"base": plain, "fixed": fixed}, shapes="1x4")


def test_adapters_that_do_not_fit_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(measure, "measure_interleaved", synthetic({}))
    graph = tiny_graph(tmp_path / "g.onnx")
    models = {"base": graph, "dynamic": graph}
    wrong_name = ort_adapter(tmp_path / "name.onnx_adapter", nope=np.ones(4))
    with pytest.raises(BadInputError, match=r"adapter .*name.onnx_adapter does not fit model 'dynamic'.*'nope'"):
        bench.run_bench(models, adapters={"dynamic": wrong_name}, shapes="1x4")
    # Passes the name check (symbolic dim) but ONNX Runtime fails at run time.
    wrong_size = ort_adapter(tmp_path / "size.onnx_adapter", w=np.ones(3))
    with pytest.raises(BadInputError, match=r"adapter .*size.onnx_adapter does not fit model 'dynamic'"):
        bench.run_bench(models, adapters={"dynamic": wrong_size}, shapes="1x4")
    garbage = tmp_path / "junk.onnx_adapter"
    garbage.write_bytes(b"not an adapter")
    with pytest.raises(BadInputError, match="not an ONNX Runtime adapter file"):
        bench.run_bench(models, adapters={"dynamic": garbage}, shapes="1x4")


def test_bad_baselines(pair, tmp_path, monkeypatch):
    monkeypatch.setattr(measure, "measure_interleaved", synthetic({"base": 1.0, "merged": 1.0}))
    bench.bench(pair, shapes="1x4", rounds=10, warmup=0, json_path=tmp_path / "r.json")
    report = load_report(tmp_path / "r.json")
    report["config"]["backend"] = "torch"
    (tmp_path / "torch.json").write_text(json.dumps(report))
    with pytest.raises(BadInputError, match="not comparable"):
        bench.run_bench(pair, shapes="1x4", baseline_path=tmp_path / "torch.json")
    with pytest.raises(BadInputError, match="shares no shape"):
        bench.run_bench(pair, shapes="2x4", baseline_path=tmp_path / "r.json")
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(BadInputError, match="not valid JSON"):
        bench.run_bench(pair, shapes="1x4", baseline_path=tmp_path / "junk.json")


def test_cuda_without_a_gpu_is_bad_input(pair):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA for ONNX Runtime")
    with pytest.raises(BadInputError, match="CUDAExecutionProvider"):
        bench.run_bench(pair, device="cuda", shapes="1x4")


def test_bare_adapter_path_attaches_to_the_dynamic_model():
    from lora_deploy.bench.plan import parse_adapter_specs

    assert parse_adapter_specs(["x.onnx_adapter"], ["base", "merged", "dynamic"]) == {"dynamic": Path("x.onnx_adapter")}
    assert parse_adapter_specs(["x.onnx_adapter"], ["merged", "lora"]) == {"lora": Path("x.onnx_adapter")}
    with pytest.raises(BadInputError):
        parse_adapter_specs(["x.onnx_adapter"], ["base", "a", "b"])
