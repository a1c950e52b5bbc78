"""`lora-deploy run --ray ADDRESS`: each step runs as a Ray task, on any node of the cluster.

The run itself (plan, cache keys, the bundle, the manifest) stays on this machine, and so
does bench (a measurement of this machine, run alone). A step writes its outputs into the
step cache, so the cache (`cache:`) must be on storage every node reaches at the same path,
as must the base and the adapters; the bundle is linked from the cache here. `local`
starts a Ray instance on this machine for the run (and stops it after); any other address
is an existing cluster's (`auto`, `ray://HOST:10001`, ...). Ray is an optional extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_deploy.errors import BadInputError
from lora_deploy.pipeline.steps import Inputs, Outcome, Produce
from lora_deploy.util import first_line


def run_step(produce: Produce, out: Path, inputs: Inputs) -> Outcome:
    """What a Ray worker runs: the step, into `out`."""
    return produce(out, inputs)


class RayExecutor:
    """Runs steps as Ray tasks: `executor(produce, out, inputs)` -> the step's Outcome."""

    def __init__(self, address: str):
        try:
            import ray
        except ImportError:
            raise BadInputError("--ray needs Ray: pip install 'lora-deploy[ray]'") from None
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            try:
                ray.init(
                    address=None if address == "local" else address,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise BadInputError(f"--ray {address}: cannot connect ({first_line(exc)})") from None
            self.started = True
        self.remote = ray.remote(num_cpus=1, max_retries=0)(run_step)
        self.address = address

    def __call__(self, produce: Produce, out: Path, inputs: Inputs) -> Outcome:
        try:
            return self.ray.get(self.remote.remote(produce, out, inputs))
        except self.ray.exceptions.RayTaskError as exc:
            cause = exc.as_instanceof_cause()  # the step's own error type (exit codes kept)
            raise cause from None

    def describe(self) -> dict[str, Any]:
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        return {"address": self.address, "nodes": len(nodes), "cpus": self.ray.cluster_resources().get("CPU")}

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
