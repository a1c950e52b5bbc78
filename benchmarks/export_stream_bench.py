"""Export with and without the weights in memory, and merged ONNX from the base graph.

    python benchmarks/export_stream_bench.py [--out DIR] [--layers 8] [--hidden 1024] [--json FILE]
    python benchmarks/export_stream_bench.py --preset 7b --steps export-stream-auto-noparity,merge-onnx,copy

Builds a LLaMA-shaped float16 checkpoint with random weights (vocab 32000, GQA 16/4
heads; `--preset 7b`: LLaMA-2-7B's shape, 32 layers, hidden 4096, 32/32 heads, 13.5 GB,
written shard by shard without the model in memory) and a synthetic rank-16 LoRA adapter
on q_proj/v_proj, then times each step in its own process and reports wall time and peak
RSS (VmHWM):

* export onnx (weights loaded, float32; the current default)
* export onnx --stream-weights (float32; float16 with --dtype auto), with and without
  the ONNX Runtime parity check (which loads the real model)
* merge --onnx-like on the streamed float16 graph, against `cp` of the graph's bytes:
  step merge-onnx (the API, in-process; its row also gives the seconds inside
  merge_onnx, imports excluded) and merge-onnx-cli (the command, imports included;
  merge-onnx-cli-before runs another source tree, --before; merge-onnx-cli-numpy the
  numpy float16 arithmetic instead of the compiled kernels, LORA_DEPLOY_NATIVE=0)

    python benchmarks/export_stream_bench.py --out DIR --layers 18 --hidden 2048 --keep --rounds 6 \
        --steps copy,merge-onnx,merge-onnx-cli --json benchmarks/results/export_like_2g.json

  (--keep reuses DIR's checkpoint and graph; --rounds interleaves the steps, their order
  reversed every other round, and reports medians and per-round ratios to copy.)
* the same as a user times it from the shell, whole processes (interpreter start-up
  included), timed by this script around each one: steps cp-process (coreutils `cp` of
  the graph and its data) and merge-onnx-process (the installed `lora-deploy` console
  script; -before: from --before's tree, entered as its console script did); their
  ratios are to cp-process. No peak RSS
  for these (not measured per process).
* optimum-onnx's exporter (steps optimum, optimum-novalidate; `--optimum-python` names a
  Python where `pip install optimum-onnx` went, as it needs transformers 4.x)

Steps copy and merge-onnx* run with bytecode, as an installed package does (pip compiles
a wheel's modules at install): PYTHONDONTWRITEBYTECODE is dropped from their environment
and PYTHONPYCACHEPREFIX points at OUT/pycache (the source trees stay clean); the
lora-deploy trees are compiled there first (compileall, as pip does), and each of these
steps runs once, untimed, before its first timed run, compiling the rest of what it
imports: no timed run pays for compiling modules from source (60-90 ms, a tenth of the
merge). The export and optimum steps keep the plain environment: they run for seconds to
a minute, and a cache prefix would ignore the installed packages' bytecode (torch's).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

STEP = r"""
import sys, time
from pathlib import Path
kind, out = sys.argv[1], Path(sys.argv[2])
# Outputs of an earlier step go first, untimed: unlinking a 2 GB file whose pages are still
# being written back costs seconds that belong to neither job.
for old in ("merged.onnx", "merged.onnx.data", "copy-export-stream-auto-noparity.onnx",
            "copy-export-stream-auto-noparity.onnx.data"):
    (out / old).unlink(missing_ok=True)
start = time.perf_counter()
if kind.startswith("export"):
    from lora_deploy.export import export_checkpoint
    from lora_deploy.export import streamed
    if kind.endswith("noparity"):
        streamed.parity_plan = lambda nbytes, mode="auto": ("skip", "benchmark")
    stream = "stream" in kind
    dtype = "auto" if "auto" in kind else "float32"
    r = export_checkpoint(out / "base", out / f"{kind}.onnx", dtype=dtype, stream_weights=stream, overwrite=True)
    note = f"{r.dtype} weights={r.weights} parity={r.parity}"
elif kind == "merge-onnx":
    from lora_deploy.export.like import merge_onnx
    r = merge_onnx(out / "base", out / "adapter", out / "export-stream-auto-noparity.onnx", out / "merged.onnx",
                   overwrite=True)
    note = f"{len(r.merged)} merged; {r.seconds:.2f}s in merge_onnx (the rest: imports)"
