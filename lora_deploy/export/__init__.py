"""Export: the exporter core (`graph`), checked ONNX export of a checkpoint or any torch
module (`model`), the adapter graphs that keep LoRA separate (`dynamic`, `multi`), and
generation-ready decoder graphs with their key/value cache (`generation`).

The names below are loaded on first use: importing one submodule (`merge --onnx-like`'s
`like`, which needs neither torch nor the exporter) does not import torch."""

from __future__ import annotations

__all__ = [
    "export_checkpoint",
    "export_module",
    "ExportResult",
    "export_dynamic",
    "export_multi",
    "export_generation",
    "export_generation_adapters",
]


def __getattr__(name: str):
    if name in ("export_checkpoint", "export_module", "ExportResult"):
        from lora_deploy.export import model

        return getattr(model, name)
    if name == "export_dynamic":
        from lora_deploy.export.dynamic import export_dynamic

        return export_dynamic
    if name == "export_multi":
        from lora_deploy.export.multi import export_multi

        return export_multi
    if name in ("export_generation", "export_generation_adapters"):
        from lora_deploy.export import generation

        return getattr(generation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
