"""The bench report rendered for people: a Markdown summary (`to_markdown`) and a PNG
plot (`plot`). The report itself is built by `summary.build_report` and stored as JSON
by `schema.write_json`."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lora_deploy.bench.gates import DEFAULT_RUN_MARGIN
from lora_deploy.io.staging import write_file_atomic

# ---------------------------------------------------------------- markdown


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def _ratio_cell(entry: Mapping[str, Any], key: str = "ratio") -> str:
    ratio = entry.get(key)
    if ratio is None:
        return "reference"
    return f"{ratio['median']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}]"


def _header_lines(report: Mapping[str, Any]) -> list[str]:
    config, machine = report["config"], report["machine"]
    libs = ", ".join(f"{k} {v}" for k, v in machine.get("libraries", {}).items() if v)
    conf = config.get("confidence", 0.95)
    return [
        f"## lora-deploy bench: {config['backend']} on {config['device']}",
        "",
        f"- Machine: {machine.get('cpu', 'unknown')} ({machine.get('cores', '?')} cores), "
        f"GPU: {machine.get('gpu') or 'none'}, threads: {config.get('threads') or 'default'}",
        f"- Libraries: {libs or 'unknown'}",
        f"- {config['rounds']} interleaved rounds (warmup {config.get('warmup')}, "
        f"inner {config.get('inner')}); per-round ratio = variant / {config['reference']}"
        + ("" if config.get("sessions") else f", median with {conf:.0%} bootstrap CI"),
        *_session_lines(config),
        *_adaptive_lines(config.get("adaptive")),
        *_noise_lines(report.get("noise")),
        "",
    ]


def _session_lines(config: Mapping[str, Any]) -> list[str]:
    """How many sessions each variant ran in, and what the intervals therefore cover."""
    sessions = config.get("sessions")
    if sessions is None:  # a report from before sessions (schema /2 or /1)
        return []
    conf = config.get("confidence", 0.95)
    loop = bool(config.get("rate_hz"))
    if sessions == 1:
        p99 = " (p99 ratio: variant p99 / reference p99)" if loop else ""
        return [
            f"- One session per variant: ratio = median of the per-round ratios{p99}, {conf:.0%} CI a percentile "
            "bootstrap of the rounds (the intervals exclude session-to-session variation, a few percent between two "
            "sessions of the same graph: --sessions 3 or more includes it)"
        ]
    p99 = " (p99 ratio: of the per-session p99 ratios)" if loop else ""
    return [
        f"- {sessions} sessions per variant (the rounds split between them, every model reopened between them): "
        f"ratio = geometric mean of the {sessions} per-session medians of the per-round ratios{p99}, {conf:.0%} CI "
        f"a Student's t interval ({sessions - 1} degree{'s' if sessions > 2 else ''} of freedom) around a "
        "two-level bootstrap's standard error (sessions, then rounds within each)"
    ]


def _adaptive_lines(adaptive: Mapping[str, Any] | None) -> list[str]:
    """How many rounds each shape ran with --until-width, and why the run stopped."""
    if not adaptive:
        return []
    ran = ", ".join(f"{k} {v['rounds']} ({v['width']:.1%} wide)" for k, v in adaptive["shapes"].items())
    return [
        f"- Adaptive rounds (until every interval is at most {adaptive['until_width']:.1%} wide, budget "
        f"{adaptive['max_time_s']:g} s): {ran}; stopped: {adaptive['reason']}"
    ]


def _noise_lines(noise: Mapping[str, Any] | None) -> list[str]:
    """The noise floor this report records for a later --baseline comparison."""
    if not noise:
        return []
    floors = ", ".join(f"{k} {v['margin']:.1%}" for k, v in noise["shapes"].items())
    return [
        f"- Noise floor: {noise['runs']} runs of {noise['rounds_per_run']} rounds, every model reopened between "
        f"them; margin for a later --baseline comparison (never below {DEFAULT_RUN_MARGIN:.0%}): {floors}"
    ]


def _fed_cell(block: Mapping[str, Any], entry: Mapping[str, Any]) -> str:
    """What the variant was really fed, e.g. '8x128 tokens', 'batch 1 (static)'."""
    fed = entry.get("fed")
    if not fed:
        return f"{block['batch']}x{block['seq']}"
    text = f"{fed['batch']}x{fed['seq']}" if fed.get("seq") else f"batch {fed['batch']}"
    source = {"file": " (file)", "example": " (example_inputs)"}.get(fed.get("source"), "")
    cached = f", {fed['past']} cached" if fed.get("past") else ""
    cached += f", {fed['generated']} generated" if fed.get("generated") else ""
    return text + (" tokens" if fed.get("tokens") else "") + cached + source


def _gate_index(report: Mapping[str, Any], kind: str) -> dict[str, Mapping[str, Any]]:
    return {g["subject"]: g for g in report["gates"] if g.get("gate") == kind}


def _verdict(gate: Mapping[str, Any] | None) -> str:
    if gate is None:
        return ""
    verdict = gate.get("verdict") or ("pass" if gate["passed"] else "fail")
    return {"pass": "pass", "fail": "**FAIL**", "inconclusive": "*inconclusive*"}[verdict]


def _table_lines(report: Mapping[str, Any]) -> list[str]:
    conf = report["config"].get("confidence", 0.95)
    baseline = report.get("baseline")
    regressions = _gate_index(report, "regression")
    head = f"| shape | variant | fed | p50 ms | p90 ms | p99 ms | samples/s | tok/s | ratio [{conf:.0%} CI] |"
    rule = "|---|---|---|---:|---:|---:|---:|---:|---|"
    if baseline:
        head += " baseline p50 ms | vs baseline [CI] | gate |"
        rule += "---:|---|---|"
    lines = [head, rule]
    for key, block in report["results"].items():
        base_block = (baseline or {}).get("results", {}).get(key, {})
        for name, entry in block["variants"].items():
            tp = entry["throughput"]
            row = (
                f"| {key} | {_cell(name)} | {_fed_cell(block, entry)} | {entry['p50_ms']:.4g} "
                f"| {_num(entry.get('p90_ms'), '.4g')} | {_num(entry.get('p99_ms'), '.4g')} "
                f"| {_num(tp.get('samples_per_s'), ',.1f')} "
                f"| {_num(tp.get('tokens_per_s'), ',.0f')} | {_ratio_cell(entry)} |"
            )
            if baseline:
                there = base_block.get(name)
                gate = regressions.get(f"{key}/{name}")
                vs = "" if gate is None else f"{gate['median']:.3f} [{gate['low']:.3f}, {gate['high']:.3f}]"
                then = "not in baseline" if there is None else format(there["p50_ms"], ".4g")
                row += f" {then} | {vs} | {_verdict(gate)} |"
            lines.append(row)
    return lines


def _loop_lines(report: Mapping[str, Any]) -> list[str]:
    rate = report["config"].get("rate_hz")
    if not rate:
        return []
    lines = [
        "",
        f"Control loop at {rate:g} Hz (period {1000 / rate:.3g} ms), ticks alternating between variants:",
        "",
        "| shape | variant | ticks | p50 ms | p99 ms | p99 ratio [CI] | p99.9 ms | max ms | jitter ms "
        "| start lag p99 ms | misses | longest miss run |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, block in report["results"].items():
        for name, entry in block["variants"].items():
            loop = entry.get("loop")
            if loop is None:
                continue
            lines.append(
                f"| {key} | {_cell(name)} | {loop['ticks']} | {entry['p50_ms']:.4g} "
                f"| {_num(entry.get('p99_ms'), '.4g')} | {_ratio_cell(entry, 'p99_ratio')} "
                f"| {_num(entry.get('p999_ms'), '.4g')} "
                f"| {entry.get('max_ms', float('nan')):.4g} "
                f"| {loop['jitter_ms']:.3g} | {_num(loop.get('lag_p99_ms'), '.3g')} | {loop['misses']} "
                f"| {loop['longest_miss_run']} |"
            )
    return lines


def _generation_lines(report: Mapping[str, Any]) -> list[str]:
    """bench --generate: the prefill and per-token decode figures of each timed generation."""
    n_new = report["config"].get("generate")
    if not n_new:
        return []
    lines = [
        "",
        f"Greedy generation of {n_new} new tokens per row (the rows above time whole generations; tok/s counts "
        "generated tokens):",
        "",
        "| shape | variant | prefill p50 ms | decode step p50 ms | decode step p99 ms | decode tok/s "
        "| decode step ratio [CI] |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for key, block in report["results"].items():
        for name, entry in block["variants"].items():
            gen = entry.get("generation")
            if gen is None:
                continue
            ratio = gen.get("decode_ratio")
            cell = "reference" if ratio is None else f"{ratio['median']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}]"
            lines.append(
                f"| {key} | {_cell(name)} | {gen['prefill_p50_ms']:.4g} | {_num(gen['decode_p50_ms'], '.4g')} "
                f"| {_num(gen['decode_p99_ms'], '.4g')} | {_num(gen['decode_tokens_per_s'], ',.0f')} | {cell} |"
            )
    return lines


def _baseline_lines(report: Mapping[str, Any]) -> list[str]:
    baseline = report.get("baseline")
    config = report["config"]
    if config.get("baseline_model"):
        return [
            "",
            f"- Baseline: the previous artifact {config['baseline_model']} timed as {config['reference']!r} "
            "in this same interleaved run (the recommended gate).",
        ]
    if not baseline:
        return []
    margins = baseline.get("run_margins") or {}
    if baseline.get("run_margin") is None and margins:
        margin = ", ".join(f"{m:.1%} ({k})" for k, m in margins.items())
        margin += f", from the baseline's noise floor over {baseline.get('noise_runs')} runs"
    else:
        margin = f"{(baseline.get('run_margin') or 0):.1%}"
    lines = [
        "",
        f"- Baseline: {baseline.get('path') or 'a saved report'} (created {baseline.get('created')}), "
        f"between-run margin {margin}",
    ]
    for what in baseline.get("mismatches") or []:
        lines.append(f"- Configuration differs: {_cell(what)}")
    if baseline.get("unshared"):
        lines.append(f"- Not gated (in one run only): {_cell(', '.join(baseline['unshared']))}")
    return lines


def to_markdown(report: Mapping[str, Any]) -> str:
    """A human summary: header, one table row per shape and variant (baseline side by
    side when there is one), control-loop figures, gate verdicts."""
    lines = _header_lines(report) + _table_lines(report) + _loop_lines(report) + _generation_lines(report)
    lines += _baseline_lines(report)
    if report["gates"]:
        lines += ["", "Gates:", ""]
        for gate in report["gates"]:
            verdict = (gate.get("verdict") or ("pass" if gate["passed"] else "fail")).upper()
            outcome = "" if verdict != "INCONCLUSIVE" else (" (passes)" if gate["passed"] else " (fails)")
            lines.append(f"- **{verdict}**{outcome} {_cell(gate['message'])}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plot


def _variant_names(report: Mapping[str, Any]) -> list[str]:
    """Every variant in the report, in first-seen order."""
    names: list[str] = []
    for block in report["results"].values():
        names += [n for n in block["variants"] if n not in names]
    return names


_MARKS = {"pass": ("pass", "tab:green"), "fail": ("FAIL", "tab:red"), "inconclusive": ("?", "tab:orange")}


def _gate_marks(report: Mapping[str, Any]) -> dict[str, str]:
    """{'key/variant': worst verdict of its gates}: fail > inconclusive > pass."""
    order = {"pass": 0, "inconclusive": 1, "fail": 2}
    marks: dict[str, str] = {}
    for gate in report["gates"]:
        subject = str(gate.get("subject", "")).split(" vs ")[0]
        verdict = gate.get("verdict") or ("pass" if gate["passed"] else "fail")
        if order[verdict] >= order.get(marks.get(subject, "pass"), 0):
            marks[subject] = verdict
    return marks


def _draw_variant(
    ax: Any,
    xs: np.ndarray,
    entries: list[Mapping[str, Any] | None],
    name: str,
    width: float,
    first: bool,
    marks: Sequence[str | None] = (),
    colour: Any = None,
) -> None:
    """One variant's bars (p50, CI error bars), p90 ticks, ratio labels and gate marks."""
    nan = float("nan")
    p50 = np.array([e["p50_ms"] if e else nan for e in entries])
    lo = np.array([e["p50_ci_ms"][0] if e and "p50_ci_ms" in e else nan for e in entries])
    hi = np.array([e["p50_ci_ms"][1] if e and "p50_ci_ms" in e else nan for e in entries])
    p90 = np.array([e["p90_ms"] if e and e.get("p90_ms") is not None else nan for e in entries])
    yerr = np.nan_to_num(np.vstack([p50 - lo, hi - p50]), nan=0.0).clip(min=0.0)
    ax.bar(xs, p50, width, yerr=yerr, capsize=3, label=name, color=colour)
    ax.plot(xs, p90, linestyle="none", marker="_", markersize=12, color="black", label="p90" if first else None)
    marks = list(marks) or [None] * len(entries)
    for x, top, e, mark in zip(xs, np.fmax(p90, p50), entries, marks):
        label = f"x{e['ratio']['median']:.3f}" if e and e.get("ratio") else ""
        if label:
            ax.annotate(label, (x, top), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
        if e and mark:
            text, col = _MARKS[mark]
            ax.annotate(
                text,
                (x, top),
                textcoords="offset points",
                xytext=(0, 12 if label else 3),
                ha="center",
                fontsize=7,
                fontweight="bold",
                color=col,
            )


def _draw_baseline(
    ax: Any, xs: np.ndarray, entries: list[Mapping[str, Any] | None], width: float, colour: Any, first: bool
) -> None:
    """The saved baseline's p50 bars (hatched, pale) beside the current ones."""
    p50 = np.array([e["p50_ms"] if e and e.get("p50_ms") is not None else np.nan for e in entries])
    ax.bar(
        xs,
        p50,
        width,
        color=colour,
        alpha=0.35,
        hatch="//",
        edgecolor="black",
        linewidth=0.5,
        label="baseline (saved run)" if first else None,
    )


def _draw_histogram(ax: Any, report: Mapping[str, Any]) -> None:
    """Control-loop mode: latency histograms per variant, the period as a red line."""
    period = 1000.0 / report["config"]["rate_hz"]
    every = [np.asarray(e["samples_s"]) * 1000.0 for b in report["results"].values() for e in b["variants"].values()]
    top = max(float(np.concatenate(every).max()), period) * 1.05
    bins = np.linspace(0.0, top, 80)  # shared bins: variants side by side, none hidden by its own binning
    for key, block in report["results"].items():
        for name, entry in block["variants"].items():
            ms = np.asarray(entry["samples_s"]) * 1000.0
            ax.hist(
                ms, bins=bins, histtype="step", linewidth=1.5, label=f"{key}/{name} (misses {entry['loop']['misses']})"
            )
    ax.axvline(period, color="tab:red", linestyle="--", label=f"period {period:.3g} ms")
    budget = report["config"].get("max_p99_ms")
    if budget:
        ax.axvline(budget, color="tab:orange", linestyle=":", label=f"p99 budget {budget:.3g} ms")
    ax.set_yscale("log")
    ax.set_xlabel("latency per call (ms)")
    ax.set_ylabel("calls")
    ax.set_title(f"control loop at {report['config']['rate_hz']:g} Hz: latency histogram", fontsize=9)
    ax.legend(fontsize=7)


def plot(
    report: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Grouped bars of p50 latency by shape and variant, written as PNG atomically (an
    existing file is replaced only with overwrite; never one of `inputs`).

    Error bars are the bootstrap CI of each p50, the black tick is p90, the label over a
    bar is its median ratio to the reference and the coloured mark its gates' verdict
    (pass, FAIL, ? = inconclusive). With a saved baseline its p50 bars stand hatched
    beside the current ones; in control-loop mode a latency histogram follows.
    """
    # The Agg canvas directly, not pyplot: no global backend switch, no GUI,
    # safe to call from a CLI or a test without a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shapes = list(report["results"])
    names = _variant_names(report)
    baseline = (report.get("baseline") or {}).get("results")
    slots = len(names) * (2 if baseline else 1)
    width = 0.8 / slots
    loop = bool(report["config"].get("rate_hz"))
    fig = Figure(figsize=(max(6.0, 1.0 + 0.6 * len(shapes) * slots), 8.0 if loop else 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(2, 1, 1) if loop else fig.add_subplot()
    base = np.arange(len(shapes), dtype=float)
    marks = _gate_marks(report)
    colours = [f"C{j % 10}" for j in range(len(names))]
    for j, name in enumerate(names):
        entries = [report["results"][s]["variants"].get(name) for s in shapes]
        variant_marks = [marks.get(f"{s}/{name}") for s in shapes]
        if baseline:
            xs = base + (2 * j - (slots - 1) / 2) * width
            _draw_baseline(ax, xs, [baseline.get(s, {}).get(name) for s in shapes], width, colours[j], j == 0)
            xs = xs + width
        else:
            xs = base + (j - (slots - 1) / 2) * width
        _draw_variant(ax, xs, entries, name, width, j == 0, variant_marks, colours[j])
    p50s = [e["p50_ms"] for b in report["results"].values() for e in b["variants"].values()]
    if baseline:
        p50s += [e["p50_ms"] for b in baseline.values() for e in b.values() if e.get("p50_ms")]
    if min(p50s) > 0 and max(p50s) / min(p50s) > 10:
        ax.set_yscale("log")  # 1x1 and 8x512 on one linear axis would hide the small shapes
    config = report["config"]
    ax.set_xticks(base, shapes)
    ax.set_xlabel("shape (batch x seq)")
    ax.set_ylabel("p50 latency (ms)")
    title = f"{config['backend']} on {config['device']}: p50 (bars: CI of p50; tick: p90; marks: gates)"
    if baseline:
        title += "\nhatched: saved baseline"
    elif config.get("baseline_model"):
        title += f"\nbaseline: {config['reference']} (previous artifact, same run)"
    ax.set_title(title, fontsize=9)
    ax.margins(y=0.15)
    ax.legend(fontsize=8)
    if loop:
        _draw_histogram(fig.add_subplot(2, 1, 2), report)
    fig.tight_layout()
    return write_file_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120), overwrite=overwrite, inputs=inputs)
