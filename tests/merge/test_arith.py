"""TIES and DARE on dense updates against PEFT's merge_utils (torch), and DARE's statistics;
truncation against numpy's SVD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft.utils import merge_utils

from lora_deploy.adapter.spectrum import lowrank_svd
from lora_deploy.merge.arith import dare, stacked_sum, ties, trim, truncate


def rand(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.filterwarnings("ignore:The density 1.0")  # PEFT's note that 1.0 prunes nothing
@pytest.mark.parametrize("density", [0.1, 0.3, 0.75, 1.0])
@pytest.mark.parametrize("weights", [(0.7, 0.3), (1.0, -0.5, 2.0)])
def test_ties_is_peft_merge_utils_ties(density, weights):
    deltas = [rand(24, 40, seed=i) for i in range(len(weights))]
    want = merge_utils.ties([torch.from_numpy(d) for d in deltas], torch.tensor(weights, dtype=torch.float64), density)
    np.testing.assert_allclose(ties(deltas, list(weights), density), want.numpy(), rtol=1e-12, atol=1e-12)


def test_trim_keeps_the_largest_magnitudes():
    d = np.array([[0.5, -3.0, 1.0], [2.0, -0.1, 0.0]])
    np.testing.assert_array_equal(trim(d, 0.5), [[0.0, -3.0, 1.0], [2.0, 0.0, 0.0]])
    assert not trim(d, 0.1).any()  # int(0.6) = 0 entries, as PEFT's magnitude pruning


def test_dare_drops_with_rescale_and_is_unbiased():
    delta = rand(50, 60)
    one = dare([delta], [1.0], 0.3, np.random.default_rng(0))
    kept = one != 0
    np.testing.assert_allclose(one[kept], delta[kept] / 0.3)  # kept entries rescaled by 1/(1-p)
    assert abs(kept.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / kept.size)  # binomial: within 4 sigma
    same = dare([delta], [1.0], 0.3, np.random.default_rng(0))
    np.testing.assert_array_equal(one, same)
    mean = np.mean([dare([delta], [0.5], 0.3, np.random.default_rng(s)) for s in range(400)], axis=0)
    spread = 0.5 * np.abs(delta) * np.sqrt(0.7 / 0.3 / 400)  # standard error of each mean
    assert np.mean(np.abs(mean - 0.5 * delta) <= 4 * spread) > 0.999


def test_truncation_and_stacking_against_dense():
    terms = [
        (0.7 * 2.0, rand(30, 8, seed=1), rand(8, 20, seed=2)),
        (0.3 * 0.5, rand(30, 4, seed=3), rand(4, 20, seed=4)),
    ]
    dense = sum(c * b @ a for c, b, a in terms)
    exact = stacked_sum(terms)
    assert exact.rank == 12 and exact.error == 0
    np.testing.assert_allclose(exact.b @ exact.a, dense, atol=1e-12)
    low = truncate(lowrank_svd(exact.b, exact.a), 5)
    u, s, vt = np.linalg.svd(dense)
    np.testing.assert_allclose(low.b @ low.a, (u[:, :5] * s[:5]) @ vt[:5], atol=1e-10)
    assert low.error == pytest.approx(np.linalg.norm(dense - low.b @ low.a), rel=1e-10)
    assert low.error == pytest.approx(np.sqrt(np.sum(s[5:] ** 2)), rel=1e-10)