elif kind.startswith("merge-onnx-cli"):
    # The command as a user runs it (`lora-deploy merge --onnx-like`), imports included;
    # merge-onnx-cli-before: the same from the source tree in --before (PYTHONPATH);
    # merge-onnx-cli-numpy: with LORA_DEPLOY_NATIVE=0 (set by step()).
    from lora_deploy.cli import main
    try:
        main(["merge", str(out / "base"), str(out / "adapter"), "--onnx-like",
              str(out / "export-stream-auto-noparity.onnx"), "-o", str(out / "merged.onnx"), "--overwrite"],
             standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise
    note = "lora-deploy merge --onnx-like (CLI entry point, imports included)"
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


PRESETS = {
    # LLaMA-2-7B: 6.74e9 parameters, 13.5 GB in float16.
    "7b": {"layers": 32, "hidden": 4096, "intermediate": 11008, "heads": 32, "kv_heads": 32},
}


def llama_config(layers: int, hidden: int, intermediate: int | None = None, heads: int = 16, kv_heads: int = 4):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate or int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def build(out: Path, layers: int, hidden: int, preset: str | None = None) -> None:
    import numpy as np
    import torch
    from safetensors.numpy import save_file
    from transformers import LlamaForCausalLM

    if preset:
        config = llama_config(**PRESETS[preset])
        write_synthetic(config, out / "base")
    else:
        config = llama_config(layers, hidden)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.float16)
        model.save_pretrained(out / "base", max_shard_size="500MB")
        del model
    layers, hidden = config.num_hidden_layers, config.hidden_size
    kv_rows = hidden * config.num_key_value_heads // config.num_attention_heads
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(layers):
        for proj, rows in (("q_proj", hidden), ("v_proj", kv_rows)):
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


def write_synthetic(config, directory: Path, shard_bytes: int = 2 << 30) -> None:
    """A float16 checkpoint of `config`'s shapes written shard by shard: the model is built
    on the meta device for its names and shapes only, and every tensor is cut from one
    64 MB block of N(0, 0.02) values (the values do not matter to export speed)."""
    import numpy as np
    import torch
    from safetensors.numpy import save_file
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}
    block = (np.random.default_rng(0).standard_normal(32 << 20, dtype=np.float32) * 0.02).astype(np.float16)
    directory.mkdir(parents=True)
    config.dtype = "float16"
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(directory)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for index, names in enumerate(groups, start=1):
        file = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for offset, name in enumerate(names):
            count = int(np.prod(shapes[name]))
            start = (offset * 4099) % block.size
            tensors[name] = np.resize(block[start:], count).reshape(shapes[name])
            weight_map[name] = file
            total += 2 * count
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        del tensors
    index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2))


# optimum-cli's exporter, run in-process in its own environment (optimum-onnx needs
# transformers < 4.58; this project needs 5.x): fp32, the full-sequence `text-generation`
# task (no KV cache), as `export onnx` exports.
OPTIMUM_STEP = r"""
import sys, time
from pathlib import Path
kind, out = sys.argv[1], Path(sys.argv[2])
start = time.perf_counter()
from optimum.exporters.onnx import main_export
main_export(str(out / "base"), output=str(out / kind), task="text-generation", do_validation=kind == "optimum")
seconds = time.perf_counter() - start
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(seconds, hwm, "optimum-onnx main_export, float32, validation " + ("on" if kind == "optimum" else "off"))
"""


def compiled(kind: str) -> bool:
    """Steps timed with bytecode written and read (see above)."""
    return kind in ("copy", "cp-process") or kind.startswith("merge-onnx")


def baseline(kind: str) -> str:
    """The step a step's per-round ratio is taken to."""
    return "cp-process" if kind.endswith("-process") or "-process-" in kind else "copy"


GRAPH = "export-stream-auto-noparity.onnx"


def process_step(kind: str, out: Path, env: dict) -> dict:
    """A whole process timed from here: `cp` of the graph's files, or the console script."""
    copies = out / "cp-process"
    shutil.rmtree(copies, ignore_errors=True)  # earlier outputs, untimed (see STEP)
    for old in ("merged.onnx", "merged.onnx.data"):
        (out / old).unlink(missing_ok=True)
    if kind == "cp-process":
        copies.mkdir()
        command = ["cp", str(out / GRAPH), str(out / f"{GRAPH}.data"), str(copies)]
    else:
        script = [str(Path(sys.executable).with_name("lora-deploy"))]
        if kind.endswith("-before"):  # what the console script ran before lora_deploy/__main__.py
            script = [sys.executable, "-c", "import sys; from lora_deploy.cli import main; sys.exit(main())"]
        command = [*script, "merge", "base", "adapter", "--onnx-like", GRAPH, "-o", "merged.onnx"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=out)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    note = "cp" if kind == "cp-process" else "lora-deploy merge --onnx-like (console script, whole process)"
    return {"step": kind, "seconds": round(seconds, 2), "note": note}


