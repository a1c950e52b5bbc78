"""Export: the exporter core (`graph`), checked ONNX export of a checkpoint or any torch
module (`model`), the adapter graphs that keep LoRA separate (`dynamic`, `multi`), and
generation-ready decoder graphs with their key/value cache (`generation`)."""

from lora_deploy.export.dynamic import export_dynamic
from lora_deploy.export.generation import export_generation, export_generation_adapters
from lora_deploy.export.model import ExportResult, export_checkpoint, export_module
from lora_deploy.export.multi import export_multi

__all__ = [
    "export_checkpoint",
    "export_module",
    "ExportResult",
    "export_dynamic",
    "export_multi",
    "export_generation",
    "export_generation_adapters",
]
