"""`inspect`: what an adapter contains, and what it costs relative to its base."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lora_deploy.adapter.plan import plan_merge
from lora_deploy.adapter.read import load_adapter
from lora_deploy.io.checkpoint import Checkpoint
from lora_deploy.io.quant import planning_view, training_quantization_hint


def describe_adapter(adapter_dir: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> dict:
    """A JSON-ready summary: variant, targets, per-module r/alpha/scaling, parameter counts.

    With a base, every module is also resolved against the checkpoint (so a mismatched
    adapter fails here, before any merge) and the trainable fraction is reported.
    """
    adapter = load_adapter(adapter_dir)
    cfg = adapter.config
    info = {
        "adapter": str(Path(adapter_dir)),
        "variant": adapter.variant,
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "lora_bias": cfg.lora_bias,
        "target_modules": cfg.target_modules,
        "modules_to_save": list(cfg.modules_to_save),
        "base_model_name_or_path": cfg.base_model_name_or_path,
        "modules": [
            {
                "module": m.name,
                "r": m.r,
                "alpha": m.alpha,
                "scaling": m.scaling,
                "variant": m.variant,
                "embedding": m.embedding,
                "parameters": m.num_parameters(),
            }
            for m in adapter.modules.values()
        ],
        "replaced_tensors": sorted(adapter.trained_replacements),
        # PEFT's saved copies of a targeted layer's base weight: loaded (and merged) as the
        # base, not trained, so not in trainable_parameters
        "saved_base_tensors": sorted(adapter.saved_base),
        "trainable_parameters": adapter.num_parameters(),
    }
    base_config = None
    if base_dir is not None:
        with Checkpoint(base_dir) as base:
            base_config = base.config
            plan = plan_merge(adapter, planning_view(base))  # an FP8 base planned as float
            base_params = sum(int(np.prod(t.shape, dtype=np.int64)) for t in base.tensors.values())
        kinds = {t.module.name: (key, t.kind) for key, t in plan.targets.items()}
        for m in info["modules"]:
            m["weight"], m["kind"] = kinds[m["module"]]
        info["base"] = str(Path(base_dir))
        info["base_parameters"] = base_params
        info["trainable_fraction"] = adapter.num_parameters() / base_params
        info["untied"] = plan.untie
    # QLoRA: trained against dequantized weights (merge --onto); None when nothing suggests it
    info["quantized_base_hint"] = training_quantization_hint(adapter_dir, cfg.raw, base_config)
    return info
