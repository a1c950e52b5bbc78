"""The pipeline file format: what a pipeline YAML may say, validated with pydantic.

Each step's options are a pydantic model made from that stage's options record
(lora_deploy.options): every field of MergeOptions is a `merge:` option, with the record's
type and default, so a new option in a record is in the pipeline format (and its JSON
Schema) without being listed again here. What the pipeline decides itself (where outputs
go, `overwrite`) is left out; the gates (tolerances, latency limits, baselines, what an
inconclusive gate does) are one `gates:` section instead of options of verify and bench.

A pipeline file is read by `load`. Relative paths in it are relative to the working
directory, as on the command line.
"""

from __future__ import annotations

import ast
import glob
import inspect
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_type_hints

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, create_model, model_validator

from lora_deploy import options as records
from lora_deploy.bench.control import loop_settings
from lora_deploy.bench.generation import check_generate
from lora_deploy.bench.plan import check_run_counts
from lora_deploy.bench.sessions import check_sessions
from lora_deploy.bench.stats import check_on_inconclusive, fraction
from lora_deploy.bench.timing import parse_duration, parse_rate
from lora_deploy.errors import BadInputError
from lora_deploy.io.checkpoint import parse_size
from lora_deploy.modeling.factory import parse_factory

FORMAT_VERSION = 1


class PipelineError(BadInputError):
    """The pipeline file (or an override) is not a valid pipeline: exit 2, one line."""


class StepKind:
    """One kind of step: the options record its options come from, the record fields the
    pipeline sets itself, and the options that are the pipeline's own."""

    def __init__(self, name: str, record: type | None, owned: Sequence[str] = (), extra: Mapping[str, Any] = ()):
        self.name = name
        self.record = record
        self.owned = tuple(owned)
        self.extra = dict(extra)


# Fields of VerifyOptions and BenchOptions that are gates: set once, in `gates:`.
GATE_FIELDS = {
    "verify": ("atol", "rtol", "allow_no_effect"),
    "bench": (
        "max_overhead",
        "baseline_model",
        "baseline_path",
        "max_regression",
        "run_margin",
        "allow_mismatch",
        "on_inconclusive",
        "max_p99",
        "max_misses",
    ),
}
GRAPHS = ("merged", "dynamic")
# VerifyOptions' ONNX Runtime GPU fields: not a pipeline's verify step's (the targets run on GPUs, in bench).
ORT_GPU_FIELDS = ("device", "provider", "trt_fp16", "trt_cache")

# The order the steps run in, whatever their order in the file (each needs only steps before it).
STEP_KINDS = {
    kind.name: kind
    for kind in [
        StepKind("inspect", None),
        StepKind("merge", records.MergeOptions, owned=("overwrite",)),
        StepKind(
            "export-onnx",
            records.ExportOptions,
            owned=("overwrite",),
            extra={
                "graphs": (
                    list[Literal[GRAPHS]],  # type: ignore[valid-type]
                    Field(
                        ["merged"],
                        description="merged: one ONNX model per adapter; dynamic: one shared graph "
                        "with LoRA inputs (pack the adapters for it)",
                    ),
                ),
                "merged_from": (
                    Literal["base-graph", "checkpoint"],
                    Field(
                        "base-graph",
                        description="base-graph: the base's ONNX export with the merged weights "
                        "written in (merge --onnx-like, no export per adapter); checkpoint: export the merged "
                        "checkpoint (needs the merge step)",
                    ),
                ),
                "base_check": (
                    Literal["sampled", "full"],
                    Field(
                        "sampled",
                        description="base-graph: compare the graph's initializers with the base "
                        "checkpoint in sampled blocks or in full",
                    ),
                ),
                "lora_targets": (
                    Union[list[str], str, None],
                    Field(
                        None,
                        description="dynamic graph: the layers that take LoRA inputs (PEFT's "
                        "target_modules rule); default: the adapters' layers",
                    ),
                ),
            },
        ),
        StepKind("pack", records.PackOptions, owned=("overwrite",)),
        StepKind(
            "export-genai",
            records.GenaiExportOptions,
            owned=("overwrite",),
            extra={
                "mode": (
                    Literal["merged", "dynamic"],
                    Field(
                        "merged",
                        description="merged: a folder per adapter from its merged checkpoint (needs "
                        "the merge step); dynamic: one folder from the base with every adapter packed",
                    ),
                ),
            },
        ),
        StepKind(
            "build-trt",
            records.TrtBuildOptions,
            owned=("overwrite", "base", "precision"),  # precision: the target's
            extra={
                "graphs": (
                    list[Literal["base", "merged"]],
                    Field(["base", "merged"], description="which ONNX graphs get an engine"),
                ),
            },
        ),
        StepKind("refit", records.TrtRefitOptions, owned=("out", "overwrite")),
        StepKind(
            "verify",
            records.VerifyOptions,
            owned=(*GATE_FIELDS["verify"], *ORT_GPU_FIELDS),  # verify runs ONNX Runtime on the CPU here
            extra={
                "generate": (
                    int,
                    Field(
                        8,
                        ge=1,
                        description="with export-genai: the new tokens each genai folder generates greedily, "
                        "checked against PEFT's unmerged generate",
                    ),
                ),
            },
        ),
        StepKind(
            "bench",
            records.BenchOptions,
            owned=("backend", "device", "provider", *GATE_FIELDS["bench"]),  # backend and device: the target's
            extra={
                "cache": (
                    bool,
                    Field(
                        False,
                        description="true: reuse a stored measurement when the models, options and machine are "
                        "unchanged (never with a regression baseline); false: measure on every run",
                    ),
                ),
            },
        ),
    ]
}

