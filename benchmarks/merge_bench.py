"""Merge throughput and memory: lora-deploy vs a plain copy vs PEFT, on one machine, one run.

Builds a synthetic sharded float16 LLaMA-shaped checkpoint (default about 2.1 GB) and an
r=16 adapter (q_proj/v_proj, or every linear layer with --targets all-linear), then
times, interleaved round by round (--modes picks which):
  copy   - copying the same shard files (shutil.copyfile), left in the page cache
  ours   - `lora-deploy merge` (the CLI's entry point, interpreter start-up included); the
           digest memo knows the base (an untimed merge before the rounds filled it), as
           when a second adapter is merged into the same base
  ours-numpy - `lora-deploy merge` with LORA_DEPLOY_NATIVE=0: the numpy float16 passes
           instead of the compiled kernels (lora_deploy/_native/f16.c)
  ours-rehash - `lora-deploy merge --rehash`: every input hashed again, as for a base
           merged for the first time
  ours-sha256 - `lora-deploy merge --rehash --sha256`: SHA-256 recorded beside BLAKE3
  ours-nf4, ours-nf4-dq - `lora-deploy merge --onto nf4 [--double-quant]`: every Linear weight
           merged onto / written as bitsandbytes' dequantized NF4 (merge/quant.py)
  ours-nf4-numpy - `lora-deploy merge --onto nf4` with LORA_DEPLOY_NATIVE=0: the numpy
           NF4 pass instead of the compiled one (lora_deploy/_native/quant4.c)
  before - the merge of another source tree (--before DIR, e.g. `git archive` of an
           older commit), run the same way: the comparison a change is judged by
  copy-fsync, ours-fsync - the same, made durable (fsync; `lora-deploy merge --fsync`)
  peft   - AutoModelForCausalLM.from_pretrained -> PeftModel -> merge_and_unload -> save_pretrained
Each runs in its own process so its peak RSS (VmHWM) and CPU time (user + system, all
threads) are its own. Ratios are per round against that round's copy (copy-fsync for
ours-fsync); medians are reported, with 95% bootstrap intervals. The digest memo lives
in WORK/cache (LORA_DEPLOY_CACHE), not the user's cache.

The children run with bytecode, as an installed package does (pip compiles a wheel's
modules at install): PYTHONDONTWRITEBYTECODE is dropped from their environment and
PYTHONPYCACHEPREFIX points at WORK/pycache (the source trees stay clean). Before the
rounds, untimed, the lora-deploy trees are compiled there (compileall, as pip does) and
one copy, one merge (and one `before` merge) run, compiling the rest of what they import:
no timed run pays for compiling modules from source (60-90 ms a run otherwise). peft's
child keeps the plain environment: it imports only installed packages, whose bytecode
pip wrote (a cache prefix would ignore it and recompile torch).

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
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import lora_deploy
from lora_deploy.arrays import float16_kernel
from lora_deploy.bench.stats import bootstrap_median_ci

HERE = Path(__file__).resolve().parent

# Peak RSS is read from /proc/self/status (VmHWM, this process's own address space):
# ru_maxrss would include the parent's memory inherited at fork.
CHILD = r"""
import sys, time, json, resource
mode, base, adapter, out = sys.argv[1:5]
t = time.perf_counter()
if mode.startswith("ours") or mode == "before":
    from lora_deploy.cli import main
    extra = {"ours-fsync": ["--fsync"], "ours-rehash": ["--rehash"], "ours-sha256": ["--rehash", "--sha256"],
             "ours-nf4": ["--onto", "nf4"], "ours-nf4-dq": ["--onto", "nf4", "--double-quant"],
             "ours-nf4-numpy": ["--onto", "nf4"]}
    extra = extra.get(mode, [])
    if mode.endswith("-numpy"):
        import os
        os.environ["LORA_DEPLOY_NATIVE"] = "0"
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
seconds = time.perf_counter() - t
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": seconds, "peak_rss": peak, "cpu_s": usage.ru_utime + usage.ru_stime}))
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


def run_child(mode: str, base: Path, adapter: Path, out: Path, cold: bool = False, env: dict | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    if cold and not drop_page_cache():
        sys.exit("--cold needs permission to write /proc/sys/vm/drop_caches (root)")
    cmd = [sys.executable, "-c", CHILD, mode, str(base), str(adapter), str(out)]
    # From WORK, so the interpreter's first import path (the working directory) is no source tree.
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=out.parent)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return result


