"""One GPU run: build -> verify -> bench -> refit, on the reference models and a
GPT-2-medium-shaped model, into one JSON of results. Meant to finish in under 8 minutes on a
machine with an NVIDIA GPU and TensorRT.

What runs depends on what the machine has, probed, not assumed:
* TensorRT (+ a GPU): engines built (fp16; base, merged, and a refittable base with the
  adapter's targets marked), verify --engine, bench --backend tensorrt, refit + verify of
  the refitted engine, refit time next to build time.
* PyTorch with CUDA: bench --backend torch --device cuda (base, merged, unmerged LoRA:
  the LoRA paper's Table 1 setting on the GPT-2-medium shape).
* onnxruntime-gpu: verify --onnx and bench --backend onnxruntime on --device cuda.
Every step that cannot run is recorded as skipped with the reason (the one line the tool
itself prints); a step that fails is recorded as failed and the run goes on. A step that
would start after the time budget (--budget, 480 s) is skipped as such.

`--dry-run` exercises the same plan on a machine without any of that (the CPU here): the
GPT-2-medium shape is scaled down (2 layers, width 64, vocab 1024), the GPU steps are skipped with
their real reasons, and the ONNX Runtime steps run on the CPU instead, labelled so, with
a few rounds, so the script's own wiring is checked. Its figures are no GPU result.

    python benchmarks/gpu/run_gpu.py --out benchmarks/results/gpu_run.json
    python benchmarks/gpu/run_gpu.py --dry-run --models llama --out /tmp/gpu_dry.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "lora-deploy.gpu-run/1"
REFERENCE = ("llama", "gpt2", "bert")
MEDIUM = "gpt2-medium"
ALL_MODELS = (*REFERENCE, MEDIUM)
BUDGET_S = 480.0
CHECK_FIELDS = ("name", "status", "max_abs", "cosine", "atol", "detail")


@dataclass
class Machine:
    """What this machine can run, with the reason for each thing it cannot."""

    tensorrt: str | None  # None when usable, else why not
    cuda: str | None
    ort_gpu: str | None
    facts: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def probe(cls) -> Machine:
        import onnxruntime as ort
        import torch

        from lora_deploy.backends.onnxrt import gpu
        from lora_deploy.backends.trt import versions
        from lora_deploy.errors import LoraDeployError

        def why(check: Callable[[], object]) -> str | None:
            try:
                check()
            except LoraDeployError as exc:
                return str(exc)
            return None

        cuda = None if torch.cuda.is_available() else f"PyTorch {torch.__version__} sees no CUDA device"
        facts: dict[str, Any] = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if cuda is None else None,
            "onnxruntime": ort.__version__,
            "onnxruntime_providers": ort.get_available_providers(),
        }
        tensorrt = why(versions.require_tensorrt)
        if tensorrt is None:
            import tensorrt as trt

            facts["tensorrt"] = trt.__version__
        return cls(tensorrt, cuda, why(lambda: gpu.require_providers(gpu.choose("cuda"))), facts)


@dataclass
class Plan:
    work: Path
    dry_run: bool
    budget_s: float
    rounds: int
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


@dataclass
class Model:
    """One model's files, made on demand (an export only when a step that reads it runs)."""

    name: str
    base: Path
    adapter: Path
    merged: Path
    shapes: str  # bench shapes
    profile: str  # TensorRT profile of input_ids
    targets: str  # the adapter's target modules, for --refittable adapter-targets
    files: dict[str, Path] = field(default_factory=dict)

    def onnx(self, which: str) -> Path:
        from lora_deploy.export import export_checkpoint

        if which not in self.files:
            source = self.base if which == "base" else self.merged
            path = source.parent / f"{which}.onnx"
            if not path.exists():
                export_checkpoint(source, path)
            self.files[which] = path
        return self.files[which]


