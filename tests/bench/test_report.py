"""The bench report: building, JSON round trip and validation, Markdown, plot, parsing."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from lora_deploy.bench.gates import regression_gates, report_gates
from lora_deploy.bench.machine import machine_info
from lora_deploy.bench.report import plot, to_markdown
from lora_deploy.bench.schema import SCHEMA, load_report, validate_report, write_json
from lora_deploy.bench.shapes import parse_shapes
from lora_deploy.bench.stats import GateFailed, enforce_gates
from lora_deploy.bench.summary import build_report
from lora_deploy.errors import BadInputError

MACHINE = {
    "cpu": "Synthetic CPU @ 3.0GHz",
    "cores": 8,
    "usable_cores": 8,
    "platform": "test",
    "python": "3.11",
    "gpu": None,
    "threads": {"requested": 4, "torch": None, "torch_interop": None, "env": {}},
    "libraries": {"numpy": np.__version__, "torch": None, "onnxruntime": None, "transformers": None},
}
SHAPES = [(1, 1), (1, 128), (8, 128)]


def synthetic_results(factors: dict[str, float], *, sigma=0.05, rounds=40, seed=0) -> dict:
    """{(batch, seq): {variant: seconds}} with latency growing with batch * seq."""
    rng = np.random.default_rng(seed)
    out = {}
    for batch, seq in SHAPES:
        base = 1e-3 * (1 + batch * seq / 64)
        out[(batch, seq)] = {name: (base * f * rng.lognormal(0, sigma, rounds)).tolist() for name, f in factors.items()}
    return out


def make_report(factors=None, *, data_seed=0, **kwargs) -> dict:
    factors = factors or {"base": 1.0, "merged": 1.0, "dynamic": 1.10}
    options = dict(
        backend="torch",
        device="cpu",
        reference="base",
        warmup=5,
        inner=1,
        threads=4,
        max_overhead=0.02,
        resamples=1000,
        machine=MACHINE,
    )
    options.update(kwargs)
    return build_report(synthetic_results(factors, seed=data_seed), **options)


@pytest.fixture(scope="module")
def report() -> dict:
    return make_report()


# ---------------------------------------------------------------- building


def test_report_has_schema_config_and_results(report):
    assert report["schema"] == SCHEMA == "lora-deploy.bench/3"
    assert report["config"]["shapes"] == ["1x1", "1x128", "8x128"]
    assert report["config"]["rounds"] == 40
    assert report["config"]["reference"] == "base"
    block = report["results"]["8x128"]
    assert (block["batch"], block["seq"]) == (8, 128)
    assert list(block["variants"]) == ["base", "merged", "dynamic"]


def test_variant_entry_numbers_are_consistent(report):
    entry = report["results"]["8x128"]["variants"]["merged"]
    samples = np.array(entry["samples_s"])
    assert entry["n"] == len(samples) == 40
    assert entry["p50_ms"] == pytest.approx(np.median(samples) * 1000)
    assert entry["min_ms"] <= entry["p50_ci_ms"][0] <= entry["p50_ms"] <= entry["p50_ci_ms"][1]
    assert entry["p50_ms"] <= entry["p90_ms"]
    assert entry["p99_ms"] is None and entry["p999_ms"] is None  # 40 samples: a p99 needs 100
    assert entry["throughput"]["samples_per_s"] == pytest.approx(8 / np.median(samples))
    assert entry["throughput"]["tokens_per_s"] == pytest.approx(8 * 128 / np.median(samples))
    ratio = entry["ratio"]
    assert ratio["vs"] == "base" and ratio["low"] <= ratio["median"] <= ratio["high"]
    assert report["results"]["8x128"]["variants"]["base"]["ratio"] is None


def test_overhead_gates_pass_merged_and_fail_slow_variant(report):
    gates = {g["subject"]: g for g in report["gates"]}
    assert set(gates) == {f"{s}/{v}" for s in ("1x1", "1x128", "8x128") for v in ("merged", "dynamic")}
    assert all(gates[f"{s}/merged"]["passed"] for s in ("1x1", "1x128", "8x128"))
    assert not any(gates[f"{s}/dynamic"]["passed"] for s in ("1x1", "1x128", "8x128"))
    with pytest.raises(GateFailed):
        enforce_gates(report_gates(report))


def test_no_gates_without_a_limit():
    assert make_report(max_overhead=None)["gates"] == []


def test_missing_reference_is_bad_input():
    with pytest.raises(BadInputError):
        build_report({(1, 1): {"merged": [1.0]}}, backend="torch", device="cpu", reference="base", machine=MACHINE)


def test_machine_info_tolerates_missing_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    info = machine_info(threads=2)
    assert isinstance(info["cpu"], str) and info["cpu"]
    assert isinstance(info["cores"], int) and info["cores"] >= 1
    assert info["gpu"] is None
    assert info["threads"]["requested"] == 2
    assert info["libraries"]["numpy"] == np.__version__
    json.dumps(info)  # must be serialisable as is


# ---------------------------------------------------------------- regression against a baseline


def test_regression_gates_against_baseline(report):
    slower = make_report({"base": 1.0, "merged": 1.25, "dynamic": 1.10}, data_seed=7, max_overhead=None)
    gates = {g.subject: g for g in regression_gates(slower, report, 0.05)}
    assert all(gates[f"{s}/merged"].passed is False for s in ("1x1", "1x128", "8x128"))
    assert all(gates[f"{s}/base"].passed for s in ("1x1", "1x128", "8x128"))
    assert all(gates[f"{s}/dynamic"].passed for s in ("1x1", "1x128", "8x128"))


def test_noisy_rerun_does_not_regress(report):
    noisy = make_report(
        {"base": 1.0, "merged": 1.0, "dynamic": 1.10},
        data_seed=9,
        max_overhead=None,
        baseline=report,
        max_regression=0.05,
    )
    kinds = {g["gate"] for g in noisy["gates"]}
    assert kinds == {"regression"}
    assert all(g["passed"] for g in noisy["gates"]), [g["message"] for g in noisy["gates"] if not g["passed"]]


def test_baseline_on_other_hardware_is_noted(report):
    other = dict(MACHINE, gpu="NVIDIA H200")
    rerun = make_report(data_seed=3, machine=other, max_overhead=None)
    gates = regression_gates(rerun, report, 0.05)
    assert all("configuration differs: gpu None in the baseline, 'NVIDIA H200' here" in g.message for g in gates)
    assert not any(g.conclusive for g in gates) and all(g.passed for g in gates)  # flagged, not failed


def test_baseline_sharing_nothing_is_bad_input(report):
    other = build_report(
        {(2, 2): {"base": [1.0, 1.1]}}, backend="torch", device="cpu", reference="base", machine=MACHINE
    )
    with pytest.raises(BadInputError):
        regression_gates(other, report, 0.05)


def test_baseline_needs_a_limit(report):
    with pytest.raises(BadInputError):
        make_report(baseline=report)


# ---------------------------------------------------------------- JSON


def test_json_round_trip(report, tmp_path):
    path = write_json(report, tmp_path / "out" / "bench.json")
    assert load_report(path) == report
    assert [p.name for p in path.parent.iterdir()] == ["bench.json"]  # no temp file left


def test_write_json_replaces_existing_file_only_with_overwrite(report, tmp_path):
    path = tmp_path / "bench.json"
    path.write_text("old")
    with pytest.raises(BadInputError, match="exists; pass --overwrite"):
        write_json(report, path)
    assert path.read_text() == "old"
    write_json(report, path, overwrite=True)
    assert json.loads(path.read_text())["schema"] == SCHEMA


def corrupt(report: dict, edit) -> dict:
    copy = json.loads(json.dumps(report))
    edit(copy)
    return copy


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: r.update(schema="lora-deploy.bench/4"),
        lambda r: r["config"].pop("sessions"),
        lambda r: r["config"].update(sessions=0),
        lambda r: r["results"]["1x1"]["variants"]["merged"].update(sample_sessions=[0]),
        lambda r: r.pop("results"),
        lambda r: r.pop("gates"),
        lambda r: r["config"].pop("backend"),
        lambda r: r["results"]["1x1"]["variants"].pop("base"),
        lambda r: r["results"]["1x1"]["variants"]["merged"].update(samples_s=[]),
        lambda r: r["results"]["1x1"]["variants"]["merged"].update(samples_s=["fast"]),
        lambda r: r["results"]["1x1"]["variants"]["merged"].update(p50_ms=None),
        lambda r: r["results"]["1x1"]["variants"]["merged"].update(ratio={"median": 1.0}),
        lambda r: r["results"]["1x1"].update(batch=2),
        lambda r: r["results"].update({"big": r["results"]["1x1"]}),
        lambda r: r["gates"].append({"passed": "yes", "message": "x"}),
    ],
)
def test_validation_rejects_broken_reports(report, edit, tmp_path):
    broken = corrupt(report, edit)
    with pytest.raises(BadInputError):
        validate_report(broken)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(BadInputError):
        load_report(path)


def test_load_report_rejects_unreadable_files(tmp_path):
    with pytest.raises(BadInputError):
        load_report(tmp_path / "missing.json")
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(BadInputError):
        load_report(tmp_path / "garbage.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(BadInputError):
        load_report(tmp_path / "list.json")


def test_write_json_refuses_invalid_report(tmp_path):
    with pytest.raises(BadInputError):
        write_json({"schema": SCHEMA}, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


# ---------------------------------------------------------------- markdown and plot


def test_markdown_has_every_shape_and_variant(report):
    md = to_markdown(report)
    rows = [line for line in md.splitlines() if line.startswith("| ") and "shape" not in line]
    assert len(rows) == 3 * 3
    for shape in ("1x1", "1x128", "8x128"):
        for variant in ("base", "merged", "dynamic"):
            assert any(row.startswith(f"| {shape} | {variant} |") for row in rows)
    assert "reference" in md
    assert "**FAIL**" in md and "**PASS**" in md
    assert "Synthetic CPU" in md


def decoded_png(path) -> np.ndarray:
    """The image, decoded by matplotlib (RGB(A) floats), after checking the PNG signature
    and that the header's size is the decoded size."""
    import struct

    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    image = imread(path)
    assert image.shape[:2] == (height, width)
    return image


