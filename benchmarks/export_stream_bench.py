"""Export with and without the weights in memory, and merged ONNX from the base graph.

    python benchmarks/export_stream_bench.py [--out DIR] [--layers 8] [--hidden 1024] [--json FILE]

Builds a LLaMA-shaped float16 checkpoint with random weights (vocab 32000, GQA 16/4
heads) and a synthetic rank-16 LoRA adapter on q_proj/v_proj, then times each step in
its own process and reports wall time and peak RSS (VmHWM):

* export onnx (weights loaded, float32; the current default)
* export onnx --stream-weights (float32; float16 with --dtype auto), with and without
  the ONNX Runtime parity check (which loads the real model)
* merge --onnx-like on the streamed float16 graph, against `cp` of the graph's bytes
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

STEP = r"""
import sys, time
from pathlib import Path
kind, out = sys.argv[1], Path(sys.argv[2])
start = time.perf_counter()
if kind.startswith("export"):
    from lora_deploy.export import export_checkpoint
    from lora_deploy.export import streamed
    if kind.endswith("noparity"):
        streamed.parity_fits = lambda nbytes: (False, "skipped: benchmark")
    stream = "stream" in kind
    dtype = "auto" if "auto" in kind else "float32"
    r = export_checkpoint(out / "base", out / f"{kind}.onnx", dtype=dtype, stream_weights=stream, overwrite=True)
    note = f"{r.dtype} weights={r.weights} parity={r.parity}"
elif kind == "merge-onnx":
    from lora_deploy.export.like import merge_onnx
    r = merge_onnx(out / "base", out / "adapter", out / "export-stream-auto-noparity.onnx", out / "merged.onnx",
                   overwrite=True)
    note = f"{len(r.merged)} merged; {r.seconds:.2f}s in merge_onnx (the rest: imports)"
elif kind == "copy":
    import shutil
    for name in ("export-stream-auto-noparity.onnx", "export-stream-auto-noparity.onnx.data"):
        shutil.copyfile(out / name, out / f"copy-{name}")
    note = "cp"
seconds = time.perf_counter() - start
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec.
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(seconds, hwm, note)
"""


def build(out: Path, layers: int, hidden: int) -> None:
    import numpy as np
    import torch
    from safetensors.numpy import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(out / "base", max_shard_size="500MB")
    del model
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(layers):
        for proj, rows in (("q_proj", hidden), ("v_proj", hidden // 4)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((16, hidden), dtype=np.float32) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((rows, 16), dtype=np.float32) * 0.02
    (out / "adapter").mkdir()
    save_file(tensors, str(out / "adapter" / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "r": 16,
        "lora_alpha": 32,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": str(out / "base"),
        "task_type": "CAUSAL_LM",
    }
    (out / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config))


def step(kind: str, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", STEP, kind, str(out)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    seconds, rss, note = done.stdout.strip().splitlines()[-1].split(" ", 2)
    return {"step": kind, "seconds": round(float(seconds), 2), "peak_rss_gb": round(int(rss) / 1e9, 3), "note": note}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/lora-deploy-export-bench"))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    start = time.perf_counter()
    build(args.out, args.layers, args.hidden)
    size = sum(p.stat().st_size for p in (args.out / "base").glob("*.safetensors"))
    print(f"built {size / 1e6:.0f} MB float16 checkpoint in {time.perf_counter() - start:.0f}s", flush=True)
    rows = []
    steps = ("export-stream-auto-noparity", "export-stream-noparity", "export-stream", "export-loaded")
    for kind in steps + ("merge-onnx", "copy"):
        rows.append(step(kind, args.out))
        print(json.dumps(rows[-1]), flush=True)
    report = {"layers": args.layers, "hidden": args.hidden, "checkpoint_bytes": size, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
