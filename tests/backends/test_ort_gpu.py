"""ONNX Runtime's GPU providers (backends/onnxrt/gpu.py), tested where there is no GPU and
no onnxruntime-gpu: the provider choice and its options, the one-line refusal, that the
strict session config reaches ONNX Runtime, and the reading of where nodes ran from an
ONNX Runtime profile. Nothing here has run on a GPU."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from lora_deploy.backends.onnxrt import gpu
from lora_deploy.backends.onnxrt.loader import SessionFromOnnx
from lora_deploy.cli import main
from lora_deploy.errors import BadInputError
from lora_deploy.proof.verify import verify as run_verify

NO_GPU = "CUDAExecutionProvider" not in ort.get_available_providers()


def test_choices_and_their_options(tmp_path):
    assert gpu.choose() == gpu.GpuChoice() and not gpu.choose().config
    cuda = gpu.choose("cuda")
    assert cuda.providers == ("CUDAExecutionProvider",) and cuda.config == {gpu.STRICT: "1"}
    assert "CPUExecutionProvider" not in cuda.providers  # ONNX Runtime refuses the strict flag beside it
    trt = gpu.choose("cuda", "tensorrt", trt_fp16=True, trt_cache=tmp_path)
    assert trt.providers == ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    options = trt.provider_options[0]
    assert options["trt_fp16_enable"] == "True" and options["trt_engine_cache_path"] == str(tmp_path.resolve())
    assert trt.record()["provider_options"][0] == options and trt.record()["session_config"] == {gpu.STRICT: "1"}
    for args, message in [
        (("cpu", "cuda"), "add --device cuda"),
        (("cuda", "cuda", True), "options of --provider tensorrt"),
        (("cpu", None, False, tmp_path), "options of --device cuda --provider tensorrt"),
        (("cuda", "rocm"), "choose cuda, tensorrt"),
    ]:
        with pytest.raises(BadInputError, match=message):
            gpu.choose(*args)


@pytest.mark.skipif(not NO_GPU, reason="this ONNX Runtime has the CUDA provider")
def test_without_onnxruntime_gpu_one_line_says_what_to_install(tmp_path):
    with pytest.raises(
        BadInputError, match=r"no TensorrtExecutionProvider, CUDAExecutionProvider .*lora-deploy\[gpu\]"
    ):
        gpu.require_providers(gpu.choose("cuda", "tensorrt"))
    model = tmp_path / "m.onnx"
    onnx.save(matmul_graph(), str(model))
    report = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--device", "cuda", "--model", f"m={model}", "--json", str(report)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "no CUDAExecutionProvider" in result.stderr and "pip install 'lora-deploy[gpu]'" in result.stderr
    assert not report.exists()
    result = CliRunner().invoke(main, ["bench", "--provider", "tensorrt", "--model", f"m={model}"])
    assert result.exit_code == 2 and "add --device cuda" in result.stderr
    verify = ["verify", str(tmp_path / "base"), str(tmp_path / "adapter"), "--onnx", str(model), "--device", "cuda"]
    result = CliRunner().invoke(main, [*verify, "--provider", "tensorrt", "--report", str(report)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "no TensorrtExecutionProvider" in result.stderr and not report.exists()


def matmul_graph():
    """x [1, 4] @ w, and the shape of x (int64): one compute node, one shape node."""
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Shape", ["x"], ["s"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("s", 7, [2]),
        ],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def shape_graph():
    nodes = [helper.make_node("Shape", ["x"], ["s"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("s", 7, [1])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_strict_flag_reaches_onnx_runtime(tmp_path):
    """ONNX Runtime refuses disable_cpu_ep_fallback next to an explicit CPU provider: proof that
    the loader hands it the session config (what it then does on a GPU is untested here)."""
    path = tmp_path / "m.onnx"
    onnx.save(matmul_graph(), str(path))
    with pytest.raises(BadInputError, match="Conflicting session configuration"):
        SessionFromOnnx(path, config={gpu.STRICT: "1"})()
    SessionFromOnnx(path, config={gpu.STRICT: "0"})()


def test_where_nodes_ran_is_read_from_a_profile(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(matmul_graph(), str(path))
    placed = gpu.probe_cpu_nodes(SessionFromOnnx(path))  # on the CPU provider, every node is there
    assert placed == {("MatMul", True): 1, ("Shape", False): 1}
    assert (
        gpu.cpu_nodes(json.loads(json.dumps([{"cat": "Session", "args": {"provider": "CPUExecutionProvider"}}]))) == {}
    )


@pytest.mark.parametrize("graph, accepted", [(shape_graph, True), (matmul_graph, False)])
def test_a_refused_strict_session_is_opened_only_for_shape_arithmetic(graph, accepted, tmp_path, monkeypatch):
    """A double: the CPU provider stands in for the GPU one, and ONNX Runtime's refusal of the
    strict flag beside it stands in for its refusal of CPU-placed nodes. It proves the decision
    (shape nodes accepted and recorded, compute nodes refused by name), nothing about a GPU."""
    path = tmp_path / "m.onnx"
    onnx.save(graph(), str(path))
    monkeypatch.setattr(gpu, "CPU_ASSIGNED", "Conflicting session configuration")
    choice = gpu.GpuChoice("cuda", "cuda", ("CPUExecutionProvider",), ({},), {gpu.STRICT: "1"})
    if accepted:
        session, record = gpu.open_session(choice, path)
        assert record["strict"] is False and record["cpu_nodes"] == {"Shape": 1}
        assert record["providers"] == ["CPUExecutionProvider"] and session.run(None, {"x": np.ones(3, np.float32)})
    else:
        with pytest.raises(BadInputError, match=r"compute nodes on the CPU.*MatMul x1"):
            gpu.open_session(choice, path)


def test_trt_cache_is_an_output_never_an_input(tmp_path):
    """--trt-cache is a directory ONNX Runtime writes into: the output policy refuses an
    input, a directory holding one, or one inside an input, in one line (exit 2), before
    the providers are needed (so on any machine), and nothing is written."""
    base, adapter, graphs = tmp_path / "base", tmp_path / "adapter", tmp_path / "graphs"
    for folder in (base, adapter, graphs):
        folder.mkdir()
    model = graphs / "m.onnx"
    onnx.save(matmul_graph(), str(model))
    report = tmp_path / "verify.json"
    verify = ["verify", str(base), str(adapter), "--onnx", str(model), "--device", "cuda", "--provider", "tensorrt"]
    for cache, relation in [
        (base / "trt", f"lies inside input {base}"),
        (adapter, f"is input {adapter}"),
        (graphs, f"contains input {model}"),
        (tmp_path, f"contains input {base}"),
    ]:
        result = CliRunner().invoke(main, [*verify, "--trt-cache", str(cache), "--report", str(report)])
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
        assert f"{cache}: output must not be or contain an input" in result.stderr and relation in result.stderr
        assert not report.exists() and not (base / "trt").exists()
    bench = ["bench", "--device", "cuda", "--provider", "tensorrt", "--model", f"m={model}"]
    result = CliRunner().invoke(main, [*bench, "--trt-cache", str(graphs)])
    assert result.exit_code == 2 and f"contains input {model}" in result.stderr, result.output
    (tmp_path / "file").write_text("")
    with pytest.raises(BadInputError, match="exists and is not a directory"):  # the API's check (click has its own)
        run_verify(base, adapter, onnx_path=model, device="cuda", provider="tensorrt", trt_cache=tmp_path / "file")
    if NO_GPU:  # a cache of its own passes the policy: the next refusal is the missing provider's
        result = CliRunner().invoke(main, [*verify, "--trt-cache", str(tmp_path / "cache")])
        assert result.exit_code == 2 and "no TensorrtExecutionProvider" in result.stderr, result.output
        result = CliRunner().invoke(main, [*bench, "--trt-cache", str(tmp_path / "cache")])
        assert result.exit_code == 2 and "no TensorrtExecutionProvider" in result.stderr, result.output
        assert not (tmp_path / "cache").exists()
