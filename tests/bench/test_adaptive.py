"""Adaptive rounds (--until-width / --max-time) and the noise floor a saved baseline
records (--noise-runs), on synthetic timings: a stand-in for measure_interleaved draws
each round's samples, a fake clock counts the seconds they would take."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lora_deploy.bench import adaptive, measure
from lora_deploy.bench import run as bench
from lora_deploy.bench.gates import DEFAULT_RUN_MARGIN
from lora_deploy.bench.report import to_markdown
from lora_deploy.bench.schema import write_json
from lora_deploy.bench.stats import more_rounds, noise_margin, relative_width, t975, widest_interval
from lora_deploy.bench.summary import build_report
from lora_deploy.bench.timing import measure_interleaved
from lora_deploy.errors import BadInputError
from tests.bench.test_bench import tiny_graph
from tests.bench.test_report import MACHINE


@pytest.fixture(autouse=True)
def no_full_collections(monkeypatch):
    """Timing is synthetic here: skip the collection before each timed block (a second
    or more each in a test process holding torch and transformers)."""
    monkeypatch.setattr(measure.gc, "collect", lambda *a: 0)


class Rounds:
    """measure_interleaved's stand-in: per round a shared machine factor, times each
    variant's factor, times its own noise; logs every call and advances `clock`."""

    def __init__(self, factors, *, noise=0.03, seed=0, clock=None, drift=None):
        self.factors, self.noise, self.clock, self.drift = factors, noise, clock, drift
        self.rng = np.random.default_rng(seed)
        self.calls = []

    def __call__(self, variants, *, warmup, rounds, inner=1, progress=None, first_round=0, **_):
        self.calls.append({"rounds": rounds, "first_round": first_round, "warmup": warmup})
        machine = 1e-3 * self.rng.lognormal(0, self.noise, rounds)
        if self.drift is not None:
            machine *= self.drift(len(self.calls))
        out = {n: list(machine * self.factors[n] * self.rng.lognormal(0, self.noise, rounds)) for n in variants}
        if self.clock is not None:
            self.clock.now += sum(sum(v) for v in out.values()) * inner
        return out


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake_timing(mp, fake):
    """`fake` times every round: the first ones (measure) and the added ones (adaptive)."""
    mp.setattr(measure, "measure_interleaved", fake)
    mp.setattr(adaptive, "measure_interleaved", fake)


CALLS = {"1x4": {"base": lambda: None, "merged": lambda: None}}


def test_rounds_are_added_until_every_interval_is_narrow():
    clock = Clock()
    fake = Rounds({"base": 1.0, "merged": 1.04}, clock=clock)
    with pytest.MonkeyPatch.context() as mp:
        fake_timing(mp, fake)
        results, info = adaptive.measure_adaptive(
            CALLS, rounds=20, warmup=3, inner=1, reference="base", until_width=0.01, max_time_s=60.0, clock=clock
        )
    n = len(results["1x4"]["base"])
    assert info["stopped"] == "narrow" and info["shapes"]["1x4"]["rounds"] == n > 20
    assert len(results["1x4"]["merged"]) == n  # every added round holds every variant: still pairs
    width, _ = widest_interval(results["1x4"], "base")
    assert width <= 0.01 == info["until_width"] and info["shapes"]["1x4"]["width"] == pytest.approx(width, rel=0.2)
    # Each step continues the rotation where the last stopped, after one untimed call per variant.
    done = 0
    for call in fake.calls:
        assert call["first_round"] == done
        done += call["rounds"]
    assert [c["warmup"] for c in fake.calls] == [3] + [1] * (len(fake.calls) - 1)
    # The first round count is the minimum; steps at most double what was done.
    assert all(c["rounds"] <= max(c["first_round"], 10) for c in fake.calls[1:])


