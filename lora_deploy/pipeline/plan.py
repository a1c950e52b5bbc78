"""A validated pipeline as tasks in run order.

`plan_tasks` lists what the base model needs once (its ONNX graph, the dynamic graph, a
base engine) and what each adapter needs (inspect, merge, the merged graph from the base
graph, pack, engines, verify, bench). A task names its inputs (files, directories, or
earlier tasks whose outputs it reads), its options (what its cache key holds with the
inputs' digests) and the step function that writes its outputs.

Bundle layout: `base/` (base.onnx, dynamic.onnx, genai/, <target>/base.engine) and
`adapters/<name>/` (adapter.json, merged/, merged.onnx, adapter.onnx_adapter, genai/,
verify.json, verify-genai.json, bench-<target>.json/.md, and per TensorRT target <target>/merged.engine or
refit.engine with its verify.json).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lora_deploy.errors import BadInputError
from lora_deploy.pipeline.spec import GATE_FIELDS, STEP_KINDS, Pipeline, adapter_name
from lora_deploy.pipeline.steps import (
    Baseline,
    Produce,
    bench_step,
    dynamic_step,
    engine_step,
    export_step,
    genai_step,
    genai_verify_step,
    inspect_step,
    merge_step,
    merged_graph_step,
    pack_step,
    refit_step,
    target_settings,
    verify_step,
)

BASE = "base"
# Steps that load or trace torch models: torch.export and transformers' loading keep global
# state (the default dtype, the tracer), so these run one at a time, beside the others.
TORCH = "torch"


@dataclass(eq=False)
class Task:
    step: str
    unit: str  # "base" or an adapter's name
    dest: str  # the bundle directory its outputs go into
    produce: Produce
    inputs: dict[str, Any] = field(default_factory=dict)  # role -> Path | Task | list[Path] | None
    options: dict[str, Any] = field(default_factory=dict)
    target: str | None = None
    required: bool = True
    machine_bound: bool = False  # measured or built for this machine: its key includes the machine
    skip: str | None = None  # why it cannot run here (its target is unavailable)
    key_inputs: dict[str, Any] | None = None  # digest material replacing `inputs` in the key
    variant: str = ""  # tells two tasks of one step and unit apart ("dynamic")
    cacheable: bool = True  # false: run every time, never stored nor reused (bench, unless opted in)
    exclusive: bool = False  # runs with no other task running (a measurement)
    serial: str | None = None  # tasks of one group run one at a time (torch's tracing and loading)

    @property
    def name(self) -> str:
        variant = f" ({self.variant})" if self.variant else ""
        return f"{self.step} {self.unit}{variant}" + (f" @{self.target}" if self.target else "")

    def deps(self) -> list[Task]:
        return [v for v in self.inputs.values() if isinstance(v, Task)]


def record_options(kind: str, opts: BaseModel) -> dict[str, Any]:
    """The step's options that are fields of its stage record (keyword arguments of the API)."""
    record = STEP_KINDS[kind].record
    names = {f.name for f in fields(record)} if record is not None else set()
    return {k: v for k, v in opts.model_dump().items() if k in names}


def gate_options(pipeline: Pipeline, stage: str) -> dict[str, Any]:
    """The gates of one stage that the pipeline sets (unset ones keep the stage's default)."""
    given = pipeline.gates.model_dump()
    return {name: given[name] for name in GATE_FIELDS[stage] if given.get(name) is not None}


