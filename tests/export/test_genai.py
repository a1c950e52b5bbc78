"""`lora-deploy export genai`: the folder loads in onnxruntime-genai as users load it, a dynamic
folder follows ONNX Runtime's multi-LoRA convention with its adapters packed the way `pack`
packs them, the manifest records the bytes, and refusals and failed or interrupted builds
leave nothing at DIR. (Generation against PEFT: tests/backends/test_genai.py.)"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from lora_deploy.cli import main
from lora_deploy.errors import BadInputError
from lora_deploy.export import genai


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_nothing_written(out):
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_folder_loads_in_onnxruntime_genai(genai_folder):
    og = pytest.importorskip("onnxruntime_genai")
    folder, _, _ = genai_folder("merged")
    for name in ("genai_config.json", "model.onnx", "tokenizer.json", genai.MANIFEST):
        assert (folder / name).is_file(), name
    model = og.Model(str(folder))  # genai_config.json's own providers: the CPU for fp32
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=6)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([[1, 20, 21]], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) == 6
    # (og.Tokenizer cannot parse the example models' character-level WordLevel tokenizer:
    # "Cannot know how to parse line"; the builder copies the files all the same.)
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert not [i.name for i in proto.graph.input if "lora" in i.name]


def test_manifest_records_inputs_and_outputs(genai_folder):
    folder, _, _ = genai_folder("merged")
    manifest = json.loads((folder / genai.MANIFEST).read_text())
    assert manifest["schema"] == genai.SCHEMA and manifest["precision"] == "fp32"
    assert manifest["architecture"] == "LlamaForCausalLM" and manifest["dynamic_adapters"] is False
    written = manifest["output"]["sha256"]
    assert {"model.onnx", "model.onnx.data", "genai_config.json"} <= set(written)
    for name, digest in written.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    source = manifest["model"]["sha256"]["model.safetensors"]
    merged = folder.parent / "merged-checkpoint" / "model.safetensors"
    assert hashlib.sha256(merged.read_bytes()).hexdigest() == source


def test_dynamic_folder_follows_the_multi_lora_convention(genai_folder, tmp_path):
    import onnxruntime as ort

    folder, _, adapters = genai_folder("dynamic")
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    inputs = {i.name: i for i in proto.graph.input}
    defaults = {t.name: t for t in proto.graph.initializer}
    a_name = "model.layers.0.mlp.down_proj.lora_A.MatMul.weight"
    dims = [d.dim_param or d.dim_value for d in inputs[a_name].type.tensor_type.shape.dim]
    assert dims == [128, "rank_model_layers_0_mlp_down_proj"]
    assert list(defaults[a_name].dims) == [128, 0]  # rank-0 default: no adapter = the base
    lora = [n for n in inputs if ".lora_" in n]
    assert len(lora) == 2 * 7 * 2  # A and B, 7 projections, 2 layers: the first adapter's targets
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert set(lora) == {i.name for i in session.get_overridable_initializers()}
    # `pack --onnx DIR/model.onnx` writes the file the export wrote, under the builder's names.
    for adapter in adapters:
        shipped = folder / f"{adapter.name}.onnx_adapter"
        result = cli("pack", adapter, "-o", tmp_path / shipped.name, "--onnx", folder / "model.onnx")
        assert result.exit_code == 0, result.output
        want = ort.AdapterFormat.read_adapter(str(shipped)).get_parameters()
        got = ort.AdapterFormat.read_adapter(str(tmp_path / shipped.name)).get_parameters()
        assert set(got) == set(want) and set(got) <= set(lora)
        for name in got:
            np.testing.assert_array_equal(got[name].numpy(), want[name].numpy())
    patterns = ort.AdapterFormat.read_adapter(str(folder / f"{adapters[1].name}.onnx_adapter")).get_parameters()
    assert patterns["model.layers.0.attn.v_proj.lora_A.MatMul.weight"].shape() == [64, 4]  # its rank_pattern


def test_unsupported_architecture_is_refused(reference, tmp_path):
    base, _ = reference("gpt2")
    out = tmp_path / "gpt2-genai"
    result = cli("export", "genai", base, "-o", out)
    assert result.exit_code == 2, result.output
    assert "GPT2LMHeadModel" in result.output and len(result.output.strip().splitlines()) == 1
    assert_nothing_written(out)


def test_adapter_outside_the_first_adapters_layers_is_refused(reference, tmp_path):
    base, plain = reference("llama")
    _, all_linear = reference("llama", "all_linear")
    out = tmp_path / "genai"
    result = cli("export", "genai", base, "-o", out, "--dynamic-adapters", "--adapter", plain, "--adapter", all_linear)
    assert result.exit_code == 2, result.output
    assert "give the widest one first" in result.output
    assert_nothing_written(out)


def test_failed_build_leaves_nothing(reference, tmp_path, monkeypatch):
    base, _ = reference("llama")
    out = tmp_path / "genai"

    def failing(model, staged, *rest):  # writes part of a folder, then fails like the builder
        code = "import sys; open(sys.argv[1] + '/model.onnx', 'w').write('x'); sys.exit('RuntimeError: out of cheese')"
        return [sys.executable, "-c", code, str(staged)]

    monkeypatch.setattr(genai, "builder_command", failing)
    result = cli("export", "genai", base, "-o", out)
    assert result.exit_code == 2, result.output
    assert "model builder failed" in result.output and "out of cheese" in result.output
    assert_nothing_written(out)


def test_interrupted_build_leaves_nothing(reference, tmp_path, monkeypatch):
    base, _ = reference("llama")
    out = tmp_path / "genai"

    def interrupted(command, cache):
        (cache.parent / "model.onnx").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(genai, "run_builder", interrupted)
    with pytest.raises(KeyboardInterrupt):
        genai.export_genai(base, out)
    assert_nothing_written(out)


def test_missing_extra_exits_2_naming_it(reference, tmp_path, monkeypatch):
    base, _ = reference("llama")
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)
    result = cli("export", "genai", base, "-o", tmp_path / "genai")
    assert result.exit_code == 2
    assert "pip install 'lora-deploy[genai]'" in result.output and len(result.output.strip().splitlines()) == 1
    with pytest.raises(BadInputError):
        genai.export_genai(base, tmp_path / "genai")
    assert_nothing_written(tmp_path / "genai")


def test_builder_names_table():
    assert genai.builder_node("model.layers.3.self_attn.k_proj") == "/model/layers.3/attn/k_proj"
    assert genai.builder_node("model.layers.12.mlp.down_proj") == "/model/layers.12/mlp/down_proj"
    assert genai.builder_node("model.embed_tokens") is None
    weight = genai.builder_weight("/model/layers.0/attn/q_proj", "lora_A")
    assert weight == "model.layers.0.attn.q_proj.lora_A.MatMul.weight"
