"""Statistics for `lora-deploy bench`: robust summaries, bootstrap CIs, gates.

Pure functions, no I/O. Latency on shared machines is noisy and skewed, so
every decision here is made on medians with a bootstrap confidence interval,
and a gate only fails when the data *prove* the slowdown: the whole interval
sits above the allowed limit. Noise widens the interval and so can never fail
a gate on its own; it can only make the result inconclusive.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lora_deploy.errors import BadInputError, LoraDeployError

# Resample matrices are built in chunks of about this many elements so that
# 10k resamples of a long sample list do not allocate gigabytes at once.
_CHUNK_ELEMENTS = 1 << 22


class GateFailed(LoraDeployError):
    """A latency gate ran and found a real overhead or regression."""

    exit_code = 1


@dataclass(frozen=True)
class GateResult:
    """Outcome of one gate: a verdict, a sentence, and the numbers behind it.

    `median`, `low` and `high` are the ratio (candidate / reference, or
    current / baseline) and its confidence interval; `limit` is 1 + the
    allowed overhead. `gate` is "overhead", "regression" (against a saved
    baseline report or, in-run, against a --baseline-model), "p99" or
    "misses" (absolute budgets of the control-loop mode); `subject` names what
    was compared, e.g. "8x128/merged". `conclusive` is False when the data
    cannot settle the question (the interval straddles the limit, the
    baseline's configuration differs, ...); `passed` then follows the
    on-inconclusive policy. `margin` is the between-run allowance a saved
    baseline's gate adds to the limit; `notes` say why a gate is inconclusive.
    """

    passed: bool
    message: str
    gate: str = ""
    subject: str = ""
    median: float = math.nan
    low: float = math.nan
    high: float = math.nan
    limit: float = math.nan
    conclusive: bool = True
    margin: float = 0.0
    notes: tuple[str, ...] = ()

    @property
    def verdict(self) -> str:
        """'fail', 'inconclusive' or 'pass' (the outcome before any on-inconclusive policy)."""
        if not self.conclusive:
            return "inconclusive"
        return "pass" if self.passed else "fail"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the JSON report; NaN (unset numbers) becomes null."""
        data = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(self).items()}
        data["notes"] = list(self.notes)
        data["verdict"] = self.verdict
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateResult:
        """Inverse of `to_dict`; unknown keys are ignored, null numbers become NaN."""
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        for name in ("median", "low", "high", "limit"):
            if known.get(name) is None:
                known.pop(name, None)
        known["notes"] = tuple(known.get("notes") or ())
        return cls(**known)


