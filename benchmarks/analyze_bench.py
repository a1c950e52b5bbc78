"""`lora-deploy analyze` on a 7B-shaped all-linear rank-64 adapter: time and peak memory.

    python benchmarks/analyze_bench.py [--dir /tmp/analyze-7b] [--json benchmarks/results/analyze_7b.json]

Writes a synthetic PEFT adapter with LLaMA-2-7B's shapes (32 layers, hidden 4096,
intermediate 11008; q/k/v/o/gate/up/down, r=64, random float32 A and B, 640 MB) tensor by
tensor, then runs the CLI (`lora-deploy analyze DIR --json`) in a fresh process and
reports its wall time and peak RSS (VmHWM) next to the adapter's size, and, from inside
that process, the seconds spent in `analyze_adapter` (the rest is Python imports).
The adapter is deleted afterwards. The goal (issue 15): under 10 s, memory of the
order of the adapter's size, never a d×k matrix.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HIDDEN, INTERMEDIATE, LAYERS, RANK = 4096, 11008, 32, 64
SHAPES = {  # module -> (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}

# Runs in the timed process: the CLI's own path (click, JSON printing), plus a timer around
# the API call and the process's peak RSS at the end.
STEP = r"""
import sys, time
from lora_deploy.adapter import analysis
real = analysis.analyze_adapter
spent = []
def timed(*a, **k):
    t = time.perf_counter(); out = real(*a, **k); spent.append(time.perf_counter() - t); return out
analysis.analyze_adapter = timed
from lora_deploy.cli import main
try:
    main(["analyze", sys.argv[1], "--json"], standalone_mode=False)
finally:
    hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]
    print(f"@@ {spent[0]:.3f} {int(hwm) * 1024}", file=sys.stderr)
"""


def write_adapter(root: Path) -> int:
    from lora_deploy.io.stream import OutputTensor, tensor_bytes, write_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    tensors = []
    for layer in range(LAYERS):
        for index, (module, (out_f, in_f)) in enumerate(SHAPES.items()):
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            for part, shape in (("lora_A", (RANK, in_f)), ("lora_B", (out_f, RANK))):
                seed = (layer, index, part == "lora_B")

                def produce(f, shape=shape, seed=seed):
                    rng = np.random.default_rng(seed)
                    f.write(tensor_bytes(rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01)))

                tensors.append(OutputTensor(f"{prefix}.{part}.weight", "F32", shape, produce))
    total = sum(t.nbytes for t in tensors)
    write_checkpoint(root, tensors, max_shard_size=total + 1)
    os.replace(root / "model.safetensors", root / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": 2 * RANK,
        "target_modules": sorted({m.split(".")[-1] for m in SHAPES}),
        "base_model_name_or_path": "synthetic/llama-2-7b-shaped",
        "task_type": "CAUSAL_LM",
    }
    (root / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/analyze-7b"))
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "analyze_7b.json")
    parser.add_argument("--keep", action="store_true", help="Keep the synthetic adapter.")
    args = parser.parse_args()
    try:
        start = time.perf_counter()
        nbytes = write_adapter(args.dir)
        written = time.perf_counter() - start
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", STEP, str(args.dir)], capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(done.stderr[-2000:])
        api_s, peak = done.stderr.rsplit("@@ ", 1)[1].split()
        report = json.loads(done.stdout)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    result = {
        "what": "lora-deploy analyze on a 7B-shaped all-linear r=64 adapter (synthetic float32 factors)",
        "shape": {"layers": LAYERS, "hidden": HIDDEN, "intermediate": INTERMEDIATE, "rank": RANK},
        "modules": len(report["modules"]),
        "adapter_bytes": nbytes,
        "write_seconds": round(written, 2),
        "cli_wall_seconds": round(wall, 2),
        "analyze_adapter_seconds": float(api_s),
        "peak_rss_bytes": int(peak),
        "peak_rss_over_adapter": round(int(peak) / nbytes, 2),
        "uniform_rank_at_99": report["summary"]["uniform_rank"],
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1min": round(os.getloadavg()[0], 1),  # other jobs shared the CPUs
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
