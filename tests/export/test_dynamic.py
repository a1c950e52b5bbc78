"""ONNX Runtime multi-LoRA graphs: dynamic (adapter per call) and multi (adapter per row).

References are transformers (base), PEFT's PeftModel (unmerged) and our merged
checkpoint; every model and adapter is built here, tiny. Each graph is exported once
per module: the exporter dominates the run time.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers
from onnx import helper, numpy_helper
from peft import LoraConfig, PeftModel, get_peft_model

from lora_deploy.backends.onnxrt.lora_format import pack_adapter
from lora_deploy.backends.onnxrt.sessions import DynamicSession, MultiSession
from lora_deploy.errors import AdapterError, BadInputError
from lora_deploy.export.dynamic import export_dynamic, resolve_slots
from lora_deploy.export.multi import export_multi
from lora_deploy.merge.streaming import merge

ATOL = 1e-4


def quiet_session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # one "not treated as constant" warning per LoRA input
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------
# Tiny models and adapters
# --------------------------------------------------------------------------


def llama_config(hidden: int = 64) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )


def gpt2_config() -> transformers.GPT2Config:
    # One layer is enough for Conv1D coverage and halves the export time.
    return transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=1, n_head=4, n_positions=128)


def save_base(cls, config, path, seed: int = 0):
    torch.manual_seed(seed)
    cls(config).eval().save_pretrained(path)
    return path


def load(cls, path):
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def save_adapter(cls, base_dir, path, seed: int = 1, **lora):
    """A PEFT adapter with random, non-zero A and B (init_lora_weights=False)."""
    torch.manual_seed(seed)
    peft = get_peft_model(load(cls, base_dir), LoraConfig(init_lora_weights=False, lora_dropout=0.0, **lora))
    peft.save_pretrained(path)
    return path


LLAMA_ADAPTERS = {
    "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    # Different targets, rsLoRA, and per-module ranks/alphas.
    "rs": dict(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["k_proj", "o_proj", "up_proj"],
        rank_pattern={"up_proj": 2},
        alpha_pattern={"layers.1.self_attn.o_proj": 4},
    ),
}
GPT2_ADAPTERS = {
    "attn": dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
    "bias": dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_bias=True),
}


def build_family(root, cls, config, adapter_recipes: dict, first_seed: int) -> dict:
    """A base, its PEFT adapters, the dynamic graph over all of them and each packed adapter."""
    base = save_base(cls, config, root / "base")
    adapters = {
        name: save_adapter(cls, base, root / name, seed=first_seed + i, **kw)
        for i, (name, kw) in enumerate(adapter_recipes.items())
    }
    graph = export_dynamic(base, root / "dynamic.onnx", adapters=list(adapters.values()))
    packed = {
        name: pack_adapter(d, root / f"{name}.onnx_adapter", onnx_path=graph.path) for name, d in adapters.items()
    }
    return {"cls": cls, "root": root, "base": base, "adapters": adapters, "graph": graph, "packed": packed}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_family(
        tmp_path_factory.mktemp("llama"), transformers.LlamaForCausalLM, llama_config(), LLAMA_ADAPTERS, first_seed=1
    )


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return build_family(
        tmp_path_factory.mktemp("gpt2"), transformers.GPT2LMHeadModel, gpt2_config(), GPT2_ADAPTERS, first_seed=3
    )


@pytest.fixture(scope="module")
def multi(gpt2):
    """GPT-2's adapters: Conv1D layers, ranks 4 and 2 on c_attn, c_fc targeted by one
    adapter only, and a lora_B bias bank."""
    names = list(gpt2["adapters"])
    graph = export_multi(gpt2["base"], gpt2["root"] / "multi.onnx", [gpt2["adapters"][n] for n in names])
    return {"graph": graph, "names": names, "session": MultiSession(graph.path)}


@pytest.fixture(scope="module")
def odd_adapters(llama, tmp_path_factory):
    """Adapters the graphs must refuse: DoRA, embedding LoRA, an untargeted layer, a narrower llama."""
    root = tmp_path_factory.mktemp("odd")
    cls, base = llama["cls"], llama["base"]
    narrow = save_base(cls, llama_config(hidden=32), root / "narrow-base")
    return {
        "dora": save_adapter(cls, base, root / "dora", r=2, target_modules=["q_proj"], use_dora=True),
        "embedding": save_adapter(cls, base, root / "embedding", r=2, target_modules=["embed_tokens", "q_proj"]),
        "down": save_adapter(cls, base, root / "down", r=2, target_modules=["down_proj"]),
        "narrow": save_adapter(cls, narrow, root / "narrow", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    }


def batch(size: int = 3, seq: int = 11, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids with one right-padded row. (Left padding leaves fully masked query rows,
    where transformers' default SDPA attention and the eager-attention export disagree.)"""
    g = np.random.default_rng(seed)
    ids = g.integers(3, 250, (size, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[-1, -4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def torch_logits(model, feeds) -> np.ndarray:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return out.logits.numpy()


def references(family: dict, feeds) -> dict:
    """Logits of the base, and of PEFT (unmerged) and our merged checkpoint per adapter."""
    key = ("refs", feeds["input_ids"].shape, int(feeds["input_ids"].sum()))
    if key in family:
        return family[key]
    cls = family["cls"]
    out = {None: torch_logits(load(cls, family["base"]), feeds)}
    for name, adapter_dir in family["adapters"].items():
        peft = PeftModel.from_pretrained(load(cls, family["base"]), adapter_dir).eval()
        merged_dir = family["root"] / f"merged-{name}"
        if not merged_dir.exists():
            merge(family["base"], adapter_dir, merged_dir)
        out[name] = torch_logits(peft, feeds)
        out[("merged", name)] = torch_logits(load(cls, merged_dir), feeds)
    family[key] = out
    return out


def close(actual, expected, atol: float = ATOL) -> None:
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=ATOL)


# --------------------------------------------------------------------------
# The dynamic graph
# --------------------------------------------------------------------------


def test_zero_rank_matmul_gives_zeros_in_onnxruntime():
    """The rank-0 defaults rely on MatMul with K=0 producing zeros (an empty sum)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "a"], ["xa"]), helper.make_node("MatMul", ["xa", "b"], ["y"])],
        "k0",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
        [
            numpy_helper.from_array(np.zeros((3, 0), np.float32), "a"),
            numpy_helper.from_array(np.zeros((0, 4), np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.ones((2, 3), np.float32)})
    assert y.shape == (2, 4) and not y.any()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_graph_names_orientation_and_defaults(family, request):
    fam = request.getfixturevalue(family)
    graph = fam["graph"]
    model = onnx.load(str(graph.path))
    initializers = {t.name: t for t in model.graph.initializer}
    session = quiet_session(graph.path)
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    overridable = {i.name: i.shape for i in session.get_overridable_initializers()}
    assert set(overridable) == set(graph.lora_inputs())
    for slot in graph.slots.values():
        assert overridable[slot.a_name] == [slot.in_features, slot.rank_dim]
        assert overridable[slot.b_name] == [slot.rank_dim, slot.out_features]
        assert list(initializers[slot.a_name].dims) == [slot.in_features, 0]
        assert list(initializers[slot.b_name].dims) == [0, slot.out_features]
        # Base weights keep the checkpoint's names (nothing folded or renamed).
        assert slot.module + ".weight" in initializers
    if family == "gpt2":  # tied lm_head: stored once, under the checkpoint's key
        assert "transformer.wte.weight" in initializers and "lm_head.weight" not in initializers
    batch_dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in batch_dims] == ["batch", "sequence"]
    meta = json.loads({p.key: p.value for p in model.metadata_props}["lora_deploy"])
    assert meta["format"] == "dynamic" and set(meta["modules"]) == set(graph.slots)


def test_llama_targets_are_the_union_of_the_adapters(llama):
    expected = {
        f"model.layers.{i}.{m}"
        for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.up_proj")
    }
    assert set(llama["graph"].slots) == expected
    assert llama["graph"].slots["model.layers.0.mlp.up_proj"].out_features == 128


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_no_adapter_is_the_base_model(family, request):
    fam = request.getfixturevalue(family)
    feeds = batch()
    out = DynamicSession(fam["graph"].path).run(feeds)["logits"]
    close(out, references(fam, feeds)[None])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_each_packed_adapter_matches_peft_and_merged(family, request):
    fam = request.getfixturevalue(family)
    feeds = batch()
    refs = references(fam, feeds)
    session = DynamicSession(fam["graph"].path)
    for name, packed in fam["packed"].items():
        session.load_adapter(name, packed)
        out = session.run(feeds, adapter=name)["logits"]
        assert np.abs(refs[name] - refs[None]).max() > 1e-2, "the adapter must change the output"
        close(out, refs[name])
        close(out, refs[("merged", name)])


def test_switching_adapters_per_call_without_reloading(llama):
    feeds = batch()
    refs = references(llama, feeds)
    session = DynamicSession(llama["graph"].path)
    for name, packed in llama["packed"].items():
        session.load_adapter(name, packed)
    for active in ["qv", "rs", None, "rs", "qv", None]:
        close(session.run(feeds, adapter=active)["logits"], refs[active])


def test_pack_without_graph_and_float16(llama, tmp_path):
    """Without onnx_path the names are the adapter's own module paths; float16 halves the file."""
    packed = pack_adapter(llama["adapters"]["qv"], tmp_path / "qv16.onnx_adapter", dtype="float16")
    params = ort.AdapterFormat.read_adapter(str(packed)).get_parameters()
    a = params["model.layers.0.self_attn.q_proj.lora_A.weight"].numpy()
    b = params["model.layers.0.self_attn.q_proj.lora_B.weight"].numpy()
    assert a.dtype == np.float16 and a.shape == (64, 4) and b.shape == (4, 64)
    lora = load_lora(llama["adapters"]["qv"], "model.layers.0.self_attn.q_proj")
    close(a.astype(np.float32), lora["A"].T, atol=1e-3)
    close(b.astype(np.float32), (lora["B"] * 2.0).T, atol=1e-2)  # scaling alpha/r = 8/4 folded in
    with pytest.raises(AdapterError, match="float16"):
        DynamicSession(llama["graph"].path).load_adapter("qv16", packed)


def load_lora(adapter_dir, module: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    key = f"base_model.model.{module}"
    return {"A": tensors[f"{key}.lora_A.weight"], "B": tensors[f"{key}.lora_B.weight"]}


def test_explicit_targets_match_like_peft(llama):
    model = load(llama["cls"], llama["base"])
    slots, skipped = resolve_slots(model, [], ["q_proj", "down_proj"])
    assert skipped == []
    assert sorted(slots) == [f"model.layers.{i}.{m}" for i in range(2) for m in ("mlp.down_proj", "self_attn.q_proj")]
    assert slots["model.layers.1.mlp.down_proj"].in_features == 128
    with pytest.raises(AdapterError, match="additive low-rank"):
        resolve_slots(model, [], ["embed_tokens"])
    with pytest.raises(BadInputError, match="match no module"):
        resolve_slots(model, [], ["nothing_like_this"])


# --------------------------------------------------------------------------
# The multi-adapter graph
# --------------------------------------------------------------------------


def test_multi_rows_equal_single_adapter_runs(gpt2, multi):
    feeds = batch(size=4)
    ids = [0, 1, -1, 1]
    out = multi["session"].run(feeds, ids)["logits"]
    single = DynamicSession(gpt2["graph"].path)
    for name, packed in gpt2["packed"].items():
        single.load_adapter(name, packed)
    for row, k in enumerate(ids):
        adapter = None if k == -1 else multi["names"][k]
        alone = single.run({n: v[row : row + 1] for n, v in feeds.items()}, adapter=adapter)["logits"][0]
        close(out[row], alone)
    refs = references(gpt2, feeds)
    for row, k in enumerate(ids):
        close(out[row], refs[None if k == -1 else multi["names"][k]][row])
    # Names work as ids too, None is the base model.
    by_name = multi["session"].run(feeds, ["bias", "attn", None, "bias"])["logits"]
    for row, ref in enumerate([refs["bias"], refs["attn"], refs[None], refs["bias"]]):
        close(by_name[row], ref[row])


def test_multi_graph_masks_out_of_range_ids(gpt2, multi):
    """Bypassing MultiSession's check, the graph itself runs such rows as the base model."""
    feeds = batch(size=3)
    raw = multi["session"].session.run(["logits"], {**feeds, "adapter_ids": np.array([7, -5, 0], np.int64)})[0]
    refs = references(gpt2, feeds)
    close(raw[0], refs[None][0])
    close(raw[1], refs[None][1])
    close(raw[2], refs["attn"][2])


def test_multi_graph_banks_are_overridable(multi):
    graph = multi["graph"]
    session = multi["session"].session
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "adapter_ids"]
    overridable = {i.name: i.shape for i in session.get_overridable_initializers()}
    slot = graph.slots["transformer.h.0.mlp.c_fc"]  # only "bias" (id 1) targets it, at rank 2
    assert overridable[slot.module + ".lora_A.bank"] == [2, 64, slot.rank_dim]
    assert overridable[slot.module + ".lora_B.bank"] == [2, slot.rank_dim, 256]
    assert overridable[slot.module + ".lora_B.bias_bank"] == [2, 256]
    bank = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(graph.path)).graph.initializer}
    a_bank = bank[slot.module + ".lora_A.bank"]
    assert a_bank.shape == (2, 64, 2) and not a_bank[0].any() and a_bank[1].any()
    # c_attn: rank 4 ("attn") and 2 ("bias", zero-padded to 4).
    b_bank = bank["transformer.h.0.attn.c_attn.lora_B.bank"]
    assert b_bank.shape == (2, 4, 192) and b_bank[0].any() and not b_bank[1, 2:].any()


