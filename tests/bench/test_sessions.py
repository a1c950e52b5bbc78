"""Several sessions per variant (`bench --sessions K`, issues 11 and 14): the two-level
bootstrap's coverage on synthetic data with a known session effect, the epochs' machinery,
and the option through run_bench, the CLI, the control loop and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from lora_deploy.backends import registry
from lora_deploy.bench import run as bench
from lora_deploy.bench.report import to_markdown
from lora_deploy.bench.schema import load_report, validate_report
from lora_deploy.bench.sessions import (
    DEFAULT_SESSIONS,
    concat_loops,
    concat_sessions,
    in_sessions,
    session_count,
    split_rounds,
)
from lora_deploy.bench.stats import (
    bootstrap_median_ci,
    p99_ratio,
    paired_ratios,
    per_session,
    session_ratio_ci,
)
from lora_deploy.cli import main
from lora_deploy.errors import BadInputError
from tests.bench.test_bench import tiny_graph

# ---------------------------------------------------------------- the statistics


def sessions_with_effect(rng, *, k, n, session_sd, noise_sd, true=1.0):
    """Paired latencies from k sessions of n rounds: every session of every variant runs at
    its own speed (a lognormal factor, `session_sd`), every round shares a drift, and
    every call has its own noise. The candidate is `true` times the reference."""
    labels = np.repeat(np.arange(k), n)
    ref_speed = np.exp(rng.normal(0, session_sd, k))[labels]
    cand_speed = np.exp(rng.normal(0, session_sd, k))[labels]
    drift = np.exp(rng.normal(0, 0.05, k * n))
    ref = 1e-3 * ref_speed * drift * np.exp(rng.normal(0, noise_sd, k * n))
    cand = 1e-3 * true * cand_speed * drift * np.exp(rng.normal(0, noise_sd, k * n))
    return ref, cand, labels


def coverage(trials, *, k, n, session_sd, noise_sd, statistic="median", true=1.03):
    rng = np.random.default_rng(7)
    two_level = flat = 0
    for t in range(trials):
        ref, cand, labels = sessions_with_effect(rng, k=k, n=n, session_sd=session_sd, noise_sd=noise_sd, true=true)
        ci = {"resamples": 400, "seed": t}
        if statistic == "median":
            _, lo, hi = session_ratio_ci([paired_ratios(ref, cand)], labels, **ci)
            _, flo, fhi = bootstrap_median_ci(paired_ratios(ref, cand), **ci)
        else:
            _, lo, hi = session_ratio_ci([ref, cand], labels, p99_ratio, **ci)
            _, flo, fhi = session_ratio_ci([ref, cand], np.zeros(k * n, int), p99_ratio, **ci)
        two_level += lo <= true <= hi
        flat += flo <= true <= fhi
    return two_level / trials, flat / trials


def test_the_two_level_interval_covers_a_session_effect_that_the_flat_one_misses():
    """A 2% per-session effect (a few percent between two sessions, as measured on ORT):
    the interval of rounds alone is confidently wrong, the session interval holds ~95%."""
    two_level, flat = coverage(150, k=4, n=25, session_sd=0.02, noise_sd=0.02)
    assert two_level >= 0.88, two_level
    assert flat <= 0.7, flat


def test_the_p99_ratio_interval_covers_a_session_effect_too():
    two_level, flat = coverage(60, k=5, n=200, session_sd=0.03, noise_sd=0.05, statistic="p99")
    assert two_level >= 0.85, two_level
    assert flat <= 0.7, flat


def test_without_a_session_effect_the_interval_stays_honest_and_not_absurdly_wide():
    rng = np.random.default_rng(3)
    widths, covered = [], 0
    for t in range(60):
        ref, cand, labels = sessions_with_effect(rng, k=8, n=25, session_sd=0.0, noise_sd=0.02)
        median, lo, hi = session_ratio_ci([paired_ratios(ref, cand)], labels, resamples=400, seed=t)
        covered += lo <= 1.0 <= hi
        widths.append((hi - lo) / median)
    assert covered >= 55
    assert np.median(widths) < 0.03  # +-1.5%: the within-session noise, with t for 7 degrees of freedom


def test_one_session_is_the_old_bootstrap_of_rounds_exactly():
    rng = np.random.default_rng(0)
    ref, cand = rng.lognormal(0, 0.05, 40), rng.lognormal(0, 0.05, 40)
    ratios = paired_ratios(ref, cand)
    assert session_ratio_ci([ratios], [0] * 40, seed=3) == bootstrap_median_ci(ratios, seed=3)


def test_the_point_is_the_geometric_mean_of_the_sessions_and_the_interval_contains_it():
    ratios = np.array([1.0] * 10 + [1.1] * 10 + [0.95] * 10) * np.linspace(0.999, 1.001, 30)
    labels = [5] * 10 + [2] * 10 + [9] * 10  # any labels; order of first appearance
    values = per_session([ratios], labels)
    assert values == pytest.approx([1.0, 1.1, 0.95], rel=2e-3)
    median, low, high = session_ratio_ci([ratios], labels, resamples=500)
    assert median == pytest.approx(float(np.exp(np.mean(np.log(values)))))
    assert low < 0.97 and high > 1.04 and low < median < high


@pytest.mark.parametrize(
    "arrays, labels, message",
    [
        ([[1.0, 1.0, 1.0]], [0, 1], "one label per sample"),
        ([[1.0, 1.0], [1.0]], [0, 1], "paired sample lists"),
        ([[1.0, 1.0, 0.0, 0.0]], [0, 0, 1, 1], "positive in every session"),
        ([[1.0, 1.0, 1.0, 2.0, 0.0, 1.0]], [0, 0, 0, 1, 1, 1], "every resample"),
    ],
)
def test_session_ratio_refuses_what_it_cannot_use(arrays, labels, message):
    with pytest.raises(BadInputError, match=message):
        session_ratio_ci(arrays, labels, resamples=10)
    with pytest.raises(BadInputError, match="tabulated"):
        session_ratio_ci([[1.0, 1.1, 1.0, 1.1]], [0, 0, 1, 1], confidence=0.9, resamples=10)


# ---------------------------------------------------------------- the epochs


def test_session_count_defaults_and_refusals():
    assert session_count(None, 50) == DEFAULT_SESSIONS == 3
    assert session_count(None, 2) == 2 and session_count(None, 1) == 1
    assert session_count(None, 50, until_width=0.01) == 1 and session_count(None, 50, noise_runs=3) == 1
    assert session_count(None, 1, rate=100.0) == 3 and session_count(7, 1, rate=100.0) == 7
    assert session_count(1, 50, until_width=0.01) == 1
    # The control loop: at most one session per tick of each variant by default; more refused.
    assert session_count(None, 50, rate=200.0, ticks=0.8) == 1 and session_count(None, 50, rate=200.0, ticks=2.4) == 2
    assert session_count(1, 50, rate=200.0, ticks=0.8) == 1 and session_count(3, 50, rate=200.0, ticks=3.0) == 3
    with pytest.raises(BadInputError, match=r"--sessions 3 splits --duration .* 0.8 tick\(s\) per variant"):
        session_count(3, 50, rate=200.0, ticks=0.8)
    for bad, match in [
        ((0, 50), "integer >= 1"),
        ((4, 3), "need rounds >= sessions"),
        ((2, 50, {"until_width": 0.01}), "--until-width"),
        ((2, 50, {"noise_runs": 3}), "--noise-runs"),
    ]:
        args, kwargs = (bad, {}) if len(bad) == 2 else (bad[:2], bad[2])
        with pytest.raises(BadInputError, match=match):
            session_count(*args, **kwargs)


def test_rounds_are_split_and_every_sample_is_labelled():
    assert split_rounds(50, 3) == [17, 17, 16] and split_rounds(3, 3) == [1, 1, 1]
    parts = [{"1x4": {"a": [1, 2], "b": [3, 4]}}, {"1x4": {"a": [5], "b": [6]}}]
    results, labels = concat_sessions(parts)
    assert results == {"1x4": {"a": [1, 2, 5], "b": [3, 4, 6]}} and labels == {"1x4": [0, 0, 1]}
    loops = [{"1x4": {"a": {"lag_s": [0.1], "miss": [False]}}}, {"1x4": {"a": {"lag_s": [0.2], "miss": [True]}}}]
    assert concat_loops(loops) == {"1x4": {"a": {"lag_s": [0.1, 0.2], "miss": [False, True]}}}


def test_in_sessions_reopens_between_epochs_and_counts_progress_on():
    opened, seen = [], []

    def reopen():
        opened.append(len(opened) + 1)
        return {"k": {"epoch": len(opened)}}

    def measure(calls, epoch, tick):
        rounds = [2, 2, 1][epoch]
        for i in range(rounds):
            tick("k", i + 1, rounds)
        return calls["k"]["epoch"], epoch

    parts = in_sessions({"k": {"epoch": 0}}, 3, reopen, measure, lambda *a: seen.append(a))
    assert parts == [(0, 0), (1, 1), (2, 2)] and opened == [1, 2]
    assert seen[0] == ("k", 1, 6) and seen[2] == ("k", 3, 6) and seen[-1] == ("k", 5, 5)


# ---------------------------------------------------------------- through run_bench and the CLI


@pytest.fixture
def pair(tmp_path):
    return {"base": tiny_graph(tmp_path / "base.onnx"), "merged": tiny_graph(tmp_path / "merged.onnx")}


def counting_opens(monkeypatch):
    """Wrap registry.open_timed: record the most sessions open at once and every open."""
    state = {"open": 0, "most": 0, "opens": 0}
    real = registry.open_timed

    def open_timed(*args, **kwargs):
        variant = real(*args, **kwargs)
        state["open"] += 1
        state["opens"] += 1
        state["most"] = max(state["most"], state["open"])
        close = variant.close

        def closing():
            state["open"] -= 1
            close()

        variant.close = closing
        return variant

    monkeypatch.setattr(registry, "open_timed", open_timed)
    return state


def test_run_bench_opens_fresh_sessions_per_epoch_one_set_at_a_time(pair, monkeypatch, tmp_path):
    state = counting_opens(monkeypatch)
    report = bench.run_bench(pair, shapes="1x4", rounds=8, warmup=1, sessions=4, max_overhead="50%")
    assert state["opens"] == 8 and state["most"] == 2 and state["open"] == 0
    config, merged = report["config"], report["results"]["1x4"]["variants"]["merged"]
    assert config["sessions"] == 4 and "two-level" in config["bootstrap"] and config["rounds"] == 8
    assert merged["sample_sessions"] == [0, 0, 1, 1, 2, 2, 3, 3] and len(merged["ratio"]["per_session"]) == 4
    gate = report["gates"][0]
    assert (gate["median"], gate["low"], gate["high"]) == tuple(merged["ratio"][k] for k in ("median", "low", "high"))
    assert "4 sessions per variant" in to_markdown(report)
    assert merged["ratio"]["statistic"] == "geometric mean of the per-session medians"
    assert merged["ratio"]["median"] == pytest.approx(np.exp(np.mean(np.log(merged["ratio"]["per_session"]))))
    header = to_markdown(report).split("| shape |")[0]
    assert "bootstrap CI" not in header and header.count("Student's t") == 1 and "geometric mean" in header
    path = tmp_path / "r.json"
    bench.write_outputs(report, json_path=path)
    assert load_report(path)["config"]["sessions"] == 4


def test_the_opening_order_turns_every_epoch(pair, monkeypatch):
    """The session opened last ran faster (a measured effect): no variant may always be it."""
    opened = []
    open_timed = registry.open_timed

    def recording(name, *args, **kwargs):
        opened.append(name)
        return open_timed(name, *args, **kwargs)

    monkeypatch.setattr(registry, "open_timed", recording)
    report = bench.run_bench(pair, shapes="1x4", rounds=8, warmup=1, sessions=4)
    names = list(pair)
    assert len(names) == 2 and opened == names + names[::-1] + names + names[::-1]
    assert list(report["results"]["1x4"]["variants"]) == names  # reports keep the models' order


def test_one_session_says_its_interval_excludes_the_session_effect(pair):
    report = bench.run_bench(pair, shapes="1x4", rounds=4, warmup=0, sessions=1)
    assert report["config"]["sessions"] == 1 and report["config"]["bootstrap"].startswith("one-level")
    assert "per_session" not in report["results"]["1x4"]["variants"]["merged"]["ratio"]
    assert "exclude session-to-session variation" in to_markdown(report)
    assert report["results"]["1x4"]["variants"]["merged"]["ratio"]["statistic"] == "median of the per-round ratios"
    # One description of the interval, not two (the rounds line no longer adds "median with ... bootstrap CI").
    assert "bootstrap CI" not in to_markdown(report) and "Student" not in to_markdown(report)


def test_the_control_loop_runs_in_sessions_with_a_p99_ratio(pair):
    report = bench.run_bench(pair, shapes="1x4", rate="200hz", duration="0.3s", warmup=1, sessions=3)
    merged = report["results"]["1x4"]["variants"]["merged"]
    assert report["config"]["sessions"] == 3 and sorted(set(merged["sample_sessions"])) == [0, 1, 2]
    assert len(merged["samples_s"]) == len(merged["loop"]["miss"]) == merged["loop"]["ticks"]
    ratio = merged["p99_ratio"]
    assert ratio["vs"] == "base" and ratio["low"] <= ratio["median"] <= ratio["high"]
    assert ratio["statistic"] == "geometric mean of the per-session p99 ratios"
    # 30 ticks per variant: no p99 (needs 100) nor p99.9, null in JSON, n/a in the table.
    assert merged["p99_ms"] is None and merged["p999_ms"] is None and merged["p90_ms"] is not None
    validate_report(json.loads(json.dumps(report)))
    assert f"| 1x4 | merged | {merged['loop']['ticks']} |" in to_markdown(report)
    assert f"{ratio['median']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}]" in to_markdown(report)


def test_a_duration_too_short_for_the_sessions_is_refused(pair):
    """--duration 0.004s at 200 Hz is 0.8 ticks: three sessions ran one tick each."""
    args = ["bench", "--model", f"base={pair['base']}", "--shapes", "1x4", "--rate", "200", "--duration", "0.004s"]
    result = CliRunner().invoke(main, [*args, "--sessions", "3", "--quiet"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "--sessions 3" in result.stderr, result.output


def test_an_old_report_without_sessions_is_still_read(pair, tmp_path):
    report = bench.run_bench(pair, shapes="1x4", rounds=3, warmup=0)
    old = json.loads(json.dumps(report))
    old["schema"] = "lora-deploy.bench/2"
    for key in ("sessions", "bootstrap"):
        old["config"].pop(key)
    for entry in old["results"]["1x4"]["variants"].values():
        entry.pop("sample_sessions")
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    gates = bench.run_bench(pair, shapes="1x4", rounds=3, warmup=0, baseline_path=path, max_regression="50%")["gates"]
    assert [g["subject"] for g in gates] == ["1x4/base", "1x4/merged"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sessions", "0"], "--sessions"),
        (["--sessions", "2", "--until-width", "1%"], "--until-width"),
        (["--sessions", "9", "--rounds", "4"], "need rounds >= sessions"),
    ],
)
def test_cli_sessions_bad_input_is_one_line(pair, extra, message):
    argv = ["bench", "--model", f"base={pair['base']}", "--shapes", "1x4", "--quiet", *extra]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_sessions_flag_reaches_the_report(pair, tmp_path):
    out = tmp_path / "r.json"
    models = [f"--model=base={pair['base']}", f"--model=merged={pair['merged']}"]
    argv = ["bench", *models, "--shapes", "1x4", "--rounds", "4", "--warmup", "0", "--sessions", "2"]
    result = CliRunner().invoke(main, [*argv, "--quiet", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["config"]["sessions"] == 2


def test_the_power_calculation_asks_for_more_sessions_when_they_disagree_more():
    from lora_deploy.bench.stats import sessions_for_width

    assert sessions_for_width([1.0, 1.0, 1.0], 0.02) == 2
    few = sessions_for_width([0.99, 1.01, 1.0, 0.995], 0.02)
    many = sessions_for_width([0.97, 1.03, 1.0, 0.985], 0.02)
    assert few is not None and many is not None and 2 < few < many
    assert sessions_for_width([0.5, 2.0], 0.02) is None
    with pytest.raises(BadInputError):
        sessions_for_width([1.0], 0.02)
