"""verify reports only what it measured (issue 9): polygraphy's own figures, None for a
figure never measured, skipped as its own state, honest failure wording, provenance
(schema, time, version, SHA-256), JSON errors, golden inputs and the adapter's effect."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig
from safetensors.torch import save_file

from lora_deploy import __version__
from lora_deploy.compare import Comparison, Comparisons, compare, compare_array, tolerance
from lora_deploy.errors import BadInputError
from lora_deploy.export.model import export_checkpoint
from lora_deploy.merge.streaming import merge
from lora_deploy.proof.verify import SCHEMA, Check, VerifyReport, polygraphy_check, verify
from tests.oracle import load_model, read_checkpoint
from tests.proof.test_custom_modules import VisionController, save_base, trained_lora


def cli(*args):
    return CliRunner().invoke(main_command(), [str(a) for a in args])


def main_command():
    from lora_deploy.cli import main

    return main


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def controller(tmp_path_factory):
    """A plain torch module's checkpoint (no config.json), an adapter and its merge:
    verified at weight level only, in well under a second."""
    root = tmp_path_factory.mktemp("controller")
    torch.manual_seed(0)
    model = VisionController().eval()
    save_base(model, root / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["stem", "head.0"], init_lora_weights=False)
    trained_lora(model, config).save_pretrained(root / "adapter")
    merge(root / "base", root / "adapter", root / "out")
    return root / "base", root / "adapter", root / "out"


@pytest.fixture(scope="module")
def llama(reference, tmp_path_factory):
    base, adapter = reference("llama", "plain")
    root = tmp_path_factory.mktemp("llama")
    merge(base, adapter, root / "merged")
    return base, adapter, root / "merged"


def tampered(merged: Path, tmp_path: Path, key: str, change) -> Path:
    bad = tmp_path / "bad"
    bad.mkdir(parents=True)
    tensors = read_checkpoint(merged)
    change(tensors, key)
    save_file(tensors, bad / "model.safetensors")
    return bad


# ------------------------------------------------------------- polygraphy ----


def polygraphy_figures(reference: dict, outputs: dict, tol):
    """What polygraphy itself measures on the same arrays, asked directly."""
    from polygraphy.comparator import SimpleCompareFunc
    from polygraphy.comparator.struct import IterationResult

    judge = SimpleCompareFunc(check_error_stat="elemwise", atol=tol.atol, rtol=tol.rtol)
    return judge(IterationResult(outputs, runner_name="onnx"), IterationResult(reference, runner_name="unmerged"))


def test_polygraphy_check_reports_polygraphy_figures_on_a_failing_case():
    rng = np.random.default_rng(0)
    reference = {"logits": rng.standard_normal((2, 4, 8)).astype(np.float32)}
    reference["logits"][0, 0, 0] = 0.0  # polygraphy and we divide by a zero differently
    outputs = {"logits": reference["logits"] + np.float32(1e-3)}
    tol = tolerance("float32")

    check = polygraphy_check(reference, outputs, tol)
    measured = polygraphy_figures(reference, outputs, tol)["logits"]
    assert check.failed and not measured
    assert check.max_abs == measured.max_absdiff and check.max_rel == measured.max_reldiff
    ours = compare(outputs, reference, tol)
    assert check.max_rel != pytest.approx(ours.max_rel)  # polygraphy's figure, not ours
    assert check.cosine is None and check.top1 is None  # polygraphy measures neither
    assert "logits" in check.detail


def test_polygraphy_check_passes_with_polygraphy_figures_and_names_a_missing_output():
    reference = {"logits": np.linspace(1, 2, 24, dtype=np.float32).reshape(2, 3, 4)}
    outputs = {"logits": reference["logits"] + np.float32(1e-6)}
    tol = tolerance("float32")
    check = polygraphy_check(reference, outputs, tol)
    measured = polygraphy_figures(reference, outputs, tol)["logits"]
    assert check.passed and check.max_abs == measured.max_absdiff > 0
    missing = polygraphy_check({**reference, "other": reference["logits"]}, outputs, tol)
    assert missing.failed and "other: missing" in missing.detail


# ------------------------------------------------------ unmeasured figures ----


def test_a_figure_never_measured_is_none_not_zero(capsys):
    tol = tolerance("float32")
    assert Comparison("y", tol).max_abs is None and Comparison("y", tol).max_rel is None
    assert Comparisons().max_abs is None and Comparisons().max_rel is None
    empty = compare_array("y", np.zeros((0, 3)), np.zeros((0, 3)), tol)
    assert empty.passed and empty.max_abs is None and empty.max_rel is None
    missing = compare({}, {"y": np.ones(3)}, tol).outputs[0]
    assert missing.max_rel is None and missing.max_abs is None  # were 0.0 and inf: nothing was measured
    shapes = compare_array("y", np.zeros(3), np.zeros(4), tol)
    assert not shapes.passed and shapes.max_abs is None and shapes.max_rel is None
    check = Check("x", "passed")
    assert check.max_abs is None and check.max_rel is None and check.to_dict()["max_abs"] is None

    from lora_deploy.cli import print_checks

    print_checks(VerifyReport(checks=[Check("measured nothing", "passed"), Check("not run", "skipped", detail="why")]))
    table = capsys.readouterr().out
    assert "measured nothing" in table and " - " in table and "skip" in table and "0.0" not in table


# ------------------------------------------------------ skipped / wording ----


def test_a_skipped_check_is_its_own_state(controller):
    base, adapter, merged = controller
    result = cli("verify", base, adapter, "--merged", merged, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    outputs = report["checks"][-1]
    assert outputs["status"] == "skipped" and outputs["passed"] is None
    assert report["checks"][0]["status"] == "passed" and report["checks"][0]["passed"] is True
    assert report["equivalent"] is True  # skipped checks do not count...
    assert report["skipped"] == [{"name": "outputs", "reason": outputs["detail"]}]  # ...but are reported
    assert "config.json" in outputs["detail"]
    table = cli("verify", base, adapter, "--merged", merged)
    assert table.exit_code == 0 and "skip" in table.stdout and "skipped: no config.json" in table.stdout

    only_skipped = VerifyReport(checks=[Check("outputs", "skipped", detail="why")])
    assert not only_skipped.equivalent and "skipped" in only_skipped.problem()


def test_a_failed_weight_check_says_what_failed(controller, tmp_path):
    base, adapter, merged = controller

    def nudge(tensors, key):
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] += 1e-3

    report = verify(base, adapter, merged_dir=tampered(merged, tmp_path, "stem.weight", nudge))
    summary = report.checks[0]
    assert summary.failed and "within one rounding," not in summary.name
    assert summary.name == "weights: 1 of 2 merged tensors not within one rounding of W0 + dW"
    assert summary.max_abs == pytest.approx(1e-3, rel=1e-3)

    report = verify(base, adapter, merged_dir=tampered(merged, tmp_path / "b", "mix.weight", nudge))
    assert report.checks[0].failed and report.checks[0].name == "weights: 1 of 7 other tensors differ from the base"

    report = verify(base, adapter, merged_dir=tampered(merged, tmp_path / "c", "mix.bias", lambda t, k: t.pop(k)))
    assert report.checks[0].name == "weights: 1 tensors missing from the merged checkpoint"
    assert report.checks[0].max_abs == 0.0  # measured: the merged tensors themselves are exact
    assert report.checks[1].name == "weights: 1 tensors missing from the merged checkpoint"
    assert report.checks[1].max_abs is None and report.checks[1].detail == "mix.bias"  # not measured: absent


# ---------------------------------------------------------------- provenance ----


def test_reports_carry_schema_time_version_and_hashes(controller, tmp_path):
    base, adapter, merged = controller
    result = cli("verify", base, adapter, "--merged", merged, "--json", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    printed, written = json.loads(result.stdout), json.loads((tmp_path / "r.json").read_text())
    for report in (printed, written):
        assert report["schema"] == SCHEMA == "lora-deploy.verify/1"
        assert datetime.fromisoformat(report["created"]).tzinfo is not None
        assert report["lora_deploy_version"] == __version__
        artifacts = report["artifacts"]
        assert set(artifacts) == {"base", "adapter", "merged"}
        assert artifacts["base"]["sha256"] == {"model.safetensors": sha256(base / "model.safetensors")}
        assert artifacts["merged"]["sha256"]["model.safetensors"] == sha256(merged / "model.safetensors")
        assert artifacts["adapter"]["sha256"] == {
            "adapter_model.safetensors": sha256(adapter / "adapter_model.safetensors"),
            "adapter_config.json": sha256(adapter / "adapter_config.json"),  # the scaling lives there
        }


def test_export_json_carries_schema_and_the_onnx_hash(llama, tmp_path):
    _, _, merged = llama
    result = cli("export", "onnx", merged, "-o", tmp_path / "m.onnx", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schema"] == "lora-deploy.export/1" and report["lora_deploy_version"] == __version__
    assert datetime.fromisoformat(report["created"])
    assert report["artifacts"]["onnx"]["sha256"] == {"m.onnx": sha256(tmp_path / "m.onnx")}
    assert report["artifacts"]["model"]["sha256"]["model.safetensors"] == sha256(merged / "model.safetensors")
    assert report["max_abs_error"] < 1e-4


# -------------------------------------------------------------- JSON errors ----


def test_with_json_errors_are_json_too(controller, tmp_path):
    base, adapter, merged = controller
    for args in [
        ("verify", base, tmp_path / "nope", "--merged", merged),
        ("inspect", tmp_path / "nope"),
        ("merge", base, tmp_path / "nope", "-o", tmp_path / "out"),
        ("export", "onnx", tmp_path / "nope", "-o", tmp_path / "x.onnx"),
    ]:
        result = cli(*args, "--json")
        assert result.exit_code == 2, (args, result.output)
        error = json.loads(result.stdout)
        assert set(error) == {"error", "exit_code"} and error["exit_code"] == 2 and "nope" in error["error"]
        assert result.stderr == f"error: {error['error']}\n"  # the one line is still there
        plain = cli(*args)
        assert plain.exit_code == 2 and plain.stdout == ""  # without --json: stderr only


def test_a_difference_with_json_is_one_document_with_the_error(controller, tmp_path):
    base, adapter, merged = controller

    def nudge(tensors, key):
        tensors[key] = tensors[key] + 1e-3

    bad = tampered(merged, tmp_path, "stem.weight", nudge)
    result = cli("verify", base, adapter, "--merged", bad, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)  # one document: the report, carrying the error
    assert report["equivalent"] is False and report["exit_code"] == 1
    assert report["error"].startswith("not equivalent") and "stem.weight" in report["error"]
    assert report["schema"] == SCHEMA


# ------------------------------------------------------------ golden inputs ----


def golden_npz(base: Path, path: Path, **override) -> Path:
    from transformers import AutoTokenizer

    texts = ["The merged model must agree with base + adapter.", "Short text."]
    encoded = AutoTokenizer.from_pretrained(base)(texts, padding=True, return_tensors="np")
    arrays = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]} | override
    np.savez(path, **arrays)
    return path


def test_golden_inputs_run_every_comparison_labelled_by_input_set(llama, tmp_path):
    base, adapter, merged = llama
    onnx_path = tmp_path / "merged.onnx"
    export_checkpoint(merged, onnx_path)
    golden = golden_npz(base, tmp_path / "golden.npz")
    result = cli("verify", base, adapter, "--merged", merged, "--onnx", onnx_path, "--inputs", golden, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    by_set = {label: [c for c in report["checks"] if c["inputs"] == label] for label in ("generated", "golden.npz")}
    for label, checks in by_set.items():
        names = [c["name"] for c in checks]
        assert all(f"[{label}]" in n for n in names)
        assert any("merged (torch)" in n for n in names) and any("onnx (onnxruntime)" in n for n in names)
        assert any("polygraphy" in n for n in names) and any(n.startswith("effect") for n in names)
        assert all(c["status"] == "passed" for c in checks)
    assert report["effect"]["golden.npz"]["max_abs"] > 1e-3
    assert report["artifacts"]["golden_inputs"]["sha256"] == {"golden.npz": sha256(golden)}
    assert report["artifacts"]["onnx"]["sha256"] == {"merged.onnx": sha256(onnx_path)}


def test_golden_inputs_are_checked_against_the_model_inputs(llama, tmp_path):
    from transformers import AutoConfig

    from lora_deploy.proof.inputs import load_golden_inputs

    base, adapter, merged = llama
    config = AutoConfig.from_pretrained(base)
    good = golden_npz(base, tmp_path / "good.npz")
    loaded = load_golden_inputs(good, config)
    assert loaded.label == "good.npz" and loaded.feed["input_ids"].dtype == np.int64

    ids = np.load(good)["input_ids"]
    cases = {
        "unexpected input 'input_idz'": dict(input_idz=ids),
        "missing input 'attention_mask'": None,
        "outside the model's": dict(input_ids=ids + 10_000),
        # an unsigned id past int64 is named as saved, not wrapped negative by the int64 cast
        "ids from 9223372036854775813 to 9223372036854775813": dict(input_ids=np.full(ids.shape, 2**63 + 5, np.uint64)),
        "row 1 has no real token": dict(attention_mask=np.array([[1] * ids.shape[1], [0] * ids.shape[1]])),
        "dim 1": dict(attention_mask=np.ones((2, 3), np.int64)),
        "longer than the model's 128 positions": dict(
            input_ids=np.full((2, 200), 20, np.int64), attention_mask=np.ones((2, 200), np.int64)
        ),
    }
    for words, override in cases.items():
        path = tmp_path / f"{len(words)}.npz"
        if override is None:
            np.savez(path, input_ids=ids)
        else:
            golden_npz(base, path, **override)
        with pytest.raises(BadInputError, match=words):
            load_golden_inputs(path, config)
    np.savez(tmp_path / "pickled.npz", input_ids=np.array([{"a": 1}], dtype=object), attention_mask=ids)
    with pytest.raises(BadInputError, match="pickle"):
        load_golden_inputs(tmp_path / "pickled.npz", config)
    np.save(tmp_path / "bare.npy", ids)
    with pytest.raises(BadInputError, match="not an .npz"):
        load_golden_inputs(tmp_path / "bare.npy", config)

    result = cli("verify", base, adapter, "--merged", merged, "--inputs", tmp_path / "pickled.npz")
    assert result.exit_code == 2 and "pickle" in result.stderr and result.stderr.count("\n") == 1
    np.savez(tmp_path / "u32.npz", **{k: v.astype(np.uint32) for k, v in np.load(good).items()})
    np.testing.assert_array_equal(load_golden_inputs(tmp_path / "u32.npz", config).feed["input_ids"], ids)


def test_a_negative_nan_or_infinite_tolerance_is_bad_input_before_any_work(llama, tmp_path):
    """Not a verification that fails (exit 1): a tolerance no comparison can use (exit 2)."""
    base, adapter, merged = llama
    report = tmp_path / "report.json"
    for flag, value in (("--atol", "-1"), ("--atol", "nan"), ("--rtol", "-0.5"), ("--rtol", "inf")):
        result = cli("verify", base, adapter, "--merged", merged, flag, value, "--report", report)
        assert result.exit_code == 2, result.output
        assert result.stderr == f"error: {flag[2:]} must be a finite number >= 0, got {float(value)}\n"
        assert not report.exists()
    for keywords in (dict(atol=-1), dict(rtol=float("nan")), dict(atol="1e-3")):
        with pytest.raises(BadInputError, match="must be a finite number >= 0"):
            verify(base, adapter, merged_dir=merged, **keywords)
    with pytest.raises(BadInputError, match="atol must be"):
        tolerance("float32", atol=-1e-3)
    assert tolerance("float32", atol=0, rtol=0).atol == 0  # exact comparison stays allowed


# ------------------------------------------------------------------- effect ----


def test_an_adapter_that_changes_nothing_fails_unless_allowed(reference, tmp_path):
    from peft import get_peft_model

    base, _ = reference("llama", "plain")
    # PEFT's own initialisation: B = 0, so base + adapter is exactly the base.
    lora = get_peft_model(load_model(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    merge(base, tmp_path / "adapter", tmp_path / "merged")

    result = cli("verify", base, tmp_path / "adapter", "--merged", tmp_path / "merged")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: no effect: base + adapter is within the comparison tolerance of the base")
    assert "on the generated inputs (max |delta| 0 vs the base, top-1 changed at 0.0% of positions" in result.stderr
    assert "cannot tell the adapter from its absence" in result.stderr and "--allow-no-effect" in result.stderr
    assert "no effect" in result.stdout  # the table's effect line

    allowed = cli("verify", base, tmp_path / "adapter", "--merged", tmp_path / "merged", "--allow-no-effect", "--json")
    assert allowed.exit_code == 0, allowed.output
    report = json.loads(allowed.stdout)
    assert report["effect"]["generated"] == {"max_abs": 0.0, "max_rel": 0.0, "top1_changed": 0.0, "no_effect": True}
    assert report["inputs"]["allow_no_effect"] is True and report["equivalent"] is True
    effect = next(c for c in report["checks"] if c["name"].startswith("effect"))
    assert effect["status"] == "passed" and "allowed by --allow-no-effect" in effect["detail"]


def test_a_trained_adapter_has_an_effect(llama):
    base, adapter, merged = llama
    report = verify(base, adapter, merged_dir=merged)
    effect = report.effect["generated"]
    assert report.equivalent and not effect["no_effect"] and effect["max_abs"] > 1e-2
    assert 0 <= effect["top1_changed"] <= 1
