"""The whole deploy path on a built-in example: reference model in, verified ONNX out.

Builds a tiny reference base, trains a real LoRA adapter on it (PEFT, a few seconds),
then runs the same stages a user runs: inspect -> merge -> verify -> export ONNX ->
verify the ONNX model in ONNX Runtime against the unmerged reference.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lora_deploy.errors import BadInputError


@dataclass
class Step:
    name: str
    seconds: float
    result: str


def run_demo(
    out_dir: str | os.PathLike,
    *,
    family: str = "llama",
    variant: str = "plain",
    on_step: Callable[[Step], None] | None = None,
) -> list[Step]:
    """Run every stage; returns one Step per stage. Raises like the stages do."""
    # models.py imports peft only inside the functions that train, so importing it proves
    # nothing: ask for peft itself, before any work, or a missing one surfaces mid-run as an
    # unexpected ModuleNotFoundError.
    try:
        import peft  # noqa: F401
    except ImportError as exc:
        raise BadInputError(
            f"the demo trains an adapter with PEFT, not installed here: pip install 'lora-deploy[reference]' ({exc})"
        ) from None
    from lora_deploy.adapter.summary import describe_adapter
    from lora_deploy.examples import models as reference
    from lora_deploy.export.model import export_checkpoint
    from lora_deploy.merge.streaming import merge
    from lora_deploy.proof.verify import verify

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base, adapter, merged, onnx = out / "base", out / "adapter", out / "merged", out / "merged.onnx"
    steps: list[Step] = []

    def step(name: str, fn: Callable[[], str]) -> None:
        start = time.perf_counter()
        result = fn()
        steps.append(Step(name, time.perf_counter() - start, result))
        if on_step:
            on_step(steps[-1])

    step("build reference base", lambda: f"{family} -> {reference.build_base(family, base, max_shard_size='200KB')}")
    step("train LoRA adapter", lambda: f"{variant} -> {reference.train_adapter(base, adapter, variant=variant)}")

    def inspect() -> str:
        info = describe_adapter(adapter, base)
        return (
            f"{info['variant']}, {len(info['modules'])} modules, "
            f"{100 * info['trainable_fraction']:.2f}% of the base's parameters"
        )

    step("inspect", inspect)
    step("merge", lambda: merge(base, adapter, merged, overwrite=True).summary())

    def check(**kw) -> str:
        report = verify(base, adapter, **kw)
        report.raise_if_different()
        outputs = [c for c in report.checks if c.name.startswith("outputs") and c.cosine is not None]
        return "; ".join(
            f"{c.name.split(':')[1].split(' vs')[0].strip()}: max abs {c.max_abs:.1e}, "
            f"cosine {c.cosine:.6f}, top-1 {100 * c.top1:.0f}%"
            for c in outputs
        )

    step("verify merged (weights + outputs)", lambda: check(merged_dir=merged))

    def export() -> str:
        result = export_checkpoint(merged, onnx, overwrite=True)  # the demo's own working directory
        return f"{result.path.name} (opset {result.opset}), ORT vs torch max abs {result.max_abs_error:.1e}"

    step("export ONNX", export)
    step("verify ONNX in ONNX Runtime", lambda: check(onnx_path=onnx, batch=3, seq=24))
    return steps
