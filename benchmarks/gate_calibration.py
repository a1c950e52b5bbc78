"""How often the latency gates cry wolf, and how often they catch a real 5% or 10% slowdown.

The model: a chain of MatMul+Relu layers (384 wide, 20 layers, batch 32), ONNX Runtime on
the CPU, 1 intra-op thread. Everything is timed by `lora-deploy bench` itself, each run in
its own process (a fresh interpreter and fresh sessions: what a CI job does per commit).

1. **Slowed models, calibrated.** `slow5` / `slow10` are the same chain plus a side branch
   (x @ S, S of width w, summed, times 0, added to the output): a fixed extra cost. Its
   width is fitted so that an isolated paired run (previous vs the slowed model only,
   interleaved, adaptive rounds until the ratio's interval is 1% wide) measures x1.05 and
   x1.10; the measured ratios and their intervals are recorded.
2. **Reruns at the default settings** (N processes): `--baseline-model previous.onnx`
   (the reference) with `aa` (a byte-identical copy: any failing gate is a false alarm),
   `slow5` and `slow10`; 50 rounds, `--max-regression` 5%.
3. **Adaptive reruns** (M processes): the same with `--until-width 2% --max-time T`.
4. **Saved baselines** (K processes): the reruns' command with `--noise-runs 3`, as a
   baseline is recorded for a later `--baseline` comparison (the same set of models, so
   that baseline and later run differ only in when they ran).

Gate kinds evaluated, with the library's own gate code:

* in-run: the gates each rerun reported (limit 5%), and the same intervals against a
  2% limit (a 5% slowdown sits exactly at the 5% limit, so it can only be "caught" by a
  tighter one);
* saved baseline: every rerun's aa / slow5 / slow10 against every recorded baseline's
  `previous` (as if the baseline had been recorded under that name), the unchanged
  `previous` being the yardstick; once with the margin from the baseline's noise floor,
  once as an old baseline without one (the fixed 3%); and every ordered pair of reruns
  (the comparison of the first calibration) with the fixed 3%.

Outputs: a JSON and a Markdown summary in --out (`gate_calibration.*`, or
`gate_calibration_quick.*` with --quick); raw reports stay in --work.

    python benchmarks/gate_calibration.py --work /tmp/gatecal            # full: ~10-15 min on a quiet machine
    python benchmarks/gate_calibration.py --work /tmp/gatecal-q --quick  # a couple of minutes
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lora_deploy.bench.gates import DEFAULT_RUN_MARGIN, regression_gates
from lora_deploy.bench.run import run_bench
from lora_deploy.bench.schema import load_report
from lora_deploy.bench.stats import overhead_gate

WIDTH = 384
SHAPE = "32x1"
VARIANTS = ("aa", "slow5", "slow10")
TARGETS = {"slow5": 1.05, "slow10": 1.10}
LIMIT = 0.05
TIGHT_LIMIT = 0.02
ANALYSIS_RESAMPLES = 2000

MODES = {
    # reruns, adaptive reruns, baselines, adaptive budget, isolated-run budget (s), layers
    "quick": {"reruns": 5, "adaptive": 3, "baselines": 2, "max_time": "6s", "calibration_time": "6s"},
    "full": {"reruns": 24, "adaptive": 20, "baselines": 4, "max_time": "20s", "calibration_time": "20s"},
}


# ---------------------------------------------------------------- models


def chain(path: Path, layers: int, side: int = 0) -> Path:
    """The chain; with `side` > 0 plus the side branch of that width (a fixed extra cost)."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"h{i}"]))
        prev = f"h{i}"
    if side:
        s = (rng.standard_normal((WIDTH, side)) / np.sqrt(WIDTH)).astype(np.float32)
        inits += [
            numpy_helper.from_array(s, "side_w"),
            numpy_helper.from_array(np.array([1], np.int64), "side_axis"),
            numpy_helper.from_array(np.zeros(1, np.float32), "side_zero"),
        ]
        nodes += [
            helper.make_node("MatMul", ["x", "side_w"], ["side_m"]),
            helper.make_node("ReduceSum", ["side_m", "side_axis"], ["side_s"], keepdims=1),
            helper.make_node("Mul", ["side_s", "side_zero"], ["side_0"]),
            helper.make_node("Add", [prev, "side_0"], ["y"]),
        ]
    else:
        nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def isolated_ratio(previous: Path, candidate: Path, budget: str) -> dict:
    """candidate / previous in a paired run of those two alone (in this process)."""
    report = run_bench(
        {"previous": previous, "candidate": candidate},
        reference="previous",
        shapes=SHAPE,
        threads=1,
        rounds=100,
        until_width="1%",
        max_time=budget,
    )
    ratio = report["results"][SHAPE]["variants"]["candidate"]["ratio"]
    rounds = report["config"]["adaptive"]["shapes"][SHAPE]["rounds"]
    return {"median": ratio["median"], "low": ratio["low"], "high": ratio["high"], "rounds": rounds}


