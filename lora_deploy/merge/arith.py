"""Adapter arithmetic on the updates ΔW = s·B·A: pure numpy, float64 unless stated.

- truncation to rank R from the factors (adapter.spectrum's QR + small SVD), with the
  Eckart–Young error sqrt(Σ_{i>R} σᵢ²);
- exact weighted sums by stacking factors: Σ wᵢ sᵢ Bᵢ Aᵢ = [w₁s₁B₁ … wₙsₙBₙ] [A₁; …; Aₙ];
- TIES (Yadav et al., 2023) and DARE (Yu et al., 2023) on the dense ΔWᵢ of one module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lora_deploy.adapter.spectrum import Spectrum, discarded_error, lowrank_svd


@dataclass(frozen=True)
class LowRank:
    """b @ a, b [d, q] and a [q, k], with the error of the approximation it came from
    (0 for an exact one) and the norm of what it approximates."""

    b: np.ndarray
    a: np.ndarray
    error: float
    norm: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def split(spectrum: Spectrum, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) = (U_R √Σ_R, √Σ_R V_Rᵀ): the best rank-R factors, balanced between sides."""
    root = np.sqrt(spectrum.sigma[:rank])
    return spectrum.u[:, :rank] * root, root[:, None] * spectrum.v[:, :rank].T


def truncate(spectrum: Spectrum, rank: int) -> LowRank:
    """The best rank-`rank` approximation (Eckart–Young), and its error."""
    rank = min(rank, len(spectrum.sigma))
    b, a = split(spectrum, rank)
    return LowRank(b, a, discarded_error(spectrum.sigma, rank), spectrum.norm)


def stack(terms: list[tuple[float, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) with B @ A = Σ c · b @ a over (c, b, a): the coefficients go into B."""
    b = np.concatenate([c * np.asarray(b, dtype=np.float64) for c, b, _ in terms], axis=1)
    a = np.concatenate([np.asarray(a, dtype=np.float64) for _, _, a in terms], axis=0)
    return b, a


def stacked_sum(terms: list[tuple[float, np.ndarray, np.ndarray]]) -> LowRank:
    """Σ c · b @ a exactly, of rank Σ rᵢ."""
    b, a = stack(terms)
    return LowRank(b, a, 0.0, lowrank_svd(b, a).norm)


def truncated_sum(terms: list[tuple[float, np.ndarray, np.ndarray]], rank: int) -> LowRank:
    """Σ c · b @ a re-factored to `rank` (never formed densely)."""
    return truncate(lowrank_svd(*stack(terms)), rank)


def dense_truncate(matrix: np.ndarray, rank: int) -> LowRank:
    """A dense matrix's best rank-`rank` factors and their Eckart–Young error."""
    u, sigma, vt = np.linalg.svd(np.asarray(matrix, dtype=np.float64), full_matrices=False)
    return truncate(Spectrum(sigma, matrix.shape, u, vt.T), rank)


def trim(delta: np.ndarray, density: float) -> np.ndarray:
    """TIES' trim: keep the int(density · size) entries of largest magnitude, zero the rest."""
    keep = int(density * delta.size)
    out = np.zeros_like(delta)
    if keep > 0:
        flat = np.abs(delta).reshape(-1)
        top = np.argpartition(flat, flat.size - keep)[flat.size - keep :]
        out.reshape(-1)[top] = delta.reshape(-1)[top]
    return out


def ties(deltas: list[np.ndarray], weights: list[float], density: float) -> np.ndarray:
    """TIES-merging of task vectors, per entry: trim each to its top `density` magnitudes,
    elect the sign of the sum of the trimmed vectors (+ where it is 0), and average the
    weighted values of the vectors that have that sign (a disjoint mean: the other sign,
    and zeros, do not count). As the paper, where λ multiplies the merged vector after
    the mean, and as PEFT's merge_utils.ties: weights do not vote."""
    trimmed = np.stack([trim(np.asarray(d, dtype=np.float64), density) for d in deltas])
    elected = np.where(trimmed.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(trimmed) == elected
    weighted = trimmed * np.asarray(weights, dtype=np.float64).reshape(-1, *([1] * (trimmed.ndim - 1)))
    return np.where(agree, weighted, 0.0).sum(axis=0) / np.maximum(agree.sum(axis=0), 1)


def dare(deltas: list[np.ndarray], weights: list[float], density: float, rng: np.random.Generator) -> np.ndarray:
    """DARE: drop each entry of each task vector with probability p = 1 - density, rescale
    the kept ones by 1 / (1 - p), then take the weighted sum."""
    out = np.zeros_like(deltas[0], dtype=np.float64)
    for delta, weight in zip(deltas, weights):
        kept = rng.random(delta.shape) < density
        out += weight * np.where(kept, delta / density, 0.0)
    return out
