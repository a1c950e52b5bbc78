"""What keeping the adapter separate costs, and what serving many adapters at once gains.

ONNX Runtime on the CPU, one run, paired and interleaved rounds on identical inputs:

1. latency: base vs merged vs dynamic graph (adapter active) vs multi-adapter graph
   (a different adapter per row), at (1, 16), (1, 128), (8, 128); reference = merged.
   This is `lora-deploy bench` itself (run_bench), so the figures carry its CIs.
2. switching: a dynamic session alternating between two loaded adapters on every call
   vs the same adapter every call; and the time to load an adapter file.
3. mixed batch: 8 rows with 8 different adapters in one multi-adapter run vs the same 8
   rows run one adapter at a time on the dynamic graph (8 runs of batch 1).

The model is a LLaMA-shaped decoder with random weights (default hidden 512, 4 layers),
big enough that a rank-8 LoRA is a realistic fraction of each layer; adapters are written
in PEFT's format with random non-zero factors, ranks 4-16 and different target sets.

    python benchmarks/adapter_graphs_bench.py --work /tmp/graphbench --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from lora_deploy.backends.onnxrt.lora_format import pack_adapter
from lora_deploy.backends.onnxrt.sessions import DynamicSession, MultiSession
from lora_deploy.bench.machine import machine_info
from lora_deploy.bench.report import plot, to_markdown
from lora_deploy.bench.run import run_bench
from lora_deploy.bench.schema import write_json
from lora_deploy.bench.stats import bootstrap_median_ci
from lora_deploy.bench.timing import measure_interleaved
from lora_deploy.export.dynamic import export_dynamic
from lora_deploy.export.model import export_checkpoint
from lora_deploy.export.multi import export_multi
from lora_deploy.merge.streaming import merge
from lora_deploy.modeling.samples import sample_inputs

# (rank, targets) of the eight adapters: mixed ranks and target sets share one bank.
ADAPTERS = [
    (8, ("q_proj", "v_proj")),
    (4, ("q_proj", "v_proj")),
    (16, ("q_proj", "v_proj")),
    (8, ("q_proj",)),
    (8, ("q_proj", "k_proj", "v_proj", "o_proj")),
    (4, ("v_proj",)),
    (8, ("q_proj", "v_proj")),
    (16, ("v_proj",)),
]


def build_base(path: Path, hidden: int, layers: int, vocab: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        vocab_size=vocab,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)


def build_adapter(path: Path, hidden: int, layers: int, rank: int, targets, seed: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(targets),
        "task_type": "CAUSAL_LM",
        "bias": "none",
        "lora_dropout": 0.0,
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for name in targets:
            key = f"base_model.model.model.layers.{i}.self_attn.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) / hidden**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(hidden, rank, generator=gen) * 0.02
    save_file(tensors, path / "adapter_model.safetensors")


def prepare(work: Path, hidden: int, layers: int, vocab: int) -> dict:
    base, merged = work / "base", work / "merged"
    adapters = [work / f"adapter{i}" for i in range(len(ADAPTERS))]
    if not base.exists():
        build_base(base, hidden, layers, vocab)
        for i, (rank, targets) in enumerate(ADAPTERS):
            build_adapter(adapters[i], hidden, layers, rank, targets, seed=i + 1)
        merge(base, adapters[0], merged)
        for model, name in ((base, "base"), (merged, "merged")):
            export_checkpoint(model, work / f"{name}.onnx")
        export_dynamic(base, work / "dynamic.onnx", adapters=adapters)
        export_multi(base, work / "multi.onnx", adapters)
        for i, adapter in enumerate(adapters):
            pack_adapter(adapter, work / f"adapter{i}.onnx_adapter", onnx_path=work / "dynamic.onnx")
    return {
        "base": base,
        "adapters": adapters,
        "packed": [work / f"adapter{i}.onnx_adapter" for i in range(len(adapters))],
    }


def ort_options(threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


def ratio_summary(numerator: list[float], denominator: list[float]) -> dict:
    ratios = np.asarray(numerator) / np.asarray(denominator)
    median, low, high = bootstrap_median_ci(ratios)
    return {"median": float(median), "low": float(low), "high": float(high)}


def switching(work: Path, files: dict, threads: int, rounds: int) -> dict:
    """Alternate two loaded adapters every call vs keep one; and load a file from disk."""
    session = DynamicSession(work / "dynamic.onnx", options=ort_options(threads))
    session.load_adapter("a", files["packed"][0])
    session.load_adapter("b", files["packed"][6])  # same rank and targets as "a": equal work per call
    feed = sample_inputs(files["base"], batch=1, seq=128, seed=0)
    flip = {"n": 0}

    def alternate() -> None:
        flip["n"] += 1
        session.run(feed, adapter="a" if flip["n"] % 2 else "b")

    times = measure_interleaved(
        {"same": lambda: session.run(feed, adapter="a"), "switch": alternate}, warmup=5, rounds=rounds
    )
    loads = []
    for _ in range(20):
        start = time.perf_counter()
        session.load_adapter("fresh", files["packed"][4])
        loads.append(time.perf_counter() - start)
        session.unload_adapter("fresh")
    return {
        "shape": "1x128",
        "same_adapter_ms": 1e3 * statistics.median(times["same"]),
        "switching_ms": 1e3 * statistics.median(times["switch"]),
        "switch_over_same": ratio_summary(times["switch"], times["same"]),
        "load_adapter_file_ms": 1e3 * statistics.median(loads),
        "adapter_file_kb": files["packed"][4].stat().st_size / 1e3,
    }


def mixed_batch(work: Path, files: dict, threads: int, rounds: int, seq: int = 128) -> dict:
    """8 rows, 8 adapters: one multi-adapter run vs 8 single-adapter runs of batch 1."""
    n = len(files["packed"])
    multi = MultiSession(work / "multi.onnx", options=ort_options(threads))
    dynamic = DynamicSession(work / "dynamic.onnx", options=ort_options(threads))
    for i, packed in enumerate(files["packed"]):
        dynamic.load_adapter(f"a{i}", packed)
    feed = sample_inputs(files["base"], batch=n, seq=seq, seed=0)
    feed["attention_mask"][:] = 1  # full rows, so one row alone is the same work as in the batch
    rows = [{k: v[i : i + 1] for k, v in feed.items()} for i in range(n)]

    # The rows must agree before timing means anything.
    together = multi.run(feed, list(range(n)))["logits"]
    for i, row in enumerate(rows):
        alone = dynamic.run(row, adapter=f"a{i}")["logits"]
        np.testing.assert_allclose(together[i : i + 1], alone, atol=1e-4, rtol=1e-3)

    def one_at_a_time() -> None:
        for i, row in enumerate(rows):
            dynamic.run(row, adapter=f"a{i}")

    times = measure_interleaved(
        {"multi": lambda: multi.run(feed, list(range(n))), "sequential": one_at_a_time}, warmup=3, rounds=rounds
    )
    return {
        "rows": n,
        "seq": seq,
        "multi_batch_ms": 1e3 * statistics.median(times["multi"]),
        "one_adapter_at_a_time_ms": 1e3 * statistics.median(times["sequential"]),
        "throughput_gain": ratio_summary(times["sequential"], times["multi"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lora-deploy-graphbench"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--shapes", default="1x16,1x128,8x128")
    ap.add_argument("--mixed-seqs", default="1,16,128", help="sequence lengths of the mixed-batch comparison")
    ap.add_argument("--parts", default="latency,switching,mixed", help="which measurements to (re)run")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    files = prepare(args.work, args.hidden, args.layers, args.vocab)
    parts = set(args.parts.split(","))
    if "latency" in parts:
        latency(args, files)
    extra_path = args.out / "adapter_graphs_switching.json"
    extra = json.loads(extra_path.read_text()) if extra_path.exists() else {}
    if "switching" in parts:
        extra["switching"] = switching(args.work, files, args.threads, args.rounds)
    if "mixed" in parts:
        seqs = [int(x) for x in args.mixed_seqs.split(",")]
        extra["mixed_batch"] = [
            mixed_batch(args.work, files, args.threads, max(10, args.rounds // 2), seq) for seq in seqs
        ]
    extra.update({"machine": machine_info(args.threads), "threads": args.threads})
    extra_path.write_text(json.dumps(extra, indent=2) + "\n")
    print(json.dumps({k: v for k, v in extra.items() if k != "machine"}, indent=2))


def latency(args, files: dict) -> None:
    report = run_bench(
        {
            "base": args.work / "base.onnx",
            "merged": args.work / "merged.onnx",
            "dynamic": args.work / "dynamic.onnx",
            "multi": args.work / "multi.onnx",
        },
        adapters={"dynamic": files["packed"][0]},
        reference="merged",
        shapes=args.shapes,
        threads=args.threads,
        rounds=args.rounds,
        warmup=5,
    )
    report["config"]["model"] = {
        "family": "llama",
        "hidden": args.hidden,
        "layers": args.layers,
        "vocab": args.vocab,
        "adapters": [{"r": r, "targets": list(t)} for r, t in ADAPTERS],
    }
    write_json(report, args.out / "adapter_graphs_latency.json", overwrite=True)  # a rerun replaces its results
    (args.out / "adapter_graphs_latency.md").write_text(to_markdown(report))
    plot(report, args.out / "adapter_graphs_latency.png", overwrite=True)
    print(to_markdown(report))


if __name__ == "__main__":
    main()
