"""Random PEFT adapters on the tiny example bases, and their updates as PEFT computes them.

The adapters are made by PEFT itself (init_lora_weights=False: A and B both random, so
every update is nonzero) and saved with save_pretrained; the oracle for an update is
PEFT's own `get_delta_weight`, read from a PeftModel loaded from the saved directory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.oracle import load_model, peft_model


def random_adapter(base_dir: Path, out_dir: Path, seed: int, targets=("q_proj", "v_proj"), **config) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(
        load_model(base_dir),
        LoraConfig(init_lora_weights=False, target_modules=list(targets), lora_dropout=0.0, **config),
    )
    model.save_pretrained(out_dir)
    return Path(out_dir)


def lora_layers(model):
    """{module name inside the wrapped model: PEFT LoRA layer}."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {name.removeprefix(prefix): m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def peft_deltas(base_dir: Path, adapter_dir: Path) -> dict[str, np.ndarray]:
    """Every module's update as PEFT computes it (get_delta_weight), float64, in the base
    weight's layout."""
    model = peft_model(base_dir, adapter_dir)
    with torch.no_grad():
        return {name: layer.get_delta_weight("default").double().numpy() for name, layer in lora_layers(model).items()}


def read_factors(adapter_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
