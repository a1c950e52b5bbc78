"""merge/bnb.py against bitsandbytes itself (its CPU functions): the dequantized values of
NF4/FP4 (with and without double quantization, several block sizes) and LLM.int8, bit for
bit. Zeros are compared by value: which of bitsandbytes' CPU kernels runs decides the sign
of a zero, not the quantization."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lora_deploy.arrays import from_torch
from lora_deploy.merge.bnb import (
    BnbSpec,
    ErrorSums,
    code4,
    code_index,
    dynamic_map,
    fake_quant,
    order_bits,
    torch_mean,
    torch_threads,
)

F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the oracle")
reference_ops = pytest.importorskip("bitsandbytes.backends.default.ops")
bnb_utils = pytest.importorskip("bitsandbytes.backends.utils")

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def bits(values: np.ndarray) -> np.ndarray:
    """float32 bit patterns, -0.0 read as 0.0."""
    return (np.asarray(values, dtype=np.float32) + np.float32(0)).view(np.uint32)


def weight(shape, dtype, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.05
    w[0, :3] = 0  # zeros, and a few outliers
    w.view(-1)[7::97] *= 20
    return w.to(dtype)


def bnb_4bit(w: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool, out_dtype=torch.float32):
    """bitsandbytes' quantization, dequantized by its reference implementation and, where
    bitsandbytes would run it, by its CPU kernel (else None), both in out_dtype."""
    packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
    absmax = state.absmax
    if double_quant:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = bnb_utils._get_4bit_code(quant_type, packed.device)
    compute = reference_ops._dequantize_4bit_compute.__wrapped__  # as written, not torch.compile'd
    reference = compute(packed.view(-1), absmax, code, blocksize, state.shape, out_dtype)
    cpu = None
    if w.shape[-1] % 2 == 0 and blocksize < 2048:  # else bitsandbytes falls back to its reference itself
        state.dtype = out_dtype
        cpu = F.dequantize_4bit(packed, state)
    return reference, cpu


def test_dynamic_map_is_bitsandbytes():
    assert np.array_equal(bits(dynamic_map()), bits(F.create_dynamic_map().numpy()))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_dequantized_values_are_bitsandbytes(quant_type, blocksize, double_quant):
    for shape, dtype in [((96, 200), torch.float16), ((64, 256), torch.bfloat16), ((37, 61), torch.float32)]:
        w = weight(shape, dtype)
        ours = fake_quant(from_torch(w), BnbSpec(quant_type, blocksize, double_quant))
        reference, cpu = bnb_4bit(w, quant_type, blocksize, double_quant)
        assert np.array_equal(bits(ours), bits(reference.numpy())), (shape, dtype)
        if cpu is not None and blocksize not in (256, 512, 1024):
            # bitsandbytes 0.50's AVX-512 CPU kernel departs from its own reference at these
            # block sizes (rows a multiple of 64 long); elsewhere it agrees with both.
            assert np.array_equal(bits(ours), bits(cpu.numpy())), (shape, dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_rounded_once_to_the_output_dtype(quant_type):
    w = weight((64, 192), torch.float16, seed=1)
    for dtype, np_dtype in [(torch.float16, np.float16), (torch.bfloat16, from_torch(w.bfloat16()).dtype)]:
        out = np.empty(w.shape, np_dtype)
        fake_quant(from_torch(w), BnbSpec(quant_type, 64, True), out=out)
        reference, _ = bnb_4bit(w, quant_type, 64, True, out_dtype=dtype)
        assert np.array_equal(out.astype(np.float32), from_torch(reference).astype(np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_dequantized_values_are_bitsandbytes(dtype):
    w = weight((48, 130), dtype, seed=2)
    w[5] = 0  # an all-zero row
    rows, stats, _ = F.int8_vectorwise_quant(w.contiguous().to(torch.float16))  # what Int8Params stores
    reference = F.int8_vectorwise_dequant(rows, stats).numpy()
    ours = fake_quant(from_torch(w), BnbSpec("int8"))
    assert np.array_equal(bits(ours), bits(reference))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_over_several_chunks_with_errors_is_bitsandbytes(quant_type):
    """More values than one block of work holds (the per-chunk block offsets), a partial
    last block, the smallest block size; the error sums against a direct computation."""
    w = weight((300, 501), torch.float16, seed=3)
    for blocksize, double_quant in [(32, False), (64, True)]:
        spec = BnbSpec(quant_type, blocksize, double_quant)
        reference, _ = bnb_4bit(w, quant_type, blocksize, double_quant, out_dtype=torch.float16)
        out, errors = np.empty(w.shape, np.float16), ErrorSums()
        fake_quant(from_torch(w), spec, out=out, errors=errors)
        assert np.array_equal(out.astype(np.float32), reference.numpy().astype(np.float32))
        exact, written = from_torch(w).astype(np.float64), out.astype(np.float64)
        expected = np.linalg.norm(written - exact) / np.linalg.norm(exact)
        assert errors.relative() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_index_table_counts_midpoints_like_the_comparisons(quant_type):
    """The looked-up code index equals the number of midpoints below the value, counted
    by comparison (torch.bucketize's rule): at every midpoint and its float32
    neighbours, signed zeros, ±1, tiny and huge values, infinities; and exhaustively
    over each interval that holds a midpoint and the two ends of every other interval
    (between them the count cannot change: the index is a step function)."""
    _, bounds = code4(quant_type)
    inf = np.float32(np.inf)
    special = np.array([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 1.2e-38, -1.2e-38, 3e38, -3e38, inf, -inf], np.float32)
    values = np.concatenate([bounds, np.nextafter(bounds, inf), np.nextafter(bounds, -inf), special])
    ordered = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    low = np.arange(1 << 16, dtype=np.uint32)
    split = (order_bits(bounds) >> np.uint32(16))[:, None] << np.uint32(16) | low
    patterns = np.concatenate([ordered, ordered | np.uint32(0xFFFF), split.ravel()])
    swept = order_bits(patterns.view(np.float32)).view(np.float32)  # the flip is its own inverse
    values = np.concatenate([values, swept[~np.isnan(swept)]])
    counted = (values[:, None] > bounds).sum(axis=1)
    assert np.array_equal(code_index(values, quant_type), counted)
    nan = np.array([np.nan, -np.nan], np.float32)  # the NaNs arithmetic produces: no midpoint below
    assert np.array_equal(code_index(nan, quant_type), [0, 0])


@pytest.mark.parametrize("threads", [1, 2, 3, 5, 16])
def test_double_quant_mean_is_torchs_at_every_thread_count(threads):
    """The offset of double quantization is torch's float32 mean, computed without torch:
    the same bits as torch's CPU sum / count, on one serial pass (fewer than 32768
    values) and split among `threads` threads (more), whose last bit differs between
    thread counts (sizes around every boundary of the cascade: lanes, groups, levels)."""
    rng = np.random.default_rng(threads)
    sizes = [0, 1, 7, 8, 9, 31, 33, 64, 100, 511, 4097, 32767, 32768, 32769, 65537, 180224, 300001]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch_threads() == threads  # what bitsandbytes would use in this process
        for n in sizes:
            absmax = (np.abs(rng.standard_normal(n)) * 0.05 + 0.01).astype(np.float16).astype(np.float32)
            spread = rng.standard_normal(n).astype(np.float32) * np.float32(1e3)
            for values in (absmax, spread):
                expected = torch.from_numpy(values).mean().numpy()
                assert bits(torch_mean(values)) == bits(expected) or (n == 0 and np.isnan(torch_mean(values)))
    finally:
        torch.set_num_threads(before)


def test_torch_threads_without_torch(monkeypatch):
    """Without torch loaded: torch's default, OMP_NUM_THREADS first; and in a fresh process
    the default equals what torch then takes."""
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert torch_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "0")  # not a count: the next in line
    monkeypatch.setenv("MKL_NUM_THREADS", "5")
    assert torch_threads() == 5
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("MKL_NUM_THREADS")
    code = (
        "from lora_deploy.merge.bnb import torch_threads; ours = torch_threads(); "
        "import torch; print(ours, torch.get_num_threads())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    ours, theirs = done.stdout.split()
    assert ours == theirs