def bytecode_env(out: Path) -> dict:
    """The environment with bytecode, as an installed package runs: without
    PYTHONDONTWRITEBYTECODE, and with the .pyc files under OUT/pycache."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str((out / "pycache").resolve())
    return env


def step(kind: str, out: Path, optimum_python: str | None = None, before: Path | None = None) -> dict:
    env = bytecode_env(out) if compiled(kind) else dict(os.environ)
    if kind.endswith("-before"):
        if before is None:
            raise SystemExit(f"{kind}: pass --before (another lora-deploy source tree)")
        env["PYTHONPATH"] = str(before.resolve())
    if kind.endswith("-numpy"):  # the numpy float16 passes, not the compiled kernels
        env["LORA_DEPLOY_NATIVE"] = "0"
    if "-process" in kind:
        return process_step(kind, out, env)
    if kind.startswith("optimum"):
        if not optimum_python:
            raise SystemExit(f"{kind}: pass --optimum-python (a Python with optimum-onnx installed)")
        command = [optimum_python, "-c", OPTIMUM_STEP, kind, str(out.resolve())]
    else:
        command = [sys.executable, "-c", STEP, kind, str(out.resolve())]
    # From the output directory, so the first import path (the working directory) is no source tree.
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=out)
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    seconds, rss, note = done.stdout.strip().splitlines()[-1].split(" ", 2)
    row = {"step": kind, "seconds": round(float(seconds), 2), "peak_rss_gb": round(int(rss) / 1e9, 3), "note": note}
    if work := re.search(r"([0-9.]+)s in merge_onnx", note):
        row["work_seconds"] = float(work.group(1))  # inside merge_onnx, imports excluded
    return row


def paired_medians(rows: list[dict]) -> dict:
    """Per step: median seconds and peak RSS (where measured), and the median of its
    per-round ratio to that round's baseline step (copy, or cp-process; when it ran)."""
    by_step: dict[str, dict[int, dict]] = {}
    for row in rows:
        by_step.setdefault(row["step"], {})[row["round"]] = row
    out = {}
    for name, runs in by_step.items():
        copy = by_step.get(baseline(name), {})
        ratios = [runs[r]["seconds"] / copy[r]["seconds"] for r in runs if r in copy and copy[r]["seconds"] > 0]
        out[name] = {"seconds": statistics.median(run["seconds"] for run in runs.values())}
        if all("peak_rss_gb" in run for run in runs.values()):
            out[name]["peak_rss_gb"] = max(run["peak_rss_gb"] for run in runs.values())
        if ratios:
            out[name][f"over_{baseline(name).replace('-', '_')}"] = statistics.median(ratios)
            out[name]["per_round"] = [round(x, 2) for x in ratios]
        work = [
            runs[r]["work_seconds"] / copy[r]["seconds"]
            for r in runs
            if r in copy and copy[r]["seconds"] > 0 and "work_seconds" in runs[r]
        ]
        if work:
            out[name]["work_seconds"] = statistics.median(run["work_seconds"] for run in runs.values())
            out[name]["work_over_copy"] = statistics.median(work)
            out[name]["work_over_copy_per_round"] = [round(x, 2) for x in work]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/lora-deploy-export-bench"))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="A published model's shape (not --layers/--hidden).")
    parser.add_argument("--steps", help="Comma-separated steps to run (default: all).")
    parser.add_argument(
        "--optimum-python", help="Python of an environment with optimum-onnx, for steps optimum, optimum-novalidate."
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--keep", action="store_true", help="Reuse the checkpoint, adapter and graphs already in --out (no rebuild)."
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="Run --steps this many times, reversing their order every other round (paired, interleaved); "
        "the report adds each step's median and its per-round ratio to copy.",
    )
    parser.add_argument("--before", type=Path, help="Another lora-deploy source tree, for steps ending in -before.")
    args = parser.parse_args()
    start = time.perf_counter()
    if not (args.keep and (args.out / "base").is_dir()):
        shutil.rmtree(args.out, ignore_errors=True)
        args.out.mkdir(parents=True)
        build(args.out, args.layers, args.hidden, args.preset)
    size = sum(p.stat().st_size for p in (args.out / "base").glob("*.safetensors"))
    print(f"checkpoint of {size / 1e6:.0f} MB float16 ready after {time.perf_counter() - start:.0f}s", flush=True)
    rows = []
    steps = ("export-stream-auto-noparity", "export-stream-noparity", "export-stream", "export-loaded")
    wanted = args.steps.split(",") if args.steps else steps + ("merge-onnx", "copy")
    load = [os.getloadavg()[0]]
    if any(compiled(kind) for kind in wanted):  # untimed, as pip compiles at install
        import lora_deploy

        trees = [Path(lora_deploy.__file__).parent] + ([args.before.resolve() / "lora_deploy"] if args.before else [])
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", *map(str, trees)], check=True, env=bytecode_env(args.out)
        )
    warmed = set()
    for r in range(args.rounds):
        for kind in wanted if r % 2 == 0 else wanted[::-1]:
            if compiled(kind) and kind not in warmed:  # untimed: compiles what the step imports
                step(kind, args.out, args.optimum_python, args.before)
                warmed.add(kind)
            rows.append({**step(kind, args.out, args.optimum_python, args.before), "round": r})
            print(json.dumps(rows[-1]), flush=True)
        load.append(os.getloadavg()[0])
    shape = PRESETS.get(args.preset, {"layers": args.layers, "hidden": args.hidden})
    report = {"preset": args.preset, **shape, "checkpoint_bytes": size, "load_average": load, "rows": rows}
    report["bytecode"] = "copy, merge-onnx*: compiled before their first timed run (OUT/pycache), as installed"
    if args.rounds > 1:
        report["medians"] = paired_medians(rows)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