def calibrate(work: Path, layers: int, budget: str) -> dict:
    """Fit the side width of each slowed model to its target ratio. The extra cost is
    taken as proportional to the width (ratio - 1 = b * width, b by least squares over
    every measurement so far, so the noise of one measurement averages out); at most 4
    measurements per target, the closest one is kept."""
    previous = work / "previous.onnx"
    first = max(8, round(WIDTH * layers * 0.05 / 8) * 8)  # about one more layer's work
    points = [(first, isolated_ratio(previous, chain(work / "probe.onnx", layers, first), budget)["median"])]
    found = {}
    for name, target in TARGETS.items():
        tries = []
        for _ in range(4):
            w = np.array([p[0] for p in points], float)
            excess = np.array([p[1] - 1 for p in points])
            slope = max(float(w @ excess / (w @ w)), 1e-3 / WIDTH)  # a noisy negative fit: assume a small cost
            width = int(min(max(8, round((target - 1) / slope / 8) * 8), 64 * WIDTH))
            measured = isolated_ratio(previous, chain(work / f"{name}.onnx", layers, width), budget)
            tries.append({"side_width": width, **measured})
            points.append((width, measured["median"]))
            if abs(measured["median"] - target) <= 0.01:
                break
        best = min(tries, key=lambda t: abs(t["median"] - target))
        chain(work / f"{name}.onnx", layers, best["side_width"])  # the closest one is what the reruns time
        found[name] = {"target": target, **best, "tries": tries}
        print(f"{name}: side width {best['side_width']}, isolated ratio {best['median']:.3f}", flush=True)
    return found


# ---------------------------------------------------------------- runs


def lora_deploy() -> list[str]:
    exe = shutil.which("lora-deploy")
    return [exe] if exe else [sys.executable, "-c", "from lora_deploy.cli import main; main()"]


def run_cli(args: list[str], out: Path, reuse: bool) -> tuple[dict, float]:
    """One `lora-deploy bench` process; (its report, seconds it took)."""
    if reuse and out.is_file():
        return load_report(out), 0.0
    started = time.time()
    done = subprocess.run(
        [*lora_deploy(), "bench", *args, "--json", str(out), "--overwrite", "--quiet"], text=True, capture_output=True
    )
    # exit 1 is a failed gate (slow10 is meant to fail); anything else is a broken run.
    if done.returncode not in (0, 1):
        raise SystemExit(f"bench failed ({done.returncode}): {done.stderr.strip()}")
    return load_report(out), time.time() - started


def rerun_args(work: Path, extra: list[str]) -> list[str]:
    args = ["--baseline-model", str(work / "previous.onnx")]
    for name in VARIANTS:
        args += ["--model", f"{name}={work / (name + '.onnx')}"]
    return args + ["--shapes", SHAPE, "--threads", "1", *extra]


