"""The variant registry and the adapter_config.json allowlist (lora_deploy/adapter/variants.py)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from lora_deploy.adapter.read import Adapter, AdapterConfig, LoraModule, load_adapter
from lora_deploy.adapter.variants import (
    NEUTRAL_KEYS,
    REFUSED_KEYS,
    VARIANTS,
    describe,
    handled_keys,
    refuse_non_additive,
)
from lora_deploy.errors import AdapterError


def write_adapter(root: Path, **config) -> Path:
    """A PEFT-written config (every field of the installed peft) for one 4x3 Linear, r=2."""
    peft = pytest.importorskip("peft")
    peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q"]).save_pretrained(str(root))
    path = root / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    rng = np.random.default_rng(0)
    save_file(
        {
            "base_model.model.q.lora_A.weight": rng.standard_normal((2, 3), dtype=np.float32),
            "base_model.model.q.lora_B.weight": rng.standard_normal((4, 2), dtype=np.float32),
        },
        str(root / "adapter_model.safetensors"),
    )
    return root


def refusal(root: Path) -> str:
    with pytest.raises(AdapterError) as info:
        load_adapter(root)
    line = str(info.value)
    assert "\n" not in line
    return line


def test_a_peft_written_config_is_accepted(tmp_path):
    assert load_adapter(write_adapter(tmp_path)).variant == "lora"


def test_unknown_key_set_is_refused_naming_it(tmp_path):
    line = refusal(write_adapter(tmp_path, use_future_variant=True))
    assert "use_future_variant" in line and "unknown config key" in line


def test_unknown_key_with_a_long_value_stays_one_short_line(tmp_path):
    line = refusal(write_adapter(tmp_path, future_config={"x" * 200: "y\nz"}))
    assert "future_config" in line and len(line) < len(str(tmp_path)) + 250


@pytest.mark.parametrize("value", [None, False, {}, [], ""])
def test_unknown_key_unset_is_accepted(tmp_path, value):
    assert load_adapter(write_adapter(tmp_path, use_future_variant=value)).variant == "lora"


def test_every_lora_config_field_is_classified_once():
    """A peft upgrade that adds a LoraConfig field fails here until it is classified."""
    peft = pytest.importorskip("peft")
    handled = set(handled_keys())
    classes = [set(NEUTRAL_KEYS), handled, set(REFUSED_KEYS)]
    for i, one in enumerate(classes):
        for other in classes[i + 1 :]:
            assert not one & other
    unclassified = {f.name for f in dataclasses.fields(peft.LoraConfig)} - set().union(*classes)
    assert not unclassified, f"classify these LoraConfig fields in adapter/variants.py: {sorted(unclassified)}"


def example_value(key: str):
    return [[0, 2]] if key == "layer_replication" else True


@pytest.mark.parametrize("key", sorted(REFUSED_KEYS))
def test_refused_keys_are_refused_only_when_set(tmp_path, key):
    (tmp_path / "set").mkdir()
    (tmp_path / "unset").mkdir()
    line = refusal(write_adapter(tmp_path / "set", **{key: example_value(key)}))
    assert line.endswith(REFUSED_KEYS[key])
    load_adapter(write_adapter(tmp_path / "unset", **{key: None}))


@pytest.mark.parametrize("init", [True, False, None, "gaussian", "eva", "orthogonal", "mica"])
def test_plain_inits_are_accepted(tmp_path, init):
    load_adapter(write_adapter(tmp_path, init_lora_weights=init))


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_base_rewriting_inits_are_refused(tmp_path, init):
    assert "rewrote the base" in refusal(write_adapter(tmp_path, init_lora_weights=init))


def test_unknown_init_is_refused(tmp_path):
    line = refusal(write_adapter(tmp_path, init_lora_weights="future_init"))
    assert "init_lora_weights" in line and "future_init" in line


# One in-memory adapter per registered variant, using that variant (and the base one).
def module(name="q", embedding=False, **parts) -> LoraModule:
    a, b = np.ones((2, 3), np.float32), np.ones((4, 2), np.float32)
    if embedding:
        a, b = np.ones((2, 5), np.float32), np.ones((3, 2), np.float32)
    return LoraModule(name, a, b, r=2, alpha=4.0, scaling=2.0, embedding=embedding, **parts)


def adapter(modules=None, replacements=None, **config) -> Adapter:
    modules = modules or [module()]
    return Adapter(
        Path("/adapters/x"),
        AdapterConfig(r=2, lora_alpha=4.0, **config),
        {m.name: m for m in modules},
        replacements or {},
        [],
    )


EXAMPLES = {
    "lora": lambda: adapter(),
    "rslora": lambda: adapter(use_rslora=True),
    "dora": lambda: adapter([module(magnitude=np.ones(4, np.float32))], use_dora=True),
    "lora_bias": lambda: adapter([module(bias=np.ones(4, np.float32))], lora_bias=True),
    "patterns": lambda: adapter(rank_pattern={"q": 2}),
    "embedding": lambda: adapter([module(), module("emb", embedding=True)]),
    "modules_to_save": lambda: adapter(
        replacements={"head.weight": np.ones((2, 2), np.float32)}, modules_to_save=("head",)
    ),
}


def test_every_variant_has_an_example():
    assert set(EXAMPLES) == set(VARIANTS)


# What export refuses each non-additive variant with (the texts of export's former check_additive).
REFUSALS = {
    "dora": "/adapters/x: DoRA cannot be expressed as an additive low-rank input (merge it instead)",
    "embedding": "/adapters/x: embedding LoRA on emb cannot be expressed as an additive low-rank input "
    "(merge it instead)",
    "modules_to_save": "/adapters/x: the adapter replaces base tensors (head.weight, modules_to_save or trained "
    "bias); that cannot be expressed as an additive low-rank input (merge it instead)",
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_additive_flag_matches_what_export_refuses(name):
    example = EXAMPLES[name]()
    base = "rslora" if name == "rslora" else "lora"
    assert describe(example) == (base if name == base else f"{base}+{name}")
    assert VARIANTS[name].additive == (name not in REFUSALS)
    if VARIANTS[name].additive:
        refuse_non_additive(example)
        return
    with pytest.raises(AdapterError) as info:
        refuse_non_additive(example)
    assert str(info.value) == REFUSALS[name]


def test_describe_keeps_the_inspect_strings():
    both = adapter(
        [module(magnitude=np.ones(4, np.float32), bias=np.ones(4, np.float32)), module("emb", embedding=True)],
        replacements={"head.weight": np.ones(1, np.float32)},
        use_rslora=True,
        use_dora=True,
        lora_bias=True,
        alpha_pattern={"q": 8.0},
    )
    assert both.variant == "rslora+dora+lora_bias+patterns+embedding+modules_to_save"
    with pytest.raises(AdapterError, match="DoRA"):  # the first non-additive variant, as export refuses
        refuse_non_additive(both)


def test_layer_math_variants_have_merge_and_unmerged_math():
    from lora_deploy.merge.delta import MERGED_WEIGHT
    from lora_deploy.modeling.unmerged import COMBINE

    layer = {name for name, v in VARIANTS.items() if v.layer_math}
    assert set(MERGED_WEIGHT) == set(COMBINE) == layer
    assert {module().variant, module(magnitude=np.ones(4, np.float32)).variant} == layer


def test_registry_and_merge_math_import_without_torch():
    code = (
        "import sys\n"
        "import lora_deploy.adapter.variants, lora_deploy.adapter.read, lora_deploy.merge.delta\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
