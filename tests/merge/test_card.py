"""The merged checkpoint's model card: the base's card kept, what was merged added."""

from __future__ import annotations

import json
import shutil

import blake3

from lora_deploy import __version__
from lora_deploy.merge import merge
from lora_deploy.merge.card import CARD_FILE, MANIFEST_NAME
from lora_deploy.merge.streaming import MANIFEST_FILE

BASE_CARD = "---\nlicense: apache-2.0\nlanguage: en\n---\n\n# Tiny llama\n\nA card written by the base's authors. | é\n"


def b3(path) -> str:
    return blake3.blake3(path.read_bytes()).hexdigest()


def test_a_base_without_a_card_gets_one(reference, tmp_path):
    base, adapter = reference("llama", "plain")
    assert not (base / CARD_FILE).exists()
    out = tmp_path / "out"
    manifest = merge(base, adapter, out).manifest
    card = (out / CARD_FILE).read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "## Merged LoRA adapter" in card
    config = json.loads((adapter / "adapter_config.json").read_text())
    for row in (
        f"| adapter | `{adapter}` |",
        f"| adapter's base model (base_model_name_or_path) | `{config['base_model_name_or_path']}` |",
        "| variant | lora |",
        "| r | 8 |",
        "| lora_alpha | 16 |",
        "| target modules | `q_proj`, `v_proj` |",
        f"| merged by | lora-deploy {__version__} (`lora-deploy merge`) |",
        f"| adapter saved by | PEFT {config['peft_version']} |",
    ):
        assert row in card, row
    assert manifest["output"]["blake3"][CARD_FILE] == b3(out / CARD_FILE)
    assert MANIFEST_NAME == MANIFEST_FILE
    assert not (base / CARD_FILE).exists()


def test_the_base_card_is_kept_and_the_merge_appended(reference, tmp_path):
    built, adapter = reference("llama", "patterns")
    base = tmp_path / "base"
    shutil.copytree(built, base)
    (base / CARD_FILE).write_text(BASE_CARD, encoding="utf-8")
    first = merge(base, adapter, tmp_path / "one").manifest
    card = (tmp_path / "one" / CARD_FILE).read_bytes()
    assert card.startswith(BASE_CARD.encode("utf-8"))  # byte for byte, front matter included
    added = card[len(BASE_CARD.encode("utf-8")) :].decode("utf-8")
    assert added.startswith("\n## Merged LoRA adapter\n") and added.count("## Merged LoRA adapter") == 1
    assert "| r | 8 (overrides: `v_proj`: 4) |" in added
    assert "| lora_alpha | 16 (overrides: `layers.1.self_attn.q_proj`: 32) |" in added
    assert first["inputs"]["blake3"]["base"][CARD_FILE] == b3(base / CARD_FILE)
    assert first["output"]["blake3"][CARD_FILE] == b3(tmp_path / "one" / CARD_FILE)
    # Nothing time- or output-dependent: the same inputs write the same card.
    merge(base, adapter, tmp_path / "two")
    assert (tmp_path / "two" / CARD_FILE).read_bytes() == card