def test_multi_banks_replaced_at_run_time(gpt2, multi):
    """Feeding every bank with its adapters swapped makes id 0 run adapter 1, no re-export."""
    feeds = batch(size=2)
    banks = {
        t.name: numpy_helper.to_array(t)
        for t in onnx.load(str(multi["graph"].path)).graph.initializer
        if t.name.endswith("bank")
    }
    swapped = {name: np.ascontiguousarray(b[::-1]) for name, b in banks.items()}
    # A wider zero-padded rank is accepted too: the rank dimension is symbolic.
    name = "transformer.h.0.attn.c_attn"
    swapped[name + ".lora_A.bank"] = np.pad(swapped[name + ".lora_A.bank"], ((0, 0), (0, 0), (0, 3)))
    swapped[name + ".lora_B.bank"] = np.pad(swapped[name + ".lora_B.bank"], ((0, 0), (0, 3), (0, 0)))
    out = multi["session"].run({**feeds, **swapped}, [0, 1])["logits"]
    refs = references(gpt2, feeds)
    close(out[0], refs["bias"][0])
    close(out[1], refs["attn"][1])
    # The stored banks are back on the next call.
    close(multi["session"].run(feeds, [0, 1])["logits"][0], refs["attn"][0])


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------


def test_adapter_for_another_base_is_refused(llama, gpt2, tmp_path):
    out = tmp_path / "x.onnx_adapter"
    with pytest.raises(AdapterError, match="no LoRA input"):
        pack_adapter(gpt2["adapters"]["attn"], out, onnx_path=llama["graph"].path)
    assert list(tmp_path.iterdir()) == []