COMMON = {
    "required": (
        bool,
        Field(True, description="false: a failure of this step is recorded but does not keep the bundle back"),
    ),
    "targets": (
        Union[list[str], None],
        Field(None, description="the targets this step runs for (build-trt, refit, bench); default: every one"),
    ),
}
TARGETED = ("build-trt", "refit", "bench")


def field_notes(record: type) -> dict[str, str]:
    """The comment after each field of an options record, as its description."""
    try:
        lines, _ = inspect.getsourcelines(record)
    except (OSError, TypeError):
        return {}
    notes = {}
    for node in ast.parse("".join(lines)).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = lines[node.lineno - 1]
            if "#" in line:
                notes[node.target.id] = line.split("#", 1)[1].strip()
    return notes


# The stage's own checks of a record field's value, run when the pipeline is loaded (not
# when the step runs, after the steps before it): record -> field -> check (raises BadInputError).
# Each reuses the stage's parser or its tuple of choices, so the two cannot drift apart;
# tests/pipeline/test_load.py checks that every CLI choice and range of a step's options loads
# and that values outside them do not.
def limit(value: Any) -> float | None:
    """A limit written in a pipeline file: a bare YAML number is read as the CLI reads the
    same text (`max_overhead: 2` is refused with "did you mean '2%'", never taken as 200%)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 1:
        value = format(value, "g")  # the text the user wrote: 2, not 2.0
    return fraction(value)


def one_of(choices: Sequence[str], what: str) -> Any:
    """A check that a value is one of a stage's own choices (the tuple its API checks)."""

    def check(value: Any) -> None:
        if value not in choices:
            raise BadInputError(f"unknown {what} {value!r} (choose {', '.join(map(str, choices))})")

    return check


def at_least(low: int, what: str) -> Any:
    def check(value: int) -> None:
        if value < low:
            raise BadInputError(f"{what} must be >= {low}, got {value}")

    return check


# Checks that need a heavier module import it when a file sets the field, not at start-up.
def merge_dtype(value: str) -> None:
    from lora_deploy.merge.streaming import OUTPUT_DTYPES

    one_of(("auto", *OUTPUT_DTYPES), "dtype")(value)


def onto(value: str) -> None:
    from lora_deploy.merge.bnb import BnbSpec

    BnbSpec(value)


def blocksize(value: int) -> None:
    from lora_deploy.merge.bnb import BnbSpec

    BnbSpec("nf4", value)  # the 4-bit block sizes (int8 takes none: the merge says so)


def requantize(value: str) -> None:
    from lora_deploy.merge.quant import REQUANTIZE_FORMATS

    one_of(REQUANTIZE_FORMATS, "--requantize")(value)


def export_dtype(value: str) -> None:
    one_of(("auto", *records.EXPORT_DTYPES), "dtype")(value)