# ---------------------------------------------------------------- analysis


def count(verdicts: list[str]) -> dict:
    return {k: verdicts.count(k) for k in ("fail", "inconclusive", "pass")} | {"n": len(verdicts)}


def in_run(reports: list[dict], limit: float | None = None) -> dict:
    """Verdicts of the in-run gates per variant: as reported, or recomputed at `limit`
    from the reported intervals (the same gate function)."""
    out = {}
    for name in VARIANTS:
        verdicts = []
        for report in reports:
            if limit is None:
                gate = next(g for g in report["gates"] if g["subject"] == f"{SHAPE}/{name} vs previous")
                verdicts.append(gate["verdict"])
            else:
                ratio = report["results"][SHAPE]["variants"][name]["ratio"]
                gate = overhead_gate((ratio["median"], ratio["low"], ratio["high"]), limit, gate="regression")
                verdicts.append(gate.verdict)
        out[name] = count(verdicts)
    return out


def as_candidate(report: dict, name: str) -> dict:
    """A rerun seen as a later run: the unchanged `previous` (the yardstick) and `name`."""
    out = copy.deepcopy(report)
    variants = out["results"][SHAPE]["variants"]
    out["results"][SHAPE]["variants"] = {"previous": variants["previous"], name: variants[name]}
    out["config"].update(run_margin=None, max_regression=LIMIT, resamples=ANALYSIS_RESAMPLES, on_inconclusive="warn")
    out["gates"] = []
    return out


def as_baseline(report: dict, name: str, noise: bool) -> dict:
    """A run's `previous` as a saved baseline of variant `name` (with or without its noise floor)."""
    out = copy.deepcopy(report)
    prev = out["results"][SHAPE]["variants"]["previous"]
    out["results"][SHAPE]["variants"] = {"previous": prev, name: prev}
    if not noise:
        out.pop("noise", None)
    return out


def saved(currents: list[dict], baselines: list[dict], noise: bool, pairs=None) -> dict:
    out = {}
    pairs = pairs or [(i, j) for i in range(len(currents)) for j in range(len(baselines))]
    for name in VARIANTS:
        verdicts, margins = [], []
        for i, j in pairs:
            gates = regression_gates(as_candidate(currents[i], name), as_baseline(baselines[j], name, noise), LIMIT)
            gate = next(g for g in gates if g.subject == f"{SHAPE}/{name}")
            verdicts.append(gate.verdict)
            margins.append(gate.margin)
        out[name] = count(verdicts) | {"margins": sorted(set(round(m, 4) for m in margins))}
    return out


def median_of(report: dict, name: str = "previous") -> float:
    return float(np.median(report["results"][SHAPE]["variants"][name]["samples_s"]))


def quantiles(values) -> dict:
    names = ("min", "p5", "p50", "p95", "max")
    return dict(zip(names, (float(x) for x in np.percentile(values, [0, 5, 50, 95, 100]))))


def cell(c: dict) -> str:
    extra = f" ({c['inconclusive']} inconclusive)" if c["inconclusive"] else ""
    return f"{c['fail']} / {c['n']}{extra}"


