"""Bench: what a run times (`plan`, `shapes`, `feeds`), timing it (`timing`, `measure`, and
the modes `adaptive`, `noise`, `control`, `generation`), statistics and gates (`stats`,
`gates`), the report (`summary` builds it, `schema` stores it, `report` renders it), and
the run that ties them together (`run`)."""

from lora_deploy.bench.gates import check_gates
from lora_deploy.bench.plan import parse_adapter_specs, parse_model_specs
from lora_deploy.bench.report import to_markdown
from lora_deploy.bench.run import bench, run_bench, write_outputs
from lora_deploy.bench.schema import load_report

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