def test_shape_mismatch_is_refused(llama, odd_adapters, tmp_path):
    with pytest.raises(AdapterError, match="expects"):
        pack_adapter(odd_adapters["narrow"], tmp_path / "narrow.onnx_adapter", onnx_path=llama["graph"].path)
    assert list(tmp_path.iterdir()) == []
    # Packed blind, it is still caught when loaded, before any run.
    packed = pack_adapter(odd_adapters["narrow"], tmp_path / "narrow.onnx_adapter")
    session = DynamicSession(llama["graph"].path)
    with pytest.raises(AdapterError, match="expects"):
        session.load_adapter("narrow", packed)
    assert session.adapters == {}


def test_target_missing_from_the_graph_is_refused(llama, odd_adapters, tmp_path):
    """Same base, but a layer (down_proj) the graph was not exported to target."""
    with pytest.raises(AdapterError, match="no LoRA input"):
        pack_adapter(odd_adapters["down"], tmp_path / "d.onnx_adapter", onnx_path=llama["graph"].path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["dora", "embedding"])
def test_dora_and_embedding_lora_are_refused(kind, llama, odd_adapters, tmp_path):
    with pytest.raises(AdapterError, match="additive low-rank"):
        export_dynamic(llama["base"], tmp_path / "g.onnx", adapters=[odd_adapters[kind]])
    with pytest.raises(AdapterError, match="additive low-rank"):
        pack_adapter(odd_adapters[kind], tmp_path / "a.onnx_adapter")
    with pytest.raises(AdapterError, match="additive low-rank"):
        export_multi(llama["base"], tmp_path / "m.onnx", [llama["adapters"]["qv"], odd_adapters[kind]])
    assert list(tmp_path.iterdir()) == []


