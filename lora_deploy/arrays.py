"""Array conversions: numpy <-> torch at the border between the merge path and the torch
runtimes, float16 <-> float32 for the merge, finite checks.

Adapters and checkpoints are read as numpy arrays (ml_dtypes supplies bfloat16 and
float8), so merging never imports torch. The unmerged reference and the exporters run
torch; they convert here, once per tensor.
"""

from __future__ import annotations

import numpy as np

from lora_deploy._native import kernel
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

    Decided on the bit patterns: integer passes, several times faster than a float check;
    one pass without a temporary array by the compiled kernel (16- and 32-bit floats).
    """
    if not is_float(array) or array.size == 0:
        return True
    carrier, pattern = _NON_FINITE[array.dtype.name]
    f16 = kernel("_f16")
    if f16 is not None and array.dtype.itemsize in (2, 4) and array.flags.c_contiguous:
        return f16.max_magnitude(array.view(carrier)) < pattern
    bits = np.ascontiguousarray(array).view(carrier)
    magnitude = np.bitwise_and(bits, carrier((1 << (8 * bits.itemsize - 1)) - 1))
    return bool(magnitude.max() < pattern)


def int_range(array: np.ndarray) -> tuple[int, int] | None:
    """(smallest, largest) value of an integer array as Python ints (never wrapped through
    a narrower type: a uint64 2**63+5 stays itself); None when it is empty."""
    if not array.size:
        return None
    return int(array.min()), int(array.max())


def ints_fit(array: np.ndarray, dtype) -> bool:
    """True when every value of the integer `array` is exact in the integer `dtype`."""
    span = int_range(array)
    info = np.iinfo(dtype)
    return span is None or (info.min <= span[0] and span[1] <= info.max)


# float16 <-> float32 for the merge's blocks. numpy converts float16 one element at a time
# (~3 ns to widen, 4-5 ns to round, here). Two exact ways, with the same results bit for bit
# (NaN payloads included, see lora_deploy/_native/f16.c):
# - the compiled kernels (`_f16`: F16C/AVX2 where the CPU has them, else scalar C), one pass
#   each, without the GIL; the merge's block is one fused pass (add_scaled_to_float16);
# - numpy: a few whole-array integer and float passes that numpy vectorizes (about 0.2 ns
#   each), 2-4x faster than its casts: where the kernels are not built, or with
#   LORA_DEPLOY_NATIVE=0.
# `out` and `scratch` take preallocated arrays, so a merge's blocks allocate (and fault in)
# no fresh pages.


def float16_kernel() -> str:
    """Which float16 conversions run: "native (avx2+f16c)", "native (scalar)" or "numpy"."""
    f16 = kernel("_f16")
    return f"native ({f16.KERNEL})" if f16 is not None else "numpy"


def quant4_kernel() -> str:
    """Which NF4/FP4 pass `merge --onto` runs: "native (avx512)" etc., or "numpy" (also when
    the module is built but only its scalar code fits this CPU: numpy's passes are faster)."""
    q4 = kernel("_quant4")
    return f"native ({q4.ISA})" if q4 is not None and q4.BEST_ISA > 0 else "numpy"


def _native_f16(*pairs: tuple[np.ndarray, type]):
    """The compiled module when it is on and every array is C-contiguous of its dtype."""
    f16 = kernel("_f16")
    if f16 is None or not all(a.dtype == t and a.flags.c_contiguous for a, t in pairs):
        return None
    return f16


# Widening: every float16 bit pattern looked up in a 256 KB table (Inf and NaN only).
F16_TO_F32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
_F16_FIELDS = np.int32(-0x7000_2000)  # 0x8FFF_E000: sign, then exponent and mantissa moved up 13 bits
_TWO_112 = np.float32(2.0**112)  # rebiases the exponent (15 -> 127); exact, subnormals included
_SMALLEST_NORMAL_F16 = np.uint32(0x3880_0000)  # 2**-14, as float32 bits
_SMALLEST_NORMAL_VALUE = np.float32(2.0**-14)
_HALF = np.uint32(0x3F00_0000)  # 0.5, as float32 bits
_MAGIC_EXPONENT = np.uint32(13 << 23)  # 2**13, an exponent step: float16 keeps 10 of float32's 23 bits
_TWO_MINUS_112 = np.float32(2.0**-112)
_EXPONENT = np.uint32(0x7F80_0000)
_INF_F16 = 0x7C00


def widen_float16(array: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Exact float32 values of a float16 array (into `out`, a float32 array of its size, if given)."""
    f16 = _native_f16((array, np.float16), *([] if out is None else [(out, np.float32)]))
    if f16 is None:
        return widen_float16_numpy(array, out)
    values = np.empty(array.shape, np.float32) if out is None else out.reshape(array.shape)
    f16.widen(array, values)
    return values


def widen_float16_numpy(array: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """widen_float16 by numpy passes.

    The bits, sign-extended and moved up 13 places, are a float32 whose exponent is 112
    too small; multiplying by 2**112 fixes it exactly, float16 subnormals included. An
    exponent of all ones (Inf, NaN) would come out finite (|x| >= 2**16): those arrays
    are looked up in the table instead."""
    wide = np.empty(array.shape, np.int32) if out is None else out.reshape(array.shape).view(np.int32)
    np.copyto(wide, array.view(np.int16), casting="unsafe")
    np.left_shift(wide, 13, out=wide)
    np.bitwise_and(wide, _F16_FIELDS, out=wide)
    values = wide.view(np.float32)
    np.multiply(values, _TWO_112, out=values)
    if values.size and (values.max() >= 65536 or values.min() <= -65536):
        np.take(F16_TO_F32, array.view(np.uint16), out=values)
    return values


def round_to_float16(array: np.ndarray, out: np.ndarray, scratch: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Round a native float32 array to the nearest float16, ties to even, into `out`.

    Past float16's largest finite (65504, up to the halfway point to 65536) values become
    Inf; NaN becomes the quiet NaN 0x7E00 with its sign, payload dropped, on both paths
    (numpy's and torch's casts keep some payload bits; any NaN stays a NaN everywhere).
    `scratch` (numpy path only): a float32 and a uint32 array of at least `array.size` elements.
    """
    f16 = _native_f16((array, np.float32), (out, np.float16))
    if f16 is None:
        round_to_float16_numpy(array, out, scratch)
    elif array.size:
        f16.round(array, out)


def add_scaled_to_float16(
    w: np.ndarray,
    product: np.ndarray,
    scaling: np.float32,
    out: np.ndarray,
    wide: np.ndarray | None = None,
    scratch: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """out = float16(float32(w) + product * scaling): the merge's block, rounded once.

    The product times the scaling and the sum are each rounded to float32 (no FMA), so it
    equals those steps done one by one. The numpy path scales `product` in place and
    takes `wide` (a float32 array of w's size) and `scratch` as round_to_float16 does."""
    f16 = _native_f16((w, np.float16), (product, np.float32), (out, np.float16))
    if f16 is not None and w.shape == product.shape == out.shape:
        if w.size:
            f16.scaled_add_round(w, product, float(scaling), out)
        return
    product *= np.float32(scaling)
    product += widen_float16_numpy(w, wide)
    round_to_float16_numpy(product, out, scratch)


def round_to_float16_numpy(
    array: np.ndarray, out: np.ndarray, scratch: tuple[np.ndarray, np.ndarray] | None = None
) -> None:
    """round_to_float16 by numpy passes.

    The FPU does the rounding: |x| + c - c, with c = 2**13 times x's power of two (2**-1
    below 2**-14), rounds |x| to a multiple of its float16 quantum, ties to even (the sum
    has 23 bits below c's, of which x keeps the top 10). The rounded value times 2**-112
    is a float32 whose bits, shifted down 13 places, are the float16's (float16
    subnormals land on float32 subnormals, exactly). A result past float16's largest
    finite (a value of 2**16 or more, Inf, NaN) takes `round_bits_to_float16` instead.
    """
    if array.size == 0:
        return
    if scratch is None:
        mag, c = np.empty(array.shape, np.float32), np.empty(array.shape, np.uint32)
    else:
        mag, c = (s.reshape(-1)[: array.size].reshape(array.shape) for s in scratch)
    np.abs(array, out=mag)
    np.maximum(mag, _SMALLEST_NORMAL_VALUE, out=c.view(np.float32))  # float16's quantum is fixed below it
    np.bitwise_and(c, _EXPONENT, out=c)
    c += _MAGIC_EXPONENT
    magic = c.view(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):  # Inf/NaN/huge take the path below
        mag += magic  # the one rounding
        mag -= magic
    mag *= _TWO_MINUS_112
    bits = mag.view(np.uint32)
    bits >>= np.uint32(13)
    if bits.max() > _INF_F16:  # overflow past Inf, Inf or NaN somewhere
        round_bits_to_float16(array, out)
        return
    np.right_shift(array.view(np.uint32), np.uint32(16), out=c)
    np.bitwise_and(c, np.uint32(0x8000), out=c)
    bits |= c  # the sign
    np.copyto(out.view(np.uint16), bits, casting="unsafe")


def round_bits_to_float16(array: np.ndarray, out: np.ndarray) -> None:
    """round_to_float16 on the bit patterns alone (the path for overflow, Inf and NaN).

    For a normal result, adding 0xFFF plus the lowest kept mantissa bit, then dropping 13
    bits, rounds to nearest even (a carry runs into the exponent, up to Inf), and the
    exponent is rebiased (127 -> 15) by a subtraction. Subnormal results are rounded by
    the FPU: adding 0.5 leaves |x| in units of 2**-24, their quantum. Overflow gives Inf
    and NaN stays NaN, as numpy's cast does.
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
