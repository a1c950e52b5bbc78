"""Export: the exporter core (`graph`), checked ONNX export of a checkpoint or any torch
module (`model`), and the adapter graphs that keep LoRA separate (`dynamic`, `multi`)."""

from lora_deploy.export.dynamic import export_dynamic
from lora_deploy.export.model import ExportResult, export_checkpoint, export_module
from lora_deploy.export.multi import export_multi

__all__ = ["export_checkpoint", "export_module", "ExportResult", "export_dynamic", "export_multi"]
