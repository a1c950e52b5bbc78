"""The one dtype table: every name a dtype has in the formats we read and write.

safetensors headers say "F16", ONNX says elem type 10, ONNX Runtime says "tensor(float16)",
numpy says float16 and the CLI says float16. Each row below ties those names together, so
no module keeps a private mapping that can drift from the others. torch is looked up by
name, lazily: the merge path never imports it. So is ml_dtypes (bfloat16, float8), on the
first use of one of its types: importing ml_dtypes 0.7 costs about 1 s of CPU (0.5 and 0.6:
nothing measurable), which a float16 or float32 merge need not pay.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from lora_deploy.errors import BadInputError


@dataclass(frozen=True)
class DType:
    name: str  # the user-facing name: float32, bfloat16, int64
    safetensors: str  # the safetensors header code: F32, BF16, I64
    numpy_type: Any  # a numpy scalar type, or the name of an ml_dtypes one (bfloat16, float8)
    onnx: int | None  # onnx.TensorProto element type (None: ONNX has no such type we use)
    mantissa_bits: int | None = None  # floats: explicit mantissa bits, for "one rounding"
    min_exponent: int | None = None  # floats: exponent of the smallest normal number

    @property
    def numpy(self) -> np.dtype:
        """The numpy dtype, little-endian (imports ml_dtypes for its types)."""
        return _numpy_dtype(self.numpy_type)

    @property
    def is_float(self) -> bool:
        return self.mantissa_bits is not None

    @property
    def ort(self) -> str:
        """ONNX Runtime's type string, e.g. tensor(float16)."""
        return f"tensor({_ORT_NAMES.get(self.name, self.name)})"

    def torch(self):
        """The torch dtype (imports torch)."""
        import torch

        return getattr(torch, self.name)


@functools.cache
def _numpy_dtype(t: Any) -> np.dtype:
    if isinstance(t, str):
        import ml_dtypes

        t = getattr(ml_dtypes, t)
    d = np.dtype(t)
    return d.newbyteorder("<") if d.itemsize > 1 else d


# ONNX TensorProto element types, fixed by the ONNX spec (onnx is not imported for them).
_ROWS = (
    DType("float64", "F64", np.float64, 11, 52, -1022),
    DType("float32", "F32", np.float32, 1, 23, -126),
    DType("float16", "F16", np.float16, 10, 10, -14),
    DType("bfloat16", "BF16", "bfloat16", 16, 7, -126),
    DType("float8_e4m3fn", "F8_E4M3", "float8_e4m3fn", 17, 3, -6),
    DType("float8_e5m2", "F8_E5M2", "float8_e5m2", 19, 2, -14),
    DType("int64", "I64", np.int64, 7),
    DType("int32", "I32", np.int32, 6),
    DType("int16", "I16", np.int16, 5),
    DType("int8", "I8", np.int8, 3),
    DType("uint8", "U8", np.uint8, 2),
    DType("bool", "BOOL", np.bool_, 9),
)
_ORT_NAMES = {"float32": "float", "float64": "double"}

BY_NAME: dict[str, DType] = {d.name: d for d in _ROWS}
BY_SAFETENSORS: dict[str, DType] = {d.safetensors: d for d in _ROWS}
BY_ORT: dict[str, DType] = {d.ort: d for d in _ROWS}
BY_ONNX: dict[int, DType] = {d.onnx: d for d in _ROWS if d.onnx is not None}
FLOATS = tuple(d.name for d in _ROWS if d.is_float and not d.name.startswith("float8"))  # float8 is storage only


class _NumpyBySafetensors(Mapping):
    """safetensors code -> numpy dtype, each resolved when looked up: reading a float16
    checkpoint never imports ml_dtypes."""

    def __getitem__(self, code: str) -> np.dtype:
        return BY_SAFETENSORS[code].numpy

    def __iter__(self) -> Iterator[str]:
        return iter(BY_SAFETENSORS)

    def __len__(self) -> int:
        return len(BY_SAFETENSORS)


NUMPY_BY_SAFETENSORS: Mapping[str, np.dtype] = _NumpyBySafetensors()


def dtype(name: str, choices: tuple[str, ...] | None = None, what: str = "dtype") -> DType:
    """The row for a user-facing name, refused with one line unless it is among `choices`."""
    allowed = choices if choices is not None else tuple(BY_NAME)
    if name not in allowed:
        raise BadInputError(f"unknown {what} {name!r} (choose {', '.join(allowed)})")
    return BY_NAME[name]


def of_numpy(array_dtype) -> DType:
    """The row for a numpy dtype (byte order ignored)."""
    wanted = np.dtype(array_dtype)
    row = BY_NAME.get(wanted.name)  # by name first, so a float16 array does not import ml_dtypes
    if row is not None and row.numpy == _numpy_dtype(wanted):
        return row
    raise BadInputError(f"unsupported dtype {wanted}")


def of_torch(torch_dtype) -> DType:
    """The row for a torch dtype."""
    name = str(torch_dtype).removeprefix("torch.")
    if name not in BY_NAME:
        raise BadInputError(f"unsupported dtype {name}")
    return BY_NAME[name]
