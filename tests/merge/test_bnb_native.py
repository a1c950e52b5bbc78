"""The compiled NF4/FP4 kernel (lora_deploy/_native/quant4.c): byte for byte the numpy
path's values on every instruction set this CPU runs (scalar, AVX2, AVX-512), and
bitsandbytes' dequantized values, on values placed at every code midpoint and its
neighbours, all-zero blocks, partial last blocks, every block size, float16/bfloat16/
float32 in and out, with and without double quantization."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_deploy._native import kernel
from lora_deploy.arrays import from_torch, to_torch
from lora_deploy.merge import bnb
from lora_deploy.merge.bnb import BLOCKSIZES, BnbSpec, ErrorSums, code4, fake_quant, fake_quant_native
from lora_deploy.merge.quant import distance_sums
from tests.merge.test_bnb import bits, bnb_4bit

quant4 = pytest.importorskip("lora_deploy._native._quant4", reason="the compiled kernel is not built")

FLOATS = [np.dtype(np.float16), from_torch(torch.zeros(1, dtype=torch.bfloat16)).dtype, np.dtype(np.float32)]
ISAS = range(quant4.BEST_ISA + 1)  # 0 scalar, 1 AVX2, 2 AVX-512


class Pinned:
    """The kernel on one instruction set."""

    def __init__(self, isa: int):
        self.isa = isa

    def fake_quant4(self, *args):
        return quant4.fake_quant4(*args, isa=self.isa)


def next_bits(values: np.ndarray, step: int) -> np.ndarray:
    """The values `step` patterns up (same sign: away from zero) in their own dtype."""
    unsigned = np.uint16 if values.dtype.itemsize == 2 else np.uint32
    moved = values.copy()
    moved.view(unsigned)[...] += unsigned(step) if step > 0 else unsigned(0)
    moved.view(unsigned)[...] -= unsigned(-step) if step < 0 else unsigned(0)
    return moved


def hard_values(quant_type: str, dtype: np.dtype, blocks: int = 48) -> np.ndarray:
    """`blocks` * 4096 values, then a last block shorter than any block size. Blocks of 32
    led by their absmax `a` (a power of two, so x / a is exact, or not), the rest at
    a * every midpoint, rounded to `dtype`, and the neighbouring patterns, both signs; an
    all-zero stretch of 4096; random values. The last block: its absmax, then values
    near a midpoint times it that land on different sides of the midpoint when divided
    by the absmax (as bitsandbytes does there) and when multiplied by its reciprocal."""
    _, mids = code4(quant_type)
    pieces = []
    for a in (1.0, 0.125, 0.0371, 3.3e-5, 7.1e4 if dtype.itemsize == 4 or dtype.name == "bfloat16" else 6.0e4):
        at = (mids * np.float32(a)).astype(dtype)
        at = at[at != 0]
        candidates = np.concatenate([at, next_bits(at, 1), next_bits(at, -1)])
        candidates = np.concatenate([candidates, -candidates])
        candidates = candidates[np.abs(candidates.astype(np.float32)) <= np.float32(np.array(a, dtype))]
        rows = -(-candidates.size // 31)
        filled = np.zeros(rows * 31, dtype)
        filled[: candidates.size] = candidates
        block = np.concatenate([np.full((rows, 1), a, dtype), filled.reshape(rows, 31)], axis=1)
        pieces.append(block.reshape(-1))
    pieces.append(np.zeros(4096, dtype))
    fixed = np.concatenate(pieces)
    rng = np.random.default_rng(0)
    rest = (rng.standard_normal(blocks * 4096 - fixed.size) * 0.05).astype(np.float32)
    rest[5::97] *= 30
    return np.concatenate([fixed, rest.astype(dtype), last_block(mids, dtype)])


def last_block(mids: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Up to 31 values: an absmax, then values where x / absmax and x * (1 / absmax) fall on
    different sides of a midpoint (none in the 16-bit dtypes' coarse grid is fine too)."""
    for a in np.array([0.0371, 0.7, 0.3, 1.7, 0.0123], dtype):
        a32 = np.float32(a)
        near = (mids * a32).astype(dtype)
        x = np.concatenate([next_bits(near, k) for k in range(-3, 4)]).astype(np.float32)
        m = np.tile(mids, 7)
        split = x[(x / a32 > m) != (x * (np.float32(1) / a32) > m)]
        if split.size:
            return np.concatenate([[a32], split[:30]]).astype(dtype)
    return np.array([np.float32(0.5), np.float32(0.25)], dtype)