def test_mismatched_ranks_in_an_adapter_file_are_refused(llama, tmp_path):
    """A hand-made adapter file whose A and B disagree on the rank never reaches a run."""
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    module = "model.layers.0.self_attn.q_proj"
    fmt.set_parameters(
        {
            module + ".lora_A.weight": ort.OrtValue.ortvalue_from_numpy(np.zeros((64, 2), np.float32)),
            module + ".lora_B.weight": ort.OrtValue.ortvalue_from_numpy(np.zeros((3, 64), np.float32)),
        }
    )
    fmt.export_adapter(str(tmp_path / "bad.onnx_adapter"))
    with pytest.raises(AdapterError, match="rank 2"):
        DynamicSession(llama["graph"].path).load_adapter("bad", tmp_path / "bad.onnx_adapter")


def test_lora_bias_needs_a_graph_with_bias_inputs():
    from lora_deploy.backends.onnxrt.lora_format import check_parameters

    graph = {"m.lora_A.weight": ([8, "rank_m"], "float32"), "m.lora_B.weight": (["rank_m", 4], "float32")}
    params = {
        "m.lora_A.weight": ([8, 2], "float32"),
        "m.lora_B.weight": ([2, 4], "float32"),
        "m.lora_B.bias": ([4], "float32"),
    }
    with pytest.raises(AdapterError, match="lora_bias=True"):
        check_parameters(params, graph, "adapter", "g.onnx")


