"""The pipeline file format: every error is one line naming the file, the line, the field
and what is wrong; ${VAR} and --set; the options come from the stage records; the JSON
Schema describes what validates."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_deploy import options
from lora_deploy.cli import main
from lora_deploy.pipeline.load import load_pipeline
from lora_deploy.pipeline.spec import GATE_FIELDS, STEP_KINDS, PipelineError, pipeline_schema


@pytest.fixture
def dirs(tmp_path):
    """A base and two adapter directories (the format checks they exist, not what is in them)."""
    for name in ("base", "adapters/a1", "adapters/a2"):
        (tmp_path / name).mkdir(parents=True)
    return tmp_path


def write(dirs: Path, text: str) -> Path:
    path = dirs / "p.yaml"
    path.write_text(text.replace("DIR", str(dirs)))
    return path


VALID = """\
base: DIR/base
adapters: DIR/adapters/a1
out: DIR/bundle
steps:
  - inspect
  - merge:
      dtype: float16
  - bench:
      rounds: 3
  - export-onnx
"""


def error(path: Path, *overrides: str, environ=None) -> str:
    with pytest.raises(PipelineError) as info:
        load_pipeline(path, overrides, environ or {})
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_valid_file_loads_with_record_defaults(dirs):
    pipeline, _ = load_pipeline(write(dirs, VALID), environ={})
    steps = pipeline.step_options()
    assert list(steps) == ["inspect", "merge", "export-onnx", "bench"]  # run order, not the file's
    assert steps["merge"].dtype == "float16"
    assert steps["merge"].max_shard_size == options.MergeOptions().max_shard_size
    assert steps["bench"].rounds == 3 and steps["bench"].warmup == options.BenchOptions().warmup
    assert list(pipeline.targets) == ["cpu-onnxruntime"]


@pytest.mark.parametrize(
    "text, where, what",
    [
        (VALID.replace("rounds: 3", "rounds: many"), "p.yaml:9: steps[2].bench.rounds", "valid integer"),
        (VALID.replace("rounds: 3", "roundz: 3"), "p.yaml:9: steps[2].bench.roundz", "did you mean 'rounds'"),
        (VALID.replace("  - inspect", "  - inpsect"), "p.yaml:5: steps[0]", "'inspect'"),
        (VALID.replace("  - inspect", "  - nope: {}"), "p.yaml:5: steps[0]", "a step is a name"),
        (VALID.replace("base: DIR/base\n", ""), "p.yaml: base:", "required"),
        (VALID.replace("DIR/base", "DIR/nowhere"), "p.yaml:1: base", "no such directory"),
        (VALID.replace("adapters/a1", "adapters/x*"), "p.yaml:2: adapters", "matches no directory"),
        (VALID + "  - inspect\n", "p.yaml:11: steps[4]", "inspect appears twice"),
        (VALID + "  - pack\n", "p.yaml:11: steps[4].pack", "writes adapters for the dynamic graph"),
        (VALID.replace("  - export-onnx\n", ""), "p.yaml:8: steps[2].bench", "add export-onnx"),
        (VALID + "targets: [gpu-tensorrt-fp16]\n  - refit\n", "p.yaml", "not valid YAML"),
        (VALID.replace("  - inspect", "  - build-trt"), "p.yaml:5: steps[0].build-trt", "tensorrt target"),
        (VALID + "targets:\n  mine: {runtime: tensorrt}\n", "p.yaml:12: targets.mine", "device cuda"),
        (VALID + "gates:\n  max_overhead: 2%\n  rounds: 3\n", "p.yaml:13: gates.rounds", "unknown field"),
    ],
)
def test_errors_name_file_line_field_and_what(dirs, text, where, what):
    message = error(write(dirs, text))
    assert message.startswith(str(dirs / where)), message
    assert what in message, message


def test_gates_are_not_step_options(dirs):
    """One place per setting: a tolerance is a gate, not a verify option."""
    message = error(write(dirs, VALID.replace("rounds: 3", "max_overhead: 2%")))
    assert "steps[2].bench.max_overhead: unknown field" in message


def test_variables_expand_with_defaults_and_escapes(dirs):
    text = VALID.replace("DIR/base", "${ROOT}/base").replace("DIR/bundle", "${OUT:-DIR/dist}/b$${x}")
    pipeline, document = load_pipeline(write(dirs, text), environ={"ROOT": str(dirs)})
    assert pipeline.base == dirs / "base"
    assert document["out"] == f"{dirs}/dist/b${{x}}"
    message = error(write(dirs, text))
    assert message == f"{dirs / 'p.yaml'}:1: base: ${{ROOT}} is not set (export ROOT=..., or write ${{ROOT:-default}})"


def test_set_overrides_fields_and_steps_by_name(dirs):
    path = write(dirs, VALID)
    pipeline, _ = load_pipeline(
        path,
        ["steps.bench.rounds=7", "steps.inspect.required=false", "gates.max_overhead=2%", f"adapters={dirs}/*/a*"],
        {},
    )
    steps = pipeline.step_options()
    assert steps["bench"].rounds == 7 and steps["inspect"].required is False
    assert pipeline.gates.max_overhead == "2%"
    assert [p.name for p in pipeline.adapter_dirs()] == ["a1", "a2"]
    assert error(path, "steps.verify.seq=3") == "--set steps.verify.seq: the pipeline has no verify step"
    assert error(path, "steps.bench.rounds=lots").startswith(f"{path} (--set steps[2].bench.rounds): ")
    assert "give KEY=VALUE" in error(path, "rounds")


def test_every_record_field_is_a_step_option_or_a_gate():
    """No second list: each stage record's fields are in the format, except what the
    pipeline sets itself (outputs, overwrite, the target's backend and precision)."""
    schema = pipeline_schema()
    defs = schema["$defs"]
    for name, kind in STEP_KINDS.items():
        if kind.record is None:
            continue
        step = defs["".join(p.title() for p in name.split("-")) + "Step"]["properties"]
        for f in fields(kind.record):
            gate = f.name in GATE_FIELDS.get(name, ())
            owned = f.name in kind.owned and not gate
            assert (f.name in step) == (not owned and not gate), (name, f.name)
            if gate:
                assert f.name in defs["Gates"]["properties"], (name, f.name)
    assert defs["MergeStep"]["properties"]["sha256"]["description"].startswith("record SHA-256")


def test_schema_from_the_cli_is_json(dirs):
    result = CliRunner().invoke(main, ["run", "--schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema["title"] == "lora-deploy pipeline" and "steps" in schema["required"]


def test_cli_bad_pipeline_is_one_line_exit_2_json_too(dirs):
    path = write(dirs, VALID.replace("rounds: 3", "rounds: many"))
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:9: steps[2].bench.rounds"), result.stderr
    result = CliRunner().invoke(main, ["run", str(path), "--json"])
    assert result.exit_code == 2 and "steps[2].bench.rounds" in json.loads(result.stdout)["error"]
    assert not (dirs / "bundle").exists()
    missing = CliRunner().invoke(main, ["run", str(dirs / "nope.yaml")])
    assert missing.exit_code == 2 and "no such pipeline file" in missing.stderr


def refused_at_load(dirs, valid, override, field, why):
    """`run VALID --set OVERRIDE` fails the load: exit 2, one line naming the field and why,
    nothing written."""
    assert error(valid, override).startswith(f"{valid} (--set {field}): {why}")
    result = CliRunner().invoke(main, ["run", str(valid), "--set", override])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and why in lines[0], result.stderr
    assert sorted(p.name for p in dirs.iterdir()) == ["adapters", "base", "p.yaml"]  # no bundle, no bundle.failed


@pytest.mark.parametrize(
    ("edit", "line", "override", "field", "why"),
    [
        (("rounds: 3", "rounds: 0"), 9, "steps.bench.rounds=0", "steps[2].bench.rounds", "rounds must be >= 1, got 0"),
        (
            ("rounds: 3", "rounds: 3\n      sessions: 0"),
            10,
            "steps.bench.sessions=0",
            "steps[2].bench.sessions",
            "--sessions must be an integer >= 1, got 0",
        ),
        (
            ("steps:", "gates:\n  max_overhead: abc\nsteps:"),
            5,
            "gates.max_overhead=abc",
            "gates.max_overhead",
            "not a percentage: 'abc'",
        ),
        (
            ("steps:", "gates:\n  max_overhead: -1\nsteps:"),
            5,
            "gates.max_overhead=-1",
            "gates.max_overhead",
            "a limit must be a finite fraction >= 0",
        ),
        (
            ("steps:", "gates:\n  max_overhead: 2\nsteps:"),
            5,
            "gates.max_overhead=2",
            "gates.max_overhead",
            "fraction above 1: '2'; did you mean '2%'?",
        ),
        (
            ("rounds: 3", "rounds: 3\n      max_time: soon"),
            10,
            "steps.bench.max_time=soon",
            "steps[2].bench.max_time",
            "bad time budget 'soon'",
        ),
    ],
)
def test_bench_values_are_checked_at_load_by_the_bench_parsers(dirs, edit, line, override, field, why):
    """A value bench would refuse is refused before any step runs, in the file or via --set."""
    in_file = write(dirs, VALID.replace(*edit))
    assert error(in_file).startswith(f"{in_file}:{line}: {field}: {why}")
    valid = write(dirs, VALID)
    refused_at_load(dirs, valid, override, field, why)


def test_valid_bench_values_still_load(dirs):
    path = write(dirs, VALID.replace("steps:", "gates:\n  max_overhead: 2%\n  on_inconclusive: fail\nsteps:"))
    pipeline, _ = load_pipeline(path, ["steps.bench.max_time=30s", "steps.bench.until_width=5%"], {})
    assert pipeline.gates.max_overhead == "2%" and pipeline.step_options()["bench"].max_time == "30s"
    pipeline, _ = load_pipeline(path, ["steps.bench.sessions=5"], {})
    assert pipeline.step_options()["bench"].sessions == 5


def step_fields():
    """(step or "gates", field, its CLI option) for every stage option a pipeline file sets."""
    from tests.test_options import CASES, command

    paths = {record: path for record, path, _ in CASES}
    for name, kind in STEP_KINDS.items():
        if kind.record is None:
            continue
        params = {p.name: p for p in command(paths[kind.record]).params}
        gates = GATE_FIELDS.get(name, ())
        for f in fields(kind.record):
            if f.name in gates:
                yield "gates", f.name, params[f.name]
            elif f.name not in kind.owned:
                yield name, f.name, params[f.name]


def field_error(where: str, field: str, value) -> str | None:
    """The one-line error for this value of a step option (or gate), None when it loads."""
    from pydantic import ValidationError

    from lora_deploy.pipeline.spec import STEP_OPTIONS, Gates

    model = Gates if where == "gates" else STEP_OPTIONS[where]
    try:
        model.model_validate({field: value})
    except ValidationError as exc:
        return str(exc.errors()[0]["msg"])
    return None


def test_every_cli_choice_and_range_is_checked_at_load():
    """Whatever a stage's CLI option refuses by its type (a choice, a range), a pipeline
    file refuses when it is loaded, and whatever the CLI accepts, it loads."""
    import click

    checked = 0
    for where, field, param in step_fields():
        if isinstance(param.type, click.Choice):
            for choice in param.type.choices:
                assert field_error(where, field, choice) is None, (where, field, choice)
            assert field_error(where, field, "bogus") is not None, (where, field)
            checked += 1
        elif isinstance(param.type, click.IntRange) and param.type.min is not None:
            low = param.type.min + (1 if param.type.min_open else 0)
            assert field_error(where, field, low) is None, (where, field, low)
            assert field_error(where, field, low - 1) is not None, (where, field, low - 1)
            checked += 1
    assert checked >= 15


@pytest.mark.parametrize(
    ("override", "field", "why"),
    [
        ("steps.merge.dtype=float17", "steps[1].merge.dtype", "unknown dtype 'float17'"),
        ("steps.merge.onto=nf5", "steps[1].merge.onto", "unknown --onto 'nf5'"),
        ("steps.merge.blocksize=65", "steps[1].merge.blocksize", "--blocksize 65 is not one bitsandbytes accepts"),
        ("steps.merge.max_shard_size=1", "steps[1].merge.max_shard_size", "shard size 1 is 1 bytes"),
        ("steps.export-onnx.module=nope", "steps[3].export-onnx.module", "bad --module 'nope'"),
        ("gates.atol=nan", "gates.atol", "atol must be a finite number >= 0, got nan"),
        ("gates.atol=-1", "gates.atol", "atol must be a finite number >= 0, got -1"),
        ("gates.rtol=.inf", "gates.rtol", "rtol must be a finite number >= 0, got inf"),
    ],
)
def test_step_values_are_refused_at_load_with_the_stage_s_message(dirs, override, field, why):
    """A bad option value of any step fails the load (file, field, the stage's own words),
    exit 2 in one line, nothing written: not the step, after the steps before it."""
    valid = write(dirs, VALID)
    refused_at_load(dirs, valid, override, field, why)


def test_a_bad_merge_dtype_in_the_file_names_its_line_as_merge_says_it(dirs):
    from lora_deploy.errors import BadInputError
    from lora_deploy.merge import merge

    with pytest.raises(BadInputError) as api:
        merge(dirs / "base", dirs / "adapters/a1", dirs / "out", dtype="float17")
    path = write(dirs, VALID.replace("dtype: float16", "dtype: float17"))
    assert error(path) == f"{path}:7: steps[1].merge.dtype: {api.value}"
