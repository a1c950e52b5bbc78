"""Bench: time models interleaved (`timing`), summarise and gate them (`stats`), report
(`report`), and the run that ties them together (`run`)."""

from lora_deploy.bench.report import load_report, to_markdown
from lora_deploy.bench.run import bench, check_gates, parse_adapter_specs, parse_model_specs, run_bench, write_outputs

__all__ = [
    "bench",
    "run_bench",
    "write_outputs",
    "check_gates",
    "parse_model_specs",
    "parse_adapter_specs",
    "load_report",
    "to_markdown",
]
