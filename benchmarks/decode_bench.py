"""Decode-step latency of generation-ready graphs (export --task text-generation-with-past).

ONNX Runtime on the CPU, one run, paired and interleaved rounds on identical inputs
(`lora-deploy bench` itself: run_bench, so every figure carries its bootstrap CI), in
--sessions K sessions per variant (default 12: every model reopened K times, the rounds split
between them, the intervals resampling sessions then rounds: stats.session_ratio_ci; one
session per variant leaves a 2-5% per-session effect out of the intervals):

1. steps: prefill 1x128 and decode steps 1x1+128, 1x1+512, 8x1+512 (one new token per
   row after P cached ones) for base, merged, dynamic (adapter active), dynamic with no
   adapter active (the same graph), and multi-adapter (two adapters, ids alternating per
   row); with --genai, onnxruntime-genai's model builder output for the merged checkpoint
   too (same precision, fp32). Ratios from the same rounds: merged / base, dynamic /
   merged, dynamic (no adapter) / base, multi / merged, ours / genai builder (merged).
2. generation: tokens/s of a fixed-length greedy generation (prompt 32, N new tokens,
   batch 1): `bench --generate N` (our greedy loop, backends/onnxrt/decode.py, on each
   variant's timed session), every variant interleaved round by round, with the prefill
   and per-token decode latencies.

The model is LLaMA-shaped with random weights (default hidden 512, 4 layers, 8 heads, 2
key/value heads: GQA), the adapters r=8 on q_proj/v_proj with random non-zero factors.

    python benchmarks/decode_bench.py --work /tmp/decodebench --out benchmarks/results   # the real run
    python benchmarks/decode_bench.py --smoke --out /tmp/decodebench-smoke                 # a quick check

Each pair's "sessions_for_2pct" is the power calculation for the next run: the sessions
whose interval would be about +-2%, from the spread of this run's per-session ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from lora_deploy.backends.onnxrt.lora_format import pack_adapter
from lora_deploy.bench.machine import machine_info
from lora_deploy.bench.report import to_markdown
from lora_deploy.bench.run import run_bench
from lora_deploy.bench.schema import write_json
from lora_deploy.bench.stats import paired_ratios, per_session, session_ratio_ci, sessions_for_width
from lora_deploy.export.generation import export_generation, export_generation_adapters
from lora_deploy.merge.streaming import merge

SHAPES = "1x128,1x1+128,1x1+512,8x1+512"
# Sessions per variant of the tokens/s run (`generation`).
GENERATION_SESSIONS = 6
# (variant, its reference) pairs reported from the same rounds.
PAIRS = [("merged", "base"), ("dynamic", "merged"), ("dynamic_off", "base"), ("multi", "merged"), ("merged", "genai")]


def build_base(path: Path, hidden: int, layers: int, vocab: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = hidden // 64
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        vocab_size=vocab,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)


def build_adapter(path: Path, hidden: int, kv_width: int, layers: int, seed: int, rank: int = 8) -> None:
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"],
        "task_type": "CAUSAL_LM",
        "bias": "none",
        "lora_dropout": 0.0,
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for name, out in (("q_proj", hidden), ("v_proj", kv_width)):
            key = f"base_model.model.model.layers.{i}.self_attn.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) / hidden**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=gen) * 0.02
    save_file(tensors, path / "adapter_model.safetensors")


def prepare(work: Path, hidden: int, layers: int, vocab: int, genai: bool) -> dict[str, Path]:
    base, merged = work / "base", work / "merged"
    adapters = [work / "adapter0", work / "adapter1"]
    kv_width = max(1, hidden // 64 // 4) * 64
    files = {
        "base": work / "base-kv.onnx",
        "merged": work / "merged-kv.onnx",
        "dynamic": work / "dynamic-kv.onnx",
        "multi": work / "multi-kv.onnx",
        "packed": work / "adapter0.onnx_adapter",
    }
    if not base.exists():
        build_base(base, hidden, layers, vocab)
        # The genai builder loads a tokenizer from the checkpoint: the example models' character one.
        from lora_deploy.examples.models import _build_tokenizer

        _build_tokenizer("llama").save_pretrained(base)
        for i, adapter in enumerate(adapters):
            build_adapter(adapter, hidden, kv_width, layers, seed=i + 1)
        merge(base, adapters[0], merged)
    for name, source in (("base", base), ("merged", merged)):
        if not files[name].exists():
            export_generation(source, files[name])
    if not files["dynamic"].exists():
        export_generation_adapters(base, files["dynamic"], adapters=adapters)
    if not files["multi"].exists():
        export_generation_adapters(base, files["multi"], adapters=adapters, multi=True)
    if not files["packed"].exists():
        pack_adapter(adapters[0], files["packed"], onnx_path=files["dynamic"])
    if genai:
        files["genai"] = genai_build(merged, work / "genai")
    return files


def genai_build(merged: Path, out: Path) -> Path:
    """onnxruntime-genai's model builder on the merged checkpoint, fp32 on the CPU."""
    if not (out / "model.onnx").exists():
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(merged), "-o", str(out)]
        command += ["-p", "fp32", "-e", "cpu", "-c", str(out.parent / "genai-cache")]
        subprocess.run(command, check=True, capture_output=True)
    return fixed_head_dims(out)


