"""Quantized paths through the merge (merge/quant.py): --onto against bitsandbytes and
PEFT, block-scaled FP8 bases against a dense float32 computation done here with torch,
and the refusals."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lora_deploy.cli import main
from lora_deploy.errors import BadInputError
from lora_deploy.merge import merge
from lora_deploy.merge.quant import split_patterns
from lora_deploy.merge.streaming import MANIFEST_FILE
from tests.oracle import peft_merged_state, read_checkpoint, ulp

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEAR


# -- --onto: bitsandbytes' dequantized base plus PEFT's update ------------------------------


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False), ("int8", False)])
def test_onto_merges_onto_bitsandbytes_dequantized_weights(reference, tmp_path, quant_type, double_quant):
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the oracle")
    base16, adapter = reference("llama", "plain", dtype="float16")
    base32, _ = reference("llama", "plain", dtype="float32")
    # PEFT's update, from the float32 base: W0 + dW - W0
    peft = peft_merged_state(base32, adapter)
    w32 = read_checkpoint(base32)
    delta = {k: peft[k] - w32[k] for k in w32 if k in peft and not torch.equal(peft[k], w32[k])}
    assert delta and all(is_linear(k) for k in delta)

    blocksize = None if quant_type == "int8" else 64  # int8 has no blocks: a blocksize is refused
    result = merge(base16, adapter, tmp_path / "out", onto=quant_type, blocksize=blocksize, double_quant=double_quant)
    merged, base = read_checkpoint(tmp_path / "out"), read_checkpoint(base16)
    for name, w0 in base.items():
        if not is_linear(name):
            assert torch.equal(merged[name], w0), name  # embeddings, norms, lm_head untouched
            continue
        if quant_type == "int8":
            rows, stats, _ = F.int8_vectorwise_quant(w0.contiguous())
            dequantized = F.int8_vectorwise_dequant(rows, stats)
        else:
            packed, state = F.quantize_4bit(w0, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
            state.dtype = torch.float32
            dequantized = F.dequantize_4bit(packed, state)
        if name not in delta:  # untargeted: what bitsandbytes holds, rounded once to float16
            assert torch.equal(merged[name], dequantized.half()), name
        else:
            expected = dequantized + delta[name]
            assert ((merged[name].float() - expected).abs() <= ulp(expected, torch.float16)).all(), name
            assert not torch.equal(merged[name], (w0.float() + delta[name]).half())  # not the plain merge

    report = result.manifest["quantization"]
    assert report["onto"] == quant_type and report["quantized_layers"] == sum(map(is_linear, base))
    merged_layers = {e["weight"] for e in report["layers"] if e["merged"]}
    assert merged_layers == set(delta)
    for entry in report["layers"]:
        assert 0 < entry["rel_error"] < (0.02 if quant_type == "int8" else 0.2)
        assert entry["onto_vs_original"] > 0


def test_onto_skip_modules_leaves_them_as_they_are(reference, tmp_path):
    pytest.importorskip("bitsandbytes")
    base, adapter = reference("llama", "plain", dtype="float16")
    result = run_cli(
        "merge",
        base,
        adapter,
        "-o",
        tmp_path / "out",
        "--onto",
        "nf4",
        "--skip-modules",
        "o_proj",
        "--skip-modules",
        "model.layers.*mlp",
    )
    assert result.exit_code == 0, result.output
    assert "--onto nf4, blocksize 64" in result.output
    merged, w0 = read_checkpoint(tmp_path / "out"), read_checkpoint(base)
    for name in w0:
        if ".mlp." in name or "o_proj" in name:
            assert torch.equal(merged[name], w0[name]), name
    manifest = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())
    assert manifest["quantization"]["skip_modules"] == ["o_proj", "model.layers.*mlp"]
    assert not any(".mlp." in e["weight"] for e in manifest["quantization"]["layers"])


def test_onto_refuses_an_untargeted_weight_that_comes_out_non_finite(reference, tmp_path):
    """The untargeted path skips the finite check when its error sums are finite; an Inf
    in the weight makes its block non-finite, and the merge must still refuse it."""
    base, adapter = reference("llama", "plain", dtype="float16")
    targets = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    copy = tmp_path / "base"
    shutil.copytree(base, copy)
    (path,) = copy.glob("*.safetensors")
    state = load_file(path)
    name = next(k for k in state if is_linear(k) and k.split(".")[-2] not in targets)
    state[name].view(-1)[5] = float("inf")
    save_file(state, path, metadata={"format": "pt"})
    result = run_cli("merge", copy, adapter, "-o", tmp_path / "out", "--onto", "nf4")
    assert result.exit_code != 0 and "NaN or Inf" in result.output, result.output
    assert not (tmp_path / "out").exists()


# -- block-scaled FP8 ---------------------------------------------------------------------

BLOCK = 128
Q, UP = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"


def fp8_blocks(w: torch.Tensor):
    """Quantize by DeepSeek-V3's recipe, in torch: scale_inv = amax / 448 per 128x128 block."""
    rows, cols = w.shape
    scale = torch.empty(-(-rows // BLOCK), -(-cols // BLOCK))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            block = w[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK]
            s = block.abs().max() / 448
            scale[i, j] = s
            q[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] = (block / s).clamp(-448, 448).to(q.dtype)
    return q, scale


def fp8_dense(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    full = scale.repeat_interleave(BLOCK, 0)[: q.shape[0]].repeat_interleave(BLOCK, 1)[:, : q.shape[1]]
    return q.float() * full


@pytest.fixture
def fp8_model(tmp_path):
    """A hand-built block-scaled FP8 checkpoint (weights 200x300 and 260x200: partial
    blocks) and a LoRA adapter on its q_proj."""
    g = torch.Generator().manual_seed(0)
    base, adapter = tmp_path / "fp8-base", tmp_path / "fp8-adapter"
    base.mkdir()
    adapter.mkdir()
    tensors = {}
    for name, shape in [(Q, (200, 300)), (UP, (260, 200))]:
        q, scale = fp8_blocks(torch.randn(*shape, generator=g) * 0.02)
        tensors[f"{name}.weight"], tensors[f"{name}.weight_scale_inv"] = q, scale
    tensors["model.norm.weight"] = torch.ones(200, dtype=torch.bfloat16)
    save_file(tensors, base / "model.safetensors")
    config = {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}
    (base / "config.json").write_text(json.dumps(config))
    a, b = torch.randn(4, 300, generator=g) * 0.1, torch.randn(200, 4, generator=g) * 0.1
    save_file(
        {f"base_model.model.{Q}.lora_A.weight": a, f"base_model.model.{Q}.lora_B.weight": b},
        adapter / "adapter_model.safetensors",
    )
    lora = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "base_model_name_or_path": "x"}
    (adapter / "adapter_config.json").write_text(json.dumps(lora))
    exact = fp8_dense(tensors[f"{Q}.weight"], tensors[f"{Q}.weight_scale_inv"]) + 2.0 * (b @ a)
    return base, adapter, tensors, exact


def test_fp8_base_is_dequantized_merged_in_float32_and_written_bfloat16(fp8_model, tmp_path):
    base, adapter, tensors, exact = fp8_model
    result = run_cli("merge", base, adapter, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(merged) == [f"{UP}.weight", f"{Q}.weight", "model.norm.weight"]  # scales dropped
    assert merged[f"{Q}.weight"].dtype == torch.bfloat16
    assert torch.equal(merged[f"{Q}.weight"], exact.bfloat16())  # one rounding of the float32 merge
    up = fp8_dense(tensors[f"{UP}.weight"], tensors[f"{UP}.weight_scale_inv"])
    assert torch.equal(merged[f"{UP}.weight"], up.bfloat16())
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    layers = {e["weight"]: e for e in manifest["quantization"]["layers"]}
    expected = ((merged[f"{Q}.weight"].float() - exact).norm() / exact.norm()).item()
    assert layers[f"{Q}.weight"]["rel_error"] == pytest.approx(expected, rel=1e-3)
    assert layers[f"{Q}.weight"]["merged"] and not layers[f"{UP}.weight"]["merged"]


def test_inspect_resolves_an_adapter_on_an_fp8_base(fp8_model):
    base, adapter, _, _ = fp8_model
    result = run_cli("inspect", adapter, "--base", base, "--json")
    assert result.exit_code == 0, result.output
    [module] = json.loads(result.stdout)["modules"]
    assert module["weight"] == f"{Q}.weight" and module["kind"] == "linear"


def test_fp8_requantized_no_worse_than_quantizing_the_exact_merge(fp8_model, tmp_path):
    base, adapter, tensors, exact = fp8_model
    result = run_cli("merge", base, adapter, "-o", tmp_path / "out", "--requantize", "fp8")
    assert result.exit_code == 0, result.output
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(merged) == sorted(tensors)  # same names and layout
    assert merged[f"{Q}.weight"].dtype == torch.float8_e4m3fn
    assert merged[f"{Q}.weight_scale_inv"].shape == tensors[f"{Q}.weight_scale_inv"].shape
    for name in (f"{UP}.weight", f"{UP}.weight_scale_inv"):  # untouched: byte for byte
        assert torch.equal(merged[name].view(torch.uint8), tensors[name].view(torch.uint8))
    ours = fp8_dense(merged[f"{Q}.weight"], merged[f"{Q}.weight_scale_inv"])
    direct = fp8_dense(*fp8_blocks(exact))
    error, direct_error = (ours - exact).norm().item(), (direct - exact).norm().item()
    assert error <= direct_error * (1 + 1e-6)
    manifest = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())
    assert "quantization_config" in json.loads((tmp_path / "out" / "config.json").read_text())
    [entry] = [e for e in manifest["quantization"]["layers"] if e["weight"] == f"{Q}.weight"]
    assert entry["rel_error"] == pytest.approx(error / exact.norm().item(), rel=1e-3)


def test_fp8_requantized_with_dtype_keeps_untouched_scales_as_they_are(fp8_model, tmp_path):
    """--dtype casts the float tensors, never the scales of a float8 weight copied as it is
    (a float16 scale would change what that weight dequantizes to)."""
    base, adapter, tensors, _ = fp8_model
    result = run_cli("merge", base, adapter, "-o", tmp_path / "out", "--requantize", "fp8", "--dtype", "float16")
    assert result.exit_code == 0, result.output
    merged = load_file(tmp_path / "out" / "model.safetensors")
    for name in (f"{UP}.weight", f"{UP}.weight_scale_inv"):
        assert merged[name].dtype == tensors[name].dtype, name
        assert torch.equal(merged[name].view(torch.uint8), tensors[name].view(torch.uint8)), name
    assert merged["model.norm.weight"].dtype == torch.float16


# -- refusals and hints ----------------------------------------------------------------------


def assert_refused(result, out, *words):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]
    assert not out.exists()


def test_other_quantized_formats_are_refused_naming_them(reference, tmp_path):
    base, adapter = reference("llama", "plain")
    gptq = tmp_path / "gptq"
    shutil.copytree(base, gptq)
    save_file(
        {"model.layers.0.self_attn.q_proj.qweight": torch.zeros(4, 8, dtype=torch.int32)}, gptq / "extra.safetensors"
    )
    index = {"weight_map": {**{k: "model.safetensors" for k in load_file(base / "model.safetensors")}}}
    index["weight_map"]["model.layers.0.self_attn.q_proj.qweight"] = "extra.safetensors"
    (gptq / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    assert_refused(run_cli("merge", gptq, adapter, "-o", out), out, "GPTQ", "qweight")

    compressed = tmp_path / "compressed"
    shutil.copytree(base, compressed)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors"}
    (compressed / "config.json").write_text(json.dumps(config))
    tensors = load_file(compressed / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].to(torch.int8)
    save_file(tensors, compressed / "model.safetensors")
    assert_refused(run_cli("merge", compressed, adapter, "-o", out), out, "compressed-tensors")


def test_quantization_options_that_do_not_fit_are_refused(reference, fp8_model, tmp_path):
    base, adapter = reference("llama", "plain")
    fp8_base, fp8_adapter, _, _ = fp8_model
    out = tmp_path / "out"
    cases = [
        ((base, adapter, "--double-quant"), "--onto"),
        ((base, adapter, "--onto", "nf4", "--blocksize", "100"), "blocksize"),
        ((base, adapter, "--onto", "int8", "--double-quant"), "double-quant"),
        ((base, adapter, "--onto", "int8", "--blocksize", "64"), "blocksize"),  # the default, given: still refused
        ((base, adapter, "--blocksize", "64"), "--onto"),
        ((base, adapter, "--onnx-like", base / "config.json", "--skip-modules", "o_proj"), "--onnx-like"),
        ((base, adapter, "--requantize", "fp8"), "FP8"),
        ((fp8_base, fp8_adapter, "--onto", "nf4"), "FP8"),
    ]
    for args, word in cases:
        assert_refused(run_cli("merge", *args, "-o", out), out, word)


def test_onto_int8_names_the_weight_that_float16_cannot_hold(reference, tmp_path):
    """LLM.int8 casts to float16 first: a NaN, or a value beyond 65504, in a targeted or an
    untargeted Linear weight is refused naming that tensor (it was neither named nor said
    to be NaN before)."""
    base, adapter = reference("llama", "plain")
    cases = [("model.layers.1.mlp.up_proj.weight", float("nan")), ("model.layers.0.self_attn.q_proj.weight", 1e6)]
    for name, value in cases:
        edited = tmp_path / f"base_{name}"
        shutil.copytree(base, edited)
        tensors = load_file(edited / "model.safetensors")
        tensors[name][1, 2] = value
        save_file(tensors, edited / "model.safetensors", metadata={"format": "pt"})
        out = tmp_path / "out"
        result = run_cli("merge", edited, adapter, "-o", out, "--onto", "int8")
        assert_refused(result, out, f"{name}: --onto int8", "NaN or Inf or exceeds float16's range")


def test_onto_4bit_refuses_a_float64_weight_naming_it(tmp_path):
    """The 4-bit passes read 16/32-bit floats: a float64 base ended as an internal error
    (exit 3, an OverflowError); bitsandbytes never sees one (transformers casts first)."""
    from safetensors.numpy import save_file as save_numpy

    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir(), adapter.mkdir()
    rng = np.random.default_rng(0)
    name = "model.layers.0.self_attn.q_proj.weight"
    save_numpy(
        {name: rng.standard_normal((8, 16)), "model.norm.weight": np.ones(16, np.float32)}, base / "model.safetensors"
    )
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    factors = {
        f"{prefix}.lora_A.weight": np.ones((2, 16), np.float32),
        f"{prefix}.lora_B.weight": np.ones((8, 2), np.float32),
    }
    save_numpy(factors, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    out = tmp_path / "out"
    for quant_type in ("nf4", "fp4"):
        result = run_cli("merge", base, adapter, "-o", out, "--onto", quant_type)
        assert_refused(result, out, f"{name}: --onto {quant_type}: a float64 weight", "convert the base")
    assert run_cli("merge", base, adapter, "-o", out, "--onto", "int8").exit_code == 0  # float16 first, as bitsandbytes


@pytest.mark.parametrize(
    "pattern,words",
    [
        ("[", ["'['", "not a valid regular expression"]),
        ("o_projj", ["'o_projj'", "matches no quantizable linear layer", "e.g. 'model.layers."]),
        ("lm_head", ["'lm_head'", "matches no"]),  # a head --onto leaves alone anyway
        ("layers.0", ["'layers.0'", "matches no"]),  # anchored at the start, as transformers does
    ],
)
def test_onto_refuses_a_skip_pattern_that_is_invalid_or_matches_nothing(reference, tmp_path, pattern, words):
    base, adapter = reference("llama", "plain")
    out = tmp_path / "out"
    args = ("merge", base, adapter, "-o", out, "--onto", "nf4", "--skip-modules", "o_proj", "--skip-modules", pattern)
    assert_refused(run_cli(*args), out, "--skip-modules", *words)


def test_a_skip_pattern_keeps_its_commas_inside_braces_and_is_shown_as_typed(reference, tmp_path):
    pytest.importorskip("bitsandbytes")
    base, adapter = reference("llama", "plain")
    out = tmp_path / "out"
    pattern = r"model\.layers\.[0-9]{1,2}\.mlp\.(down_proj|up_proj)"
    result = run_cli("merge", base, adapter, "-o", out, "--onto", "nf4", "--skip-modules", f"o_proj,{pattern}")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["quantization"]["skip_modules"] == ["o_proj", pattern]
    merged, w0 = read_checkpoint(out), read_checkpoint(base)
    skipped = [n for n in w0 if n.endswith((".down_proj.weight", ".up_proj.weight", ".o_proj.weight"))]
    targeted = {m["weight"] for m in manifest["modules"]}
    assert skipped and all(torch.equal(merged[n], w0[n]) for n in skipped if n not in targeted)
    quantized = {e["weight"] for e in manifest["quantization"]["layers"]}
    assert not quantized & set(skipped) and any(".gate_proj." in n for n in quantized)

    out2 = tmp_path / "out2"
    typo = r"model\.layers\.[0-9]{3}\.mlp"
    result = run_cli("merge", base, adapter, "-o", out2, "--onto", "nf4", "--skip-modules", typo)
    assert_refused(result, out2, f"'{typo}' matches no")


@pytest.mark.parametrize(
    "entry, parts",
    [
        ("o_proj,down_proj", ["o_proj", "down_proj"]),
        (r"layers\.[0-9]{1,2}\.mlp", [r"layers\.[0-9]{1,2}\.mlp"]),
        ("(q|k)_proj,v_proj", ["(q|k)_proj", "v_proj"]),
        ("[,x]_proj,o", ["[,x]_proj", "o"]),
        (r"a\,b", [r"a\,b"]),
        ("a,,b,", ["a", "b"]),
    ],
)
def test_skip_modules_values_split_at_commas_outside_brackets(entry, parts):
    assert split_patterns(entry) == parts


def test_api_takes_one_string_as_one_item_and_refuses_a_string_blocksize(reference, robot, tmp_path):
    base, adapter = reference("llama", "plain")
    out = tmp_path / "out"
    if importlib.util.find_spec("bitsandbytes") is not None:
        result = merge(base, adapter, out, onto="nf4", skip_modules="o_proj")
        assert result.manifest["quantization"]["skip_modules"] == ["o_proj"]
        shutil.rmtree(out)
    with pytest.raises(BadInputError, match=r"^blocksize must be an int such as 64, not str '64'$"):
        merge(base, adapter, out, onto="nf4", blocksize="64")
    assert not out.exists()
    paths = robot("vla")
    result = merge(paths["base"], paths["adapter"], out, side_files=str(paths["statistics"]))
    assert (out / paths["statistics"].name).read_bytes() == paths["statistics"].read_bytes()


def test_adapter_trained_on_a_quantized_base_gets_a_hint(reference, tmp_path):
    base, adapter = reference("llama", "plain")
    qlora = tmp_path / "qlora"
    shutil.copytree(adapter, qlora)
    config = json.loads((qlora / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "unsloth/tiny-llama-bnb-4bit"
    (qlora / "adapter_config.json").write_text(json.dumps(config))
    result = run_cli("merge", base, qlora, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    hints = [line for line in result.stderr.splitlines() if line.startswith("hint:")]
    assert len(hints) == 1 and "--onto" in hints[0] and "bnb" in hints[0]
    info = json.loads(run_cli("inspect", qlora, "--json").stdout)
    assert "bnb" in info["quantized_base_hint"]
    plain = run_cli("merge", base, adapter, "-o", tmp_path / "plain")
    assert "hint:" not in plain.stderr
    assert json.loads(run_cli("inspect", adapter, "--json").stdout)["quantized_base_hint"] is None


def test_onto_quantizes_gpt2_conv1d_weights_transposed_as_transformers_does(reference, tmp_path):
    """transformers hands bitsandbytes a Conv1D weight ([in, out]) transposed."""
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the oracle")
    base, adapter = reference("gpt2", "plain", dtype="float16")
    merge(base, adapter, tmp_path / "out", onto="nf4")
    merged, w0 = read_checkpoint(tmp_path / "out"), read_checkpoint(base)
    name = "transformer.h.0.mlp.c_fc.weight"  # untargeted by the example adapter
    packed, state = F.quantize_4bit(w0[name].t().contiguous(), blocksize=64, quant_type="nf4")
    assert torch.equal(merged[name], F.dequantize_4bit(packed, state).t())
    for kept in ("transformer.wte.weight", "transformer.wpe.weight"):
        assert torch.equal(merged[kept], w0[kept])
    # the adapter's target, c_attn: bitsandbytes' values (transposed back) plus PEFT's update
    base32, _ = reference("gpt2", "plain", dtype="float32")
    name = "transformer.h.0.attn.c_attn.weight"
    delta = peft_merged_state(base32, adapter)[name] - read_checkpoint(base32)[name]
    packed, state = F.quantize_4bit(w0[name].t().contiguous(), blocksize=64, quant_type="nf4")
    state.dtype = torch.float32
    expected = F.dequantize_4bit(packed, state).t() + delta
    assert ((merged[name].float() - expected).abs() <= ulp(expected, torch.float16)).all()
