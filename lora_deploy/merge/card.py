"""The merged checkpoint's model card (README.md): the base's card plus what was merged.

PEFT's adapter cards record the base model and the PEFT version; a merged checkpoint has
no adapter files left to read, so its card says which adapter went in (its path and the
base it was trained on), the LoRA recipe (variant, r, alpha, targets) and the tool and
version that merged it. The base's card is kept byte for byte, this section appended
after it; a base without a card gets a new one. Nothing time- or machine-dependent goes
in beyond the adapter's path, so two merges of the same inputs write the same card.
"""

from __future__ import annotations

import re
from pathlib import Path

from lora_deploy import __version__
from lora_deploy.adapter.read import Adapter

CARD_FILE = "README.md"
MANIFEST_NAME = "merge-manifest.json"  # streaming.MANIFEST_FILE
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def merged_card(base_card: bytes | None, adapter: Adapter, dtype: str, base_name: str) -> bytes:
    """The card of the merged checkpoint: `base_card` (None: the base has none) + the merge section."""
    section = merge_section(adapter, dtype)
    if base_card is None:
        return (new_card_header(adapter, base_name) + section).encode("utf-8")
    text = base_card.decode("utf-8", errors="surrogateescape")  # any bytes survive unchanged
    if not text or text.endswith("\n\n"):
        joint = ""
    else:
        joint = "\n" if text.endswith("\n") else "\n\n"
    return (text + joint + section).encode("utf-8", errors="surrogateescape")


def new_card_header(adapter: Adapter, base_name: str) -> str:
    """Front matter and a title for a base that came without a card."""
    lines = ["---", "library_name: transformers", "tags:", "- lora", "- merged-lora", "- lora-deploy"]
    origin = adapter.config.base_model_name_or_path
    if origin and HUB_ID.fullmatch(origin) and not Path(origin).exists():
        lines.append(f"base_model: {origin}")  # the Hub's metadata field takes repository ids only
    lines += ["---", "", f"# {base_name} + LoRA (merged)", "", f"`{base_name}` with a LoRA adapter merged in.", ""]
    return "\n".join(lines) + "\n"


def merge_section(adapter: Adapter, dtype: str) -> str:
    cfg = adapter.config
    rows = [
        ("adapter", code(str(adapter.path))),
        ("adapter's base model (base_model_name_or_path)", code(cfg.base_model_name_or_path or "not recorded")),
        ("variant", adapter.variant),
        ("r", str(cfg.r) + patterns(cfg.rank_pattern)),
        ("lora_alpha", f"{cfg.lora_alpha:g}" + patterns(cfg.alpha_pattern)),
        ("scaling", "lora_alpha / sqrt(r) (rsLoRA)" if cfg.use_rslora else "lora_alpha / r"),
        ("target modules", targets(cfg.target_modules)),
        ("adapted modules", str(len(adapter.modules))),
    ]
    if cfg.modules_to_save:
        rows.append(("modules_to_save", ", ".join(code(m) for m in cfg.modules_to_save)))
    if adapter.replacements:
        rows.append(("base tensors replaced", str(len(adapter.replacements))))
    rows.append(("output dtype", "auto (each tensor keeps the base's dtype)" if dtype == "auto" else dtype))
    peft_version = cfg.raw.get("peft_version")
    if peft_version:
        rows.append(("adapter saved by", f"PEFT {peft_version}"))
    rows.append(("merged by", f"lora-deploy {__version__} (`lora-deploy merge`)"))
    table = "\n".join(f"| {name} | {cell(value)} |" for name, value in rows)
    return (
        "## Merged LoRA adapter\n\n"
        "This checkpoint has a LoRA adapter merged into its weights (computed in float32 and rounded "
        "once to each tensor's dtype): it loads and runs like the base, without PEFT.\n\n"
        "| | |\n|---|---|\n"
        f"{table}\n\n"
        f"Per-module r, alpha, scaling and ||ΔW||, the full adapter config and the SHA-256 of every input "
        f"and output file: `{MANIFEST_NAME}`.\n"
    )


def targets(value) -> str:
    if value is None:
        return "not recorded"
    if isinstance(value, str):
        return f"regex {code(value)}"
    return ", ".join(code(str(t)) for t in sorted(value))


def patterns(pattern: dict) -> str:
    if not pattern:
        return ""
    return " (overrides: " + ", ".join(f"{code(k)}: {v:g}" for k, v in pattern.items()) + ")"


def code(text: str) -> str:
    return "`" + text.replace("`", "'") + "`"


def cell(text: str) -> str:
    """A table cell: pipes escaped, no line breaks."""
    return text.replace("|", "\\|").replace("\n", " ")
