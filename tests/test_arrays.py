"""The numpy side of the merge path against torch: dtype round trips, the finite check, and
the merge's own float16 conversions against numpy's and torch's, by both of their paths (the
compiled kernels of lora_deploy/_native/f16.c, and numpy passes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_deploy._native import kernel
from lora_deploy.arrays import (
    add_scaled_to_float16,
    all_finite,
    float16_kernel,
    from_torch,
    int_range,
    ints_fit,
    round_bits_to_float16,
    round_to_float16,
    to_torch,
    widen_float16,
)

DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int64,
    torch.int8,
    torch.uint8,
    torch.bool,
]


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
def test_finite_check_agrees_with_torch(dtype, special, float16_path):
    t = values(dtype)
    if special is not None:
        t[100] = torch.tensor(special, dtype=torch.float64).to(dtype)
    edges = torch.tensor(
        [torch.finfo(dtype).max, -torch.finfo(dtype).max, torch.finfo(dtype).tiny, -0.0], dtype=torch.float64
    ).to(dtype)
    t = torch.cat([t, edges])
    assert all_finite(from_torch(t)) == bool(torch.isfinite(t.double()).all())


def test_scalars_stay_scalars():
    assert to_torch(np.float32(2.5).reshape(())).shape == ()
    assert from_torch(torch.tensor(1.5, dtype=torch.bfloat16)).shape == ()


def test_integer_ranges_are_exact_and_fit_only_where_every_value_does():
    big = np.array([5, 2**63 + 5], np.uint64)
    assert int_range(big) == (5, 2**63 + 5)  # not wrapped through int64
    assert not ints_fit(big, np.int64) and ints_fit(big[:1], np.int64)
    assert ints_fit(np.array([0, 255]), np.uint8) and not ints_fit(np.array([-1, 3]), np.uint8)
    assert not ints_fit(np.array([256]), np.uint8)
    assert int_range(np.zeros(0, np.int8)) is None and ints_fit(np.zeros(0, np.int64), np.uint8)


def test_reads_larger_than_one_pread(tmp_path, monkeypatch):
    """Linux returns at most ~2 GiB per pread: a larger tensor takes several."""
    import os

    from lora_deploy.io import fileio

    data = os.urandom(10_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    real = os.pread
    monkeypatch.setattr(fileio.os, "pread", lambda fd, n, off: real(fd, min(n, 777), off))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert fileio.pread_all(fd, 9_000, 500, path) == data[500:9_500]
    finally:
        os.close(fd)


def same_float16(got: np.ndarray, want: np.ndarray) -> bool:
    """Bit for bit, except that any NaN matches any NaN."""
    return bool(np.all((got.view(np.uint16) == want.view(np.uint16)) | (np.isnan(got) & np.isnan(want))))


@pytest.fixture(params=["native", "numpy"])
def float16_path(request, monkeypatch):
    """Each float16 test runs on the compiled kernels (skipped where they are not built) and
    on the numpy passes (LORA_DEPLOY_NATIVE=0)."""
    if request.param == "numpy":
        monkeypatch.setenv("LORA_DEPLOY_NATIVE", "0")
        assert float16_kernel() == "numpy"
    else:
        monkeypatch.delenv("LORA_DEPLOY_NATIVE", raising=False)
        if kernel("_f16") is None:
            pytest.skip("lora_deploy._native._f16 is not built (no C compiler at install)")
        assert float16_kernel().startswith("native")
    return request.param


def test_widening_float16_is_exact_for_every_value(float16_path):
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    got = widen_float16(every)
    for want in (every.astype(np.float32), torch.from_numpy(every).float().numpy()):
        assert np.all((got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want)))


def test_widening_finite_float16_takes_the_arithmetic_path(float16_path):
    """Without Inf or NaN in the array no value is looked up in the table; every finite
    float16 still widens exactly, into a given array too."""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = every[np.isfinite(every)].reshape(-1, 2)
    out = np.full(finite.size, np.nan, np.float32)
    got = widen_float16(finite, out)
    want = torch.from_numpy(finite).float().numpy()
    assert got.shape == finite.shape and np.shares_memory(got, out)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def rounding_cases() -> np.ndarray:
    """float32 values covering every rounding decision of the conversion to float16.

    For normal results the decision depends on the 19 high bits (sign, exponent, kept
    mantissa) and on the 13 dropped ones relative to half: all 2**19 high patterns, each
    with dropped bits just below, at and above half, zero and all ones. Subnormal results
    round at 2**-24: exact ties and their neighbours, plus random values in that range.
    """
    high = np.arange(1 << 19, dtype=np.uint32) << np.uint32(13)
    dropped = np.array([0, 1, 0x7FF, 0xFFF, 0x1000, 0x1001, 0x17FF, 0x1FFF], dtype=np.uint32)
    normal = (high[:, None] | dropped[None, :]).reshape(-1).view(np.float32)
    ties = ((np.arange(1025, dtype=np.float64) + 0.5) * 2.0**-24).astype(np.float32)
    near = np.concatenate([ties, np.nextafter(ties, 0), np.nextafter(ties, 1)])
    rng = np.random.default_rng(0)
    tiny = (rng.random(1 << 20) * 2.0**-14).astype(np.float32)
    small = np.concatenate([near, tiny])
    return np.concatenate([normal, small, -small])


def test_rounding_to_float16_matches_numpy_and_torch(float16_path):
    x = rounding_cases()
    got = np.empty(x.shape, np.float16)
    round_to_float16(x, got)
    with np.errstate(over="ignore", invalid="ignore"):
        assert same_float16(got, x.astype(np.float16))
    assert same_float16(got, torch.from_numpy(x).half().numpy())


def test_rounding_to_float16_below_overflow_takes_the_fpu_path(float16_path):
    """Values that all round to a finite float16 (or exactly to Inf) go through the
    FPU rounding, not the bit-pattern path the other cases fall back to; with scratch."""
    x = rounding_cases()
    x = x[np.abs(x) < 65520.0]
    x = np.concatenate([x, np.float32([65519.996, -65519.996, 65504.0, 65520.0, -0.0])])
    got = np.empty(x.shape, np.float16)
    scratch = (np.empty(x.size + 7, np.float32), np.empty(x.size + 7, np.uint32))
    round_to_float16(x, got, scratch)
    with np.errstate(over="ignore"):
        assert same_float16(got, x.astype(np.float16))
    assert same_float16(got, torch.from_numpy(x).half().numpy())


def test_rounding_to_float16_of_a_two_dimensional_slice(float16_path):
    x = np.random.default_rng(1).standard_normal((64, 48)).astype(np.float32) * 1e-3
    x[0, :6] = [65504.0, 65520.0, -1e6, np.inf, np.nan, -0.0]  # max, first overflow, ...
    out = np.zeros((128, 48), np.float16)
    round_to_float16(x, out[32:96])
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    assert same_float16(out[32:96], want) and not out[:32].any() and not out[96:].any()


def special_float32() -> np.ndarray:
    """NaNs with payloads and signs (quiet and signalling), Infs, the overflow boundary, zeros,
    float32 subnormals, and random bit patterns."""
    bits = [0x7F800001, 0xFF800001, 0x7FC00000, 0xFFC00000, 0x7FAAAAAA, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FA00001]
    bits += [0x7F800000, 0xFF800000, 0x477FEFFF, 0x477FF000, 0x477FF001, 0, 0x80000000, 1, 0x807FFFFF]
    rng = np.random.default_rng(2)
    random = rng.integers(0, 1 << 32, 1 << 18, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([np.array(bits, np.uint32), random])


@pytest.mark.parametrize("simd", [True, False], ids=["simd", "scalar"])
def test_native_kernels_equal_the_numpy_path_bit_for_bit(simd):
    """Both loops of the compiled module (F16C/AVX2 where the CPU has them, and the portable
    scalar C) give the numpy path's bits for every input, NaN payloads included: widening
    keeps a NaN's payload unquieted, rounding makes any NaN 0x7E00 with its sign."""
    f16 = kernel("_f16")
    if f16 is None:
        pytest.skip("lora_deploy._native._f16 is not built")
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    wide = np.empty(every.size, np.float32)
    f16.widen(every, wide, simd)
    assert np.array_equal(wide.view(np.uint32), every.astype(np.float32).view(np.uint32))  # numpy's cast, bit for bit

    x = np.concatenate([rounding_cases(), special_float32().view(np.float32)])
    want = np.empty(x.size, np.float16)
    round_bits_to_float16(x, want)  # the numpy path's rule for every input, NaN included
    got = np.empty(x.size, np.float16)
    f16.round(x, got, simd)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    nan = np.isnan(x)
    assert np.array_equal(got.view(np.uint16)[nan], (x[nan].view(np.uint32) >> 16 & 0x8000 | 0x7E00).astype(np.uint16))

    for bits in (x.view(np.uint32), got.view(np.uint16)):  # all_finite's pass: the largest magnitude
        for part in (bits, bits[5:-3], bits[:7]):
            assert f16.max_magnitude(part, simd) == int((part & (np.iinfo(part.dtype).max >> 1)).max())

    odd = slice(3, 3 + 1001)  # lengths and offsets that are not multiples of the vector width
    got_odd = np.empty(1001, np.float16)
    f16.round(x[odd], got_odd, simd)
    assert np.array_equal(got_odd.view(np.uint16), want[odd].view(np.uint16))


@pytest.mark.parametrize("scaling", [0.37, 2.0, -1e-3])
def test_adding_a_scaled_product_rounds_once(float16_path, scaling):
    """out = float16(float32(w) + product * scaling), against torch doing the steps one by one;
    every float16 weight pattern, products from tiny to overflowing."""
    rng = np.random.default_rng(3)
    w = np.tile(np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16), 4)
    product = (rng.standard_normal(w.size) * rng.choice([1e-7, 1e-3, 1.0, 50.0, 1e5], w.size)).astype(np.float32)
    product[:5] = [np.nan, np.inf, -np.inf, 0.0, -0.0]
    s = np.float32(scaling)
    with np.errstate(invalid="ignore"):
        want = (torch.from_numpy(w).float() + torch.from_numpy(product) * torch.tensor(s)).half().numpy()
    out = np.empty(w.size, np.float16)
    scaled = product.copy()  # the numpy path scales its product in place
    with np.errstate(invalid="ignore", over="ignore"):
        add_scaled_to_float16(w.reshape(-1, 64), scaled.reshape(-1, 64), s, out.reshape(-1, 64))
    assert same_float16(out, want)
