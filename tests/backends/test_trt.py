"""TensorRT backend, tested without TensorRT: profiles, version gates, manifest, refit weights,
and the CLI's one-line refusal (the fp16/bf16 conversion: test_trt_convert.py). No test here runs TensorRT; the one
that would is marked and skipped."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from lora_deploy.backends.trt import manifest as mf
from lora_deploy.backends.trt import versions
from lora_deploy.backends.trt.build import engine_loader, onnx_weight_map, select_refit_weights
from lora_deploy.backends.trt.profiles import InputProfile, build_profiles
from lora_deploy.backends.trt.refit import refit_engine
from lora_deploy.backends.trt.weights import initializer_map, refit_weights
from lora_deploy.cli import main
from lora_deploy.errors import AdapterError, BadInputError
from lora_deploy.io.checkpoint import Checkpoint

INPUTS = {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"], "flags": [1, 4]}


# ------------------------------------------------------------------ profiles ----


def test_profiles_from_a_spec_shared_by_dim_name():
    profiles = build_profiles(INPUTS, ["input_ids:1x1,1x128,8x512"])
    assert profiles == [
        InputProfile("input_ids", (1, 1), (1, 128), (8, 512)),
        InputProfile("attention_mask", (1, 1), (1, 128), (8, 512)),  # same dims, same sizes; static "flags" left out
    ]


def test_profile_defaults_and_one_fixed_shape():
    assert build_profiles(INPUTS)[0] == InputProfile("input_ids", (1, 1), (1, 128), (8, 512))
    assert build_profiles(INPUTS, ["input_ids:2x64"])[1] == InputProfile("attention_mask", (2, 64), (2, 64), (2, 64))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("pixels:1x3", "model's inputs are"),
        ("input_ids:1x1,1x128", "one shape or three"),
        ("input_ids:8x1,1x128,8x512", "min <= opt <= max"),
        ("input_ids:1x1x1", "rank 3"),
        ("input_ids:1xa", "not a shape"),
        ("flags:1x5", "fixed at 4"),
        ("input_ids", "NAME:MIN,OPT,MAX"),
    ],
)
def test_bad_shape_specs_are_refused(spec, message):
    with pytest.raises(BadInputError, match=message):
        build_profiles(INPUTS, [spec])


def test_a_dynamic_dim_without_default_is_named():
    with pytest.raises(BadInputError, match="pixel_values dim 2 .*'height'"):
        build_profiles({"pixel_values": ["batch", 3, "height"]})


# ------------------------------------------------------------ version gates ----


def test_precision_by_flag_on_10_and_by_graph_on_11():
    ten, eleven = versions.build_plan(10, "fp16"), versions.build_plan(11, "fp16")
    assert ten.config == {"fp16": True} and ten.convert is None and not ten.strongly_typed
    assert eleven.config == {} and eleven.convert == "fp16" and eleven.strongly_typed
    assert versions.build_plan(11, "bf16").convert == "bf16" and versions.build_plan(10, "bf16").config == {
        "bf16": True
    }
    assert versions.build_plan(11).convert is None and versions.build_plan(11).strongly_typed


def test_refit_modes_and_refusals():
    assert versions.build_plan(10, refittable="all").config == {"refittable": True}
    individual = versions.build_plan(11, refittable="adapter-targets", strip_weights=True)
    assert individual.flags == ("REFIT_INDIVIDUAL",) and individual.mark_refittable
    assert individual.config == {"strip_plan": True}
    assert versions.build_plan(10, hardware_compat="ampere+").hardware_compat == "AMPERE_PLUS"
    with pytest.raises(BadInputError, match="--strip-weights needs"):
        versions.build_plan(10, strip_weights=True)
    with pytest.raises(versions.TensorRTUnavailable, match="too old"):
        versions.build_plan(8)


def test_realized_precision_catches_an_fp32_engine_asked_for_fp16():
    assert versions.realized_precision({"HALF": 30, "FLOAT": 4}, "fp16") == ("fp32+fp16", None)
    realized, problem = versions.realized_precision({"FLOAT": 34}, "fp16")
    assert realized == "fp32" and "no layer runs in HALF" in problem


class Recorder:
    """A recorded-call double of tensorrt and polygraphy's loaders. It proves nothing about
    TensorRT itself: only which loaders, keywords and flags engine_loader chooses per version."""

    def __init__(self):
        self.calls = []
        enum = lambda *names: SimpleNamespace(**{n: f"{n}" for n in names})  # noqa: E731
        self.BuilderFlag = enum("REFIT_INDIVIDUAL")
        self.HardwareCompatibilityLevel = enum("AMPERE_PLUS")
        self.MemoryPoolType = enum("WORKSPACE")
        self.ProfilingVerbosity = enum("DETAILED")

    def __getattr__(self, name):
        def loader(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return SimpleNamespace(
                loader=name, args=args, kwargs=kwargs, add=lambda *a, **k: self.calls.append(("add", a, k))
            )

        return loader


def loader_calls(major, **options):
    rec = Recorder()
    plan = versions.build_plan(major, **options)
    profile = [InputProfile("input_ids", (1, 1), (1, 128), (8, 512))]
    engine_loader(rec, rec, plan, "m.onnx", profile, ["model.layers.0.q_proj.weight"], "cache", 1 << 30)
    return {name: kwargs for name, _, kwargs in rec.calls}, rec.calls


def test_loader_chain_trt10_fp16_sets_the_flag():
    calls, _ = loader_calls(10, precision="fp16")
    assert calls["NetworkFromOnnxPath"] == {"strongly_typed": None}
    assert calls["CreateConfig"]["fp16"] is True and calls["CreateConfig"]["load_timing_cache"] == "cache"
    assert calls["CreateConfig"]["memory_pool_limits"] == {"WORKSPACE": 1 << 30}
    assert calls["add"] == {"min": (1, 1), "opt": (1, 128), "max": (8, 512)}
    assert "PostprocessConfig" not in calls and "PostprocessNetwork" not in calls


def test_loader_chain_trt11_fp16_is_strongly_typed_without_flags():
    calls, _ = loader_calls(11, precision="fp16", refittable="adapter-targets")
    assert calls["NetworkFromOnnxPath"] == {"strongly_typed": True}
    assert "fp16" not in calls["CreateConfig"]
    assert "PostprocessNetwork" in calls and "PostprocessConfig" in calls  # mark weights, REFIT_INDIVIDUAL


# ------------------------------------------------------------------ manifest ----


def test_manifest_layout_and_refit_targets(tmp_path):
    plan = versions.build_plan(11, "fp16", refittable="adapter-targets")
    doc = mf.build_manifest(
        header={"schema": mf.SCHEMA},
        environment={"tensorrt": "11.4.0", "cuda": "12.9", "gpu": "H200", "compute_capability": "9.0"},
        onnx={"path": "m.onnx", "sha256": "ab", "conversion": {"converter": "modelopt"}},
        options={"precision": "fp16", "refittable": "adapter-targets", "timing_cache": tmp_path / "c"},
        plan=plan,
        precision={"requested": "fp16", "realized": "fp32+fp16", "layer_types": {"HALF": 3}, "problem": None},
        profiles=[{"input": "input_ids", "min": [1, 1], "opt": [1, 128], "max": [8, 512]}],
        weights={"w": {"checkpoint": "w", "dtype": "float16", "shape": [2, 2]}},
        refittable=["w"],
        build_seconds=12.3456,
        timing_cache={"path": "c", "hit": False},
    )
    assert (
        doc["build"]["converted_to"] == "fp16" and doc["build"]["strongly_typed"] and doc["build"]["seconds"] == 12.346
    )
    assert doc["refit"]["weights"] == ["w"] and doc["options"]["timing_cache"] == str(tmp_path / "c")
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    mf.manifest_path(engine).write_text(json.dumps(doc))
    assert mf.refit_targets(mf.read_manifest(engine)) == (["w"], ["w"])
    with pytest.raises(BadInputError, match="without --refittable"):
        mf.refit_targets({"refit": {"mode": "none"}})
    mf.manifest_path(engine).write_text("{}")
    with pytest.raises(BadInputError, match="not a lora-deploy engine manifest"):
        mf.read_manifest(engine)


def test_layer_types_from_inspector_json():
    # Shaped like the inspector's DETAILED JSON; written here, not read from a real engine.
    text = json.dumps(
        {
            "Layers": [
                {"Name": "a", "Outputs": [{"Format/Datatype": "Row major linear FP16 format"}]},
                {"Name": "b", "Outputs": [{"Format/Datatype": "Row major linear FP32"}]},
                "c (no details without DETAILED verbosity)",
            ]
        }
    )
    assert mf.layer_types(text) == {"HALF": 1, "FLOAT": 1}


# ------------------------------------------------------------ refit weights ----


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_refit_weights_equal_the_merge_bit_for_bit(reference, tmp_path, dtype):
    from lora_deploy.merge import merge

    base, adapter = reference("llama", "plain")
    result = merge(base, adapter, tmp_path / "merged", dtype=dtype)
    merged = {}
    for f in sorted((tmp_path / "merged").glob("*.safetensors")):
        merged.update(load_file(f))
    with Checkpoint(base) as ckpt:
        names = list(ckpt.tensors)
        w0 = {n: ckpt.read(n) for n in names}
    weights = {f"onnx::{n}": {"checkpoint": n, "dtype": dtype} for n in names}
    untouched = next(n for n in names if n not in result.merged and n.endswith("weight"))
    out = refit_weights(base, adapter, weights, reset=[f"onnx::{untouched}"])
    assert {k.removeprefix("onnx::") for k in out} == set(result.merged) | {untouched}
    for key in result.merged:
        got = out[f"onnx::{key}"]
        assert got.dtype == merged[key].dtype and got.tobytes() == merged[key].tobytes(), key
    assert out[f"onnx::{untouched}"].tobytes() == w0[untouched].astype(dtype).tobytes()  # reset to W0


def test_refit_refuses_targets_the_engine_cannot_refit(reference):
    base, adapter = reference("llama", "plain")
    with Checkpoint(base) as ckpt:
        weights = {n: {"checkpoint": n, "dtype": "float32"} for n in ckpt.tensors}
    with pytest.raises(AdapterError, match="not refittable in this engine"):
        refit_weights(base, adapter, weights, refittable=[])
    some = dict(list(weights.items())[:1])
    with pytest.raises(AdapterError, match="no weight for adapter targets"):
        refit_weights(base, adapter, some)


# ------------------------------------------------------------ ONNX: name map ----


@pytest.fixture
def exported(example_graphs):
    base, path, _ = example_graphs("llama")
    return base, path


def test_initializer_map_names_checkpoint_tensors(exported):
    base, onnx_path = exported
    mapping = initializer_map(onnx_path, base)
    with Checkpoint(base) as ckpt:
        q = next(n for n in ckpt.tensors if n.endswith("q_proj.weight"))
        assert mapping[q] == {"checkpoint": q, "dtype": "float32", "shape": list(ckpt.tensors[q].shape)}
        assert set(e["checkpoint"] for e in mapping.values()) <= set(ckpt.tensors)
    assert set(mapping) <= set(onnx_weight_map(onnx_path))
    chosen = select_refit_weights(mapping, "q_proj,v_proj")
    assert chosen and all(("q_proj" in n or "v_proj" in n) for n in chosen)


# -------------------------------------------------------- without TensorRT ----


def assert_clean_exit_2(result, *fragments):
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as on a machine without it


def test_build_trt_help_works_everywhere():
    result = CliRunner().invoke(main, ["build", "trt", "--help"])
    assert result.exit_code == 0 and "--precision" in result.output and "--refittable" in result.output


def test_tensorrt_commands_exit_2_in_one_line_and_write_nothing(no_tensorrt, tmp_path, exported):
    base, onnx_path = exported
    engine = tmp_path / "m.engine"
    before = set(tmp_path.iterdir())
    result = CliRunner().invoke(main, ["build", "trt", str(onnx_path), "-o", str(engine), "--precision", "fp16"])
    assert_clean_exit_2(result, "TensorRT is not installed", "lora-deploy[tensorrt]", "NVIDIA GPU")
    refit = ["refit", str(engine), "--base", str(base), "--adapter", str(base)]
    result = CliRunner().invoke(main, [*refit, "-o", str(tmp_path / "new.engine")])
    assert_clean_exit_2(result, "TensorRT is not installed")
    # The input engine is never the output: there is no in-place refit.
    assert_clean_exit_2(CliRunner().invoke(main, refit), "Missing option '-o'")
    with pytest.raises(BadInputError, match="input engine is never changed"):
        refit_engine(engine, base, base)
    engine.write_bytes(b"not a plan")
    result = CliRunner().invoke(main, ["bench", "--backend", "tensorrt", "--device", "cuda", "--model", f"e={engine}"])
    assert_clean_exit_2(result, "TensorRT is not installed")
    assert set(tmp_path.iterdir()) == before | {engine}


def test_type_stubs_alone_are_not_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace())  # what `import tensorrt` gives with only stubs
    with pytest.raises(versions.TensorRTUnavailable, match="only its type stubs"):
        versions.load_tensorrt()


def test_nothing_imports_tensorrt_at_import_time():
    import subprocess

    code = "import sys, lora_deploy.cli, lora_deploy.backends.trt.build, lora_deploy.backends.trt.refit, "
    code += "lora_deploy.backends.trt.timed; print('tensorrt' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def tensorrt_and_gpu() -> bool:
    try:
        versions.require_tensorrt()
    except Exception:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not tensorrt_and_gpu(), reason="needs TensorRT and an NVIDIA GPU (neither here)")
def test_build_and_refit_on_a_gpu(exported, reference, tmp_path):
    from lora_deploy.backends.trt.build import build_engine
    from lora_deploy.backends.trt.refit import refit_engine

    base, onnx_path = exported
    _, adapter = reference("llama", "plain")
    built = build_engine(onnx_path, tmp_path / "m.engine", refittable="all", base=base)
    assert built.manifest["precision"]["problem"] is None
    result = refit_engine(built.path, base, adapter, out=tmp_path / "a.engine")
    assert result.weights > 0
    from lora_deploy.proof.verify import verify

    # The base engine matches ONNX Runtime on its ONNX; the refitted one base + adapter.
    assert not verify(base, adapter, engine_path=built.path).equivalent  # it lacks the adapter
    report = verify(base, adapter, engine_path=result.path)
    assert report.equivalent, report.problem()


# ------------------------------------------------- verify --engine, wiring ----


def engine_manifest(onnx_path, realized="fp32+fp16", refit_adapter=None):
    from lora_deploy.io.digests import file_sha256

    document = mf.build_manifest(
        header={"schema": mf.SCHEMA},
        environment={"tensorrt": "10.13.0", "cuda": "12.9", "gpu": "none (written by a test)"},
        onnx={"path": str(onnx_path), "sha256": file_sha256(onnx_path), "conversion": None},
        options={"precision": "fp16", "refittable": "none"},
        plan=versions.build_plan(10, "fp16"),
        precision={"requested": "fp16", "realized": realized, "layer_types": {}, "problem": None},
        profiles=[{"input": "input_ids", "min": [1, 1], "opt": [1, 128], "max": [8, 512]}],
        weights={},
        refittable=None,
        build_seconds=1.0,
        timing_cache=None,
    )
    document["refit"]["current_adapter"] = refit_adapter
    return document


def write_engine(tmp_path, document):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not a plan: the engine runner is replaced in these tests")
    mf.manifest_path(engine).write_text(json.dumps(document))
    return engine


def test_engine_tolerance_comes_from_the_realized_precision():
    def dtype(realized, requested="fp16"):
        return mf.engine_dtype({"precision": {"realized": realized, "requested": requested}})

    assert dtype("fp32", "fp32") == "float32"
    assert dtype("fp32+fp16") == "float16"
    assert dtype("fp32+bf16", "bf16") == "bfloat16"
    assert dtype("fp32", "fp16") == "float32"  # read back as fp32: fp32's tolerance, not the request's
    assert dtype("unknown", "bf16") == "bfloat16"  # inconclusive read-back: the requested precision


def test_engine_onnx_is_found_and_must_be_unchanged(exported, tmp_path):
    import shutil

    _, onnx_path = exported
    copy = tmp_path / "model.onnx"
    shutil.copyfile(onnx_path, copy)
    document = engine_manifest(copy)
    engine = write_engine(tmp_path, document)
    assert mf.engine_onnx(engine, document) == copy
    document["onnx"]["path"] = "elsewhere/model.onnx"  # moved with the engine: found beside it
    assert mf.engine_onnx(engine, document) == tmp_path / "model.onnx"
    copy.write_bytes(copy.read_bytes() + b"\0")
    with pytest.raises(BadInputError, match="changed since the engine was built"):
        mf.engine_onnx(engine, document)
    with pytest.raises(BadInputError, match="outside the engine's profile"):
        mf.check_in_profiles(document, {"input_ids": np.zeros((9, 16), np.int64)})


def test_fit_feed_casts_ids_to_the_engines_integer_type():
    from lora_deploy.backends.trt.runner import fit_feed

    meta = {"input_ids": (np.dtype(np.int32), ["dyn", "dyn"]), "x": (np.dtype(np.float16), [2])}
    fed = fit_feed({"input_ids": np.arange(4, dtype=np.int64), "x": np.ones(2, np.float32)}, meta)
    assert fed["input_ids"].dtype == np.int32 and fed["x"].dtype == np.float32  # floats are not converted
    with pytest.raises(BadInputError, match="do not fit the engine's int32"):
        fit_feed({"input_ids": np.array([2**40])}, meta)


class StandInEngine:
    """ONNX Runtime on the engine's ONNX in place of TensorRT, with input_ids bound as int32
    the way TensorRT may bind them. It proves the wiring of verify --engine (checks, tolerance,
    report, feed casting), nothing about TensorRT."""

    fed: list = []

    def __new__(cls, path, name=None):
        from lora_deploy.backends.base import Runner
        from lora_deploy.backends.onnxrt.runner import OnnxrtRunner

        inner = OnnxrtRunner(mf.engine_onnx(path, mf.read_manifest(path)))

        class Runner_(Runner):
            def _activate(self):
                inner.activate()

            def _deactivate(self):
                inner.deactivate()

            def _input_metadata(self):
                meta = dict(inner.input_metadata())
                meta["input_ids"] = (np.dtype(np.int32), meta["input_ids"][1])
                return meta

            def _infer(self, feed):
                cls.fed.append(feed)
                return inner.infer({k: v.astype(np.int64) for k, v in feed.items()})

        return Runner_(name)


@pytest.fixture
def stand_in(monkeypatch):
    from lora_deploy.backends.trt import runner

    monkeypatch.setattr(versions, "require_tensorrt", lambda: None)
    monkeypatch.setattr(runner, "TrtEngineRunner", StandInEngine)
    StandInEngine.fed = []


def test_verify_engine_wiring(stand_in, exported, reference, tmp_path):
    """An 'engine' computing the base ONNX: equal to ONNX Runtime on its ONNX, and not to
    base + adapter, which verify must catch (exit 1), with the fp16 tolerance its manifest
    records."""
    _, onnx_path = exported
    base, adapter = reference("llama", "plain")
    engine = write_engine(tmp_path, engine_manifest(onnx_path))
    report = tmp_path / "report.json"
    result = CliRunner().invoke(
        main, ["verify", str(base), str(adapter), "--engine", str(engine), "--report", str(report)]
    )
    assert result.exit_code == 1, result.output
    doc = json.loads(report.read_text())
    checks = {c["name"]: c for c in doc["checks"]}
    versus_unmerged = checks["outputs [generated]: engine (tensorrt) logits vs unmerged"]
    versus_onnx = checks[f"outputs [generated]: engine (tensorrt) vs onnxruntime on {onnx_path.name}: logits"]
    assert versus_unmerged["status"] == "failed" and versus_onnx["status"] == "passed"
    assert versus_onnx["max_abs"] == 0.0 and versus_onnx["atol"] == 2e-2  # float16's row, from the manifest
    assert checks["outputs [generated]: polygraphy comparator, engine vs unmerged"]["status"] == "failed"
    assert set(doc["artifacts"]) >= {"engine", "engine_onnx"} and doc["inputs"]["engine"] == str(engine)
    assert StandInEngine.fed and all(f["input_ids"].dtype == np.int32 for f in StandInEngine.fed)


def test_verify_refitted_engine_skips_the_onnx_comparison(stand_in, exported, reference, tmp_path):
    from lora_deploy.proof.verify import verify

    _, onnx_path = exported
    base, adapter = reference("llama", "plain")
    engine = write_engine(tmp_path, engine_manifest(onnx_path, "fp32", refit_adapter={"path": str(adapter)}))
    report = verify(base, adapter, engine_path=engine)
    skipped = [c for c in report.checks if c.skipped]
    assert len(skipped) == 1 and "refitted to" in skipped[0].detail
    assert {c.atol for c in report.checks if c.atol is not None} == {1e-4}  # fp32 engine: fp32 tolerance


def test_verify_engine_without_tensorrt_exits_2_and_writes_nothing(no_tensorrt, exported, reference, tmp_path):
    _, onnx_path = exported
    base, adapter = reference("llama", "plain")
    engine = write_engine(tmp_path, engine_manifest(onnx_path))
    report = tmp_path / "report.json"
    args = ["verify", str(base), str(adapter), "--engine", str(engine), "--report", str(report)]
    assert_clean_exit_2(CliRunner().invoke(main, args), "TensorRT is not installed", "lora-deploy[tensorrt]")
    assert not report.exists()
