"""Array conversions: numpy <-> torch at the border between the merge path and the torch
runtimes, float16 <-> float32 for the merge, finite checks.

Adapters and checkpoints are read as numpy arrays (ml_dtypes supplies bfloat16 and
float8), so merging never imports torch. The unmerged reference and the exporters run
torch; they convert here, once per tensor.
"""

from __future__ import annotations

import numpy as np

from lora_deploy.dtypes import BY_NAME, of_numpy


def _needs_view(np_dtype: np.dtype) -> bool:
    """ml_dtypes' types (bfloat16, float8): numpy user-defined dtypes (isbuiltin 2), which
    torch.from_numpy refuses; they cross as the same-width integer and are viewed back."""
    return np_dtype.isbuiltin == 2


def _carrier(np_dtype: np.dtype) -> np.dtype:
    return np.dtype(f"int{8 * np_dtype.itemsize}")


def to_torch(array: np.ndarray):
    """A torch tensor with the array's dtype and values (shares memory when it can)."""
    import torch

    array = np.ascontiguousarray(array).reshape(np.shape(array))  # ascontiguousarray makes 0-d arrays 1-d
    if not array.flags.writeable:  # torch tensors are always writable
        array = array.copy()
    if _needs_view(array.dtype):
        return torch.from_numpy(array.view(_carrier(array.dtype))).view(of_numpy(array.dtype).torch())
    return torch.from_numpy(array)


def from_torch(tensor) -> np.ndarray:
    """A CPU numpy array with the tensor's dtype and values."""
    import torch

    t = tensor.detach().cpu().contiguous()
    row = BY_NAME.get(str(t.dtype).removeprefix("torch."))
    if row is not None and _needs_view(row.numpy):
        return t.view(getattr(torch, _carrier(row.numpy).name)).numpy().view(row.numpy)
    return t.numpy()


# Per float dtype: the unsigned integer of its width, and its bit pattern with every
# exponent bit set. Clearing the sign, a value is NaN or Inf exactly when its bits are at
# least that pattern (float8_e4m3fn has no Inf: all bits set below the sign is its NaN).
# Keyed by the dtype's name, so the ml_dtypes ones need no import of ml_dtypes (lora_deploy.dtypes).
_NON_FINITE = {
    "float64": (np.uint64, 0x7FF0_0000_0000_0000),
    "float32": (np.uint32, 0x7F80_0000),
    "float16": (np.uint16, 0x7C00),
    "bfloat16": (np.uint16, 0x7F80),
    "float8_e5m2": (np.uint8, 0x7C),
    "float8_e4m3fn": (np.uint8, 0x7F),
}


def is_float(array: np.ndarray) -> bool:
    return array.dtype.name in _NON_FINITE and array.dtype.isnative


def all_finite(array: np.ndarray) -> bool:
    """True when no element is NaN or Inf.

    Decided on the bit patterns: integer passes, several times faster than a float check.
    """
    if not is_float(array) or array.size == 0:
        return True
    carrier, pattern = _NON_FINITE[array.dtype.name]
    bits = np.ascontiguousarray(array).view(carrier)
    magnitude = np.bitwise_and(bits, carrier((1 << (8 * bits.itemsize - 1)) - 1))
    return bool(magnitude.max() < pattern)


# float16 <-> float32 for the merge's blocks. numpy converts float16 one element at a time
# (~3 ns to widen, 4-5 ns to round, here); these are exact and about 1.6x-2x faster.

# Widening: every float16 bit pattern looked up in a 256 KB table.
F16_TO_F32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
_SMALLEST_NORMAL_F16 = np.uint32(0x3880_0000)  # 2**-14, as float32 bits
_HALF = np.uint32(0x3F00_0000)  # 0.5, as float32 bits


def widen_float16(array: np.ndarray) -> np.ndarray:
    return np.take(F16_TO_F32, array.view(np.uint16))


def round_to_float16(array: np.ndarray, out: np.ndarray) -> None:
    """Round a native float32 array to the nearest float16, ties to even, into `out`.

    On the bit patterns: for a normal result, adding 0xFFF plus the lowest kept mantissa
    bit, then dropping 13 bits, rounds to nearest even (a carry runs into the exponent,
    up to Inf), and the exponent is rebiased (127 -> 15) by a subtraction. Subnormal
    results are rounded by the FPU: adding 0.5 leaves |x| in units of 2**-24, their
    quantum. Overflow gives Inf and NaN stays NaN, as numpy's cast does.
    """
    bits = array.view(np.uint32)
    t = bits & np.uint32(0x7FFF_FFFF)
    tiny = t < _SMALLEST_NORMAL_F16
    odd = t >> np.uint32(13)
    odd &= np.uint32(1)
    t += odd
    t += np.uint32(0xFFF)
    t >>= np.uint32(13)
    t -= np.uint32(112 << 10)  # wraps below for tiny values, which are replaced next
    np.minimum(t, np.uint32(0x7C00), out=t)
    if tiny.any():
        t[tiny] = (np.abs(array[tiny]) + np.float32(0.5)).view(np.uint32) - _HALF
    if t.max() == 0x7C00:  # Inf or NaN somewhere: NaN was clamped to Inf above
        t[(bits & np.uint32(0x7FFF_FFFF)) > np.uint32(0x7F80_0000)] = 0x7E00
    sign = bits >> np.uint32(16)
    sign &= np.uint32(0x8000)
    t |= sign
    np.copyto(out.view(np.uint16), t, casting="unsafe")