def test_the_time_budget_stops_the_rounds_and_the_report_says_why():
    clock = Clock()
    fake = Rounds({"base": 1.0, "merged": 1.0}, noise=0.2, clock=clock)
    with pytest.MonkeyPatch.context() as mp:
        fake_timing(mp, fake)
        results, info = adaptive.measure_adaptive(
            CALLS, rounds=20, warmup=0, inner=1, reference="base", until_width=0.001, max_time_s=0.5, clock=clock
        )
    assert info["stopped"] == "time" and "0.5 s budget ran out with 1x4: merged / base" in info["reason"]
    assert clock.now <= 0.5 * 1.05  # a step is sized to fit what is left of the budget
    assert info["shapes"]["1x4"]["width"] > 0.001
    report = build_report(
        results, backend="onnxruntime", device="cpu", reference="base", rounds=20, machine=MACHINE, adaptive=info
    )
    assert report["config"]["adaptive"]["shapes"]["1x4"]["rounds"] == report["results"]["1x4"]["variants"]["base"]["n"]
    assert "stopped: the 0.5 s budget ran out" in to_markdown(report)


def test_continued_rounds_keep_the_rotation_of_one_long_run():
    order = []
    variants = {n: (lambda n=n: order.append(n)) for n in "abc"}
    measure_interleaved(variants, warmup=0, rounds=7)
    whole, order[:] = list(order), []
    measure_interleaved(variants, warmup=0, rounds=4)
    measure_interleaved(variants, warmup=0, rounds=3, first_round=4)
    assert order == whole


def test_more_rounds_follows_the_square_root_law_within_bounds():
    assert more_rounds(100, 0.02, 0.01) == 100  # 400 wanted, at most doubling per step
    assert more_rounds(100, 0.0105, 0.01) == 11  # ceil(100 * 1.1025) - 100
    assert more_rounds(100, 0.01, 0.01) == 0
    assert more_rounds(5, 0.5, 0.01) == 10  # at least the minimum step
    assert relative_width((2.0, 1.9, 2.1)) == pytest.approx(0.1)


def test_adaptive_options_through_run_bench(tmp_path, monkeypatch):
    fake_timing(monkeypatch, Rounds({"base": 1.0, "merged": 1.0}, noise=0.01))
    pair = {"base": tiny_graph(tmp_path / "a.onnx"), "merged": tiny_graph(tmp_path / "b.onnx")}
    report = bench.run_bench(pair, shapes="1x4", rounds=10, warmup=0, until_width="2%", max_overhead="5%")
    info = report["config"]["adaptive"]
    assert info["until_width"] == 0.02 and info["max_time_s"] == adaptive.DEFAULT_MAX_TIME_S
    assert info["stopped"] == "narrow" and report["gates"][0]["verdict"] == "pass"
    for kwargs, phrase in [
        ({"max_time": "10s"}, "--max-time is the budget of --until-width"),
        ({"until_width": "0%"}, "--until-width must be above 0"),
        ({"until_width": "1%", "rate": "100hz"}, "control-loop mode"),
        ({"until_width": "1%", "max_time": "soon"}, "bad time budget"),
        ({"until_width": "1%", "noise_runs": 3}, "drop --until-width"),
    ]:
        with pytest.raises(BadInputError, match=phrase):
            bench.run_bench(pair, shapes="1x4", **kwargs)


# ---------------------------------------------------------------- noise floor


def test_noise_margin_is_a_prediction_bound_for_the_next_run():
    """Simulated: N runs' medians and one more from the same distribution; the next one
    lies above the bound's upper end about 2.5% of the time (one side of a 95% interval)."""
    rng = np.random.default_rng(0)
    for n in (3, 5, 10):
        above = 0
        trials = 4000
        for _ in range(trials):
            medians = np.exp(rng.normal(0, 0.02, n + 1))
            margin = noise_margin(medians[:n])
            above += medians[n] > math.exp(np.log(medians[:n]).mean()) * (1 + margin)
        assert 0.015 < above / trials < 0.035, (n, above / trials)
    assert t975(1) == 12.706 and t975(11) == t975(10) and t975(100) == t975(30)
    with pytest.raises(BadInputError, match="at least 2 positive"):
        noise_margin([1.0])