def markdown(summary: dict) -> str:
    slow = summary["slowdowns"]
    lines = [
        f"# Gate calibration ({summary['mode']} mode)",
        "",
        f"- Machine: {summary['machine'].get('cpu')} ({summary['machine'].get('cores')} cores), load average "
        f"{summary['load_average'][0]:.1f} / {summary['load_average'][1]:.1f} at the start / end; "
        f"{summary['duration_s']:.0f} s of runs (calibration and processes; the analysis not counted)",
        f"- Model: {summary['layers']} MatMul+Relu layers, {WIDTH} wide, batch 32, ONNX Runtime, 1 thread",
        "- Slowed models (isolated paired run, ratio to the chain with its 95% CI): "
        + ", ".join(
            f"{n} x{s['median']:.3f} [{s['low']:.3f}, {s['high']:.3f}] (side width {s['side_width']})"
            for n, s in slow.items()
        ),
        "- The same, as measured inside the reruns (median of the per-run ratios): "
        + ", ".join(f"{n} x{r:.3f}" for n, r in summary["in_run_ratio"].items()),
        "",
        "| gate | identical (aa): false alarms | x1.05 caught | x1.10 caught |",
        "|---|---:|---:|---:|",
    ]
    for label, block in summary["tables"].items():
        lines.append(f"| {label} | {cell(block['aa'])} | {cell(block['slow5'])} | {cell(block['slow10'])} |")
    drift = summary["between_run_drift"]
    lines += [
        "",
        f"- Between-run drift of the unchanged model (median in run i / in run j, {drift['pairs']} pairs): "
        + ", ".join(f"{k} x{v:.3f}" for k, v in drift["quantiles"].items()),
        "- |log| of the unchanged model's drift, between runs vs between the halves of one run (p50 / p95): "
        + " vs ".join(
            f"{summary['abs_log_drift'][k]['p50']:.3f} / {summary['abs_log_drift'][k]['p95']:.3f}"
            for k in ("between_runs", "within_run_halves")
        ),
        "- Noise floors recorded by the baselines (margin for a later comparison): "
        + ", ".join(f"{m:.1%}" for m in summary["baseline_noise_margins"]),
        f"- Drift of the reruns against those baselines inside their noise-floor margin: "
        f"{summary['floor_covers']['covered']} / {summary['floor_covers']['n']}",
    ]
    if summary.get("adaptive_rounds"):
        a = summary["adaptive_rounds"]
        lines.append(
            f"- Adaptive reruns: {a['rounds']['min']}-{a['rounds']['max']} rounds (median {a['rounds']['p50']:.0f}); "
            f"stopped narrow in {a['narrow']} / {a['n']}, by the {a['max_time']} budget in the rest"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="a couple of minutes: few runs, short budgets")
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--reuse", action="store_true", help="reuse models and run*.json already in --work")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    settings = MODES[mode]
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load_start = _load()

    previous = chain(work / "previous.onnx", args.layers)
    shutil.copy(previous, work / "aa.onnx")
    cal_path = work / "calibration.json"
    if args.reuse and cal_path.is_file():
        slowdowns = json.loads(cal_path.read_text())
        for name, s in slowdowns.items():
            chain(work / f"{name}.onnx", args.layers, s["side_width"])
    else:
        slowdowns = calibrate(work, args.layers, settings["calibration_time"])
        cal_path.write_text(json.dumps(slowdowns, indent=2) + "\n")

    reruns, adaptive, baselines, seconds = [], [], [], {"rerun": [], "adaptive": [], "baseline": []}
    plan = [
        ("rerun", settings["reruns"], lambda: rerun_args(work, [])),
        (
            "adaptive",
            settings["adaptive"],
            lambda: rerun_args(work, ["--until-width", "2%", "--max-time", settings["max_time"]]),
        ),
        (
            "baseline",
            settings["baselines"],
            # The same models as the reruns, so that baseline and later run differ only in when
            # they ran (models timed together share the cores' caches and memory bandwidth).
            lambda: rerun_args(work, ["--noise-runs", "3"]),
        ),
    ]
    lists = {"rerun": reruns, "adaptive": adaptive, "baseline": baselines}
    for kind, n, make in plan:
        for i in range(n):
            report, took = run_cli(make(), work / f"{kind}{i:02d}.json", args.reuse)
            lists[kind].append(report)
            seconds[kind].append(took)
            print(f"{kind} {i + 1}/{n} ({took:.1f} s, {time.time() - started:.0f} s in all)", flush=True)
    # What the runs cost, kept in --work so that --reuse (analysis only) still reports it.
    timing_path = work / "timing.json"
    timing = {
        "duration_s": time.time() - started,
        "seconds_per_process": {k: float(np.mean(v)) if v else None for k, v in seconds.items()},
        "load_average": [load_start, _load()],
    }
    if args.reuse and timing_path.is_file():
        timing = json.loads(timing_path.read_text())
    else:
        timing_path.write_text(json.dumps(timing) + "\n")

    # Between-run drift of the unchanged model, and whether the baselines' floors covered it.
    pairs = list(itertools.permutations(range(len(reruns)), 2))
    drift = [median_of(reruns[i]) / median_of(reruns[j]) for i, j in pairs]
    floors = [b["noise"]["shapes"][SHAPE]["margin"] for b in baselines]
    covered = [
        abs(median_of(r) / median_of(b) - 1) <= max(DEFAULT_RUN_MARGIN, b["noise"]["shapes"][SHAPE]["margin"])
        for r in reruns
        for b in baselines
    ]
    # Within one run: the second half of the rounds against the first (what a noise floor
    # from halves would see), to set beside the drift between runs.
    halves = []
    for r in reruns:
        samples = r["results"][SHAPE]["variants"]["previous"]["samples_s"]
        half = len(samples) // 2
        halves.append(abs(float(np.log(np.median(samples[half:]) / np.median(samples[:half])))))
    tables = {
        f"in-run (`--baseline-model`), 50 rounds, limit {LIMIT:.0%}": in_run(reruns),
        f"in-run, 50 rounds, limit {TIGHT_LIMIT:.0%}": in_run(reruns, TIGHT_LIMIT),
    }
    if adaptive:
        tables[f"in-run, `--until-width 2% --max-time {settings['max_time']}`, limit {LIMIT:.0%}"] = in_run(adaptive)
        tables[f"in-run, adaptive, limit {TIGHT_LIMIT:.0%}"] = in_run(adaptive, TIGHT_LIMIT)
    tables[f"saved baseline with noise floor (`--noise-runs 3`), limit {LIMIT:.0%}"] = saved(reruns, baselines, True)
    tables[f"same baselines without it (old: fixed {DEFAULT_RUN_MARGIN:.0%})"] = saved(reruns, baselines, False)
    tables[f"saved baseline, every pair of reruns, fixed {DEFAULT_RUN_MARGIN:.0%}"] = saved(
        reruns, reruns, False, pairs
    )
    adaptive_rounds = None
    if adaptive:
        rounds = [a["config"]["adaptive"]["shapes"][SHAPE]["rounds"] for a in adaptive]
        adaptive_rounds = {
            "rounds": {"min": min(rounds), "max": max(rounds), "p50": float(np.median(rounds))},
            "narrow": sum(a["config"]["adaptive"]["stopped"] == "narrow" for a in adaptive),
            "n": len(adaptive),
            "max_time": settings["max_time"],
        }
    summary = {
        "mode": mode,
        "settings": settings,
        "machine": reruns[0]["machine"],
        **timing,
        "layers": args.layers,
        "shape": SHAPE,
        "slowdowns": {
            n: {k: s[k] for k in ("target", "median", "low", "high", "rounds", "side_width")}
            for n, s in slowdowns.items()
        },
        "in_run_ratio": {
            n: float(np.median([r["results"][SHAPE]["variants"][n]["ratio"]["median"] for r in reruns]))
            for n in VARIANTS
        },
        "p50_ms_previous": [median_of(r) * 1000 for r in reruns],
        "between_run_drift": {"pairs": len(pairs), "quantiles": quantiles(drift)},
        "abs_log_drift": {
            "between_runs": quantiles(np.abs(np.log(drift))),
            "within_run_halves": quantiles(halves),
        },
        "baseline_noise_margins": floors,
        "floor_covers": {"covered": int(sum(covered)), "n": len(covered)},
        "adaptive_rounds": adaptive_rounds,
        "tables": tables,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gate_calibration" + ("_quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(summary))
    print(markdown(summary))


def _load() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


if __name__ == "__main__":
    main()