def bytecode_env(env: dict, work: Path) -> dict:
    """The children's environment with bytecode written and read, as an installed package
    runs: without PYTHONDONTWRITEBYTECODE, and with the .pyc files under WORK/pycache."""
    env = {name: value for name, value in env.items() if name != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str((work / "pycache").resolve())
    return env


def machine() -> dict:
    cpu = platform.processor()
    flags: set[str] = set()
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
        cpu = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
        flags = set(next(ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "hash_instructions": sorted(flags & {"sha_ni", "avx2", "avx512f"}),  # SHA-256 and BLAKE3 speed
        "memory_gb": round(mem / 2**30, 1),
        "load_average_at_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "float16_kernels": float16_kernel(),  # `ours`; ours-numpy runs the numpy passes
    }


def ratios(rows: dict, mode: str, against: str) -> dict:
    """Median seconds and CPU seconds of `mode`, and its per-round ratio to `against`."""
    ratio = [o["seconds"] / c["seconds"] for o, c in zip(rows[mode], rows[against])]
    return {
        "seconds": statistics.median(x["seconds"] for x in rows[mode]),
        "cpu_s": statistics.median(x["cpu_s"] for x in rows[mode]),
        f"over_{against}": statistics.median(ratio),
        f"over_{against}_ci95": bootstrap_median_ci(ratio)[1:] if len(ratio) > 1 else None,
        "peak_rss": max(x["peak_rss"] for x in rows[mode]),
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
    ap.add_argument(
        "--modes",
        default="copy,ours,ours-rehash,ours-sha256,copy-fsync,ours-fsync",
        help="comma-separated jobs to time each round, besides peft (see above); copy is always timed",
    )
    ap.add_argument("--before", type=Path, help="another lora-deploy source tree, timed as mode 'before'")
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
    modes = [m for m in re.split(r"[,\s]+", args.modes) if m]
    modes = ["copy"] + [m for m in modes if m != "copy"] + (["before"] if args.before else [])
    if "ours-fsync" in modes and "copy-fsync" not in modes:
        modes.append("copy-fsync")
    plain_env = {**os.environ, "LORA_DEPLOY_CACHE": str(args.work / "cache")}
    env = bytecode_env(plain_env, args.work)
    before_env = {**env, "PYTHONPATH": str(args.before.resolve())} if args.before else env
    # Untimed: compiles the bytecode, fills the digest memo (and the page cache, when warm).
    trees = [Path(lora_deploy.__file__).parent] + ([args.before.resolve() / "lora_deploy"] if args.before else [])
    subprocess.run([sys.executable, "-m", "compileall", "-q", *map(str, trees)], check=True, env=env)
    run_child("copy", base, adapter, out, env=env)
    run_child("ours", base, adapter, out, env=env)
    if args.before:
        run_child("before", base, adapter, out, env=before_env)
    rows: dict[str, list] = {mode: [] for mode in modes + ["peft"]}
    for r in range(args.rounds):
        order = modes if r % 2 == 0 else modes[::-1]
        if r < args.peft_rounds:
            order = [*order, "peft"]
        for mode in order:
            child_env = {"before": before_env, "peft": plain_env}.get(mode, env)
            rows[mode].append(run_child(mode, base, adapter, out, args.cold, child_env))
            print(
                f"round {r} {mode}: {rows[mode][-1]['seconds']:.2f}s, cpu {rows[mode][-1]['cpu_s']:.2f}s, "
                f"peak RSS {rows[mode][-1]['peak_rss'] / 1e9:.2f} GB",
                flush=True,
            )
    summary = {
        "machine": machine(),
        "page_cache": "dropped before every run" if args.cold else "warm (whatever earlier runs left)",
        "bytecode": "compiled before the rounds (WORK/pycache), as an installed package runs",
        "adapter": {"r": 16, "targets": list(TARGETS[args.targets])},
        "model_bytes": model_bytes,
        "largest_shard_bytes": largest,
        "shards": len(files),
        "before": str(args.before) if args.before else None,
        "jobs": {
            mode: ratios(rows, mode, "copy-fsync" if mode == "ours-fsync" else "copy")
            for mode in modes + (["peft"] if rows["peft"] else [])
        },
        "rounds": rows,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
