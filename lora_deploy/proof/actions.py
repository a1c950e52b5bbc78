"""Action-level comparisons for robot controllers: what a robot would do differently.

* Token-decoding VLAs emit, per degree of freedom, logits over action bins; the action is
  the argmax bin. Two runs agree when they pick the same bins. Where they do not, the
  mismatch is reported with its **margin**: how far apart the two bins' logits are in
  the float32 reference. A margin within what the comparison tolerance allows each of
  the two logits to move (2 x (atol + rtol * |logit|)) is a **near-tie**: float16
  rounding can legitimately flip it, and it is reported as such, never hidden.
* Continuous policies emit actions in action units; the figure is the largest absolute
  action error, and where it occurs.

Pure numpy; the verify stage turns these into checks (proof/plain.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lora_deploy.compare import Tolerance

SHOWN = 5  # mismatches spelled out in a check's detail


@dataclass(frozen=True)
class Mismatch:
    """One (observation, degree of freedom) whose bin differs from the reference's."""

    index: tuple[int, ...]  # position in the output without its last (bin) axis
    reference_bin: int
    got_bin: int
    margin: float  # reference logit of its bin minus the reference logit of the bin picked
    near_tie: bool

    def describe(self) -> str:
        kind = "near-tie" if self.near_tie else "NOT a near-tie"
        return f"{list(self.index)}: bin {self.got_bin} vs {self.reference_bin}, margin {self.margin:.3g} ({kind})"


@dataclass
class BinComparison:
    """Decoded bins of a candidate against the reference's."""

    total: int
    agree: int
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def share(self) -> float:
        return self.agree / self.total if self.total else 1.0

    @property
    def all_near_ties(self) -> bool:
        return all(m.near_tie for m in self.mismatches)

    def summary(self) -> str:
        text = f"{self.agree} of {self.total} action bins equal ({100 * self.share:.2f}%)"
        if not self.mismatches:
            return text
        ties = sum(m.near_tie for m in self.mismatches)
        text += f"; {len(self.mismatches)} mismatch(es), {ties} near-tie(s): "
        text += "; ".join(m.describe() for m in self.mismatches[:SHOWN])
        return text + (f"; +{len(self.mismatches) - SHOWN} more" if len(self.mismatches) > SHOWN else "")


def compare_bins(got_logits: np.ndarray, reference_logits: np.ndarray, tol: Tolerance) -> BinComparison:
    """Argmax bins over the last axis of both, mismatches with their reference margins."""
    got = np.asarray(got_logits, dtype=np.float64)
    ref = np.asarray(reference_logits, dtype=np.float64)
    if got.shape != ref.shape:
        raise ValueError(f"shape {list(got.shape)} != reference {list(ref.shape)}")
    got_bins, ref_bins = got.argmax(-1), ref.argmax(-1)
    ref_top = np.take_along_axis(ref, ref_bins[..., None], -1)[..., 0]
    ref_at_got = np.take_along_axis(ref, got_bins[..., None], -1)[..., 0]
    margins = ref_top - ref_at_got
    allowance = 2 * (tol.atol + tol.rtol * np.maximum(np.abs(ref_top), np.abs(ref_at_got)))
    differ = np.argwhere(got_bins != ref_bins)
    mismatches = [
        Mismatch(
            tuple(int(i) for i in idx),
            int(ref_bins[tuple(idx)]),
            int(got_bins[tuple(idx)]),
            float(margins[tuple(idx)]),
            bool(margins[tuple(idx)] <= allowance[tuple(idx)]),
        )
        for idx in differ
    ]
    mismatches.sort(key=lambda m: -m.margin)  # the worst first
    return BinComparison(int(ref_bins.size), int(ref_bins.size - len(mismatches)), mismatches)


def action_error(got: np.ndarray, reference: np.ndarray) -> tuple[float, tuple[int, ...]]:
    """The largest |got - reference| in action units, and where it is."""
    diff = np.abs(np.asarray(got, dtype=np.float64) - np.asarray(reference, dtype=np.float64))
    if diff.size == 0:
        return 0.0, ()
    where = np.unravel_index(int(np.nanargmax(diff)) if not np.isnan(diff).all() else 0, diff.shape)
    worst = float(np.nan if np.isnan(diff).any() else diff[where])
    return worst, tuple(int(i) for i in where)
