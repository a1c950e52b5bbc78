"""The LoRA paper's Table 1 setting, measured with `lora-deploy bench --backend torch`.

GPT-2-medium-shaped model (n_embd 1024, 24 layers, 16 heads; random weights), LoRA r=4 on
the attention projection (GPT-2 fuses q, k, v into c_attn), and three variants:
base, merged (same architecture, merged weights) and unmerged LoRA (adapter attached as
an extra low-rank path). Shapes as in the paper: batch 1 / seq 128, 16 / 256, 32 / 512.

On a GPU (the intended run, one short script):
    python benchmarks/paper_table1.py --device cuda --out benchmarks/results
On the CPU (a smoke run at smaller shapes):
    python benchmarks/paper_table1.py --device cpu --shapes 1x32 --rounds 5 --layers 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lora_deploy.bench.run import run_bench, write_outputs
from lora_deploy.merge.streaming import merge

# Paper, Table 1 (GPT-2 medium, one RTX 8000, mean of 100 runs): fine-tuned / merged LoRA
# latency in ms and the adapter variants' overhead.
PAPER = {
    "1x128": {"merged_ms": 19.8, "AdapterL": "+20.7%", "AdapterH": "+30.3%"},
    "16x256": {"AdapterL": "+5.0%", "AdapterH": "+8.4%"},
    "32x512": {"AdapterL": "+2.2%", "AdapterH": "+3.0%"},
}


def build(work: Path, layers: int) -> tuple[Path, Path, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    base, adapter, merged = work / "base", work / "adapter", work / "merged"
    if not merged.exists():
        torch.manual_seed(0)
        config = GPT2Config(n_embd=1024, n_layer=layers, n_head=16, n_positions=1024, vocab_size=50257)
        model = GPT2LMHeadModel(config)
        model.save_pretrained(base)
        lora = get_peft_model(
            model,
            LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False),
        )
        lora.save_pretrained(adapter)
        merge(base, adapter, merged)
    return base, adapter, merged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lora-deploy-table1"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="1x128,16x256,32x512")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--cuda-graphs", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base, adapter, merged = build(args.work, args.layers)
    report = run_bench(
        {"base": base, "merged": merged, "unmerged": base},
        adapters={"unmerged": adapter},
        backend="torch",
        device=args.device,
        shapes=args.shapes,
        reference="base",
        rounds=args.rounds,
        warmup=10,
        cuda_graphs=args.cuda_graphs,
    )
    report["config"]["paper_table1"] = PAPER
    name = f"paper_table1_{args.device}"
    args.out.mkdir(parents=True, exist_ok=True)
    write_outputs(
        report,
        json_path=args.out / f"{name}.json",
        markdown_path=args.out / f"{name}.md",
        plot_path=args.out / f"{name}.png",
        overwrite=True,  # a rerun replaces its results
    )
    for shape, row in report["results"].items():
        cells = ", ".join(
            f"{v}: {e['p50_ms']:.2f} ms" + (f" ({100 * (e['ratio']['median'] - 1):+.1f}%)" if e.get("ratio") else "")
            for v, e in row["variants"].items()
        )
        print(f"{shape}: {cells}; paper: {json.dumps(PAPER.get(shape, {}))}")


if __name__ == "__main__":
    main()