def run_step(plan: Plan, steps: list[dict], name: str, blocker: str | None, fn: Callable[[], dict]) -> dict | None:
    """Run one step unless `blocker` says why it cannot; record it either way."""
    record: dict[str, Any] = {"step": name}
    if blocker is None and plan.elapsed() > plan.budget_s:
        blocker = f"the time budget of {plan.budget_s:.0f} s was spent before this step"
    if blocker is not None:
        steps.append(record | {"status": "skipped", "reason": blocker})
        print(f"  skip {name}: {blocker}", file=sys.stderr)
        return None
    start = time.perf_counter()
    try:
        result = fn()
        status = "failed" if result.get("equivalent") is False else "passed"
        record |= {"status": status, "result": result}
    except Exception as exc:  # a failed step is a result; the run goes on
        record |= {"status": "failed", "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:400]}
        record["traceback"] = traceback.format_exc(limit=4).splitlines()[-3:]
    record["seconds"] = round(time.perf_counter() - start, 2)
    steps.append(record)
    print(f"  {record['status']} {name} ({record['seconds']} s)", file=sys.stderr)
    return record.get("result")


# ------------------------------------------------------------------ models ----


def prepare(name: str, plan: Plan) -> Model:
    from lora_deploy.examples import models as ref
    from lora_deploy.merge import merge

    root = plan.work / name
    base, adapter, merged = root / "base", root / "adapter", root / "merged"
    if name == MEDIUM:
        layers, hidden, vocab = (2, 64, 1024) if plan.dry_run else (24, 1024, 50257)
        build_medium(base, adapter, layers, hidden, vocab)
        shapes, profile = ("1x128,16x256", "input_ids:1x1,1x128,16x256")
        targets = "c_attn"
    else:
        if not base.exists():
            ref.build_base(name, base)
        if not adapter.exists():
            ref.train_adapter(base, adapter)
        shapes, profile = "1x32,8x128", "input_ids:1x1,1x32,8x128"
    if plan.dry_run:
        shapes = "1x8"  # the wiring, not a measurement
        targets = ",".join(sorted(json.loads((adapter / "adapter_config.json").read_text())["target_modules"]))
    if not merged.exists():
        merge(base, adapter, merged)
    return Model(name, base, adapter, merged, shapes, profile, targets)


def build_medium(base: Path, adapter: Path, layers: int, hidden: int, vocab: int) -> None:
    """GPT-2 medium's shape (random weights) and a random r=4 LoRA on c_attn, as in the
    LoRA paper's Table 1 (benchmarks/paper_table1.py)."""
    if base.exists() and adapter.exists():
        return
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=16, n_positions=1024, vocab_size=vocab)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(base)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(adapter)


# ------------------------------------------------------------------- steps ----


def verify_result(report) -> dict:
    return {
        "equivalent": report.equivalent,
        "problem": report.problem(),
        "checks": [{k: c.to_dict()[k] for k in CHECK_FIELDS} for c in report.checks],
        "onnxruntime": report.inputs.get("onnxruntime"),
    }


def bench_result(report) -> dict:
    """Per shape and variant: p50 and the ratio to the reference with its interval; and
    where each variant ran (its details: providers, engine)."""
    rows = {}
    for shape, block in report["results"].items():
        rows[shape] = {
            name: {"p50_ms": entry["p50_ms"]}
            | ({} if not entry.get("ratio") else {k: entry["ratio"][k] for k in ("vs", "median", "low", "high")})
            for name, entry in block["variants"].items()
        }
    return {"results": rows, "variants": report.get("config", {}).get("variants")}


def model_steps(model: Model, plan: Plan, machine: Machine, steps: list[dict]) -> None:
    from lora_deploy.backends.trt.build import build_engine
    from lora_deploy.backends.trt.refit import refit_engine
    from lora_deploy.bench.run import run_bench
    from lora_deploy.proof.verify import verify

    trt = machine.tensorrt
    engines: dict[str, Any] = {}

    def build(which: str, onnx: str, **options) -> Callable[[], dict]:
        def go() -> dict:
            out = model.base.parent / f"{which}.engine"
            built = build_engine(model.onnx(onnx), out, shapes=(model.profile,), overwrite=True, **options)
            engines[which] = built
            m = built.manifest
            return {"engine": str(out), "precision": m["precision"], "build_seconds": m["build"]["seconds"]}

        return go

    run_step(plan, steps, "build trt base (fp16)", trt, build("base", "base", precision="fp16"))
    run_step(plan, steps, "build trt merged (fp16)", trt, build("merged", "merged", precision="fp16"))
    refittable = {"precision": "fp16", "refittable": "adapter-targets", "refit_targets": model.targets}
    refittable["base"] = model.base
    run_step(plan, steps, "build trt refittable base (fp16)", trt, build("refit", "base", **refittable))
    need = trt or (None if "merged" in engines else "the merged engine was not built")
    run_step(
        plan,
        steps,
        "verify --engine merged",
        need,
        lambda: verify_result(
            verify(model.base, model.adapter, onnx_path=model.onnx("merged"), engine_path=engines["merged"].path)
        ),
    )

    ort_device, ort_blocker = "cuda", machine.ort_gpu
    if plan.dry_run and ort_blocker is not None:
        ort_device, ort_blocker = "cpu", None  # the wiring, on the CPU: no GPU figure
    label = "" if ort_device == "cuda" else " [dry run: on the CPU]"
    run_step(
        plan,
        steps,
        f"verify --onnx merged --device {ort_device}{label}",
        ort_blocker,
        lambda: verify_result(verify(model.base, model.adapter, onnx_path=model.onnx("merged"), device=ort_device)),
    )
    rounds = 3 if plan.dry_run else plan.rounds
    run_step(
        plan,
        steps,
        f"bench onnxruntime --device {ort_device}{label}",
        ort_blocker,
        lambda: bench_result(
            run_bench(
                {"base": model.onnx("base"), "merged": model.onnx("merged")},
                backend="onnxruntime",
                device=ort_device,
                shapes=model.shapes,
                rounds=rounds,
                warmup=1 if plan.dry_run else 10,
            )
        ),
    )
    need = trt or (None if {"base", "merged"} <= set(engines) else "the base and merged engines were not both built")
    run_step(
        plan,
        steps,
        "bench tensorrt base vs merged",
        need,
        lambda: bench_result(
            run_bench(
                {"base": engines["base"].path, "merged": engines["merged"].path},
                backend="tensorrt",
                device="cuda",
                shapes=model.shapes,
                rounds=rounds,
                warmup=10,
            )
        ),
    )
    run_step(
        plan,
        steps,
        "bench torch cuda base / merged / unmerged LoRA",
        machine.cuda,
        lambda: bench_result(
            run_bench(
                {"base": model.base, "merged": model.merged, "unmerged": model.base},
                adapters={"unmerged": model.adapter},
                backend="torch",
                device="cuda",
                shapes=model.shapes,
                reference="base",
                rounds=rounds,
                warmup=10,
            )
        ),
    )

    def refit() -> dict:
        out = model.base.parent / "refitted.engine"
        result = refit_engine(engines["refit"].path, model.base, model.adapter, out=out, overwrite=True)
        checked = verify(model.base, model.adapter, engine_path=out)
        return {
            "weights": result.weights,
            "refit_seconds": round(result.seconds, 3),
            "build_seconds": result.build_seconds,
            "refit_vs_build": None if not result.build_seconds else round(result.seconds / result.build_seconds, 4),
        } | {"verify": verify_result(checked), "equivalent": checked.equivalent}

    need = trt or (None if "refit" in engines else "the refittable engine was not built")
    run_step(plan, steps, "refit the adapter into the refittable engine, then verify it", need, refit)


