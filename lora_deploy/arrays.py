"""numpy <-> torch, at the border between the merge path and the torch runtimes.

Adapters and checkpoints are read as numpy arrays (ml_dtypes supplies bfloat16 and
float8), so merging never imports torch. The unmerged reference and the exporters run
torch; they convert here, once per tensor.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

# dtypes numpy lacks natively, and the same-width integer each is viewed through.
_VIEWS = {
    np.dtype(ml_dtypes.bfloat16): ("bfloat16", np.int16),
    np.dtype(ml_dtypes.float8_e4m3fn): ("float8_e4m3fn", np.uint8),
    np.dtype(ml_dtypes.float8_e5m2): ("float8_e5m2", np.uint8),
}


def to_torch(array: np.ndarray):
    """A torch tensor with the array's dtype and values (shares memory when it can)."""
    import torch

    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # torch tensors are always writable
        array = array.copy()
    if array.dtype in _VIEWS:
        name, carrier = _VIEWS[array.dtype]
        return torch.from_numpy(array.view(carrier)).view(getattr(torch, name))
    return torch.from_numpy(array)


def from_torch(tensor) -> np.ndarray:
    """A CPU numpy array with the tensor's dtype and values."""
    import torch

    t = tensor.detach().cpu().contiguous()
    for np_dtype, (name, carrier) in _VIEWS.items():
        if t.dtype == getattr(torch, name):
            return t.view(getattr(torch, np.dtype(carrier).name)).numpy().view(np_dtype)
    return t.numpy()


def is_float(array: np.ndarray) -> bool:
    return array.dtype.kind == "f" or array.dtype in _VIEWS


def all_finite(array: np.ndarray) -> bool:
    """True when no element is NaN or Inf.

    The float64 sum of finite float32 (or narrower) values cannot overflow, and any NaN
    or Inf poisons it: one pass with no temporary array decides.
    """
    if not is_float(array) or array.size == 0:
        return True
    if array.dtype == np.float64:
        return bool(np.isfinite(array).all())
    return bool(np.isfinite(np.sum(array, dtype=np.float64)))
