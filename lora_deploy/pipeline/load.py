"""Reading a pipeline file: YAML, then `${VAR}` / `${VAR:-default}` expanded in every
string (`$${` is a literal `${`), then the `--set key=value` overrides, then validation
against the format (spec). Every error is one line naming the file, the line, the field
and what is wrong (PipelineError, exit 2)."""

from __future__ import annotations

import difflib
import glob
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lora_deploy.pipeline.spec import (
    STEP_KINDS,
    STEP_OPTIONS,
    Gates,
    Pipeline,
    PipelineError,
    Target,
    adapter_name,
)
from lora_deploy.util import first_line


def load_pipeline(
    path: str | os.PathLike,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> tuple[Pipeline, dict[str, Any]]:
    """Read, expand, override and validate a pipeline file; returns (pipeline, the
    document as validated). Raises PipelineError naming the file, line and field."""
    path = Path(path)
    environ = os.environ if environ is None else environ
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such pipeline file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: unreadable ({exc})") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise PipelineError(f"{where}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: a pipeline file is a mapping (base:, adapters:, steps:, ...)")
    lines = node_lines(root)
    data = expand(data, environ, path, lines, ())
    overridden: set[tuple] = set()
    for override in overrides:
        overridden.add(apply_override(data, override, path))
    try:
        pipeline = Pipeline.model_validate(data)
    except ValidationError as exc:
        raise PipelineError(validation_message(exc, path, lines, overridden)) from None
    problem = pipeline.problem()
    if problem is not None:
        raise PipelineError(f"{located(path, lines, problem[0], overridden)}: {problem[1]}")
    check_paths(pipeline, path, lines)
    return pipeline, data


def node_lines(node: Any, where: tuple = ()) -> dict[tuple, int]:
    """The 1-based line of every value in a composed YAML document, by its path."""
    found: dict[tuple, int] = {}
    if node is None:
        return found
    found[where] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else str(key.value)
            found.update(node_lines(value, (*where, name)))
            found[(*where, name)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            found.update(node_lines(value, (*where, i)))
    return found


def line_of(lines: Mapping[tuple, int], loc: Sequence) -> int | None:
    """The line of `loc`, or of its nearest ancestor that is in the file."""
    loc = tuple(loc)
    while loc not in lines and loc:
        loc = loc[:-1]
    return lines.get(loc) if loc else None  # the whole document: no line says more than the field


VARIABLE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(value: Any, environ: Mapping[str, str], path: Path, lines: Mapping[tuple, int], where: tuple) -> Any:
    """`${VAR}` and `${VAR:-default}` replaced in every string; `$${` is a literal `${`."""
    if isinstance(value, dict):
        return {k: expand(v, environ, path, lines, (*where, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, environ, path, lines, (*where, i)) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$${":
            return "${"
        name, default = match.group(1), match.group(2)
        if name in environ and (environ[name] != "" or default is None):
            return environ[name]
        if default is not None:
            return default
        raise PipelineError(
            f"{located(path, lines, where)}: ${{{name}}} is not set (export {name}=..., or write ${{{name}:-default}})"
        )

    return VARIABLE.sub(substitute, value)


def located(path: Path, lines: Mapping[tuple, int], loc: Sequence, overridden: Iterable[tuple] = ()) -> str:
    """`file:line: field` for an error message."""
    loc = tuple(loc)
    field = dotted(loc)
    if any(loc[: len(o)] == o for o in overridden):
        return f"{path} (--set {field})"
    line = line_of(lines, loc)
    place = f"{path}:{line}" if line is not None else str(path)
    return f"{place}: {field}" if field else place


def dotted(loc: Sequence) -> str:
    """('steps', 2, 'bench', 'rounds') -> 'steps[2].bench.rounds'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def apply_override(data: dict, override: str, path: Path) -> tuple:
    """`--set a.b.c=value`: value read as YAML (5 is a number, true a boolean, [a, b] a
    list); a step is addressed by its name (steps.bench.rounds=5). Returns the path set."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise PipelineError(f"--set {override}: give KEY=VALUE, e.g. steps.bench.rounds=5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts: list[Any] = key.strip().split(".")
    if len(parts) > 1 and parts[0] == "steps" and not parts[1].lstrip("-").isdigit():
        steps = data.get("steps")
        index = step_index(steps, parts[1]) if isinstance(steps, list) else None
        if index is None:
            raise PipelineError(f"--set {key}: the pipeline has no {parts[1]} step")
        if isinstance(steps[index], str):  # a bare step name becomes {name: {}} so it can take options
            steps[index] = {parts[1]: {}}
        elif steps[index][parts[1]] is None:
            steps[index][parts[1]] = {}
        parts.insert(1, index)
    node: Any = data
    loc: list = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            try:
                index = int(part)
                node[index]
            except (ValueError, IndexError):
                raise PipelineError(f"--set {key}: {dotted(loc)} has no item {part}") from None
            loc.append(index)
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise PipelineError(f"--set {key}: {dotted(loc) or 'the pipeline'} is not a mapping")
        loc.append(part)
        if last:
            node[part] = value
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
    return tuple(loc)


def step_index(steps: list, name: str) -> int | None:
    for i, entry in enumerate(steps):
        if entry == name or (isinstance(entry, dict) and len(entry) == 1 and name in entry):
            return i
    return None


def validation_message(
    exc: ValidationError, path: Path, lines: Mapping[tuple, int], overridden: Iterable[tuple]
) -> str:
    """The first error of a pydantic ValidationError as one line (and how many more)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = clean_loc(first["loc"])
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), known_fields(loc[:-1]), n=1)
        message = f"unknown field{f' (did you mean {close[0]!r}?)' if close else ''}"
    elif first["type"] == "missing":
        message = "required, not given"
    elif first["type"] in ("value_error", "assertion_error"):
        message = message.removeprefix("Value error, ")
    elif "input" in first and first["type"] != "unknown_step":
        shown = repr(first["input"])
        message += f" (got {shown if len(shown) < 60 else shown[:57] + '...'})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{located(path, lines, loc, overridden)}: {message}{more}"


def clean_loc(loc: Sequence) -> tuple:
    """pydantic's location without the union tags: ('steps', 2, 'bench', 'bench', 'rounds')
    -> ('steps', 2, 'bench', 'rounds'); ('steps', 0, 'name') -> ('steps', 0)."""
    out: list = []
    parts = list(loc)
    i = 0
    while i < len(parts):
        part = parts[i]
        if len(out) == 2 and out[0] == "steps" and isinstance(out[1], int):
            if part == "name":
                i += 1
                continue
            if i + 1 < len(parts) and parts[i + 1] == part and part in STEP_KINDS:
                i += 1  # the tag, then the same name as the entry's key
        out.append(part)
        i += 1
    return tuple(out)


def known_fields(parent: Sequence) -> list[str]:
    """The field names valid at `parent` (the mapping an unknown field was found in)."""
    if not parent:
        return list(Pipeline.model_fields)
    if parent[0] == "gates":
        return list(Gates.model_fields)
    if parent[0] == "targets":
        return list(Target.model_fields)
    if parent[0] == "steps" and len(parent) >= 3 and parent[2] in STEP_OPTIONS:
        return list(STEP_OPTIONS[parent[2]].model_fields)
    return []


def check_paths(pipeline: Pipeline, path: Path, lines: Mapping[tuple, int]) -> None:
    """The base and every adapter exist as directories; a glob matches; names are unique."""
    if not pipeline.base.is_dir():
        raise PipelineError(f"{located(path, lines, ('base',))}: {pipeline.base}: no such directory")
    given = [pipeline.adapters] if isinstance(pipeline.adapters, str) else list(pipeline.adapters)
    for i, pattern in enumerate(given):
        loc = ("adapters",) if isinstance(pipeline.adapters, str) else ("adapters", i)
        if glob.has_magic(pattern):
            if not [p for p in glob.glob(pattern) if Path(p).is_dir()]:
                raise PipelineError(f"{located(path, lines, loc)}: {pattern} matches no directory")
        elif not Path(pattern).is_dir():
            raise PipelineError(f"{located(path, lines, loc)}: {pattern}: no such adapter directory")
    seen: dict[str, Path] = {}
    for adapter in pipeline.adapter_dirs():
        name = adapter_name(adapter)
        if name in seen and seen[name].resolve() != adapter.resolve():
            raise PipelineError(
                f"{located(path, lines, ('adapters',))}: two adapters are named {name} ({seen[name]}, {adapter}); "
                "their artifacts would collide"
            )
        seen[name] = adapter
