"""The spectrum math (from the factors) against dense numpy on the formed matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lora_deploy.adapter.spectrum import (
    amplification,
    effective_rank,
    lowrank_norm,
    lowrank_svd,
    numerical_rank,
    rank_for_energy,
    subspace_similarity,
)


def rand(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("d, k, r", [(48, 40, 8), (40, 48, 8), (6, 30, 8), (30, 5, 8), (64, 64, 1)])
def test_lowrank_svd_matches_the_dense_svd(d, k, r):
    b, a, s = rand(d, r, seed=d), rand(r, k, seed=k), 1.7
    dense = s * (b.astype(np.float64) @ a.astype(np.float64))
    spectrum = lowrank_svd(b, a, s)
    want = np.linalg.svd(dense, compute_uv=False)
    q = min(d, k, r)
    assert spectrum.sigma.shape == (q,)
    np.testing.assert_allclose(spectrum.sigma, want[:q], rtol=1e-10, atol=1e-12 * want[0])
    values_only = lowrank_svd(b, a, s, vectors=False)  # one Cholesky pass per factor
    assert values_only.u is None and values_only.v is None
    np.testing.assert_allclose(values_only.sigma, want[:q], rtol=1e-8, atol=1e-10 * want[0])
    np.testing.assert_allclose((spectrum.u * spectrum.sigma) @ spectrum.v.T, dense, atol=1e-10 * want[0])
    np.testing.assert_allclose(spectrum.u.T @ spectrum.u, np.eye(q), atol=1e-12)
    np.testing.assert_allclose(spectrum.v.T @ spectrum.v, np.eye(q), atol=1e-12)
    assert math.isclose(spectrum.norm, np.linalg.norm(dense), rel_tol=1e-12)
    assert math.isclose(lowrank_norm(s * b, a), np.linalg.norm(dense), rel_tol=1e-6)


def test_lowrank_norm_of_a_near_cancelling_difference():
    """‖X - X'‖ for X' a float32 rounding of X: a difference of squares would lose it."""
    b, a = rand(200, 8), rand(8, 300, seed=1)
    b2 = (b.astype(np.float64) * (1 + 1e-7)).astype(np.float64)
    left = np.concatenate([b.astype(np.float64), -b2], axis=1)
    right = np.concatenate([a, a], axis=0).astype(np.float64)
    dense = left @ right
    assert math.isclose(lowrank_norm(left, right), np.linalg.norm(dense), rel_tol=1e-6)


def test_energy_and_ranks():
    sigma = np.array([3.0, 2.0, 1.0, 0.0])
    energy = np.cumsum(sigma**2) / np.sum(sigma**2)  # 9/14, 13/14, 1, 1
    assert rank_for_energy(sigma, 0.5) == 1
    assert rank_for_energy(sigma, energy[1]) == 2
    assert rank_for_energy(sigma, 0.99) == 3
    assert rank_for_energy(sigma, 1.0) == 3
    assert rank_for_energy(np.zeros(4), 0.99) == 0
    p = sigma[:3] / 6
    assert math.isclose(effective_rank(sigma), math.exp(-np.sum(p * np.log(p))))
    assert effective_rank(np.array([1.0, 1.0, 1.0])) == pytest.approx(3.0)
    b = rand(30, 4)
    b[:, 3] = b[:, 0]  # rank 3: no Cholesky factor of BᵀB, Householder QR instead
    assert numerical_rank(lowrank_svd(b, rand(4, 20, seed=2))) == 3
    assert numerical_rank(lowrank_svd(b, rand(4, 20, seed=2), vectors=False)) == 3


def test_subspace_similarity_is_the_papers_phi():
    d1, d2 = lowrank_svd(rand(20, 8), rand(8, 50, seed=1)), lowrank_svd(rand(20, 4, seed=2), rand(4, 50, seed=3))
    phi = subspace_similarity(d1.v, d2.v)
    for i in range(1, 9):
        for j in range(1, 5):
            want = np.linalg.norm(d1.v[:, :i].T @ d2.v[:, :j]) ** 2 / min(i, j)
            assert math.isclose(phi[i - 1, j - 1], want, rel_tol=1e-10, abs_tol=1e-14)
    assert np.all((phi >= 0) & (phi <= 1 + 1e-12))
    same = subspace_similarity(d1.v, d1.v)
    np.testing.assert_allclose(np.diag(same), 1.0, atol=1e-12)


def test_amplification_is_the_papers_ratio():
    b, a, w0 = rand(40, 4), rand(4, 30, seed=1), rand(40, 30, seed=2)
    dense = 2.0 * b.astype(np.float64) @ a.astype(np.float64)
    u, s, vt = np.linalg.svd(dense)
    projected = np.linalg.norm(u[:, :4].T @ w0.astype(np.float64) @ vt[:4].T)
    got_projected, factor = amplification(lowrank_svd(b, a, 2.0), w0)
    assert math.isclose(got_projected, projected, rel_tol=1e-5)
    assert math.isclose(factor, np.linalg.norm(dense) / projected, rel_tol=1e-5)
