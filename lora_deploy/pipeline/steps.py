"""Each step over its stage's Python API (never the CLI): a `produce(out_dir, inputs)`
that writes the step's files into out_dir, a directory of its own, and returns an Outcome
(one line, a JSON result for the manifest, and the problem when a gate or verification
failed). `inputs` are paths: the base, an adapter, or an earlier step's output directory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_deploy.errors import BadInputError
from lora_deploy.pipeline.spec import Target


@dataclass
class Outcome:
    """What a step did: one line, a JSON result for the manifest, and, when a gate or a
    verification failed, the problem (exit 1). `lines` are printed under the step's line."""

    detail: str
    result: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None
    lines: list[str] = field(default_factory=list)


@dataclass
class Baseline:
    """gates.baseline: previous, for one adapter and target: the previous bundle's bench
    report (checked against that bundle's manifest), or why there is none."""

    report: Path | None
    reason: str | None = None  # set when report is None: the regression gate is skipped
    source: dict[str, Any] = field(default_factory=dict)  # the previous bundle, its manifest's date, the digest


Inputs = dict[str, Any]  # role -> Path | list[Path] | None, as `produce` receives them
Produce = Callable[[Path, Inputs], Outcome]


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """A JSON file inside a step's own (staging) output directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def inspect_step(out: Path, inputs: Inputs) -> Outcome:
    from lora_deploy.adapter.summary import describe_adapter

    info = describe_adapter(inputs["adapter"], inputs["base"])
    write_json(out / "adapter.json", info)
    detail = (
        f"{info['variant']}, r={info['r']}, {len(info['modules'])} modules, "
        f"{100 * info['trainable_fraction']:.2f}% of the base's parameters"
    )
    keep = ("variant", "r", "lora_alpha", "target_modules", "trainable_parameters", "trainable_fraction")
    return Outcome(detail, {k: info[k] for k in keep} | {"modules": len(info["modules"])})


def merge_step(options: dict[str, Any]) -> Produce:
    def produce(out: Path, inputs: Inputs) -> Outcome:
        from lora_deploy.merge import merge

        result = merge(inputs["base"], inputs["adapter"], out / "merged", **options)
        size = result.manifest["output"]["total_bytes"]
        return Outcome(
            f"{len(result.merged)} tensors merged, {size / 1e6:.1f} MB checkpoint",
            {"merged_tensors": result.merged, "total_bytes": size},
        )

    return produce


def export_step(options: dict[str, Any], name: str, sub: str | None = None) -> Produce:
    def produce(out: Path, inputs: Inputs) -> Outcome:
        from dataclasses import asdict

        from lora_deploy.export import export_checkpoint

        model = inputs["model"] / sub if sub else inputs["model"]
        result = export_checkpoint(model, out / name, **options)
        error = "-" if result.max_abs_error is None else f"{result.max_abs_error:.1e}"
        parity = f"ONNX Runtime vs torch max abs {error}" if result.parity == "checked" else result.parity
        data = {k: v for k, v in asdict(result).items() if k != "path"}
        return Outcome(f"{name}: {result.task}, opset {result.opset}, {result.dtype}; {parity}", data)

    return produce


def merged_graph_step(base_check: str) -> Produce:
    def produce(out: Path, inputs: Inputs) -> Outcome:
        from lora_deploy.export.like import merge_onnx

        result = merge_onnx(
            inputs["base"], inputs["adapter"], inputs["graph"] / "base.onnx", out / "merged.onnx", base_check=base_check
        )
        data = {k: v for k, v in result.to_dict().items() if k not in ("path", "base_graph")}
        return Outcome(
            f"merged.onnx from the base graph: {len(result.merged)} initializers merged, {result.copied} copied, "
            f"{result.checked} checked against the base ({base_check})",
            data,
        )

    return produce


def dynamic_step(options: dict[str, Any], adapters: list[Path] | None) -> Produce:
    def produce(out: Path, inputs: Inputs) -> Outcome:
        from lora_deploy.export.dynamic import export_dynamic

        graph = export_dynamic(
            inputs["model"],
            out / "dynamic.onnx",
            adapters=adapters or (),
            targets=options["lora_targets"],
            task=options["task"],
            opset=options["opset"],
        )
        return Outcome(
            f"dynamic.onnx: {len(graph.slots)} LoRA layers as overridable inputs ({graph.task})",
            {"task": graph.task, "modules": sorted(graph.slots), "skipped": graph.skipped},
        )

    return produce


def pack_step(options: dict[str, Any]) -> Produce:
    def produce(out: Path, inputs: Inputs) -> Outcome:
        from lora_deploy.backends.onnxrt.lora_format import pack_adapter

        notes: list[str] = []
        path = pack_adapter(
            inputs["adapter"],
            out / "adapter.onnx_adapter",
            onnx_path=inputs["graph"] / "dynamic.onnx",
            note=notes.append,
            **options,
        )
        dtype = options["dtype"] or "the graph's dtype"
        return Outcome(f"adapter.onnx_adapter, {path.stat().st_size / 1e3:.1f} kB ({dtype})", lines=notes)

    return produce


def genai_step(options: dict[str, Any], sub: str | None = None) -> Produce:
    def produce(out: Path, inputs: Inputs) -> Outcome:
        from lora_deploy.export.genai import export_genai

        notes: list[str] = []
        model = inputs["model"] / sub if sub else inputs["model"]
        folder = export_genai(model, out / "genai", adapters=inputs["adapters"], note=notes.append, **options)
        kind = f"dynamic, {len(folder.adapters)} adapter file(s)" if folder.dynamic else "merged"
        return Outcome(
            f"genai/: {folder.architecture}, {folder.precision} for {folder.execution_provider} ({kind})",
            {"precision": folder.precision, "execution_provider": folder.execution_provider, "dynamic": folder.dynamic},
            lines=notes,
        )

    return produce


def engine_step(options: dict[str, Any], name: str, checkpoint: Path | None, graph: str = "base.onnx") -> Produce:
    def produce(out: Path, inputs: Inputs) -> Outcome:
        from lora_deploy.backends.trt.build import build_engine

        built = build_engine(inputs["graph"] / graph, out / name, **{**options, "base": inputs.get("checkpoint")})
        precision = built.manifest["precision"]
        return Outcome(
            f"{name}: {precision['requested']} requested, {precision['realized']} realized",
            {"precision": precision, "tensorrt": built.manifest["environment"]["tensorrt"]},
        )

    return produce


def refit_step(out: Path, inputs: Inputs) -> Outcome:
    from lora_deploy.backends.trt.refit import refit_engine

    result = refit_engine(inputs["engine"] / "base.engine", inputs["base"], inputs["adapter"], out=out / "refit.engine")
    return Outcome(
        f"refit.engine: {result.weights} weights refitted in {result.seconds:.2f}s", {"weights": result.weights}
    )


def verify_outcome(report: Any, out: Path, name: str) -> Outcome:
    """A verify report into `name` in out, and its line and manifest summary."""
    data = report.to_dict()
    write_json(out / name, data)
    checks = report.checks
    passed = sum(c.passed for c in checks)
    worst = max((c.max_abs for c in checks if c.max_abs is not None and c.name.startswith("outputs")), default=None)
    detail = f"{passed} checks passed, {sum(c.skipped for c in checks)} skipped"
    if worst is not None:
        detail += f"; outputs max abs {worst:.2g}"
    summary = {
        "report": name,
        **{k: data[k] for k in ("schema", "created", "equivalent", "skipped", "artifacts")},
        "checks": passed,
        "max_abs": worst,
    }
    return Outcome(detail, summary, problem=report.problem())


def genai_verify_step(options: dict[str, Any], generate: int) -> Produce:
    """The genai folder's greedy generation against PEFT's unmerged generate (verify --genai)."""

    def produce(out: Path, inputs: Inputs) -> Outcome:
        from lora_deploy.proof.genai import verify_genai

        report = verify_genai(inputs["base"], inputs["adapter"], inputs["genai"] / "genai", generate, **options)
        return verify_outcome(report, out, "verify-genai.json")

    return produce


def verify_step(options: dict[str, Any]) -> Produce:
    def produce(out: Path, inputs: Inputs) -> Outcome:
        from lora_deploy.proof.verify import verify

        def file(role: str, name: str) -> Path | None:
            return inputs[role] / name if inputs.get(role) is not None else None

        engine = inputs.get("engine")
        engine_path = None
        if engine is not None:
            engine_path = engine / ("refit.engine" if (engine / "refit.engine").is_file() else "merged.engine")
        report = verify(
            inputs["base"],
            inputs["adapter"],
            merged_dir=file("merged", "merged"),
            onnx_path=file("onnx", "merged.onnx"),
            dynamic_path=file("dynamic", "dynamic.onnx"),
            packed_path=file("packed", "adapter.onnx_adapter"),
            engine_path=engine_path,
            **options,
        )
        return verify_outcome(report, out, "verify.json")

    return produce


def target_settings(target: Target) -> dict[str, Any]:
    if target.runtime == "tensorrt":
        return {"backend": "tensorrt", "device": "cuda"}
    return {"backend": "onnxruntime", "device": target.device, "provider": target.provider}


def bench_step(options: dict[str, Any], target: Target, target_name: str, baseline: Baseline | None = None) -> Produce:
    """Time the models; with `baseline` (gates.baseline: previous) gate them against the
    previous bundle's report too, or say why that gate is skipped."""

    def produce(out: Path, inputs: Inputs) -> Outcome:
        from lora_deploy.bench import check_gates, run_bench, write_outputs
        from lora_deploy.bench.gates import inconclusive_gates
        from lora_deploy.bench.stats import GateFailed

        models, adapters = {}, {}
        for role, value in inputs.items():
            kind, _, name = role.partition(":")
            if kind == "model":
                models[name] = value / model_file(value, name)
            elif kind == "adapter":
                adapters[name] = value / "adapter.onnx_adapter"
        models = {name: models[name] for name in ("base", "merged", "dynamic") if name in models}
        opts, previous = dict(options), None
        if baseline is not None:
            reason = baseline.reason or unshared(baseline.report, opts, models)
            if reason is None:  # another machine or library versions: inconclusive gates, not an error
                opts |= {"baseline_path": baseline.report, "allow_mismatch": True}
            else:
                opts = {k: v for k, v in opts.items() if k not in ("max_regression", "run_margin")}
            previous = {"baseline": "previous", **baseline.source, "used": reason is None, "skipped": reason}
        report = run_bench(models, adapters=adapters, **opts, **target_settings(target))
        stem = f"bench-{target_name}"
        write_outputs(report, json_path=out / f"{stem}.json", markdown_path=out / f"{stem}.md")
        problem = None
        try:
            check_gates(report)
        except GateFailed as exc:
            problem = str(exc)
        lines = bench_lines(report)
        lines += [f"warning: {g.message}" for g in inconclusive_gates(report)]
        if previous is not None:
            if previous["skipped"]:
                lines.append(f"baseline previous: regression gate skipped ({previous['skipped']})")
            else:
                previous["mismatches"] = (report.get("baseline") or {}).get("mismatches") or []
                lines += [f"baseline previous: differs: {m}" for m in previous["mismatches"]]
        gates = report.get("gates", [])
        passed = sum(1 for g in gates if g["passed"])
        verdict = f"gates {passed}/{len(gates)} passed" if gates else "no latency gate"
        detail = f"{len(models)} models, {len(report['results'])} shapes; {verdict}"
        from lora_deploy.io.provenance import artifact_hashes

        timed = {**models, **{f"{name} adapter": path for name, path in adapters.items()}}
        result = {
            "report": f"{stem}.json",
            "schema": report.get("schema"),
            "created": report.get("created"),
            "artifacts": {name: artifact_hashes(path) for name, path in timed.items()},
            "config": {k: report["config"].get(k) for k in ("backend", "device", "rounds", "reference", "shapes")},
            "p50_ms": {
                shape: {name: v["p50_ms"] for name, v in entry["variants"].items()}
                for shape, entry in report["results"].items()
            },
            "gates": gates,
        }
        if previous is not None:
            result["baseline"] = previous
            if previous["skipped"]:
                detail += "; regression gate skipped (no previous result)"
        return Outcome(detail, result, problem=problem, lines=lines)

    return produce