def noisy_baseline(tmp_path, monkeypatch, pair, spread):
    """A baseline recorded with --noise-runs 3, its runs' medians `spread` apart."""
    steps = iter([1.0, 1.0 + spread, 1.0 - spread])
    fake = Rounds({"base": 1.0, "merged": 1.0}, noise=0.005, drift=lambda i: next(steps))
    fake_timing(monkeypatch, fake)
    report = bench.run_bench(pair, shapes="1x4", rounds=40, warmup=0, noise_runs=3)
    assert len(fake.calls) == 3 and report["noise"]["runs"] == 3 and report["config"]["noise_runs"] == 3
    assert report["results"]["1x4"]["variants"]["merged"]["n"] == 120
    path = tmp_path / f"baseline-{spread}.json"
    write_json(report, path)
    return path, report


def test_a_baseline_with_a_noise_floor_calibrates_the_margin(tmp_path, monkeypatch):
    pair = {"base": tiny_graph(tmp_path / "a.onnx"), "merged": tiny_graph(tmp_path / "b.onnx")}
    # Runs that agree closely: the margin stays the default floor.
    quiet, _ = noisy_baseline(tmp_path, monkeypatch, pair, 0.001)
    fake_timing(monkeypatch, Rounds({"base": 1.0, "merged": 1.0}, noise=0.005, seed=1))
    report = bench.run_bench(pair, shapes="1x4", rounds=40, warmup=0, baseline_path=quiet)
    assert report["config"]["run_margin"] is None and report["baseline"]["noise_runs"] == 3
    assert report["baseline"]["run_margins"] == {"1x4": DEFAULT_RUN_MARGIN}
    assert [g["margin"] for g in report["gates"]] == [DEFAULT_RUN_MARGIN] * 2
    assert "from the baseline's noise floor over 3 runs" in to_markdown(report)
    # Runs 0.8% apart: a wider margin (about 5x their spread with 3 runs), which a
    # slowdown must clear on top of the limit: 1.05 x (1 + margin).
    medium, recorded = noisy_baseline(tmp_path, monkeypatch, pair, 0.008)
    floor = recorded["noise"]["shapes"]["1x4"]["margin"]
    assert DEFAULT_RUN_MARGIN < floor < 0.05
    fake_timing(monkeypatch, Rounds({"base": 1.0, "merged": 1.15}, noise=0.005, seed=2))
    gates = bench.run_bench(pair, shapes="1x4", rounds=40, warmup=0, baseline_path=medium)["gates"]
    assert [g["margin"] for g in gates] == [pytest.approx(floor)] * 2
    assert [g["verdict"] for g in gates] == ["pass", "fail"]
    # An explicit --run-margin still wins.
    gates = bench.run_bench(pair, shapes="1x4", rounds=40, warmup=0, baseline_path=medium, run_margin="1%")["gates"]
    assert [g["margin"] for g in gates] == [0.01] * 2


def test_a_baseline_noisier_than_the_limit_is_inconclusive_and_old_ones_keep_3_percent(tmp_path, monkeypatch):
    pair = {"base": tiny_graph(tmp_path / "a.onnx"), "merged": tiny_graph(tmp_path / "b.onnx")}
    loud, _ = noisy_baseline(tmp_path, monkeypatch, pair, 0.03)
    fake_timing(monkeypatch, Rounds({"base": 1.0, "merged": 1.3}, noise=0.005, seed=3))
    gates = bench.run_bench(pair, shapes="1x4", rounds=40, warmup=0, baseline_path=loud)["gates"]
    assert {g["verdict"] for g in gates} == {"inconclusive"}
    assert all("call for a" in g["message"] and "re-record it on a quieter machine" in g["message"] for g in gates)
    # A report without a noise block (every baseline written before --noise-runs): 3%, as before.
    fake_timing(monkeypatch, Rounds({"base": 1.0, "merged": 1.0}, noise=0.005))
    plain = tmp_path / "plain.json"
    write_json(bench.run_bench(pair, shapes="1x4", rounds=40, warmup=0), plain)
    report = bench.run_bench(pair, shapes="1x4", rounds=40, warmup=0, baseline_path=plain)
    assert report["config"]["run_margin"] == DEFAULT_RUN_MARGIN
    assert {g["margin"] for g in report["gates"]} == {DEFAULT_RUN_MARGIN}
    with pytest.raises(BadInputError, match="--noise-runs must be >= 3"):
        bench.run_bench(pair, shapes="1x4", noise_runs=2)
