"""Property tests for the merge math (numpy) against first principles: float64 numpy, and
torch's own linear, embedding and convolution layers computing the unmerged forward."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_deploy.adapter.read import LoraModule
from lora_deploy.merge.delta import BLOCK_ELEMENTS, lora_norm, merged_bias, merged_weight

dims = st.integers(min_value=1, max_value=24)
ranks = st.integers(min_value=1, max_value=8)
scales = st.floats(min_value=0.01, max_value=8.0)


def module(a, b, scaling, **kw) -> LoraModule:
    return LoraModule("m", a, b, r=a.shape[0], alpha=scaling * a.shape[0], scaling=scaling, **kw)


def rand(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def T(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


def rounding_bound(w0, a, b, s) -> np.ndarray:
    """Worst-case float32 error of W0 + s B A summed in any order (Higham's gamma_n with
    n = r + 3 roundings per element: r products and sums, s to float32, the scaling and
    the add of W0). Fixed tolerances fail where the terms cancel."""
    magnitude = np.abs(w0.astype(np.float64)) + s * (np.abs(b.astype(np.float64)) @ np.abs(a.astype(np.float64)))
    nu = (a.shape[0] + 3) * 2.0**-24
    return nu / (1 - nu) * magnitude


@settings(max_examples=60, deadline=None)
@given(out_f=dims, in_f=dims, r=ranks, s=scales, seed=st.integers(0, 2**16))
def test_linear_merge_is_w0_plus_scaled_product(out_f, in_f, r, s, seed):
    a, b, w0 = rand(r, in_f, seed=seed), rand(out_f, r, seed=seed + 1), rand(out_f, in_f, seed=seed + 2)
    got = merged_weight(module(a, b, s), "linear", w0).astype(np.float64)
    want = w0.astype(np.float64) + s * (b.astype(np.float64) @ a.astype(np.float64))
    assert np.all(np.abs(got - want) <= rounding_bound(w0, a, b, s))


@settings(max_examples=40, deadline=None)
@given(out_f=dims, in_f=dims, r=ranks, s=scales)
def test_merged_linear_computes_the_unmerged_forward(out_f, in_f, r, s):
    a, b, w0, x = rand(r, in_f), rand(out_f, r, seed=1), rand(out_f, in_f, seed=2), rand(5, in_f, seed=3)
    unmerged = F.linear(T(x), T(w0)) + s * F.linear(F.linear(T(x), T(a)), T(b))
    merged = F.linear(T(x), T(merged_weight(module(a, b, s), "linear", w0)))
    torch.testing.assert_close(merged, unmerged, atol=1e-4 * max(1, s), rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(out_f=dims, in_f=dims, r=ranks, s=scales, seed=st.integers(0, 2**16))
def test_transposed_layout_is_the_transpose(out_f, in_f, r, s, seed):
    a, b, w0 = rand(r, in_f, seed=seed), rand(out_f, r, seed=seed + 1), rand(out_f, in_f, seed=seed + 2)
    lin = merged_weight(module(a, b, s), "linear", w0)
    conv1d = merged_weight(module(a, b, s), "transposed", np.ascontiguousarray(w0.T))
    # both are within the bound of the exact value; the two BLAS summation orders differ
    difference = np.abs(conv1d.T.astype(np.float64) - lin.astype(np.float64))
    assert np.all(difference <= 2 * rounding_bound(w0, a, b, s))


@settings(max_examples=30, deadline=None)
@given(vocab=dims, dim=dims, r=ranks, s=scales)
def test_embedding_merge_matches_lookup_of_lora(vocab, dim, r, s):
    a, b, w0 = rand(r, vocab), rand(dim, r, seed=1), rand(vocab, dim, seed=2)
    ids = torch.arange(vocab)
    unmerged = F.embedding(ids, T(w0)) + s * F.embedding(ids, T(a.T)) @ T(b.T)
    torch.testing.assert_close(
        F.embedding(ids, T(merged_weight(module(a, b, s), "embedding", w0))), unmerged, atol=1e-4 * max(1, s), rtol=1e-4
    )


@settings(max_examples=25, deadline=None)
@given(c_out=st.integers(1, 6), c_in=st.integers(1, 6), r=ranks, k=st.sampled_from([1, 3]), s=scales)
def test_conv_merge_equals_conv_then_pointwise_conv(c_out, c_in, r, k, s):
    a, b = rand(r, c_in, k, k), rand(c_out, r, 1, 1, seed=1)
    w0, x = rand(c_out, c_in, k, k, seed=2), rand(2, c_in, 7, 7, seed=3)
    unmerged = F.conv2d(T(x), T(w0), padding=k // 2) + s * F.conv2d(F.conv2d(T(x), T(a), padding=k // 2), T(b))
    merged = F.conv2d(T(x), T(merged_weight(module(a, b, s), "conv", w0)), padding=k // 2)
    torch.testing.assert_close(merged, unmerged, atol=1e-3 * max(1, s), rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(out_f=dims, in_f=dims, r=ranks, s=scales)
def test_dora_rows_take_the_learned_magnitude(out_f, in_f, r, s):
    a, b, w0 = rand(r, in_f), rand(out_f, r, seed=1), rand(out_f, in_f, seed=2)
    m = np.abs(rand(out_f, seed=3)) + 0.1
    merged = T(merged_weight(module(a, b, s, magnitude=m), "linear", w0))
    torch.testing.assert_close(merged.norm(dim=1), T(m), atol=1e-4, rtol=1e-4)
    # direction unchanged: each row is a positive multiple of W0 + s B A
    direction = T(w0) + s * T(b) @ T(a)
    cos = F.cosine_similarity(merged, direction, dim=1)
    torch.testing.assert_close(cos, torch.ones(out_f), atol=1e-4, rtol=0)


def test_dora_transposed_normalises_columns():
    a, b, w0 = rand(4, 6), rand(5, 4, seed=1), rand(6, 5, seed=2)
    m = np.abs(rand(5, seed=3))
    merged = merged_weight(module(a, b, 0.5, magnitude=m), "transposed", w0)
    np.testing.assert_allclose(np.linalg.norm(merged.astype(np.float64), axis=0), m, atol=1e-5, rtol=1e-5)


@given(n=dims, s=scales)
def test_bias_is_scaled(n, s):
    b0, lb = rand(n), rand(n, seed=1)
    m = module(rand(2, 3), rand(n, 2), s, bias=lb)
    want = b0.astype(np.float64) + s * lb.astype(np.float64)
    bound = 2 * 2.0**-24 * (np.abs(b0) + s * np.abs(lb)) + 2.0**-24 * s * np.abs(lb)  # two roundings, plus s itself
    assert np.all(np.abs(merged_bias(m, b0) - want) <= bound)


@settings(max_examples=40, deadline=None)
@given(out_f=dims, in_f=dims, r=ranks, s=st.floats(-4.0, 8.0), k=st.sampled_from([0, 1, 3]))
def test_lora_norm_is_the_norm_of_the_formed_product(out_f, in_f, r, s, k):
    spatial = (k, k) if k else ()
    a, b = rand(r, in_f, *spatial), rand(out_f, r, *((1, 1) if k else ()), seed=1)
    formed = s * (b.reshape(out_f, r).astype(np.float64) @ a.reshape(r, -1).astype(np.float64))
    assert np.isclose(lora_norm(module(a, b, s)), np.linalg.norm(formed), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_many_block_merge_rounds_once(dtype, monkeypatch):
    monkeypatch.setattr("lora_deploy.merge.blocks.worker_count", lambda: 4)  # the pool, even on one core
    # Large enough for several blocks, so they run on the worker threads; W0 holds
    # float16 subnormals and signed zeros, which the table lookup must carry exactly.
    out_f, in_f, r, s = 700, 1000, 8, 1.5
    assert out_f * in_f > 2 * BLOCK_ELEMENTS
    a, b = rand(r, in_f) * 1e-3, rand(out_f, r, seed=1) * 1e-3
    w0 = (rand(out_f, in_f, seed=2) * np.float32(1e-4)).astype(dtype)
    w0[0, :4] = [0.0, -0.0, 6e-8, -6e-8]
    exact = w0.astype(np.float64) + s * (b.astype(np.float64) @ a.astype(np.float64))
    float32 = merged_weight(module(a, b, s), "linear", w0)
    assert np.all(np.abs(float32 - exact) <= rounding_bound(w0.astype(np.float32), a, b, s))
    rounded = merged_weight(module(a, b, s), "linear", w0, dtype)
    assert rounded.dtype == dtype
    # one rounding of the float32 result, by numpy's own cast
    assert np.array_equal(rounded.view(np.uint8), float32.astype(dtype).view(np.uint8))


def ulps(x: np.ndarray, dtype) -> np.ndarray:
    """The spacing of `dtype` at |x| (float64), from numpy's own nextafter in that dtype."""
    x = np.abs(x).astype(dtype)
    return np.nextafter(x, np.asarray(np.inf, dtype)).astype(np.float64) - x.astype(np.float64)