def numpy_path(w, spec, out_dtype, monkeypatch):
    monkeypatch.setenv("LORA_DEPLOY_NATIVE", "0")
    out, errors = np.empty(w.shape, out_dtype), ErrorSums()
    fake_quant(w, spec, out=out, errors=errors)
    monkeypatch.delenv("LORA_DEPLOY_NATIVE")
    return out, errors.relative()


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_native_is_the_numpy_path_byte_for_byte(quant_type, double_quant, monkeypatch):
    monkeypatch.setattr(bnb, "CHUNK_4BIT", 8192)  # many chunks (threads, error sums per chunk)
    for in_dtype in FLOATS:
        w = hard_values(quant_type, in_dtype)
        for blocksize in BLOCKSIZES:
            spec = BnbSpec(quant_type, blocksize, double_quant)
            out_dtypes = FLOATS if blocksize in (32, 64, 4096) else [in_dtype]
            for out_dtype in out_dtypes:
                expected, error = numpy_path(w, spec, out_dtype, monkeypatch)
                for isa in ISAS:
                    out, errors = np.empty(w.shape, out_dtype), ErrorSums()
                    fake_quant_native(Pinned(isa), w, spec, out, errors)
                    where = (in_dtype.name, out_dtype.name, blocksize, isa)
                    assert out.tobytes() == expected.tobytes(), where
                    assert errors.relative() == pytest.approx(error, rel=1e-5), where


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_native_is_bitsandbytes_at_the_midpoints(quant_type):
    """bitsandbytes' reference dequantization (see test_bnb.py), every output dtype, by the
    kernel on the best instruction set here (scalar included: fake_quant_native directly)."""
    for in_dtype in FLOATS:
        w = hard_values(quant_type, in_dtype, blocks=6).reshape(1, -1)
        for blocksize, double_quant in [(32, False), (64, True), (4096, False)]:
            spec = BnbSpec(quant_type, blocksize, double_quant)
            for torch_dtype in (torch.float32, torch.float16, torch.bfloat16):
                out = from_torch(torch.empty(w.shape, dtype=torch_dtype))
                fake_quant_native(quant4, w, spec, out)
                reference, _ = bnb_4bit(to_torch(w), quant_type, blocksize, double_quant, out_dtype=torch_dtype)
                ours, theirs = out.astype(np.float32), from_torch(reference).astype(np.float32)
                assert np.array_equal(bits(ours), bits(theirs)), (in_dtype.name, blocksize, torch_dtype)


def test_native_off_and_bad_arguments(monkeypatch):
    assert kernel("_quant4") is quant4
    monkeypatch.setenv("LORA_DEPLOY_NATIVE", "0")
    assert kernel("_quant4") is None
    code, mids = code4("nf4")
    w, absmax = np.zeros(100, np.float32), np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="block boundaries"):
        quant4.fake_quant4(w, 0, np.zeros(100, np.float32), 0, absmax, False, None, code, mids, 32, 10, 100, False)
    with pytest.raises(ValueError, match="sizes"):
        quant4.fake_quant4(w, 0, np.zeros(99, np.float32), 0, absmax, False, None, code, mids, 32, 0, 100, False)


