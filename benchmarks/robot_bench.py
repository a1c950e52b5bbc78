"""Issue 14's goals for robot controllers, on ONNX Runtime's CPU provider here.

1. Action bins: the token VLA (examples/robot.py) merged, exported float16 with static
   shapes (batch 1, as a robot runs it), against base + adapter unmerged in float32
   (PEFT's math through modeling.unmerged) on N observations (default 1,000). Goal:
   identical decoded bins on >= 99.9%, every mismatch a reported near-tie.
   The continuous policy the same way: max action error in action units.
2. Control loop: the merged and the base float16 static graphs of the VLA in one paced
   loop (lora-deploy bench's control-loop mode, ticks alternating between the two) at
   100 Hz, in --sessions K sessions per variant (default 10: every graph reopened K times,
   the duration split between them; the p99 ratio's interval resamples sessions, then ticks:
   stats.session_ratio_ci). Goal: p99 ratio merged / base 1.00 within +-2%; zero deadline
   misses for the reference controller on a quiet machine. "sessions_for_2pct" is the power
   calculation for the next run, from the spread of this run's per-session p99 ratios.

    python benchmarks/robot_bench.py --work /tmp/robotbench --out benchmarks/results \
        [--observations 1000] [--duration 20s] [--sessions 10] [--loop-only]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from lora_deploy.bench.machine import machine_info
from lora_deploy.bench.run import run_bench
from lora_deploy.bench.stats import p99_ratio, per_session, sessions_for_width
from lora_deploy.compare import tolerance
from lora_deploy.examples import robot
from lora_deploy.export.model import export_plain
from lora_deploy.merge import merge
from lora_deploy.modeling.factory import load_module
from lora_deploy.modeling.unmerged import attach
from lora_deploy.proof.actions import action_error, compare_bins


def build(work: Path, kind: str) -> dict[str, Path]:
    paths = robot.build_controller(kind, work / kind)
    side = [paths["statistics"]] if "statistics" in paths else []
    merge(paths["base"], paths["adapter"], work / kind / "merged", side_files=side, overwrite=True)
    first = {k: v[:1] for k, v in np.load(paths["observations"]).items()}
    np.savez(work / kind / "obs1.npz", **first)
    spec = f"lora_deploy.examples.robot:build_{kind}"
    for name, checkpoint in (("merged", work / kind / "merged"), ("base", paths["base"])):
        out = work / kind / f"{name}.onnx"
        export_plain(
            checkpoint, out, module=spec, inputs_path=work / kind / "obs1.npz", dtype="float16", static=True,
            overwrite=True,
        )  # fmt: skip
        paths[f"{name}_onnx"] = out
    paths["obs1"] = work / kind / "obs1.npz"
    paths["spec"] = spec
    return paths


def observations(kind: str, count: int) -> dict[str, np.ndarray]:
    make = robot.example_observations if kind == "policy" else robot.vla_observations
    return make(count, seed=12345)  # held out: neither training nor the recorded set


def action_agreement(paths: dict, kind: str, count: int) -> dict:
    """The merged float16 static graph (batch 1, one call per observation) against the
    unmerged float32 reference."""
    import onnxruntime as ort

    obs = observations(kind, count)
    model = load_module(paths["spec"], paths["base"])
    with torch.inference_mode(), attach(model, paths["adapter"]):
        reference = np.concatenate(
            [
                model(**{k: torch.from_numpy(v[i : i + 100]) for k, v in obs.items()}).numpy()
                for i in range(0, count, 100)
            ]
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(paths["merged_onnx"]), options, providers=["CPUExecutionProvider"])
    start = time.perf_counter()
    got = np.concatenate(
        [
            session.run(None, {k: (v[i : i + 1].astype(np.float16) if v.dtype.kind == "f" else v[i : i + 1])
                               for k, v in obs.items()})[0]
            for i in range(count)
        ]
    ).astype(np.float32)  # fmt: skip
    seconds = time.perf_counter() - start
    if kind == "vla":
        result = compare_bins(got, reference, tolerance("float16"))
        return {
            "observations": count,
            "bins": result.total,
            "identical_bins": result.agree,
            "identical_share": result.share,
            "mismatches": [
                {"index": list(m.index), "reference_bin": m.reference_bin, "got_bin": m.got_bin,
                 "margin": m.margin, "near_tie": m.near_tie}
                for m in result.mismatches
            ],
            "all_mismatches_near_ties": result.all_near_ties,
            "goal_met": result.share >= 0.999 and result.all_near_ties,
            "summary": result.summary(),
            "graph_seconds": seconds,
        }  # fmt: skip
    worst, where = action_error(got, reference)
    return {"observations": count, "max_action_error": worst, "at": list(where), "graph_seconds": seconds}


def control_loop(paths: dict, rate: str, duration: str, sessions: int) -> dict:
    report = run_bench(
        {"base": paths["base_onnx"], "merged": paths["merged_onnx"]},
        inputs_path=paths["obs1"],
        reference="base",
        threads=1,
        rate=rate,
        duration=duration,
        sessions=sessions,
    )
    (shape,) = report["results"].values()
    variants = shape["variants"]
    loops = {name: v["loop"] for name, v in variants.items()}
    p99 = {name: variants[name]["p99_ms"] for name in loops}
    labels = variants["merged"]["sample_sessions"]
    each = per_session([variants["base"]["samples_s"], variants["merged"]["samples_s"]], labels, p99_ratio)
    return {
        "rate": rate,
        "duration_all_variants": duration,
        "sessions": report["config"]["sessions"],
        "bootstrap": report["config"]["bootstrap"],
        "p99_ms": p99,
        "p50_ms": {name: variants[name]["p50_ms"] for name in loops},
        "p99_ratio_merged_over_base": variants["merged"]["p99_ratio"],
        "p99_ratio_per_session": each,
        "sessions_for_2pct": sessions_for_width(each, 0.02) if len(each) > 1 else None,
        "pooled_p99_ratio": p99["merged"] / p99["base"],
        "misses": {name: loop["misses"] for name, loop in loops.items()},
        "ticks": {name: loop["ticks"] for name, loop in loops.items()},
        "jitter_ms": {name: loop["jitter_ms"] for name, loop in loops.items()},
        "start_lag_p99_ms": {name: loop["lag_p99_ms"] for name, loop in loops.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--observations", type=int, default=1000)
    parser.add_argument("--rate", default="100hz")
    parser.add_argument("--duration", default="20s")
    parser.add_argument("--sessions", type=int, default=10, help="sessions per variant in the control loop")
    parser.add_argument("--loop-only", action="store_true", help="the control loop only (no action agreement)")
    parser.add_argument("--name", default="robot_bench.json", help="file name of the results under --out")
    parser.add_argument("--note", default="", help="e.g. 'machine shared with other jobs'")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    vla = build(args.work, "vla")
    result = {"machine": machine_info(1), "note": args.note}
    if not args.loop_only:
        policy = build(args.work, "policy")
        result["vla_bins"] = action_agreement(vla, "vla", args.observations)
        result["policy_actions"] = action_agreement(policy, "policy", args.observations)
    result["vla_control_loop"] = control_loop(vla, args.rate, args.duration, args.sessions)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / args.name).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2, default=str))


if __name__ == "__main__":
    main()
