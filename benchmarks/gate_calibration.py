"""How often the latency gates cry wolf, and how often they catch a real slowdown.

One tiny ONNX graph (a chain of float32 MatMul+Relu layers, 384 wide, batch 32) timed by
`lora-deploy bench` in N separate processes (a fresh interpreter, fresh sessions: what a
CI job does on every commit), ONNX Runtime on the CPU, 1 intra-op thread, default rounds.
Every run times, interleaved:

* previous = the graph with L layers (`--baseline-model`: the reference),
* aa       = a byte-identical copy of it (an A/A pair: any gate firing is a false alarm),
* slow5 / slow10 = the same chain with more layers, a real slowdown (its size is measured:
  the in-run median ratio to `previous`, averaged over all runs).

Gate kinds evaluated at the default settings (--max-regression 5%):

1. in-run: `--baseline-model` — the gates the runs themselves report;
2. saved baseline: every ordered pair of runs (i, j), i != j, run i's variant against run
   j's `previous` as a saved `--baseline` would be compared, with the between-run margin.

The between-run drift (median of `previous` in run i / in run j) is what the margin has to
cover; its distribution is printed and saved.

    python benchmarks/gate_calibration.py --work /tmp/gatecal --runs 24 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lora_deploy.bench.report import DEFAULT_RUN_MARGIN, load_report
from lora_deploy.bench.stats import regression_gate, yardstick_note

WIDTH = 384


def chain(path: Path, layers: int) -> Path:
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"h{i}"]))
        prev = f"h{i}"
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=24)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--shape", default="32x1")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--reuse", action="store_true", help="analyse the run*.json already in --work")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    base = chain(work / "previous.onnx", args.layers)
    shutil.copy(base, work / "aa.onnx")
    chain(work / "slow5.onnx", args.layers + max(1, round(args.layers * 0.05)))
    chain(work / "slow10.onnx", args.layers + max(1, round(args.layers * 0.10)))
    reports = []
    started = time.time()
    for i in range(args.runs):
        out = work / f"run{i:02d}.json"
        if args.reuse and out.is_file():
            reports.append(load_report(out))
            continue
        cmd = [shutil.which("lora-deploy") or "lora-deploy", "bench", "--baseline-model", str(base)]
        for name in ("aa", "slow5", "slow10"):
            cmd += ["--model", f"{name}={work / (name + '.onnx')}"]
        cmd += ["--shapes", args.shape, "--threads", "1", "--json", str(out), "--overwrite", "--quiet"]
        rc = subprocess.run(cmd, capture_output=True, text=True)
        # exit 1 is a failed gate (slow10 is meant to fail); anything else is a broken run.
        if rc.returncode not in (0, 1):
            raise SystemExit(rc.stderr)
        reports.append(load_report(out))
        print(f"run {i + 1}/{args.runs} done ({time.time() - started:.0f} s)", flush=True)

    key = reports[0]["config"]["shapes"][0]
    v = [r["results"][key]["variants"] for r in reports]
    true_ratio = {n: float(np.mean([x[n]["ratio"]["median"] for x in v])) for n in ("aa", "slow5", "slow10")}

    def in_run(name: str) -> dict:
        gates = [g for r in reports for g in r["gates"] if g["subject"].startswith(f"{key}/{name} ")]
        return {
            "fail": sum(g["verdict"] == "fail" for g in gates),
            "inconclusive": sum(g["verdict"] == "inconclusive" for g in gates),
            "n": len(gates),
        }

    pairs = list(itertools.permutations(range(len(reports)), 2))
    drift = [
        float(np.median(v[i]["previous"]["samples_s"]) / np.median(v[j]["previous"]["samples_s"])) for i, j in pairs
    ]

    def saved(name: str, margin: float) -> dict:
        # As `regression_gates` does: the reference ('previous', unchanged) is the yardstick.
        verdicts = []
        for i, j in pairs:
            note = yardstick_note(v[i]["previous"]["samples_s"], v[j]["previous"]["samples_s"], margin, "previous")
            notes = [note] if note and margin else []
            gate = regression_gate(v[i][name], v[j]["previous"], 0.05, margin=margin, notes=notes, resamples=2000)
            verdicts.append(gate.verdict)
        return {k: verdicts.count(k) for k in ("fail", "inconclusive", "pass")} | {"n": len(verdicts)}

    summary = {
        "machine": reports[0]["machine"],
        "runs": len(reports),
        "rounds": reports[0]["config"]["rounds"],
        "shape": key,
        "layers": args.layers,
        "p50_ms_previous": [x["previous"]["p50_ms"] for x in v],
        "true_ratio": true_ratio,
        "between_run_drift": {
            "pairs": len(pairs),
            "quantiles": dict(zip(("min", "p5", "p50", "p95", "max"), np.percentile(drift, [0, 5, 50, 95, 100]))),
        },
        "in_run_gate": {n: in_run(n) for n in ("aa", "slow5", "slow10")},
        "saved_baseline_gate": {
            f"margin {m:.0%}": {n: saved(n, m) for n in ("previous", "aa", "slow5", "slow10")}
            for m in (0.0, 0.03, DEFAULT_RUN_MARGIN)
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gate_calibration.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    print(json.dumps({k: summary[k] for k in summary if k != "machine"}, indent=2, default=float))


if __name__ == "__main__":
    main()