def plan_tasks(
    pipeline: Pipeline,
    adapters: Mapping[str, Path],
    unavailable: Mapping[str, str],
    only: set[str] | None = None,
    previous: Callable[[str, str], Baseline] | None = None,
) -> list[Task]:
    """Every task of the pipeline in run order; with `only`, the tasks of those steps and
    the tasks they need. `previous(adapter, target)`: the bench result to gate against
    (gates.baseline: previous)."""
    steps = pipeline.step_options()
    base = Path(pipeline.base)
    targets = pipeline.targets
    tasks: list[Task] = []
    per_adapter: dict[str, dict[str, Task]] = {name: {} for name in adapters}
    shared: dict[str, Task] = {}

    def add(task: Task) -> Task:
        task.required = task.required and bool(getattr(steps[task.step], "required", True))
        if task.step in ("export-genai", "verify") or (
            task.step == "export-onnx" and task.options.get("merged_from") != "base-graph"
        ):
            task.serial = TORCH
        if task.target is not None and task.target in unavailable:
            task.skip = f"target {task.target}: {unavailable[task.target]}"
        tasks.append(task)
        return task

    def step_targets(kind: str, runtime: str | None = None) -> list[str]:
        chosen = getattr(steps[kind], "targets", None) or list(targets)
        return [t for t in chosen if runtime is None or targets[t].runtime == runtime]

    if "inspect" in steps:
        for name, adapter in adapters.items():
            per_adapter[name]["inspect"] = add(
                Task("inspect", name, f"adapters/{name}", inspect_step, {"base": base, "adapter": adapter})
            )
    if "merge" in steps:
        options = record_options("merge", steps["merge"])
        for name, adapter in adapters.items():
            per_adapter[name]["merge"] = add(
                Task(
                    "merge", name, f"adapters/{name}", merge_step(options), {"base": base, "adapter": adapter}, options
                )
            )
    export = steps.get("export-onnx")
    if export is not None:
        options = record_options("export-onnx", export)
        # The base's own graph: what merged graphs are written from, bench's reference, an engine's source.
        if (
            ("merged" in export.graphs and export.merged_from == "base-graph")
            or "bench" in steps
            or "base" in getattr(steps.get("build-trt"), "graphs", ())
        ):
            shared["graph"] = add(
                Task("export-onnx", BASE, BASE, export_step(options, "base.onnx"), {"model": base}, options)
            )
        if "dynamic" in export.graphs:
            dyn_options = {"task": export.task, "opset": export.opset, "lora_targets": export.lora_targets}
            layout = None if export.lora_targets else {name: ("layout", a) for name, a in adapters.items()}
            shared["dynamic"] = add(
                Task(
                    "export-onnx",
                    BASE,
                    BASE,
                    dynamic_step(dyn_options, None if export.lora_targets else list(adapters.values())),
                    {"model": base},
                    dyn_options,
                    key_inputs=None if layout is None else {"model": base, "adapter_layouts": layout},
                    variant="dynamic",
                )
            )
        if "merged" in export.graphs:
            for name, adapter in adapters.items():
                if export.merged_from == "base-graph":
                    opts = {"merged_from": "base-graph", "base_check": export.base_check}
                    inputs = {"base": base, "adapter": adapter, "graph": shared["graph"]}
                    produce = merged_graph_step(export.base_check)
                else:
                    opts = {"merged_from": "checkpoint", **options}
                    inputs = {"model": per_adapter[name]["merge"]}
                    produce = export_step(options, "merged.onnx", sub="merged")
                per_adapter[name]["onnx"] = add(Task("export-onnx", name, f"adapters/{name}", produce, inputs, opts))
    if "pack" in steps:
        options = record_options("pack", steps["pack"])
        for name, adapter in adapters.items():
            per_adapter[name]["pack"] = add(
                Task(
                    "pack",
                    name,
                    f"adapters/{name}",
                    pack_step(options),
                    {"adapter": adapter, "graph": shared["dynamic"]},
                    options,
                )
            )
    genai = steps.get("export-genai")
    if genai is not None:
        options = record_options("export-genai", genai)
        if genai.mode == "dynamic":
            inputs = {"model": base, "adapters": list(adapters.values())}
            opts = {**options, "mode": "dynamic", "adapter_names": list(adapters)}  # the .onnx_adapter files' names
            shared["genai"] = add(Task("export-genai", BASE, BASE, genai_step(options), inputs, opts))
        else:
            for name in adapters:
                inputs = {"model": per_adapter[name]["merge"], "adapters": []}
                per_adapter[name]["genai"] = add(
                    Task("export-genai", name, f"adapters/{name}", genai_step(options, sub="merged"), inputs, options)
                )
    build = steps.get("build-trt")
    engines: dict[tuple[str, str], Task] = {}  # (adapter, target) -> the engine verify and bench use
    base_engines: dict[str, Task] = {}
    if build is not None:
        options = record_options("build-trt", build)
        for t in step_targets("build-trt", "tensorrt"):
            opts = {**options, "precision": targets[t].precision}
            if "base" in build.graphs:
                base_engines[t] = add(
                    Task(
                        "build-trt",
                        BASE,
                        f"{BASE}/{t}",
                        engine_step(opts, "base.engine", base),
                        {"graph": shared["graph"], "checkpoint": base},
                        opts,
                        target=t,
                        machine_bound=True,
                    )
                )
            if "merged" in build.graphs:
                for name in adapters:
                    engines[name, t] = add(
                        Task(
                            "build-trt",
                            name,
                            f"adapters/{name}/{t}",
                            engine_step(opts, "merged.engine", None, graph="merged.onnx"),
                            {"graph": per_adapter[name]["onnx"]},
                            opts,
                            target=t,
                            machine_bound=True,
                        )
                    )
    if "refit" in steps:
        for t in step_targets("refit", "tensorrt"):
            if t not in base_engines:
                continue
            for name, adapter in adapters.items():
                engines[name, t] = add(
                    Task(
                        "refit",
                        name,
                        f"adapters/{name}/{t}",
                        refit_step,
                        {"engine": base_engines[t], "base": base, "adapter": adapter},
                        target=t,
                        machine_bound=True,
                    )
                )
    if "verify" in steps:
        options = {**record_options("verify", steps["verify"]), **gate_options(pipeline, "verify")}
        for name, adapter in adapters.items():
            mine = per_adapter[name]
            inputs = {"base": base, "adapter": adapter}
            inputs.update(merged=mine.get("merge"), onnx=mine.get("onnx"), packed=mine.get("pack"))
            inputs["dynamic"] = shared.get("dynamic") if "pack" in mine else None
            inputs = {k: v for k, v in inputs.items() if v is not None}
            if len(inputs) > 2:
                add(Task("verify", name, f"adapters/{name}", verify_step(options), inputs, options))
            if "export-genai" in steps:
                folder = shared.get("genai") or mine.get("genai")
                opts = {**options, "generate": steps["verify"].generate}
                add(
                    Task(
                        "verify",
                        name,
                        f"adapters/{name}",
                        genai_verify_step(options, steps["verify"].generate),
                        {"base": base, "adapter": adapter, "genai": folder},
                        opts,
                        variant="genai",
                    )
                )
            for t in targets:
                if (name, t) in engines:
                    add(
                        Task(
                            "verify",
                            name,
                            f"adapters/{name}/{t}",
                            verify_step(options),
                            {"base": base, "adapter": adapter, "engine": engines[name, t]},
                            options,
                            target=t,
                            machine_bound=True,
                        )
                    )
    if "bench" in steps:
        options = {**record_options("bench", steps["bench"]), **gate_options(pipeline, "bench")}
        for t in step_targets("bench"):
            target = targets[t]
            for name in adapters:
                mine = per_adapter[name]
                if target.runtime == "tensorrt":
                    models = {"base": base_engines.get(t), "merged": engines.get((name, t))}
                    adapter_files = {}
                else:
                    models = {"base": shared.get("graph"), "merged": mine.get("onnx")}
                    if "pack" in mine:
                        models["dynamic"] = shared["dynamic"]
                    adapter_files = {"dynamic": mine["pack"]} if "pack" in mine else {}
                models = {k: v for k, v in models.items() if v is not None}
                if not models and t not in unavailable:
                    raise BadInputError(
                        f"bench @{t}: nothing to time for {name}: add export-onnx"
                        + (" and build-trt" if target.runtime == "tensorrt" else "")
                    )
                baseline = None
                if pipeline.gates.baseline == "previous" and previous is not None and t not in unavailable:
                    baseline = previous(name, t)
                opts = {**options, **target_settings(target), "models": sorted(models)}
                if baseline is not None:  # the key holds the previous report's bytes, or why there is none
                    opts["baseline"] = baseline.report or f"none: {baseline.reason}"
                inputs = {f"model:{k}": v for k, v in models.items()}
                inputs.update({f"adapter:{k}": v for k, v in adapter_files.items()})
                add(
                    Task(
                        "bench",
                        name,
                        f"adapters/{name}",
                        bench_step(options, target, t, baseline),
                        inputs,
                        opts,
                        target=t,
                        machine_bound=True,
                        cacheable=steps["bench"].cache,
                        exclusive=True,
                    )
                )
    if only:
        tasks = with_dependencies([t for t in tasks if t.step in only])
    return tasks


def with_dependencies(chosen: list[Task]) -> list[Task]:
    """`chosen` and every task they need, each after what it needs."""
    ordered = []
    seen: set[int] = set()

    def visit(task: Task) -> None:
        if id(task) in seen:
            return
        seen.add(id(task))
        for dep in task.deps():
            visit(dep)
        ordered.append(task)

    for task in chosen:
        visit(task)
    return ordered


def adapter_names(adapters: list[Path]) -> dict[str, Path]:
    return {adapter_name(a): a for a in adapters}