def fixed_head_dims(folder: Path) -> Path:
    """The builder's graph with its cache's symbolic head dim ("kv_cache_dim") set to the head
    size from genai_config.json, so `bench` can size the past tensors from the graph alone
    (the same graph and weights file; only the declared input shapes change)."""
    import onnx

    fixed = folder / "model-fixed-dims.onnx"
    if not fixed.exists():
        head = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
        proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)  # the .data file stays as it is
        for value in [*proto.graph.input, *proto.graph.output]:
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param == "kv_cache_dim":
                    dim.dim_value = head
        onnx.save(proto, str(fixed))
    return fixed


def ratios(report: dict) -> dict:
    """Every PAIRS ratio per shape, from the same interleaved rounds (median, 95% CI: the
    session interval when the run had several sessions), with the per-session ratios and
    the sessions a +-2% interval would need."""
    out = {}
    for key, block in report["results"].items():
        variants = block["variants"]
        out[key] = {}
        for name, ref in PAIRS:
            if name in variants and ref in variants:
                per_round = [paired_ratios(variants[ref]["samples_s"], variants[name]["samples_s"])]
                labels = variants[ref].get("sample_sessions") or [0] * len(per_round[0])
                median, low, high = session_ratio_ci(per_round, labels)
                each = per_session(per_round, labels)
                out[key][f"{name}/{ref}"] = {
                    "median": median,
                    "low": low,
                    "high": high,
                    "per_session": each,
                    "sessions_for_2pct": sessions_for_width(each, 0.02) if len(each) > 1 else None,
                }
    return out


def generation(
    models: dict[str, Path], adapters: dict[str, Path], threads: int, rounds: int, n_new: int, sessions: int
) -> dict:
    """Tokens/s of a greedy generation of n_new tokens after a 32-token prompt, batch 1:
    `bench --generate` (run_bench(generate=...)), every variant interleaved round by round,
    in at most GENERATION_SESSIONS sessions per variant (tokens/s is a figure, not a goal: a
    whole generation per round is long, and every session adds its warm-up generations)."""
    sessions = min(sessions, rounds, GENERATION_SESSIONS)
    report = run_bench(
        models,
        adapters=adapters,
        reference="base",
        shapes="1x32",
        generate=n_new,
        threads=threads,
        rounds=rounds,
        warmup=2,
        sessions=sessions,
    )
    result = {"prompt": 32, "new_tokens": n_new, "batch": 1, "rounds": rounds, "sessions": sessions, "variants": {}}
    pairs = ratios(report)["1x32"]
    for name, entry in report["results"]["1x32"]["variants"].items():
        gen = entry["generation"]
        result["variants"][name] = {
            "median_s": entry["p50_ms"] / 1000,
            "tokens_per_s": entry["throughput"]["tokens_per_s"],
            "prefill_ms": gen["prefill_p50_ms"],
            "decode_step_ms": gen["decode_p50_ms"],
            "decode_step_p99_ms": gen["decode_p99_ms"],
            **{f"vs_{ref}": pairs[f"{name}/{ref}"] for mine, ref in PAIRS if mine == name and f"{name}/{ref}" in pairs},
        }
    return result, report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lora-deploy-decodebench"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=240, help="interleaved rounds in all, split between the sessions")
    ap.add_argument("--sessions", type=int, default=12, help="sessions per variant (README: power calculation)")
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens per timed generation")
    ap.add_argument("--skip-generation", action="store_true", help="decode steps only (no --generate run)")
    ap.add_argument("--genai", action="store_true", help="time onnxruntime-genai's builder output side by side")
    ap.add_argument("--smoke", action="store_true", help="a quick check: tiny model, 3 rounds, short generation")
    args = ap.parse_args()
    if args.smoke:
        args.hidden, args.layers, args.vocab, args.rounds, args.new_tokens, args.sessions = 128, 2, 512, 6, 8, 3
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    files = prepare(args.work, args.hidden, args.layers, args.vocab, args.genai)
    models = {name: files[name] for name in ("base", "merged", "dynamic")}
    models.update(dynamic_off=files["dynamic"], multi=files["multi"])
    if args.genai:
        models["genai"] = files["genai"]
    report = run_bench(
        models,
        adapters={"dynamic": files["packed"]},
        reference="base",
        shapes=args.shapes,
        threads=args.threads,
        rounds=args.rounds,
        warmup=5,
        sessions=args.sessions,
    )
    report["config"]["model"] = {
        "family": "llama",
        "hidden": args.hidden,
        "layers": args.layers,
        "vocab": args.vocab,
        "kv_heads": max(1, args.hidden // 64 // 4),
        "adapters": [{"r": 8, "targets": ["q_proj", "v_proj"]}] * 2,
    }
    gen = gen_report = None
    if not args.skip_generation:
        gen, gen_report = generation(
            models, {"dynamic": files["packed"]}, args.threads, max(3, args.rounds // 5), args.new_tokens, args.sessions
        )
    summary = {"pairs": ratios(report), "generation": gen, "machine": machine_info(args.threads)}
    write_json(report, args.out / "decode_latency.json", overwrite=True)  # a rerun replaces its results
    if gen_report is not None:
        write_json(gen_report, args.out / "decode_generation.json", overwrite=True)
    (args.out / "decode_latency.md").write_text(to_markdown(report))
    (args.out / "decode_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(to_markdown(report))
    print(json.dumps({k: v for k, v in summary.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
