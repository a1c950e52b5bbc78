"""The numpy side of the merge path against torch: dtype round trips and the finite check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_deploy.arrays import all_finite, from_torch, to_torch

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.int64, torch.int8, torch.uint8, torch.bool]


def values(dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(257, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 40
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_keeps_dtype_and_bits(dtype):
    t = values(dtype)
    back = to_torch(from_torch(t))
    assert back.dtype == dtype
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d.is_floating_point], ids=str)
@pytest.mark.parametrize("special", [float("nan"), float("inf"), float("-inf"), None])
def test_finite_check_agrees_with_torch(dtype, special):
    t = values(dtype)
    if special is not None:
        t[100] = torch.tensor(special, dtype=torch.float64).to(dtype)
    edges = torch.tensor([torch.finfo(dtype).max, -torch.finfo(dtype).max, torch.finfo(dtype).tiny, -0.0],
                         dtype=torch.float64).to(dtype)
    t = torch.cat([t, edges])
    assert all_finite(from_torch(t)) == bool(torch.isfinite(t.double()).all())


def test_scalars_stay_scalars():
    assert to_torch(np.float32(2.5).reshape(())).shape == ()
    assert from_torch(torch.tensor(1.5, dtype=torch.bfloat16)).shape == ()


def test_reads_larger_than_one_pread(tmp_path, monkeypatch):
    """Linux returns at most ~2 GiB per pread: a larger tensor takes several."""
    import os

    from lora_deploy import checkpoint

    data = os.urandom(10_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    real = os.pread
    monkeypatch.setattr(checkpoint.os, "pread", lambda fd, n, off: real(fd, min(n, 777), off))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert checkpoint.pread_all(fd, 9_000, 500, path) == data[500:9_500]
    finally:
        os.close(fd)