def test_adapter_ids_out_of_range(multi):
    feeds = batch(size=2)
    session = multi["session"]
    for ids, message in [
        ([0, 2], "out of range"),
        ([-2, 0], "out of range"),
        ([0], "2 rows"),
        (["nope", 0], "unknown adapter"),
        ([0.5, 0], "not an integer"),
    ]:
        with pytest.raises(BadInputError, match=message):
            session.run(feeds, ids)


def test_run_time_mistakes_are_bad_input(llama, multi):
    session = DynamicSession(llama["graph"].path)
    feeds = batch(size=1)
    with pytest.raises(BadInputError, match="not loaded"):
        session.run(feeds, adapter="qv")
    with pytest.raises(BadInputError, match="missing"):
        session.run({"input_ids": feeds["input_ids"]})
    with pytest.raises(BadInputError, match="unknown input"):
        session.run({**feeds, "adapter_ids": np.zeros(1, np.int64)})
    with pytest.raises(BadInputError, match="own argument"):
        multi["session"].run({**feeds, "adapter_ids": np.zeros(1, np.int64)}, [0])
    bank = "transformer.h.0.attn.c_attn.lora_A.bank"
    with pytest.raises(BadInputError, match="expects"):
        multi["session"].run({**feeds, bank: np.zeros((3, 64, 4), np.float32)}, [0])
    with pytest.raises(BadInputError, match="not a multi-adapter graph"):
        MultiSession(llama["graph"].path)
