"""One tolerance table and one output comparison, shared by export and verify.

Export (ONNX Runtime vs torch on the example inputs), the dynamic-graph check and verify
(merged / ONNX / dynamic / multi vs the unmerged reference) all ask "do these outputs
agree?". They ask it here, so float16 means the same tolerance everywhere and the figures
(max abs / rel error, cosine, top-1 agreement) are computed one way.

A comparison returns a result; the caller decides what a miss is. Export raises it as an
ExportError, verify records it as a failed check. The typed errors follow Optimum's
``validate_model_outputs``: ShapeError, AtolError, OutputMatchError.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import numpy as np

from lora_deploy.errors import BadInputError, ExportError, LoraDeployError


@dataclass(frozen=True)
class Tolerance:
    """Outputs agree when |actual - expected| <= atol + rtol * |expected| everywhere and
    their cosine similarity is at least min_cosine."""

    atol: float
    rtol: float
    min_cosine: float


# By the dtype that limits precision: the reference's output dtype for export, the loosest
# of the merged weights' and the ONNX output's dtype for verify. One rounding of a value
# costs 2**-24 relative in float32, 2**-11 in float16 and 2**-8 in bfloat16; logits are sums
# of hundreds of such products through several layers, so the bounds scale with that.
# - float32: 1e-4 / 1e-3. Export and verify already agreed; ORT and torch differ only by
#   summation order (~1e-6 here), so this leaves two orders of margin and still catches a
#   tampered weight (tests/test_verify.py sees > 1e-3).
# - float16: 2e-2. Verify needs it: float16-stored weights run in float32 differ from the
#   reference by one rounding per weight, and tests/test_verify.py pins atol 2e-2 for a
#   float16 graph. Export used 1e-2 (torch's CPU half kernels vs ORT's); one value for both
#   takes the looser, which still rejects a missing adapter (errors ~1e-1 and up).
# - bfloat16: 0.15 / 0.1, verify's value (README): 8x float16's unit roundoff. Export never
#   writes bfloat16 graphs (float32/float16 only), so its old 5e-2 row had no user.
# - float64: 1e-6 / 1e-5, export's value for a float64 module; verify never reaches it.
# min_cosine catches a systematic drift that stays inside atol elementwise.
TOLERANCES: MappingProxyType[str, Tolerance] = MappingProxyType(
    {
        "float64": Tolerance(1e-6, 1e-5, 0.9999999),
        "float32": Tolerance(1e-4, 1e-3, 0.99999),
        "float16": Tolerance(2e-2, 2e-2, 0.9995),
        "bfloat16": Tolerance(1.5e-1, 1e-1, 0.995),
    }
)
# Relative errors are divided by max(|expected|, this), so zeros do not give infinities.
REL_FLOOR = 1e-6


def tolerance(dtype_name: str, atol: float | None = None, rtol: float | None = None) -> Tolerance:
    """The table's row for a dtype name, with atol and/or rtol overridden when given."""
    if dtype_name not in TOLERANCES:
        raise BadInputError(f"no output tolerance for dtype {dtype_name!r} (choose {', '.join(TOLERANCES)})")
    check_tolerances(atol, rtol)
    row = TOLERANCES[dtype_name]
    return replace(row, atol=row.atol if atol is None else atol, rtol=row.rtol if rtol is None else rtol)


def check_tolerances(atol: float | None = None, rtol: float | None = None) -> None:
    """Refuse a tolerance override that is no tolerance: negative, NaN (every comparison
    with it fails), infinite (none does) or not a number. None keeps the table's value.
    tolerance() calls it; entry points call it first, so a typo costs no model load."""
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise BadInputError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0 <= value < math.inf:  # NaN fails both
            raise BadInputError(f"{name} must be a finite number >= 0, got {value}")


# ------------------------------------------------------------------ errors ----


class ComparisonError(LoraDeployError):
    """Outputs disagree. Raised through Comparison.raise_for, which also makes it the
    caller's kind of error (ExportError, NotEquivalentError) for handlers and exit codes."""


class ShapeError(ComparisonError):
    """An output's shape differs from the reference's."""


class AtolError(ComparisonError):
    """An output's values differ from the reference's beyond the tolerance."""


class OutputMatchError(ComparisonError):
    """An output the reference has is missing."""


@functools.cache
def in_context(error: type[ComparisonError], kind: type[LoraDeployError]) -> type[ComparisonError]:
    """`error` as a subclass of `kind` too: `except AtolError` and `except ExportError` both
    catch it, and the exit code is kind's."""
    return type(error.__name__, (error, kind), {"__module__": __name__, "__doc__": error.__doc__})


# -------------------------------------------------------------- comparison ----


@dataclass
class Comparison:
    """One output against its reference: the figures and, on a miss, why.

    A figure that was not measured (no comparable position, a missing output, a shape
    mismatch) is None, never 0.0 (a perfect match nobody saw) nor inf (an error nobody
    measured); `error` and `reason` say why. inf is measured: an Inf where the reference
    is finite, or NaN/Inf placed unlike the reference's."""

    name: str
    tol: Tolerance
    max_abs: float | None = None
    max_rel: float | None = None
    cosine: float | None = None
    top1: float | None = None  # share of positions whose argmax over the last axis agrees
    error: type[ComparisonError] | None = None
    reason: str = ""

    @property
    def passed(self) -> bool:
        return self.error is None

    def message(self) -> str:
        return f"output {self.name!r}: {self.reason}"

    def raise_for(self, kind: type[LoraDeployError], context: str = "") -> None:
        """Raise the miss, if any, as `kind` (e.g. ExportError), prefixed by `context`."""
        if self.error is not None:
            raise in_context(self.error, kind)(f"{context}: {self.message()}" if context else self.message())