def unshared(report_path: Path, options: Mapping[str, Any], models: Mapping[str, Path]) -> str | None:
    """Why a previous bench report cannot be a baseline for this run's shapes and models
    (None: it can): unreadable, or no shape and model in common."""
    from lora_deploy.bench.schema import load_report
    from lora_deploy.bench.shapes import DEFAULT_SHAPES, parse_shapes, shape_key

    try:
        previous = load_report(report_path)
    except BadInputError as exc:
        return f"the previous report is unusable: {exc}"
    if options.get("inputs_path") is not None or options.get("rate") is not None:
        return None  # the shape comes from the inputs, or a control loop: run_bench decides
    shapes = [shape_key(s) for s in parse_shapes(options.get("shapes") or DEFAULT_SHAPES)]
    results = previous.get("results") or {}
    if any(set(models) & set((results.get(k) or {}).get("variants", {})) for k in shapes):
        return None
    return "the previous bundle's bench shares no shape and model with this run"


def model_file(directory: Path, name: str) -> str:
    """The file a bench model comes from in its step's output directory."""
    for candidate in ("refit.engine", "merged.engine", "base.engine", f"{name}.onnx", "merged.onnx", "base.onnx"):
        if (directory / candidate).is_file():
            return candidate
    raise BadInputError(f"{directory}: no model file for {name}")


def bench_lines(report: Mapping[str, Any]) -> list[str]:
    """One line per shape: every variant's p50, and its ratio to the reference with the CI."""
    lines = []
    reference = report["config"].get("reference")
    for shape, entry in report["results"].items():
        parts = []
        for name, v in entry["variants"].items():
            part = f"{name} {v['p50_ms']:.4g} ms"
            ratio = v.get("ratio")
            if name != reference and isinstance(ratio, Mapping) and ratio.get("median") is not None:
                part += f" (x{ratio['median']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}])"
            parts.append(part)
        lines.append(f"{shape}: " + ", ".join(parts))
    return lines
