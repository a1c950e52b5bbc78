"""The merge math: pure functions on numpy arrays, one place per layer kind and variant.

Every function computes in float32 and returns float32; the caller rounds once to the
output dtype. (PEFT instead rounds the delta to the weight's dtype and adds there, which
in float16/bfloat16 can land one ulp away from the correctly rounded sum.) The exception:
a float64 weight, or a float64 output, is merged in float64 (A and B widened, the product
in float64), as PEFT does it, so its merge keeps float64's precision.
"""

from __future__ import annotations

import threading

import numpy as np

from lora_deploy.adapter.read import LoraModule, weight_shape
from lora_deploy.arrays import add_scaled_to_float16, all_finite, round_to_float16, widen_float16
from lora_deploy.errors import NonFiniteError
from lora_deploy.merge.blocks import for_each_block


def f32(array: np.ndarray) -> np.ndarray:
    return np.asarray(array).astype(np.float32, copy=False)


# Elements per block of a blocked merge: a float32 block of 1 MB stays in cache while it
# is multiplied, scaled, added to W0 and rounded.
BLOCK_ELEMENTS = 256 * 1024


def factors(module: LoraModule, kind: str, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """(left, right), float32 (or `dtype`), with left @ right = B A in the weight's layout,
    as 2-D.

    Rows of `left` are rows of the weight (convolution kernels flattened), so any block
    of weight rows is a block of `left` times all of `right`.
    """
    a, b = np.asarray(module.a).astype(dtype, copy=False), np.asarray(module.b).astype(dtype, copy=False)
    if kind == "linear":
        return b, a
    if kind in ("transposed", "embedding"):
        return a.T, b.T
    if kind == "conv":
        # B is a 1x1 kernel, so composing the two convolutions (what PEFT computes with a
        # conv of A by B) is a product over r at every kernel position.
        return b.reshape(b.shape[0], b.shape[1]), a.reshape(a.shape[0], -1)
    raise ValueError(f"unknown layer kind {kind!r}")


def delta_weight(module: LoraModule, kind: str) -> np.ndarray:
    """s * B A in the base weight's layout, float32."""
    left, right = factors(module, kind)
    product = left @ right
    product *= np.float32(module.scaling)  # in place: as large as the weight
    return product.reshape(weight_shape(module, kind))


def working_dtype(w0: np.ndarray, dtype=None) -> type:
    """The merge's working precision: float64 when the weight or the output is float64,
    else float32."""
    wide = np.asarray(w0).dtype == np.float64 or (dtype is not None and np.dtype(dtype) == np.float64)
    return np.float64 if wide else np.float32


def merged_weight(module: LoraModule, kind: str, w0: np.ndarray, dtype=None) -> np.ndarray:
    """W0 merged with the module's update, by the math of its variant (`LoraModule.variant`),
    computed in float32 (float64 for a float64 weight or output, see `working_dtype`) and
    rounded once to `dtype` (default: that working dtype)."""
    work = working_dtype(w0, dtype)
    dtype = work if dtype is None else dtype
    if work == np.float64:
        return merged_weight_float64(module, kind, w0, dtype)
    return MERGED_WEIGHT[module.variant](module, kind, w0, dtype)


def merged_weight_float64(module: LoraModule, kind: str, w0: np.ndarray, dtype) -> np.ndarray:
    """W0 + s B A (DoRA: rescaled to the magnitudes) in float64, rounded once to `dtype`."""
    left, right = factors(module, kind, np.float64)
    w = left @ right
    w *= np.float64(module.scaling)
    w = w.reshape(weight_shape(module, kind))
    w += np.asarray(w0, dtype=np.float64)
    if module.variant == "dora":
        w = dora_rescale(w, np.asarray(module.magnitude, dtype=np.float64).reshape(-1), kind)
    return w.astype(dtype, copy=False)


_scratch = threading.local()


def block_scratch(size: int) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """This thread's float32 arrays for a block of `size` elements: the product, the
    widened W0, and round_to_float16's scratch. Reused from block to block, so the merge
    does not fault in fresh pages for every block."""
    arrays = getattr(_scratch, "arrays", None)
    if arrays is None or arrays[0].size < size:
        n = max(size, BLOCK_ELEMENTS)
        arrays = np.empty(n, np.float32), np.empty(n, np.float32), (np.empty(n, np.float32), np.empty(n, np.uint32))
        _scratch.arrays = arrays
    return arrays


def lora_merged_weight(module: LoraModule, kind: str, w0: np.ndarray, dtype=np.float32) -> np.ndarray:
    """W0 + s B A, a block of rows at a time: each block is multiplied, scaled, added and
    rounded while in cache, and no float32 copy of the whole weight is made."""
    left, right = factors(module, kind)
    scaling = np.float32(module.scaling)
    base = w0.reshape(left.shape[0], right.shape[1])
    out = np.empty(base.shape, dtype)
    rows = max(1, BLOCK_ELEMENTS // max(1, right.shape[1]))

    def merge_block(i: int) -> None:
        w = base[i : i + rows]
        product, wide, scratch = block_scratch(w.size)
        block = product[: w.size].reshape(w.shape)
        np.matmul(left[i : i + rows], right, out=block)
        if w.dtype == np.float16 and out.dtype == np.float16:  # one pass where the kernel is built
            add_scaled_to_float16(w, block, scaling, out[i : i + rows], wide[: w.size], scratch)
            return
        block *= scaling
        block += widen_float16(w, wide[: w.size]) if w.dtype == np.float16 else w  # numpy casts the others
        if out.dtype == np.float16:
            round_to_float16(block, out[i : i + rows], scratch)  # the one rounding
        else:
            out[i : i + rows] = block  # the one rounding

    for_each_block(merge_block, range(0, out.shape[0], rows))
    return out.reshape(w0.shape)


def dora_merged_weight(module: LoraModule, kind: str, w0: np.ndarray, dtype=np.float32) -> np.ndarray:
    """m / ||W0 + s B A|| * (W0 + s B A), whole: the norms need whole rows or columns."""
    w = delta_weight(module, kind)
    w += w0
    w = dora_rescale(w, f32(module.magnitude).reshape(-1), kind)
    return w.astype(dtype, copy=False)


def dora_scale(w: np.ndarray, magnitude: np.ndarray, kind: str) -> np.ndarray:
    """m / ||W|| per output feature: one value per row of a Linear weight, per column of a
    transposed one, per embedding dimension, per output channel of a convolution.

    The norm is taken over the input features, as PEFT computes DoRA.
    """
    if kind == "linear":
        return magnitude / np.linalg.norm(w, axis=1)
    if kind in ("transposed", "embedding"):
        return magnitude / np.linalg.norm(w, axis=0)
    if kind == "conv":
        return magnitude / np.linalg.norm(w.reshape(w.shape[0], -1), axis=1)
    raise ValueError(f"unknown layer kind {kind!r}")


def dora_rescale(w: np.ndarray, magnitude: np.ndarray, kind: str) -> np.ndarray:
    """Scale each output feature of W to the learned magnitude."""
    return w * feature_axis(dora_scale(w, magnitude, kind), kind, w.ndim)


def feature_axis(scale: np.ndarray, kind: str, ndim: int) -> np.ndarray:
    """Shape a per-output-feature vector to broadcast against a weight of this kind."""
    if kind in ("transposed", "embedding"):
        return scale.reshape(1, -1)
    return scale.reshape(-1, *([1] * (ndim - 1)))


def merged_bias(module: LoraModule, b0: np.ndarray) -> np.ndarray:
    """Base bias plus the scaled lora_B bias (PEFT's lora_bias), float32 (float64 for a
    float64 bias)."""
    if np.asarray(b0).dtype == np.float64:
        return b0 + np.asarray(module.bias, dtype=np.float64) * np.float64(module.scaling)
    return f32(b0) + f32(module.bias) * np.float32(module.scaling)


# The merge math of each variant with per-layer math (see lora_deploy.adapter.variants).
MERGED_WEIGHT = {"lora": lora_merged_weight, "dora": dora_merged_weight}


def lora_norm(module: LoraModule) -> float:
    """||s B A||_F without forming B A: sqrt(sum((A A^T) * (B^T B))), in float64.

    The norm ignores layout (a transpose or a reshape keeps it), so one formula serves
    every kind, at r x r cost instead of a pass over the full weight.
    """
    r = module.b.shape[1]
    a = np.asarray(module.a, dtype=np.float64).reshape(r, -1)
    b = np.asarray(module.b, dtype=np.float64).reshape(-1, r)
    gram = np.sum((a @ a.T) * (b.T @ b))
    return float(abs(module.scaling) * np.sqrt(max(gram, 0.0)))


# -- finite outputs -------------------------------------------------------------------------
# The rule: the merge never writes a NaN or Inf its input does not hold. A tensor copied
# (byte for byte, or converted to --dtype) keeps the base's own NaN/Inf where they are, but
# a conversion that turns a finite value non-finite (beyond float16's range) is refused. A
# tensor computed from the base (merged, quantized with --onto, dequantized FP8) is refused
# when its base already holds NaN/Inf: the update cannot be applied there, and DoRA's norms
# or a quantization block spread it to other values.


def checked_finite(array: np.ndarray, name: str, source: np.ndarray | None = None, what: str = "merged") -> np.ndarray:
    """`array`, or NonFiniteError when it holds NaN or Inf, naming `source` (the base
    tensor it was computed from) when that is where they come from. Checked after
    rounding: a float16 output can overflow to Inf even when float32 did not."""
    if all_finite(array):
        return array
    if source is not None and not all_finite(source):
        raise NonFiniteError(f"base tensor {name} already holds NaN or Inf values (no {what} weight computed from it)")
    raise NonFiniteError(
        f"{what} tensor {name} has NaN or Inf values (overflow in the output dtype, {array.dtype.name}?)"
    )


def converted(array: np.ndarray, dtype, name: str) -> np.ndarray:
    """`array` as `dtype`, its own NaN/Inf kept; NonFiniteError when the conversion turns a
    finite value into Inf. One finite pass over the result; the input is looked at only
    when that fails."""
    with np.errstate(over="ignore"):  # an overflow is refused below, naming the tensor
        out = array.astype(dtype)
    if all_finite(out):
        return out
    made_up = np.isfinite(array.astype(np.float64)) & ~np.isfinite(out.astype(np.float64))
    if made_up.any():
        value = array.reshape(-1)[np.flatnonzero(made_up)[0]]
        raise NonFiniteError(
            f"tensor {name}: {float(value):g} is beyond {np.dtype(dtype).name}'s range "
            f"(converting {array.dtype.name} to {np.dtype(dtype).name} would make it Inf)"
        )
    return out