@pytest.mark.parametrize("isa", ISAS)
def test_native_distance_sums_are_float64_sums(isa, monkeypatch):
    """merge/quant.py's per-layer figures: the kernel's sums (float32 differences summed
    over short runs, then in float64) against float64 sums, and against the numpy path."""
    rng = np.random.default_rng(1)
    exact = (rng.standard_normal(3 * 1024 + 13) * 0.05).astype(np.float32)
    for written_dtype in FLOATS:
        written = (exact * np.float32(1.01)).astype(written_dtype)
        for reference in (exact, exact.astype(written_dtype)):
            kinds = (bnb.NATIVE_KINDS[written_dtype.name], bnb.NATIVE_KINDS[reference.dtype.name])
            raw = bnb.raw_bits(written), bnb.raw_bits(reference)
            sums = quant4.distance_sums(raw[0], kinds[0], raw[1], kinds[1], True, isa=isa)
            w, e = written.astype(np.float64), reference.astype(np.float64)
            p = reference.astype(np.float32).astype(written_dtype).astype(np.float64)  # rounded once
            expected = [((w - e) ** 2).sum(), (e**2).sum(), ((w - p) ** 2).sum(), (p**2).sum()]
            assert sums == pytest.approx(expected, rel=1e-5), (written_dtype.name, reference.dtype.name)
            monkeypatch.setenv("LORA_DEPLOY_NATIVE", "0")
            assert distance_sums(written, reference, True) == pytest.approx(expected, rel=1e-5)
            monkeypatch.delenv("LORA_DEPLOY_NATIVE")
            assert quant4.distance_sums(raw[0], kinds[0], raw[1], kinds[1], False, isa=isa)[2:] == (0.0, 0.0)


@pytest.mark.parametrize("isa", ISAS)
def test_native_merge_onto_is_the_numpy_steps(isa):
    """merge_onto (merged_onto's block in one pass) on each instruction set: exact = p + w0
    and out = p + onto rounded once, p = product * scaling, float32 steps in numpy's order;
    every kind in and out, sizes with a tail past the last whole vector, values that
    round to float16 subnormals and overflow to Inf."""
    rng = np.random.default_rng(isa)
    for w_dtype in FLOATS:
        for out_dtype in FLOATS:
            for n in (1, 15, 16, 17, 1000):
                product = rng.standard_normal(n).astype(np.float32)
                product[::7] *= np.float32(1e-5)
                product[5::11] = np.float32(4e4)  # past float16's range once scaled
                w0 = rng.standard_normal(n).astype(w_dtype)
                onto = rng.standard_normal(n).astype(np.float32)
                scaling = np.float32(1.75)
                out, exact = np.empty(n, out_dtype), np.full(n, np.nan, np.float32)
                with np.errstate(over="ignore"):
                    quant4.merge_onto(
                        product,
                        bnb.raw_bits(w0),
                        bnb.NATIVE_KINDS[w_dtype.name],
                        onto,
                        scaling,
                        bnb.raw_bits(out),
                        bnb.NATIVE_KINDS[out_dtype.name],
                        exact,
                        isa=isa,
                    )
                    p = product * scaling
                    assert exact.tobytes() == (p + w0.astype(np.float32)).tobytes(), (w_dtype, out_dtype, n)
                    assert out.tobytes() == (p + onto).astype(out_dtype).tobytes(), (w_dtype, out_dtype, n)
                    # exact None: distance_sums' figures (its order on this instruction set) instead
                    again = np.empty(n, out_dtype)
                    raw = bnb.raw_bits(again), bnb.NATIVE_KINDS[out_dtype.name]
                    kind = bnb.NATIVE_KINDS[w_dtype.name]
                    sums = quant4.merge_onto(product, bnb.raw_bits(w0), kind, onto, scaling, *raw, None, isa=isa)
                    assert again.tobytes() == out.tobytes()
                    expected = quant4.distance_sums(raw[0], raw[1], exact, 0, True, isa=isa)  # Inf, NaN sums too
                    assert np.array(sums).tobytes() == np.array(expected).tobytes(), (
                        w_dtype,
                        out_dtype,
                        n,
                    )
    with pytest.raises(ValueError, match="sizes"):
        quant4.merge_onto(product, bnb.raw_bits(w0[:-1]), 0, onto, scaling, bnb.raw_bits(out), 0, exact)
