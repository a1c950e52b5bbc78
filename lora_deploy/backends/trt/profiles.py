"""Optimization profiles: min, opt and max shapes for every dynamic input of an ONNX graph.

`--shapes input_ids:1x1,1x128,8x512` gives one input's three shapes (one shape, `1x128`,
fixes it). Inputs that share a named dynamic dim (batch, sequence) share its sizes, so
naming input_ids is enough for attention_mask too. What no spec names comes from
DEFAULT_DIMS by the dim's name; a dynamic dim with neither is refused, naming it.
Pure Python: no TensorRT.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from lora_deploy.errors import BadInputError

Shape = tuple[int, ...]
# Defaults by dim name (min, opt, max): the export names its dims batch and sequence.
DEFAULT_DIMS: dict[str, tuple[int, int, int]] = {"batch": (1, 1, 8), "sequence": (1, 128, 512)}


@dataclass(frozen=True)
class InputProfile:
    name: str
    min: Shape
    opt: Shape
    max: Shape

    def as_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def onnx_inputs(path: str | os.PathLike) -> dict[str, list[int | str]]:
    """{input name: dims}, an int for a fixed dim and the dim's name for a dynamic one
    (initializers that are also inputs, LoRA defaults, are not inputs to profile)."""
    import onnx

    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as exc:
        raise BadInputError(f"{path}: not a readable ONNX model ({exc})") from exc
    initializers = {i.name for i in model.graph.initializer}
    out: dict[str, list[int | str]] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims: list[int | str] = []
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                dims.append(int(dim.dim_value))
            else:
                dims.append(dim.dim_param or f"{value.name}:{axis}")
        out[value.name] = dims
    return out


def parse_shape_specs(specs: Iterable[str]) -> dict[str, tuple[Shape, Shape, Shape]]:
    """`name:MINxD,OPTxD,MAXxD` (or `name:AxB` for one fixed shape) -> {name: (min, opt, max)}."""
    parsed: dict[str, tuple[Shape, Shape, Shape]] = {}
    for spec in specs:
        name, sep, shapes = spec.rpartition(":")
        if not sep or not name or not shapes:
            raise BadInputError(f"--shapes {spec!r}: expected NAME:MIN,OPT,MAX, e.g. input_ids:1x1,1x128,8x512")
        if name in parsed:
            raise BadInputError(f"--shapes names {name!r} twice")
        parts = [parse_shape(p, spec) for p in shapes.split(",")]
        if len(parts) == 1:
            parts *= 3
        if len(parts) != 3:
            raise BadInputError(f"--shapes {spec!r}: give one shape or three (min,opt,max), not {len(parts)}")
        if len({len(p) for p in parts}) != 1:
            raise BadInputError(f"--shapes {spec!r}: min, opt and max have different ranks")
        low, opt, high = parts
        if not all(a <= b <= c for a, b, c in zip(low, opt, high)):
            raise BadInputError(f"--shapes {spec!r}: needs min <= opt <= max in every dim")
        parsed[name] = (low, opt, high)
    return parsed


def parse_shape(text: str, spec: str) -> Shape:
    try:
        dims = tuple(int(d) for d in text.strip().lower().split("x"))
    except ValueError:
        raise BadInputError(f"--shapes {spec!r}: {text!r} is not a shape like 8x512") from None
    if not dims or any(d < 1 for d in dims):
        raise BadInputError(f"--shapes {spec!r}: dims must be positive integers")
    return dims


def build_profiles(inputs: Mapping[str, list[int | str]], specs: Iterable[str] = ()) -> list[InputProfile]:
    """One profile entry per dynamic input, from the specs, the dims they name, and the defaults."""
    given = parse_shape_specs(specs)
    unknown = sorted(set(given) - set(inputs))
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise BadInputError(f"--shapes names {names}; the model's inputs are {', '.join(inputs)}")
    by_dim: dict[str, tuple[int, int, int]] = {}  # named dim -> sizes, from the specs
    for name, (low, opt, high) in given.items():
        dims = inputs[name]
        if len(dims) != len(low):
            raise BadInputError(f"--shapes {name}: rank {len(low)}, but the input has rank {len(dims)} {dims}")
        for axis, dim in enumerate(dims):
            sizes = (low[axis], opt[axis], high[axis])
            if isinstance(dim, int):
                if sizes != (dim, dim, dim):
                    raise BadInputError(f"--shapes {name}: dim {axis} is fixed at {dim} in the model, not {sizes}")
                continue
            seen = by_dim.setdefault(dim, sizes)
            if seen != sizes:
                raise BadInputError(f"--shapes: dim {dim!r} of {name} is {sizes} but another input gave {seen}")
    profiles = []
    for name, dims in inputs.items():
        if all(isinstance(d, int) for d in dims):
            continue  # static: TensorRT takes it as it is
        per_dim: list[tuple[int, int, int]] = []
        for axis, dim in enumerate(dims):
            if isinstance(dim, int):
                per_dim.append((dim, dim, dim))
            elif dim in by_dim:
                per_dim.append(by_dim[dim])
            elif dim in DEFAULT_DIMS:
                per_dim.append(DEFAULT_DIMS[dim])
            else:
                raise BadInputError(
                    f"input {name} dim {axis} ({dim!r}) is dynamic with no default: give --shapes {name}:MIN,OPT,MAX"
                )
        profiles.append(InputProfile(name, *(tuple(s[i] for s in per_dim) for i in range(3))))
    return profiles