def export_task(value: str) -> None:
    from lora_deploy.modeling.tasks import AUTO, EXPORT_TASKS

    one_of((AUTO, *EXPORT_TASKS), "task")(value)


def verify_task(value: str) -> None:
    from lora_deploy.modeling.tasks import AUTO, resolve_task

    if value != AUTO:
        resolve_task(value, None)  # a named task is checked without the config


def parity(value: str) -> None:
    one_of(records.PARITY_MODES, "parity")(value)


def refit_mode(value: str) -> None:
    from lora_deploy.backends.trt.versions import REFIT_MODES

    one_of(REFIT_MODES, "refit mode")(value)


def hardware_compat(value: str) -> None:
    from lora_deploy.backends.trt.versions import HARDWARE_COMPAT

    one_of(HARDWARE_COMPAT, "hardware compatibility")(value)


def converter(value: str) -> None:
    from lora_deploy.backends.trt.convert import CONVERTERS

    one_of(CONVERTERS, "converter")(value)


def workspace(value: Any) -> None:
    from lora_deploy.backends.trt.build import parse_workspace

    parse_workspace(value)


def trt_shapes(value: Any) -> None:
    from lora_deploy.backends.trt.profiles import parse_shape_specs

    parse_shape_specs([value] if isinstance(value, str) else value)


def tolerance(name: str) -> Any:
    from lora_deploy.compare import check_tolerances

    return lambda value: check_tolerances(**{name: value})


def noise_runs(value: int) -> None:
    from lora_deploy.bench.noise import check_noise_runs

    check_noise_runs(value, None)


VALUE_CHECKS: dict[type, dict[str, Any]] = {
    records.MergeOptions: {
        "dtype": merge_dtype,
        "max_shard_size": parse_size,
        "onto": onto,
        "blocksize": blocksize,
        "requantize": requantize,
    },
    records.ExportOptions: {
        "task": export_task,
        "dtype": export_dtype,
        "parity": parity,
        "module": parse_factory,
    },
    records.PackOptions: {"dtype": one_of(records.PACK_DTYPES, "dtype")},
    records.GenaiExportOptions: {"precision": one_of(records.GENAI_PRECISIONS, "precision")},
    records.TrtBuildOptions: {
        "shapes": trt_shapes,
        "refittable": refit_mode,
        "hardware_compat": hardware_compat,
        "converter": converter,
        "workspace": workspace,
    },
    records.VerifyOptions: {
        "atol": tolerance("atol"),
        "rtol": tolerance("rtol"),
        "batch": at_least(1, "batch"),
        "seq": at_least(1, "seq"),
        "task": verify_task,
    },
    records.BenchOptions: {
        "rounds": lambda v: check_run_counts(v, 0, 1, None),
        "warmup": lambda v: check_run_counts(1, v, 1, None),
        "inner": lambda v: check_run_counts(1, 0, v, None),
        "threads": lambda v: check_run_counts(1, 0, 1, v),
        "until_width": limit,
        "max_time": lambda v: parse_duration(v, "time budget"),
        "max_overhead": limit,
        "max_regression": limit,
        "run_margin": limit,
        "on_inconclusive": check_on_inconclusive,
        "sessions": check_sessions,
        "rate": parse_rate,
        "duration": parse_duration,
        "max_p99": lambda v: parse_duration(v, "p99 budget"),
        "noise_runs": noise_runs,
        "max_misses": lambda v: loop_settings("1hz", None, None, v),
        "generate": lambda v: check_generate(v, None, 1, None, None, None),
    },
}


def value_check(check: Any) -> AfterValidator:
    """A stage check as a pydantic validator: its BadInputError becomes the field's error."""

    def validate(value: Any) -> Any:
        if value is not None:
            try:
                check(value)
            except BadInputError as exc:
                raise ValueError(str(exc)) from None
        return value

    return AfterValidator(validate)


