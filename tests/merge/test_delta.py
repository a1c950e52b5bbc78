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