@dataclass
class Comparisons:
    """Every output of a model against the reference's, in the reference's order."""

    outputs: list[Comparison] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.outputs)

    @property
    def max_abs(self) -> float | None:
        """The largest measured max_abs; None when no output was measured."""
        return max((c.max_abs for c in self.outputs if c.max_abs is not None), default=None)

    @property
    def max_rel(self) -> float | None:
        return max((c.max_rel for c in self.outputs if c.max_rel is not None), default=None)

    @property
    def cosine(self) -> float | None:
        return min((c.cosine for c in self.outputs if c.cosine is not None), default=None)

    @property
    def top1(self) -> float | None:
        return min((c.top1 for c in self.outputs if c.top1 is not None), default=None)

    def raise_for(self, kind: type[LoraDeployError], context: str = "") -> None:
        """Raise the first miss, in output order, as `kind`."""
        for c in self.outputs:
            c.raise_for(kind, context)


def compare(
    actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], tol: Tolerance, mask: np.ndarray | None = None
) -> Comparisons:
    """Each expected output against the actual one of the same name; extra actual outputs
    are ignored. `mask` ([batch, sequence], 0 = padding) limits sequence outputs to real
    tokens."""
    result = Comparisons()
    for name, want in expected.items():
        if name not in actual:
            missing = Comparison(
                name,
                tol,
                error=OutputMatchError,
                reason=f"missing (outputs present: {', '.join(actual) or 'none'})",
            )
            result.outputs.append(missing)
        else:
            result.outputs.append(compare_array(name, actual[name], want, tol, mask))
    return result


def compare_array(name: str, actual, expected, tol: Tolerance, mask: np.ndarray | None = None) -> Comparison:
    """One output against its reference. Integer and bool outputs must be equal; NaN/Inf
    must sit where the reference has the same NaN/Inf; the rest is within `tol`."""
    got, want = np.asarray(actual), np.asarray(expected)
    if got.shape != want.shape:
        return Comparison(
            name,
            tol,
            error=ShapeError,
            reason=f"shape {list(got.shape)} != expected {list(want.shape)}",
        )
    if want.dtype.kind in "biu":  # ids, masks, counts: no rounding to allow for
        tol = replace(tol, atol=0.0, rtol=0.0)
    keep = valid_positions(mask, want.shape)
    g, w = got.astype(np.float64)[keep], want.astype(np.float64)[keep]
    result = Comparison(name, tol, cosine=cosine(g, w), top1=top1(g, w))
    unmatched = int(np.count_nonzero(~_same_non_finite(g, w)))
    finite = np.isfinite(g) & np.isfinite(w)
    diff = np.abs(g[finite] - w[finite])
    if diff.size:
        result.max_abs = float(diff.max())
        result.max_rel = float((diff / np.maximum(np.abs(w[finite]), REL_FLOOR)).max())
    if unmatched:
        result.max_abs = result.max_rel = float("inf")
        result.error, result.reason = AtolError, f"NaN/Inf differs from the reference at {unmatched} position(s)"
    elif not np.all(diff <= tol.atol + tol.rtol * np.abs(w[finite])):
        result.error = AtolError
        result.reason = f"max abs error {result.max_abs:.3g} (atol {tol.atol:g}, rtol {tol.rtol:g})"
    elif _direction_matters(w[finite], tol) and result.cosine < tol.min_cosine:
        result.error = AtolError
        result.reason = (
            f"cosine similarity {result.cosine:.6g} < {tol.min_cosine:g} (max abs error {result.max_abs:.3g})"
        )
    return result


def _same_non_finite(g: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per position: both finite, or the same NaN/Inf (a NaN matches a NaN)."""
    return (np.isfinite(g) & np.isfinite(w)) | (g == w) | (np.isnan(g) & np.isnan(w))


def _direction_matters(w: np.ndarray, tol: Tolerance) -> bool:
    # A reference within atol of zero everywhere has no direction worth comparing: its
    # cosine with an equally tiny actual output measures noise, and atol has decided.
    return w.size > 0 and float(np.abs(w).max()) > tol.atol


def cosine(g: np.ndarray, w: np.ndarray) -> float:
    """Cosine similarity of the flattened finite values; 1.0 for two all-zero outputs."""
    finite = np.isfinite(g) & np.isfinite(w)
    g, w = g[finite], w[finite]
    norms = float(np.linalg.norm(g)) * float(np.linalg.norm(w))
    if norms == 0.0:
        return 1.0 if not g.any() and not w.any() else 0.0
    return float(np.dot(g, w) / norms)


def top1(g: np.ndarray, w: np.ndarray) -> float | None:
    """Share of positions whose argmax over the last axis agrees; None below 2 dims or
    with no positions."""
    if g.ndim < 2 or g.size == 0:
        return None
    return float(np.mean(np.argmax(g, -1) == np.argmax(w, -1)))


def valid_positions(mask, shape) -> tuple | np.ndarray:
    """Compare only real tokens: padded positions of a sequence output are undefined."""
    if mask is None or len(shape) < 3 or tuple(np.shape(mask)) != tuple(shape[:2]):
        return (...,)
    return np.asarray(mask).astype(bool)


def require_close(actual: np.ndarray, expected: np.ndarray, dtype_name: str, label: str) -> None:
    """Export's parity gate for one array: ExportError (ShapeError/AtolError) on a miss."""
    result = compare_array(label, actual, expected, tolerance(dtype_name))
    if not result.passed:
        worst = float("nan") if result.max_abs is None else result.max_abs  # nan: not measured (shapes differ)
        raise in_context(result.error, ExportError)(
            f"exported graph differs from PyTorch {label} (max abs error {worst:.3g})"
        )
