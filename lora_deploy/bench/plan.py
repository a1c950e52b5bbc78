"""What a bench run will time, checked before anything is loaded: the `--model` and
`--adapter` specs (NAME=PATH), every path against its backend, the reference, the
previous artifact (--baseline-model) and the counts."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from lora_deploy.backends import registry
from lora_deploy.bench.timing import check_counts
from lora_deploy.errors import BadInputError

# The variant --baseline-model adds: the previous artifact, timed in the same run.
PREVIOUS = "previous"
# Names end up as report keys, gate subjects ("8x128/merged") and table cells.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _parse_specs(specs: Sequence[str], option: str) -> dict[str, Path]:
    """['name=path', ...] -> {name: Path}; malformed or repeated names are bad input."""
    parsed: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = str(spec).partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise BadInputError(f"bad {option} {spec!r}: expected NAME=PATH, e.g. merged=merged.onnx")
        if not _NAME_RE.match(name):
            raise BadInputError(f"bad {option} name {name!r}: use letters, digits and _ . + - only")
        if name in parsed:
            raise BadInputError(f"{option} name {name!r} is given twice")
        parsed[name] = Path(path).expanduser()
    return parsed


def parse_model_specs(specs: Sequence[str]) -> dict[str, Path]:
    """`--model` values ['base=base.onnx', ...] -> {'base': Path('base.onnx'), ...}, in order."""
    models = _parse_specs(specs, "--model")
    if not models:
        raise BadInputError("no models given: pass --model NAME=PATH at least once")
    return models


def parse_adapter_specs(specs: Sequence[str], models: Sequence[str] = ()) -> dict[str, Path]:
    """`--adapter` values ['dynamic=x.onnx_adapter'] -> {'dynamic': Path(...)}.

    The name is the model the adapter attaches to (checked in `check_plan`). A bare path
    attaches to the model named "dynamic", or to the one model that is neither "base"
    nor "merged"; anything else is ambiguous.
    """
    named = [s if "=" in s else f"{default_adapter_target(models, s)}={s}" for s in specs]
    return _parse_specs(named, "--adapter")


def default_adapter_target(models: Sequence[str], spec: str) -> str:
    if "dynamic" in models:
        return "dynamic"
    others = [m for m in models if m not in ("base", "merged")]
    if len(others) == 1:
        return others[0]
    raise BadInputError(f"--adapter {spec}: say which model it is for, as --adapter NAME={spec}")


def check_plan(
    models: Mapping[str, str | os.PathLike],
    adapters: Mapping[str, str | os.PathLike] | None,
    backend: str,
    reference: str | None,
    module: str | None = None,
) -> tuple[dict[str, Path], dict[str, Path], str]:
    """Validate names and paths before loading anything; return (models, adapters, reference).

    The reference defaults to 'base' when there is one, else the first model. With
    `module` (the factory form, torch only) every model path is a checkpoint for it.
    """
    spec = registry.get(backend)
    if not models:
        raise BadInputError("no models given: pass --model NAME=PATH at least once")
    models = {name: Path(p) for name, p in models.items()}
    adapters = {name: Path(p) for name, p in (adapters or {}).items()}
    for name, path in models.items():
        if not _NAME_RE.match(name):
            raise BadInputError(f"bad model name {name!r}: use letters, digits and _ . + - only")
        registry.check_model(path, backend, name, module)
    for name, path in adapters.items():
        if name not in models:
            raise BadInputError(
                f"adapter {name}={path}: there is no model named {name!r} (models: {', '.join(models)})"
            )
        registry.check_path(path, spec.adapter, "adapter", name, backend)
    if reference is None:
        reference = "base" if "base" in models else next(iter(models))
    if reference not in models:
        raise BadInputError(f"reference {reference!r} is not among the models ({', '.join(models)})")
    return models, adapters, reference


def with_previous(
    models: Mapping[str, str | os.PathLike], baseline_model: str | os.PathLike | None, reference: str | None
) -> tuple[dict[str, str | os.PathLike], str | None]:
    """--baseline-model OLD: the previous artifact joins the run as the reference."""
    models = dict(models)
    if baseline_model is None:
        return models, reference
    if PREVIOUS in models:
        raise BadInputError(f"--baseline-model adds a model named {PREVIOUS!r}: rename the --model of that name")
    if reference not in (None, PREVIOUS):
        raise BadInputError(f"--baseline-model makes {PREVIOUS!r} the reference; drop --reference {reference}")
    return {PREVIOUS: baseline_model, **models}, PREVIOUS


def check_run_counts(rounds: int, warmup: int, inner: int, threads: int | None) -> None:
    """Fail on nonsense counts now, not after minutes of loading."""
    check_counts(warmup, rounds, inner)
    if threads is not None and threads < 1:
        raise BadInputError(f"threads must be >= 1, got {threads}")