def bar_colours(image: np.ndarray) -> int:
    """How many distinct saturated colours each cover at least 1% of the image: the bars of
    the variants (text, axes and error bars are black, grey or white; edges and overlaps
    give a few hundred pixels of other shades)."""
    rgb = np.round(image[..., :3] * 255).astype(int).reshape(-1, 3)
    saturated = rgb[rgb.max(axis=1) - rgb.min(axis=1) > 60]
    _, counts = np.unique(saturated, axis=0, return_counts=True)
    return int((counts >= 0.01 * len(rgb)).sum())


def test_plot_writes_a_png(report, tmp_path):
    path = plot(report, tmp_path / "plots" / "bench.png")
    image = decoded_png(path)
    # 4.5 in tall and 1 in + 0.6 in per bar wide (3 shapes x 3 variants), at 120 dpi
    assert image.shape[:2] == (540, 768)
    assert np.ptp(image[..., :3]) > 0.5  # not a blank canvas
    assert bar_colours(image) == 3  # one colour per variant, each drawn
    assert [p.name for p in path.parent.iterdir()] == ["bench.png"]


def test_plot_handles_wide_ranges_and_missing_variants(tmp_path):
    results = {(1, 1): {"base": [1e-4, 1.1e-4]}, (64, 512): {"base": [0.5, 0.6], "merged": [0.5, 0.61]}}
    rep = build_report(results, backend="onnxruntime", device="cpu", reference="base", resamples=200, machine=MACHINE)
    image = decoded_png(plot(rep, tmp_path / "b.png"))
    assert image.shape[:2] == (540, 720)  # never narrower than 6 in
    assert bar_colours(image) == 2  # "merged" drawn where it was measured, though missing at 1x1


# ---------------------------------------------------------------- parse_shapes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1x1,1x128,8x128", [(1, 1), (1, 128), (8, 128)]),
        ("4x64", [(4, 64)]),
        (" 2 x 16 , 8X32 ", [(2, 16), (8, 32)]),
    ],
)
def test_parse_shapes_accepts(text, expected):
    assert parse_shapes(text) == expected


@pytest.mark.parametrize(
    "text", ["", " ", "1x", "x2", "0x8", "8x0", "1x-2", "abc", "1.5x2", "1x1,", "1x1,,2x2", "1x2x3", "1x1,1x1", "8*128"]
)
def test_parse_shapes_rejects(text):
    with pytest.raises(BadInputError):
        parse_shapes(text)