# -------------------------------------------------------------------- main ----


def run(models: Sequence[str], plan: Plan, machine: Machine) -> dict:
    document: dict[str, Any] = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dry_run": plan.dry_run,
        "budget_s": plan.budget_s,
        "machine": machine.facts,
        "unavailable": {"tensorrt": machine.tensorrt, "torch_cuda": machine.cuda, "onnxruntime_gpu": machine.ort_gpu},
        "models": {},
    }
    for name in models:
        print(f"{name}:", file=sys.stderr)
        steps: list[dict] = []
        model: Model | None = None

        def make(name: str = name) -> dict:
            nonlocal model
            model = prepare(name, plan)
            return {"base": str(model.base), "adapter": str(model.adapter), "merged": str(model.merged)}

        run_step(plan, steps, "prepare: base, adapter, merge", None, make)
        if model is not None:
            model_steps(model, plan, machine, steps)
        document["models"][name] = {"steps": steps}
    document["elapsed_s"] = round(plan.elapsed(), 1)
    counts: dict[str, int] = {}
    for entry in document["models"].values():
        for step in entry["steps"]:
            counts[step["status"]] = counts.get(step["status"], 0) + 1
    document["summary"] = counts
    return document


def parse_models(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_MODELS]
    if unknown or not names:
        given = ", ".join(unknown) or "(none given)"
        raise SystemExit(f"--models: unknown {given}; choose from {', '.join(ALL_MODELS)}")
    return names


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="The JSON of results.")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lora-deploy-gpu-run"), help="Models and engines.")
    ap.add_argument("--models", default=",".join(ALL_MODELS), help=f"Comma-separated, from {', '.join(ALL_MODELS)}.")
    ap.add_argument("--dry-run", action="store_true", help="Exercise the plan on a machine without a GPU.")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="Seconds; later steps are skipped once spent.")
    ap.add_argument("--rounds", type=int, default=50, help="Bench rounds per shape (a dry run uses 3).")
    ap.add_argument("--overwrite", action="store_true", help="Replace an existing --out.")
    args = ap.parse_args(argv)
    from lora_deploy.io.staging import check_output, write_file_atomic

    models = parse_models(args.models)
    check_output(args.out, [], args.overwrite)  # before the work
    args.work.mkdir(parents=True, exist_ok=True)
    plan = Plan(args.work, args.dry_run, args.budget, args.rounds)
    document = run(models, plan, Machine.probe())
    text = json.dumps(document, indent=2, default=str) + "\n"
    write_file_atomic(args.out, lambda f: f.write(text.encode()), overwrite=args.overwrite)
    print(f"wrote {args.out}: {document['summary']} in {document['elapsed_s']} s", file=sys.stderr)
    return document


if __name__ == "__main__":
    main()