def layer_factors(kind: str, rows: int, cols: int, r: int, seed: int):
    """(A, B, left, right) of a LoRA on a `kind` weight with `rows` rows: left @ right is
    B A as a [rows, -1] matrix (conv: `cols` input channels, 3x3 kernels)."""
    if kind == "linear":
        a, b = rand(r, cols, seed=seed), rand(rows, r, seed=seed + 1)
        return a, b, b, a
    if kind == "conv":
        a, b = rand(r, cols, 3, 3, seed=seed), rand(rows, r, 1, 1, seed=seed + 1)
        return a, b, b.reshape(rows, r), a.reshape(r, -1)
    # transposed (GPT-2 Conv1D, [in, out]) and embedding ([vocab, dim]): B A transposed
    a, b = rand(r, rows, seed=seed), rand(cols, r, seed=seed + 1)
    return a, b, a.T, b.T


@settings(max_examples=30, deadline=None)
@given(
    data=st.data(),
    kind=st.sampled_from(["linear", "transposed", "embedding", "conv"]),
    rows=st.integers(2, 40),
    cols=st.integers(1, 12),
    r=ranks,
    s=scales,
    dtype=st.sampled_from([np.float32, np.float16, ml_dtypes.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_blocked_merge_matches_a_float64_reference(data, kind, rows, cols, r, s, dtype, seed):
    """Blocks of rows smaller than the weight, so the merge takes its multi-block path (on
    the pool's threads), uneven last block included; the real BLOCK_ELEMENTS (256K) is never
    reached by the small shapes of the other property tests."""
    import unittest.mock

    import lora_deploy.merge.delta as delta

    a, b, left, right = layer_factors(kind, rows, cols, r, seed)
    shape = (rows, cols, 3, 3) if kind == "conv" else (rows, cols)
    w0 = rand(*shape, seed=seed + 2).astype(dtype)
    w0_64 = w0.astype(np.float64).reshape(rows, -1)
    exact = w0_64 + s * (left.astype(np.float64) @ right.astype(np.float64))
    block = data.draw(st.integers(1, right.shape[1] * (rows - 1)), label="BLOCK_ELEMENTS")
    real_for_each_block, blocks_run = delta.for_each_block, []

    def counting(work, starts):
        blocks_run.append(len(starts))
        return real_for_each_block(work, starts)

    with (
        unittest.mock.patch.object(delta, "BLOCK_ELEMENTS", block),
        unittest.mock.patch.object(delta, "for_each_block", counting),
        unittest.mock.patch("lora_deploy.merge.blocks.worker_count", lambda: 4),
    ):
        got = merged_weight(module(a, b, s), kind, w0, dtype)
    assert blocks_run and blocks_run[0] >= 2  # the multi-block path ran
    assert got.dtype == dtype and got.shape == w0.shape
    # float32 arithmetic (bounded as above), then one rounding to dtype: within one ulp of it
    allowed = rounding_bound(w0_64.astype(np.float32), right, left, s)
    if dtype is not np.float32:
        allowed = allowed + ulps(exact, dtype)
    assert np.all(np.abs(got.astype(np.float64).reshape(rows, -1) - exact) <= allowed)
