"""Merge throughput and memory: lora-deploy vs a plain copy vs PEFT, on one machine, one run.

Builds a synthetic sharded float16 LLaMA-shaped checkpoint (default about 2.1 GB) and an
r=16 adapter (q_proj/v_proj, or every linear layer with --targets all-linear), then
times, interleaved round by round:
  copy   - copying the same shard files (shutil.copyfile), left in the page cache
  ours   - `lora-deploy merge` (the CLI's entry point, interpreter start-up included)
  copy-fsync, ours-fsync - the same, made durable (fsync; `lora-deploy merge --fsync`)
  peft   - AutoModelForCausalLM.from_pretrained -> PeftModel -> merge_and_unload -> save_pretrained
Each runs in its own process so its peak RSS (VmHWM) is its own. Ratios are per round
against that round's copy; medians are reported, with 95% bootstrap intervals.

    python benchmarks/merge_bench.py --work /tmp/mergebench --rounds 4 --json benchmarks/results/merge.json
    python benchmarks/merge_bench.py --work /tmp/mergebench --rounds 4 --cold --json benchmarks/results/merge_cold.json
    python benchmarks/merge_bench.py --work /tmp/mergebench --rounds 4 --cold --targets all-linear \
        --json benchmarks/results/merge_cold_all_linear.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from lora_deploy.bench.stats import bootstrap_median_ci

HERE = Path(__file__).resolve().parent

# Peak RSS is read from /proc/self/status (VmHWM, this process's own address space):
# ru_maxrss would include the parent's memory inherited at fork.
CHILD = r"""
import sys, time, json
mode, base, adapter, out = sys.argv[1:5]
t = time.perf_counter()
if mode.startswith("ours"):
    from lora_deploy.cli import main
    extra = ["--fsync"] if mode == "ours-fsync" else []
    try:
        main(["merge", base, adapter, "-o", out, "--max-shard-size", "500MB"] + extra, standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise
elif mode.startswith("copy"):
    import os, shutil
    os.makedirs(out)
    for name in os.listdir(base):
        shutil.copyfile(os.path.join(base, name), os.path.join(out, name))
        if mode == "copy-fsync":
            fd = os.open(os.path.join(out, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
elif mode == "peft":
    import torch
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out, max_shard_size="500MB")
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss": peak}))
"""


def llama_config(layers: int, hidden: int, intermediate: int, vocab: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128,
        "num_key_value_heads": hidden // 128,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "dtype": "float16",
        "hidden_act": "silu",
    }


def layer_shapes(i: int, h: int, inter: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}."
    return {
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
        **{p + f"self_attn.{n}.weight": (h, h) for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
        p + "mlp.gate_proj.weight": (inter, h),
        p + "mlp.up_proj.weight": (inter, h),
        p + "mlp.down_proj.weight": (h, inter),
    }


def build_base(path: Path, layers: int, hidden: int, inter: int, vocab: int, shard_bytes: int) -> None:
    """Write shards one at a time so building a 2 GB model never holds more than a shard."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(llama_config(layers, hidden, inter, vocab), indent=2))
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        shapes.update(layer_shapes(i, hidden, inter))
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    gen = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.tensor(shape).prod())
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = shape
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (torch.randn(s, generator=gen) * 0.02).half() for n, s in shard.items()}
        save_file(tensors, path / fname, metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({n: fname for n in shard})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


TARGETS = {
    "qv": ("q_proj", "v_proj"),
    "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def build_adapter(path: Path, layers: int, hidden: int, inter: int, targets: str, r: int = 16) -> None:
    path.mkdir(parents=True)
    names = TARGETS[targets]
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": list(names),
        "task_type": "CAUSAL_LM",
        "bias": "none",
        "fan_in_fan_out": False,
        "lora_dropout": 0.0,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(layers):
        shapes = layer_shapes(i, hidden, inter)
        for n in names:
            [weight] = [k for k in shapes if k.endswith(f".{n}.weight")]
            out_f, in_f = shapes[weight]
            key = "base_model.model." + weight.removesuffix(".weight")
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * 0.01
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})