def record_fields(record: type, exclude: Iterable[str] = (), *, optional: bool = False) -> dict[str, Any]:
    """pydantic field definitions for the fields of an options record (its types, defaults,
    comments and the stage's value checks); optional=True makes every default None (not set)."""
    hints = get_type_hints(record)
    notes = field_notes(record)
    checks = VALUE_CHECKS.get(record, {})
    defined = {}
    for f in fields(record):
        if f.name in exclude:
            continue
        default = None if optional else (f.default if f.default is not MISSING else f.default_factory())
        kind = hints[f.name] | None if optional else hints[f.name]
        if f.name in checks:
            kind = Annotated[kind, value_check(checks[f.name])]
        defined[f.name] = (kind, Field(default, description=notes.get(f.name)))
    return defined


def options_model(kind: StepKind) -> type[BaseModel]:
    defined = record_fields(kind.record, kind.owned) if kind.record is not None else {}
    common = {k: v for k, v in COMMON.items() if k != "targets" or kind.name in TARGETED}
    title = "".join(part.title() for part in kind.name.split("-")) + "Step"
    return create_model(title, __config__=ConfigDict(extra="forbid"), **defined, **kind.extra, **common)


STEP_OPTIONS = {name: options_model(kind) for name, kind in STEP_KINDS.items()}


def step_tag(value: Any) -> str | None:
    """Which form a steps entry is: "name" (a bare step name) or the step's name."""
    if isinstance(value, str):
        return "name"
    if isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in STEP_KINDS:
        return next(iter(value))
    return None


def step_entry_model(name: str) -> type[BaseModel]:
    options = STEP_OPTIONS[name]
    return create_model(
        options.__name__ + "Entry",
        __config__=ConfigDict(extra="forbid"),
        **{name: (options, Field(default_factory=options))},
    )


STEP_ENTRIES = {name: step_entry_model(name) for name in STEP_KINDS}
StepEntry = Annotated[
    Union[  # built from the step names
        (Annotated[Literal[tuple(STEP_KINDS)], Tag("name")],)  # type: ignore[valid-type]
        + tuple(Annotated[entry, Tag(name)] for name, entry in STEP_ENTRIES.items())
    ],
    Discriminator(
        step_tag,
        custom_error_type="unknown_step",
        custom_error_message=f"a step is a name, or one name mapping to its options: {', '.join(STEP_KINDS)}",
    ),
]


# Named targets: `targets: [cpu-onnxruntime, gpu-tensorrt-fp16]`, or a mapping of these
# names (or your own, spelling runtime and device out) to settings.
TARGET_PRESETS = {
    "cpu-onnxruntime": {"runtime": "onnxruntime", "device": "cpu"},
    "gpu-onnxruntime": {"runtime": "onnxruntime", "device": "cuda"},
    "gpu-onnxruntime-tensorrt": {"runtime": "onnxruntime", "device": "cuda", "provider": "tensorrt"},
    "gpu-tensorrt-fp32": {"runtime": "tensorrt", "device": "cuda", "precision": "fp32"},
    "gpu-tensorrt-fp16": {"runtime": "tensorrt", "device": "cuda", "precision": "fp16"},
    "gpu-tensorrt-bf16": {"runtime": "tensorrt", "device": "cuda", "precision": "bf16"},
}
DEFAULT_TARGETS = ("cpu-onnxruntime",)


class Target(BaseModel):
    """Where the artifacts are deployed: what bench times them on, what build-trt builds."""

    model_config = ConfigDict(extra="forbid")

    runtime: Literal["onnxruntime", "tensorrt"] = Field(description="onnxruntime: ONNX graphs; tensorrt: engines")
    device: Literal["cpu", "cuda"] = "cpu"
    precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="tensorrt: the engine's precision")
    provider: Literal["cuda", "tensorrt"] | None = Field(
        None, description="onnxruntime on cuda: the CUDA or TensorRT execution provider"
    )
    required: bool = Field(
        True,
        description="false: where this target cannot run (no GPU, no TensorRT) its steps are skipped with the "
        "reason; true: the run stops before any work",
    )

    @model_validator(mode="after")
    def consistent(self) -> Target:
        if self.runtime == "tensorrt" and self.device != "cuda":
            raise ValueError("a tensorrt target runs on device cuda")
        if self.provider is not None and (self.runtime, self.device) != ("onnxruntime", "cuda"):
            raise ValueError("provider is for runtime onnxruntime on device cuda")
        if self.precision != "fp32" and self.runtime != "tensorrt":
            raise ValueError("precision is a tensorrt target's (onnxruntime runs the graph's own dtype)")
        return self


