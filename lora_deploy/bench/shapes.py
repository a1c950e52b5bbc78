"""The shapes a bench run times: "8x128" (batch x sequence) or "8x1+512" (a decode step
after 512 cached tokens), parsed, checked and turned back into report keys."""

from __future__ import annotations

import re
from collections.abc import Sequence

from lora_deploy.errors import BadInputError
from lora_deploy.modeling.samples import check_input_size

# (batch, seq), or (batch, seq, past) for a decode step of a KV-cache graph: seq new tokens
# per row after past cached ones ("8x1+512"). A plain shape on a KV-cache graph is a prefill.
Shape = tuple[int, ...]

DEFAULT_SHAPES = "1x1,1x128,8x128"

SHAPE_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*(?:\+\s*(\d+)\s*)?$")


def shape_key(shape: Shape) -> str:
    """(8, 128) -> '8x128', (8, 1, 512) -> '8x1+512': the key used in the report."""
    return f"{shape[0]}x{shape[1]}" + (f"+{shape[2]}" if len(shape) > 2 and shape[2] else "")


def _parse_one_shape(item: str) -> Shape:
    match = SHAPE_RE.match(item)
    if not match:
        raise BadInputError(f"bad shape {item!r}: expected BATCHxSEQ (8x128) or BATCHxSEQ+PAST (8x1+512)")
    batch, seq = int(match.group(1)), int(match.group(2))
    if batch < 1 or seq < 1:
        raise BadInputError(f"bad shape {item!r}: batch and sequence length must be >= 1")
    past = int(match.group(3) or 0)
    return (batch, seq, past) if past else (batch, seq)


def parse_shapes(text: str) -> list[Shape]:
    """'1x1,1x128,8x128' -> [(1, 1), (1, 128), (8, 128)]; garbage -> BadInputError."""
    if not isinstance(text, str) or not text.strip():
        raise BadInputError("no shapes given: expected e.g. 1x1,1x128,8x128")
    shapes = [_parse_one_shape(item) for item in text.split(",")]
    # Results are keyed by shape, so a repeat would silently overwrite one.
    seen: set[Shape] = set()
    for shape in shapes:
        if shape in seen:
            raise BadInputError(f"shape {shape_key(shape)} is listed twice")
        seen.add(shape)
        # Refused now with an estimate, not by a MemoryError (or the OOM killer) after loading.
        check_input_size(shape[0], sum(shape[1:]), what=f"shape {shape_key(shape)}")
    return shapes


def as_shape(key: Shape | str) -> Shape:
    """A report key or a shape tuple -> the checked shape tuple."""
    return _parse_one_shape(key) if isinstance(key, str) else _parse_one_shape(shape_key(tuple(map(int, key))))


def as_shapes(shapes: str | Sequence[Shape]) -> list[Shape]:
    """`--shapes` text or a list of shapes -> checked shapes (`parse_shapes`)."""
    if isinstance(shapes, str):
        return parse_shapes(shapes)
    return parse_shapes(",".join(shape_key(shape) for shape in shapes))