def drop_page_cache() -> bool:
    """Start from a cold cache, as a checkpoint fresh from storage would (needs root)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_child(mode: str, base: Path, adapter: Path, out: Path, cold: bool = False) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    if cold and not drop_page_cache():
        sys.exit("--cold needs permission to write /proc/sys/vm/drop_caches (root)")
    cmd = [sys.executable, "-c", CHILD, mode, str(base), str(adapter), str(out)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return result


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lora-deploy-mergebench"))
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard", default="500MB", help="base shard size")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peft-rounds", type=int, default=1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every run (root only)")
    ap.add_argument("--targets", choices=sorted(TARGETS), default="qv", help="layers the r=16 adapter adapts")
    args = ap.parse_args()
    base = args.work / "base"
    adapter = args.work / ("adapter" if args.targets == "qv" else f"adapter-{args.targets}")
    if not base.exists():
        shard_bytes = int(float(args.shard.rstrip("MB")) * 1e6)
        build_base(base, args.layers, args.hidden, args.intermediate, args.vocab, shard_bytes)
    if not adapter.exists():
        build_adapter(adapter, args.layers, args.hidden, args.intermediate, args.targets)
    files = [p for p in base.iterdir() if p.suffix == ".safetensors"]
    model_bytes = sum(p.stat().st_size for p in files)
    largest = max(p.stat().st_size for p in files)
    out = args.work / "out"
    rows = {"copy": [], "ours": [], "copy-fsync": [], "ours-fsync": [], "peft": []}
    for r in range(args.rounds):
        order = ["copy", "ours", "copy-fsync", "ours-fsync"]
        order = order if r % 2 == 0 else order[::-1]
        if r < args.peft_rounds:
            order.append("peft")
        for mode in order:
            rows[mode].append(run_child(mode, base, adapter, out, args.cold))
            print(
                f"round {r} {mode}: {rows[mode][-1]['seconds']:.2f}s, "
                f"peak RSS {rows[mode][-1]['peak_rss'] / 1e9:.2f} GB",
                flush=True,
            )
    ratio = [o["seconds"] / c["seconds"] for o, c in zip(rows["ours"], rows["copy"])]
    durable_ratio = [o["seconds"] / c["seconds"] for o, c in zip(rows["ours-fsync"], rows["copy-fsync"])]
    summary = {
        "machine": machine(),
        "page_cache": "dropped before every run" if args.cold else "warm (whatever earlier runs left)",
        "adapter": {"r": 16, "targets": list(TARGETS[args.targets])},
        "model_bytes": model_bytes,
        "largest_shard_bytes": largest,
        "shards": len(files),
        "copy_s": statistics.median(x["seconds"] for x in rows["copy"]),
        "ours_s": statistics.median(x["seconds"] for x in rows["ours"]),
        "ours_over_copy": statistics.median(ratio),
        "ours_over_copy_ci95": bootstrap_median_ci(ratio)[1:],
        "copy_fsync_s": statistics.median(x["seconds"] for x in rows["copy-fsync"]),
        "ours_fsync_s": statistics.median(x["seconds"] for x in rows["ours-fsync"]),
        "ours_over_copy_fsync": statistics.median(durable_ratio),
        "ours_over_copy_fsync_ci95": bootstrap_median_ci(durable_ratio)[1:],
        "ours_peak_rss": max(x["peak_rss"] for x in rows["ours"]),
        "rounds": rows,
    }
    if rows["peft"]:
        summary["peft_s"] = statistics.median(x["seconds"] for x in rows["peft"])
        summary["peft_over_copy"] = summary["peft_s"] / summary["copy_s"]
        summary["peft_peak_rss"] = max(x["peak_rss"] for x in rows["peft"])
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