def _as_samples(values: Sequence[float] | np.ndarray, what: str = "samples") -> np.ndarray:
    """1-D float array of finite values, or BadInputError."""
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise BadInputError(f"{what}: need a non-empty list of numbers, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise BadInputError(f"{what}: contains NaN or Inf")
    return arr


# The fewest samples a tail percentile is reported from: n >= 1/(1 - q), so that at least
# one sample lies beyond it. Below that it would only be the largest sample (or an
# interpolation towards it) under another name: it is reported as not measured (None).
TAIL_MIN_SAMPLES = {"p90": 10, "p99": 100, "p999": 1000}


def tail_percentile(samples: Sequence[float] | np.ndarray, name: str) -> float | None:
    """Percentile `name` ("p90", "p99", "p999") of `samples`, or None when there are fewer
    samples than TAIL_MIN_SAMPLES asks for."""
    arr = np.asarray(samples, dtype=np.float64).ravel()
    if arr.size < TAIL_MIN_SAMPLES[name]:
        return None
    return float(np.percentile(arr, {"p90": 90.0, "p99": 99.0, "p999": 99.9}[name]))


def percentiles(samples: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    """p50, p90, p99, p99.9 ("p999"), mean, min and max of `samples`, in the samples' own
    unit; a tail percentile from too few samples (TAIL_MIN_SAMPLES) is None."""
    arr = _as_samples(samples)
    return {
        "p50": float(np.percentile(arr, 50)),
        **{name: tail_percentile(arr, name) for name in TAIL_MIN_SAMPLES},
        "mean": float(arr.mean()),
        "min": float(arr.min()),
        "max": float(arr.max()),
    }


def paired_ratios(reference: Sequence[float], candidate: Sequence[float]) -> np.ndarray:
    """Per-round candidate / reference.

    Rounds are measured back to back (see `timing.measure_interleaved`), so a
    slow moment on the machine hits both members of a pair; dividing within
    the round cancels it, which is why ratios are paired and not pooled.
    """
    ref = _as_samples(reference, "reference")
    cand = _as_samples(candidate, "candidate")
    if ref.shape != cand.shape:
        raise BadInputError(
            f"paired ratios need the same number of rounds: reference has {ref.size}, candidate has {cand.size}"
        )
    if np.any(ref <= 0):
        raise BadInputError("reference: timings must be positive to form ratios")
    return cand / ref


def _check_ci_args(confidence: float, resamples: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise BadInputError(f"confidence must be between 0 and 1, got {confidence}")
    if resamples < 1:
        raise BadInputError(f"resamples must be at least 1, got {resamples}")


def _bootstrap_medians(arr: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """`resamples` medians of `arr` resampled with replacement."""
    n = arr.size
    rows = max(1, _CHUNK_ELEMENTS // n)
    out = np.empty(resamples)
    for start in range(0, resamples, rows):
        stop = min(resamples, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = np.median(arr[idx], axis=1)
    return out


def _interval(point: float, boot: np.ndarray, confidence: float) -> tuple[float, float, float]:
    """Percentile interval of `boot` around `point`."""
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(boot, [tail, 100.0 - tail])
    # Monte Carlo error can leave the point estimate a hair outside the
    # interval on tiny samples; widening (never narrowing) keeps reports
    # coherent and only makes the gates more cautious about failing.
    return point, float(min(low, point)), float(max(high, point))


def bootstrap_median_ci(
    values: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(median, low, high): percentile-bootstrap CI of the median of `values`.

    Deterministic for a given seed, so a report can be recomputed exactly.
    """
    arr = _as_samples(values, "values")
    _check_ci_args(confidence, resamples)
    rng = np.random.default_rng(seed)
    boot = _bootstrap_medians(arr, resamples, rng)
    return _interval(float(np.median(arr)), boot, confidence)


def bootstrap_ratio_of_medians_ci(
    current: Sequence[float] | np.ndarray,
    baseline: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(ratio, low, high) for median(current) / median(baseline).

    The two runs are independent (different processes, maybe different
    days), so there is no pairing: each sample set is resampled on its own.
    """
    cur = _as_samples(current, "current")
    base = _as_samples(baseline, "baseline")
    _check_ci_args(confidence, resamples)
    if np.any(base <= 0):
        raise BadInputError("baseline: timings must be positive to form ratios")
    rng = np.random.default_rng(seed)
    boot_cur = _bootstrap_medians(cur, resamples, rng)
    boot_base = _bootstrap_medians(base, resamples, rng)
    point = float(np.median(cur) / np.median(base))
    return _interval(point, boot_cur / boot_base, confidence)


def _check_limit(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise BadInputError(f"{name} must be a finite fraction >= 0, got {value}")
    return value


def _label(subject: str) -> str:
    return f"{subject}: " if subject else ""


def _pct(ratio: float) -> str:
    """1.034 -> '+3.4%'."""
    return f"{(ratio - 1.0) * 100:+.1f}%"


ON_INCONCLUSIVE = ("pass", "warn", "fail")


def check_on_inconclusive(policy: str) -> str:
    if policy not in ON_INCONCLUSIVE:
        raise BadInputError(f"on-inconclusive must be one of {', '.join(ON_INCONCLUSIVE)}, got {policy!r}")
    return policy


def _ratio_gate(
    gate: str,
    ratio_ci: Sequence[float],
    max_fraction: float,
    subject: str,
    confidence: float,
    noun: str,
    *,
    margin: float = 0.0,
    notes: Sequence[str] = (),
    on_inconclusive: str = "warn",
) -> GateResult:
    """Shared verdict logic for the overhead and regression gates.

    Fails when the whole interval lies above (1 + max_fraction) * (1 + margin): the
    slowdown is shown to exceed the limit plus the between-run margin. Passes
    conclusively when the whole interval lies at or below the limit. Anything between,
    or any `notes` (reasons the comparison itself is doubtful), is inconclusive, and
    `on_inconclusive` decides whether that passes ("pass", "warn") or fails ("fail").
    """
    median, low, high = (float(x) for x in ratio_ci)
    if not all(math.isfinite(x) for x in (median, low, high)) or not low <= median <= high:
        raise BadInputError(f"ratio CI must be finite with low <= median <= high, got {ratio_ci}")
    check_on_inconclusive(on_inconclusive)
    limit = 1.0 + max_fraction
    fail_above = limit * (1.0 + margin)
    ci = f"{confidence:.0%} CI {low:.3f}-{high:.3f}"
    head = f"{_label(subject)}{noun} {_pct(median)} (ratio {median:.3f}, {ci})"
    allowed = f"allowed {max_fraction:.1%}" + (f" + {margin:.1%} between-run margin" if margin else "")
    doubts = "; ".join(notes)
    if low > fail_above and not notes:
        passed, conclusive = False, True
        msg = f"{head}: FAIL, the whole interval is above the {allowed}."
    elif high <= limit and not notes:
        passed, conclusive = True, True
        msg = f"{head}: pass, within the {allowed}."
    else:
        conclusive = False
        passed = on_inconclusive != "fail"
        settle = "more rounds, more sessions or a quieter machine would settle it"
        why = doubts or f"the interval reaches past the {allowed}; {settle}"
        outcome = "FAIL (--on-inconclusive fail)" if not passed else "pass"
        msg = f"{head}: INCONCLUSIVE, {outcome}: {why}."
    return GateResult(passed, msg, gate, subject, median, low, high, limit, conclusive, margin, tuple(notes))


def absolute_gate(
    gate: str,
    value: float,
    limit: float,
    *,
    subject: str,
    unit: str,
    conclusive: bool = True,
    why: str = "",
    on_inconclusive: str = "warn",
) -> GateResult:
    """An absolute budget (control-loop p99 in ms, deadline misses): value <= limit.

    Absolute figures belong to one machine: the message says so. A gate without enough
    data (`conclusive` False, `why`) is inconclusive whichever side of the budget its
    figure lies (too few calls prove a p99 neither within nor over it), and follows
    `on_inconclusive` like the ratio gates.
    """
    check_on_inconclusive(on_inconclusive)
    within = value <= limit
    shown = "not measured" if math.isnan(value) else f"{value:g}{unit}"
    head = f"{_label(subject)}{gate} {shown} (budget {limit:g}{unit}, valid on the target machine only)"
    if not conclusive:
        passed = on_inconclusive != "fail"
        outcome = "FAIL (--on-inconclusive fail)" if not passed else "pass"
        msg = f"{head}: INCONCLUSIVE, {outcome}: {why}."
    elif not within:
        passed, msg = False, f"{head}: FAIL."
    else:
        passed, msg = True, f"{head}: pass."
    notes = () if conclusive else (why,)
    return GateResult(
        passed, msg, gate, subject, float(value), float(value), float(value), float(limit), conclusive, 0.0, notes
    )


def overhead_gate(
    ratio_ci: Sequence[float],
    max_overhead: float,
    *,
    subject: str = "",
    confidence: float = 0.95,
    gate: str = "overhead",
    on_inconclusive: str = "warn",
) -> GateResult:
    """Gate on candidate / reference latency, measured in one interleaved run.

    `ratio_ci` is (median, low, high) from `bootstrap_median_ci` of the paired
    ratios. Fails only when the lower bound exceeds 1 + max_overhead, i.e. the
    overhead is both real and above the threshold; `confidence` is only used
    to word the message. No between-run margin: both sides shared every round.
    `gate="regression"` labels the in-run regression gate against a --baseline-model.
    """
    max_overhead = _check_limit(max_overhead, "max overhead")
    noun = "overhead" if gate == "overhead" else "regression"
    return _ratio_gate(gate, ratio_ci, max_overhead, subject, confidence, noun, on_inconclusive=on_inconclusive)


def _entry_samples(entry: Mapping[str, Any] | Sequence[float], what: str) -> np.ndarray:
    """Samples (seconds) from a report variant entry or a bare list."""
    if isinstance(entry, Mapping):
        if "samples_s" not in entry:
            raise BadInputError(f"{what}: report entry has no 'samples_s'")
        entry = entry["samples_s"]
    return _as_samples(entry, what)


def regression_gate(
    current_report_entry: Mapping[str, Any] | Sequence[float],
    baseline_entry: Mapping[str, Any] | Sequence[float],
    max_regression: float,
    *,
    subject: str = "",
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
    margin: float = 0.0,
    notes: Sequence[str] = (),
    on_inconclusive: str = "warn",
) -> GateResult:
    """Gate this run against an earlier one for the same shape and variant.

    Entries are report variant entries (with 'samples_s') or bare sample
    lists. The bootstrap CI of median(current) / median(baseline) covers the
    noise inside each run, not the drift between runs (a process, a session,
    clocks, a neighbour: measured at a few percent, README "Calibration"), so
    it fails only when the CI lies wholly above (1 + max_regression) *
    (1 + margin). A real improvement larger than the margin is suspicious — a
    baseline measured on a loaded machine makes everything look fast — and is
    inconclusive, as is any comparison with `notes` (configuration mismatches).
    """
    max_regression = _check_limit(max_regression, "max regression")
    margin = _check_limit(margin, "between-run margin")
    cur = _entry_samples(current_report_entry, "current")
    base = _entry_samples(baseline_entry, "baseline")
    ci = bootstrap_ratio_of_medians_ci(cur, base, confidence=confidence, resamples=resamples, seed=seed)
    notes = list(notes)
    if margin and ci[2] < 1.0 / (1.0 + 2.0 * margin):
        notes.append(
            f"this run is {1 - ci[0]:.0%} faster than the baseline, beyond twice the between-run margin: "
            "was the baseline measured on a loaded machine? Re-record it"
        )
    dispersion = relative_iqr(base)
    if dispersion > max(LOADED_DISPERSION, 2.0 * relative_iqr(cur)):
        notes.append(
            f"the baseline's own spread (IQR {dispersion:.0%} of its median, this run {relative_iqr(cur):.0%}) "
            "says it was measured under load; re-record it"
        )
    return _ratio_gate(
        "regression",
        ci,
        max_regression,
        subject,
        confidence,
        "regression",
        margin=margin,
        notes=notes,
        on_inconclusive=on_inconclusive,
    )


def yardstick_note(
    current_reference: Sequence[float], baseline_reference: Sequence[float], margin: float, name: str = "reference"
) -> str | None:
    """A doubt when the reference variant (usually the unchanged base model: the machine's
    yardstick) itself moved by more than the between-run margin: the machine's state
    differs between the runs (load, clocks), so no variant's change can be read off."""
    drift = float(np.median(_as_samples(current_reference)) / np.median(_as_samples(baseline_reference)))
    if abs(drift - 1.0) <= margin:
        return None
    return (
        f"the reference {name!r} itself ran {_pct(drift)} against the baseline, beyond the {margin:.1%} "
        "between-run margin: the machine's state differs between the runs"
    )


# A baseline whose interquartile range exceeds this fraction of its median (and twice this
# run's) was measured under load: quiet runs of the calibration stayed below 0.05.
LOADED_DISPERSION = 0.10


def relative_iqr(samples: Sequence[float] | np.ndarray) -> float:
    """Interquartile range / median: the spread of one run, independent of its speed."""
    arr = _as_samples(samples)
    q1, q2, q3 = np.percentile(arr, [25, 50, 75])
    return float((q3 - q1) / q2) if q2 > 0 else math.inf


# ---------------------------------------------------------------- adaptive rounds


def relative_width(interval: Sequence[float]) -> float:
    """(high - low) / median of a (median, low, high) interval: its width as a fraction."""
    median, low, high = (float(x) for x in interval)
    return (high - low) / median if median > 0 else math.inf


def widest_interval(
    samples: Mapping[str, Sequence[float]],
    reference: str,
    *,
    own: bool = False,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, str]:
    """(relative width, what) of the widest interval more rounds of this run can narrow.

    Those are every variant's paired ratio to `reference` (what the in-run gates decide
    on) and, with `own` (a saved baseline's gates, which compare each variant's own
    median) or when there is no pair, every variant's own median. Only widths are looked
    at, never where an interval lies, so stopping on them does not bias a verdict (as
    stopping on "conclusive" would: peeking until the interval clears a limit)."""
    ci = {"confidence": confidence, "resamples": resamples, "seed": seed}
    widths = []
    if reference in samples:
        for name, values in samples.items():
            if name != reference:
                ratio = bootstrap_median_ci(paired_ratios(samples[reference], values), **ci)
                widths.append((relative_width(ratio), f"{name} / {reference}"))
    if own or not widths:
        for name, values in samples.items():
            widths.append((relative_width(bootstrap_median_ci(values, **ci)), f"{name} p50"))
    return max(widths)


def more_rounds(done: int, width: float, target: float, minimum: int = 10) -> int:
    """Rounds to add to `done` for an interval `width` wide to reach `target`.

    Widths shrink as 1/sqrt(rounds), so about done * (width / target)^2 in all; at least
    `minimum`, and at most `done` (doubling): a width from few rounds is itself noisy,
    so the estimate is revised after every step rather than trusted for one long one."""
    if not width > target:
        return 0
    wanted = math.ceil(done * (width / target) ** 2) - done if math.isfinite(width) else done
    return int(min(max(wanted, minimum), max(done, minimum)))


# ---------------------------------------------------------------- noise floor of a saved baseline

# Student's t, two-sided 95% (the 0.975 quantile), by degrees of freedom; between two
# tabulated ones the smaller df's (larger) value is used, beyond 30 the value for 30.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
_T975 |= {12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: int) -> float:
    if df < 1:
        raise BadInputError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[max(k for k in _T975 if k <= df)]


def noise_margin(medians: Sequence[float] | np.ndarray) -> float:
    """The between-run margin that a baseline's own N repeated runs call for.

    The upper end of a 95% prediction interval for one later run's median against the
    mean of these N, on the log scale (Student's t, N-1 degrees of freedom):
    exp(t * s * sqrt(1 + 1/N)) - 1, s the standard deviation of the log medians. Few runs
    give a wide bound on purpose: two agreeing runs prove little (t = 12.7 for N = 2).
    """
    arr = _as_samples(medians, "run medians")
    if arr.size < 2 or np.any(arr <= 0):
        raise BadInputError(f"a noise floor needs at least 2 positive run medians, got {arr.tolist()}")
    spread = float(np.log(arr).std(ddof=1))
    return math.expm1(t975(arr.size - 1) * spread * math.sqrt(1.0 + 1.0 / arr.size))


def enforce_gates(gates: Sequence[GateResult | Mapping[str, Any]]) -> None:
    """Raise GateFailed (exit 1) naming every failed gate; return if all passed."""
    results = [g if isinstance(g, GateResult) else GateResult.from_dict(g) for g in gates]
    failed = [g.message for g in results if not g.passed]
    if failed:
        raise GateFailed(f"{len(failed)} latency gate(s) failed: " + " | ".join(failed))


_PERCENT_RE = re.compile(r"^\s*([+]?\d+(?:\.\d*)?|[+]?\.\d+)\s*(%?)\s*$")


def parse_percent(text: str | float) -> float:
    """'2%' -> 0.02, '2 %' -> 0.02, '0.02' -> 0.02.

    A bare number is a fraction and must be at most 1: '2' is almost always
    a forgotten '%', and silently allowing 200% would disable the gate.
    """
    raw = str(text)
    match = _PERCENT_RE.match(raw)
    if not match:
        raise BadInputError(f"not a percentage: {raw!r} (use e.g. '2%' or '0.02')")
    number, percent = float(match.group(1)), match.group(2)
    if percent:
        if number > 100:
            raise BadInputError(f"percentage above 100%: {raw!r}")
        return number / 100.0
    if number > 1:
        raise BadInputError(f"fraction above 1: {raw!r}; did you mean '{match.group(1)}%'?")
    return number


def fraction(value: float | str | None) -> float | None:
    """A limit as a fraction: '2%' / 0.02 -> 0.02; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        return parse_percent(value)
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise BadInputError(f"a limit must be a finite fraction >= 0, got {value}")
    return value


# ---------------------------------------------------------------- sessions (two-level bootstrap)

# A statistic of one session's samples, vectorised: arrays of shape (rows, n) -> (rows,).
SessionStatistic = Callable[..., np.ndarray]

# How the report names the interval each number of sessions gets.
FLAT_BOOTSTRAP = (
    "one-level percentile bootstrap of the rounds around the median per-round ratio (one session per variant: "
    "excludes session-to-session variation)"
)
TWO_LEVEL_BOOTSTRAP = (
    "two-level bootstrap (sessions with replacement, then rounds within each) of the geometric mean of the "
    "per-session statistics, as a Student's t interval with sessions - 1 degrees of freedom around its standard error"
)
# What `ratio.median` / `p99_ratio.median` hold (their `statistic` field; the key keeps
# its old name so earlier readers still find the point estimate there).
RATIO_STATISTIC = {
    False: {"ratio": "median of the per-round ratios", "p99_ratio": "p99 ratio"},
    True: {
        "ratio": "geometric mean of the per-session medians",
        "p99_ratio": "geometric mean of the per-session p99 ratios",
    },
}


def median_of_ratios(ratios: np.ndarray) -> np.ndarray:
    """Per row, the median of paired per-round ratios (the in-run ratio of `bench`)."""
    return np.median(ratios, axis=-1)


def p99_ratio(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per row, p99(candidate) / p99(reference) (control-loop mode)."""
    return np.percentile(candidate, 99, axis=-1) / np.percentile(reference, 99, axis=-1)


def session_groups(sessions: Sequence[int] | np.ndarray, n: int) -> list[np.ndarray]:
    """Indices of the samples of each session, in the order sessions first appear."""
    labels = np.asarray(sessions)
    if labels.shape != (n,):
        raise BadInputError(f"sessions: need one label per sample ({n}), got shape {labels.shape}")
    _, first = np.unique(labels, return_index=True)
    return [np.flatnonzero(labels == labels[i]) for i in sorted(first)]


def _resampled(arrays: Sequence[np.ndarray], statistic: SessionStatistic, rows: int, rng) -> np.ndarray:
    """`rows` values of `statistic` on `arrays` resampled together (pairs stay pairs)."""
    n = arrays[0].size
    chunk = max(1, _CHUNK_ELEMENTS // (n * len(arrays)))
    out = np.empty(rows)
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = statistic(*(a[idx] for a in arrays))
    return out


def _paired(
    arrays: Sequence[Sequence[float] | np.ndarray], sessions: Sequence[int] | np.ndarray
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    data = [_as_samples(a, f"samples {i}") for i, a in enumerate(arrays)]
    if not data or any(a.shape != data[0].shape for a in data):
        raise BadInputError("session ratio: need paired sample lists of one length")
    return data, session_groups(sessions, data[0].size)


def per_session(
    arrays: Sequence[Sequence[float] | np.ndarray],
    sessions: Sequence[int] | np.ndarray,
    statistic: SessionStatistic = median_of_ratios,
) -> list[float]:
    """`statistic` of each session's pairs, in the order sessions first appear (all positive)."""
    data, groups = _paired(arrays, sessions)
    values = [float(statistic(*(a[None, g] for a in data))[0]) for g in groups]
    if any(not (v > 0 and math.isfinite(v)) for v in values):
        raise BadInputError(f"session ratio: the statistic must be positive in every session, got {values}")
    return values


def session_ratio_ci(
    arrays: Sequence[Sequence[float] | np.ndarray],
    sessions: Sequence[int] | np.ndarray,
    statistic: SessionStatistic = median_of_ratios,
    *,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(ratio, low, high) of a positive statistic of paired samples from several sessions.

    `arrays` are paired sample lists (one per argument of `statistic`: the per-round
    ratios for `median_of_ratios`, reference and candidate latencies for `p99_ratio`),
    `sessions` the session each pair came from. Every variant's speed differs a little
    from one ONNX Runtime session to the next (where its buffers landed, its thread pool),
    and one session per variant puts that difference into every ratio, unseen by a
    bootstrap of rounds. So with K >= 2 sessions the session is the unit: the ratio is the
    geometric mean of the K per-session statistics, and its spread is estimated by a
    two-level bootstrap (K sessions drawn with replacement, then each drawn session's pairs
    with replacement, the statistic computed per drawn session). Few sessions make that
    spread itself uncertain, and a percentile interval of K resampled values can never
    reach past their range (with 3 sessions it misses the truth a quarter of the time), so
    the interval is Student's t with K - 1 degrees of freedom on the log scale around the
    standard error the bootstrap measures (its variance corrected for drawing K of K and
    for the within-session noise that both levels count).
    With one session this is the one-level percentile bootstrap of the pairs
    (`bootstrap_median_ci` of the ratios for the median): its interval excludes
    session-to-session variation. Deterministic for a given seed.
    """
    _check_ci_args(confidence, resamples)
    data, groups = _paired(arrays, sessions)
    values = per_session(data, sessions, statistic)
    rng = np.random.default_rng(seed)
    k = len(groups)
    if k == 1:
        return _interval(values[0], _resampled(data, statistic, resamples, rng), confidence)
    if not math.isclose(confidence, 0.95):
        raise BadInputError(f"the session interval is Student's t at 95% (tabulated), got confidence {confidence}")
    logs = np.log(values)
    point = float(np.exp(logs.mean()))
    # Inner level: `resamples` bootstrap values per session; outer: K sessions drawn per row.
    inner = np.stack([_resampled([a[g] for a in data], statistic, resamples, rng) for g in groups])
    if not np.all(inner > 0) or not np.all(np.isfinite(inner)):
        raise BadInputError("session ratio: the statistic must be positive in every resample (zero timings?)")
    inner = np.log(inner)
    chosen = rng.integers(0, k, size=(resamples, k))
    which = rng.integers(0, resamples, size=(resamples, k))
    boot = inner[chosen, which].mean(axis=1)
    # var(boot) = (k-1)/k * s^2/k + w/k, with s^2 the spread of the per-session values (their
    # within-session noise included) and w the mean inner variance, counted twice by the two
    # levels; s^2/k, the squared standard error of their mean, is recovered from it, and never
    # taken below the within-session part alone.
    within = float(inner.var(axis=1, ddof=1).mean()) / k
    se2 = max((float(boot.var(ddof=1)) - within) * k / (k - 1), within)
    half = t975(k - 1) * math.sqrt(se2)
    return point, point * math.exp(-half), point * math.exp(half)


def sessions_for_width(per_session_values: Sequence[float], half_width: float, most: int = 100) -> int | None:
    """The fewest sessions whose `session_ratio_ci` interval would be about +-`half_width`
    (0.02: +-2%), from the spread of the per-session values a run measured: the smallest
    K >= 2 with t(K - 1) * s / sqrt(K) <= log(1 + half_width), s their standard deviation on
    the log scale (a power calculation for planning the next run; None beyond `most`)."""
    values = _as_samples(per_session_values, "per-session values")
    if values.size < 2 or np.any(values <= 0):
        raise BadInputError(f"a power calculation needs at least 2 positive per-session values, got {values.tolist()}")
    spread = float(np.log(values).std(ddof=1))
    target = math.log1p(half_width)
    for k in range(2, most + 1):
        if t975(k - 1) * spread / math.sqrt(k) <= target:
            return k
    return None