GATE_RECORDS = {"verify": records.VerifyOptions, "bench": records.BenchOptions}
Gates = create_model(
    "Gates",
    __config__=ConfigDict(extra="forbid"),
    __doc__="Pass/fail criteria: verify's tolerances, bench's latency gates (unset: the stage's default).",
    **{
        name: spec
        for stage, record in GATE_RECORDS.items()
        for name, spec in record_fields(
            record, [f.name for f in fields(record) if f.name not in GATE_FIELDS[stage]], optional=True
        ).items()
    },
    baseline=(
        Union[Literal["previous"], None],
        Field(
            None,
            description="previous: gate each bench result against the same adapter's and target's in the bundle "
            "this run replaces (max_regression, default 5%); no previous result: the gate is skipped, not passed; "
            "another machine or library versions: inconclusive (on_inconclusive decides)",
        ),
    ),
)


class Pipeline(BaseModel):
    """A deploy pipeline: base model and adapters in, a verified artifact bundle out."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = Field(FORMAT_VERSION, description="the pipeline format's version")
    name: str | None = None
    base: Path = Field(description="the base checkpoint directory")
    adapters: Union[str, list[str]] = Field(
        description="a PEFT adapter directory, a list of them, or a glob (adapters/*)"
    )
    out: Path | None = Field(None, description="the artifact bundle directory (--out overrides it)")
    cache: Path | None = Field(
        None, description="the step cache; default: $LORA_DEPLOY_CACHE/pipeline (~/.cache/lora-deploy/pipeline)"
    )
    targets: dict[str, Target] = Field(
        default_factory=lambda: {name: Target(**TARGET_PRESETS[name]) for name in DEFAULT_TARGETS},
        description="where the artifacts run: preset names (cpu-onnxruntime, gpu-tensorrt-fp16, ...) or your own",
    )
    gates: Gates = Field(default_factory=Gates)  # type: ignore[valid-type]
    steps: list[StepEntry] = Field(min_length=1)  # type: ignore[valid-type]

    @model_validator(mode="before")
    @classmethod
    def expand_targets(cls, data: Any) -> Any:
        """Target names that are presets get the preset's settings; a list of names is a
        mapping of each to nothing more."""
        if not isinstance(data, dict) or "targets" not in data:
            return data
        targets = data["targets"]
        if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
            targets = dict.fromkeys(targets)
        if isinstance(targets, dict):
            targets = {
                name: {**TARGET_PRESETS.get(name, {}), **(value or {})}
                if isinstance(value, dict) or value is None
                else value
                for name, value in targets.items()
            }
        return {**data, "targets": targets}

    def problem(self) -> tuple[tuple, str] | None:
        """What makes the steps and targets not fit together, as (location, message): each
        field is valid alone, but a step needs another, or a target."""
        listed = self.step_list()
        kinds = [name for name, _ in listed]
        for i, name in enumerate(kinds):
            if name in kinds[:i]:
                return ("steps", i), f"{name} appears twice; each step appears once"
        where = {name: ("steps", i, name) for i, name in enumerate(kinds)}
        steps = dict(listed)
        if not self.targets:
            return ("targets",), "give at least one target"
        for name, opts in steps.items():
            for target in getattr(opts, "targets", None) or ():
                if target not in self.targets:
                    return (*where[name], "targets"), f"unknown target {target!r} (targets: {', '.join(self.targets)})"
        trt = [n for n, t in self.targets.items() if t.runtime == "tensorrt"]
        bench_targets = (getattr(steps.get("bench"), "targets", None) or list(self.targets)) if "bench" in steps else []
        export = steps.get("export-onnx")
        genai = steps.get("export-genai")
        gates = self.gates
        checks = [
            ("build-trt", not trt, "builds for a tensorrt target: add one to targets (e.g. gpu-tensorrt-fp16)"),
            ("refit", not trt, "refits for a tensorrt target: add one to targets (e.g. gpu-tensorrt-fp16)"),
            ("refit", "build-trt" not in steps, "needs the build-trt step (a refittable base engine)"),
            (
                "refit",
                "build-trt" in steps
                and ("base" not in steps["build-trt"].graphs or steps["build-trt"].refittable == "none"),
                "needs build-trt to build the base engine (graphs: [base, ...]) refittable",
            ),
            ("build-trt", export is None, "builds from the ONNX graphs: add the export-onnx step"),
            (
                "build-trt",
                export is not None
                and "merged" in getattr(steps.get("build-trt"), "graphs", ())
                and "merged" not in export.graphs,
                "graphs: [merged] needs export-onnx to export the merged graphs",
            ),
            (
                "pack",
                export is None or "dynamic" not in export.graphs,
                "writes adapters for the dynamic graph: add export-onnx with graphs: [dynamic]",
            ),
            (
                "verify",
                not {"merge", "export-onnx", "build-trt", "export-genai"} & set(steps),
                "checks artifacts: add merge, export-onnx or export-genai",
            ),
            ("bench", export is None, "times the ONNX graphs (and engines): add export-onnx"),
            (
                "bench",
                "build-trt" not in steps and any(self.targets[t].runtime == "tensorrt" for t in bench_targets),
                "times engines on a tensorrt target: add build-trt, or give bench targets without it",
            ),
            (
                "export-genai",
                genai is not None and genai.mode == "merged" and "merge" not in steps,
                "mode merged builds from the merged checkpoint: add the merge step",
            ),
            (
                "bench",
                getattr(steps.get("bench"), "cache", False)
                and (gates.baseline or gates.baseline_path or gates.baseline_model),
                "cache: true would reuse an earlier measurement in a regression check: drop it",
            ),
        ]
        if (gates.max_regression is not None or gates.run_margin is not None) and not (
            gates.baseline or gates.baseline_path or gates.baseline_model
        ):
            field = "max_regression" if gates.max_regression is not None else "run_margin"
            return ("gates", field), "needs a baseline: baseline: previous, baseline_path or baseline_model"
        if gates.baseline is not None:
            if "bench" not in steps:
                return ("gates", "baseline"), "previous compares bench results: add the bench step"
            if gates.baseline_path or gates.baseline_model:
                return ("gates", "baseline"), "one baseline: drop baseline_path and baseline_model"
        if export is not None:
            checks += [
                ("export-onnx", not export.graphs, "graphs: give merged, dynamic or both"),
                (
                    "export-onnx",
                    export.task == "text-generation-with-past",
                    "KV-cache graphs (text-generation-with-past) are not in pipelines yet",
                ),
                (
                    "export-onnx",
                    "dynamic" in export.graphs and (export.dtype != "float32" or export.stream_weights),
                    "the dynamic graph is float32 with its weights: drop dtype and stream_weights",
                ),
                (
                    "export-onnx",
                    "merged" in export.graphs and export.merged_from == "checkpoint" and "merge" not in steps,
                    "merged_from: checkpoint needs the merge step",
                ),
            ]
        for name, broken, message in checks:
            if name in steps and broken:
                return where[name], message
        return None

    def step_list(self) -> list[tuple[str, BaseModel]]:
        """(kind, options) for each step, in the order of the file."""
        listed = []
        for entry in self.steps:
            if isinstance(entry, str):
                listed.append((entry, STEP_OPTIONS[entry]()))
            else:
                (name, opts), *_ = entry.__dict__.items()
                listed.append((name, opts))
        return listed

    def step_options(self) -> dict[str, BaseModel]:
        """Options by kind, in run order (STEP_KINDS)."""
        given = dict(self.step_list())
        return {name: given[name] for name in STEP_KINDS if name in given}

    def adapter_dirs(self) -> list[Path]:
        """The adapter directories: a glob expanded (sorted)."""
        given = [self.adapters] if isinstance(self.adapters, str) else list(self.adapters)
        found: list[Path] = []
        for pattern in given:
            if glob.has_magic(pattern):
                found += [Path(p) for p in sorted(glob.glob(pattern)) if Path(p).is_dir()]
            else:
                found.append(Path(pattern))
        return found


def pipeline_schema() -> dict[str, Any]:
    """The JSON Schema of a pipeline file (for editors: yaml-language-server's $schema)."""
    schema = Pipeline.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "lora-deploy pipeline"
    return schema


def adapter_name(adapter: Path) -> str:
    """An adapter's name in the bundle: its directory's name."""
    return Path(os.path.abspath(adapter)).name
