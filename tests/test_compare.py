"""compare: the one tolerance table and the one output comparison that export and verify share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_deploy import compare
from lora_deploy.compare import (
    AtolError,
    OutputMatchError,
    ShapeError,
    Tolerance,
    tolerance,
)
from lora_deploy.errors import (
    BadInputError,
    ExportError,
    LoraDeployError,
    NotEquivalentError,
)
from lora_deploy.export import graph as onnx_graph
from lora_deploy.export import model as export_mod
from lora_deploy.proof import verify

TIGHT = Tolerance(atol=1e-4, rtol=1e-3, min_cosine=0.99999)


# ------------------------------------------------------------------ table ----


def test_export_and_verify_read_the_same_table():
    assert export_mod.TOLERANCES is compare.TOLERANCES
    assert verify.TOLERANCES is compare.TOLERANCES
    assert not hasattr(onnx_graph, "TOLERANCES")  # the exporter core keeps no table of its own


def test_the_values_the_readme_promises():
    assert (tolerance("float32").atol, tolerance("float32").rtol) == (1e-4, 1e-3)
    assert (tolerance("float16").atol, tolerance("float16").rtol) == (2e-2, 2e-2)
    assert (tolerance("bfloat16").atol, tolerance("bfloat16").rtol) == (0.15, 0.1)
    assert verify.loosest(["float32", "bfloat16", "float16"]) == "bfloat16"


def test_overriding_one_tolerance_keeps_the_other():
    t = tolerance("float16", atol=0.5)
    assert (t.atol, t.rtol, t.min_cosine) == (0.5, 2e-2, compare.TOLERANCES["float16"].min_cosine)
    assert tolerance("float32", rtol=0.0).atol == 1e-4


def test_unknown_dtype_is_one_line_naming_the_choices():
    with pytest.raises(BadInputError) as info:
        tolerance("int8")
    assert str(info.value) == "no output tolerance for dtype 'int8' (choose float64, float32, float16, bfloat16)"


@pytest.mark.parametrize("error", [1.5e-2, 3e-2])
def test_export_and_verify_agree_on_a_float16_output(error):
    """The same float16 output, off by `error`: export's gate and verify's check decide alike."""
    want = np.linspace(-4, 4, 24, dtype=np.float32).reshape(2, 3, 4)
    got = (want + np.float32(error)).astype(np.float16)
    reference = [torch.from_numpy(want).to(torch.float16)]
    passes = error < 2e-2
    check = verify.compare_outputs("logits", got, reference[0].float().numpy(), None, tolerance("float16"))
    assert check.passed is passes
    if passes:
        assert export_mod._compare(["logits"], reference, [got], None, None) == pytest.approx(error, rel=0.05)
    else:
        with pytest.raises(ExportError, match="max abs error 0.03"):
            export_mod._compare(["logits"], reference, [got], None, None)


# ---------------------------------------------------------------- figures ----


def test_cosine_and_top1_on_a_hand_checked_pair():
    actual = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    expected = np.array([[1.0, 2.0, 4.0], [1.0, 2.0, 3.0]])
    result = compare.compare_array("y", actual, expected, TIGHT)
    # dot 27, |a|^2 28, |e|^2 35; argmax rows: actual (2, 0), expected (2, 2)
    assert result.cosine == pytest.approx(27 / np.sqrt(28 * 35))
    assert result.cosine == pytest.approx(
        np.dot(actual.ravel(), expected.ravel()) / (np.linalg.norm(actual) * np.linalg.norm(expected))
    )
    assert result.top1 == 0.5
    assert result.max_abs == 2.0
    assert result.max_rel == pytest.approx(2.0 / 1.0)  # |3 - 1| / |1|, row 2 column 0
    assert not result.passed and result.error is AtolError


def test_cosine_catches_drift_inside_atol():
    expected = np.array([1e-3, -1e-3, 1e-3, -1e-3])
    actual = -expected  # elementwise within atol 1e-2, pointing the other way
    result = compare.compare_array("y", actual, expected, Tolerance(1e-2, 0.0, 0.99))
    assert result.cosine == pytest.approx(-1.0)
    assert result.error is None  # every |expected| <= atol: no direction to compare
    expected = np.array([0.5, -0.5, 0.5, -0.5])
    actual = np.array([0.2, -0.2, 0.8, -0.8])  # each within atol 0.35, the direction is not
    result = compare.compare_array("y", actual, expected, Tolerance(0.35, 0.0, 0.99))
    assert result.cosine == pytest.approx(1.0 / np.sqrt(1.36))  # dot 1.0, |e| 1, |a| sqrt(1.36)
    assert result.error is AtolError and "cosine" in result.reason


def test_all_zero_outputs_agree():
    zeros = np.zeros((2, 3), np.float32)
    result = compare.compare_array("y", zeros, zeros, TIGHT)
    assert result.passed and result.cosine == 1.0 and result.top1 == 1.0 and result.max_abs == 0.0


def test_mask_limits_sequence_outputs_to_real_tokens():
    expected = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    actual = expected.copy()
    actual[1, 1] = [100.0, 0.0, 0.0]  # a padded position: different values and argmax
    mask = np.array([[1, 1], [1, 0]])
    masked = compare.compare_array("y", actual, expected, TIGHT, mask)
    assert masked.passed and masked.top1 == 1.0 and masked.max_abs == 0.0
    unmasked = compare.compare_array("y", actual, expected, TIGHT)
    assert not unmasked.passed and unmasked.top1 == 0.75 and unmasked.max_abs == 91.0


def test_integer_outputs_must_be_equal():
    ids = np.array([[3, 4, 5]], np.int64)
    assert compare.compare_array("ids", ids, ids, tolerance("bfloat16")).passed
    result = compare.compare_array("ids", ids + np.array([[0, 0, 1]]), ids, tolerance("bfloat16"))
    assert result.error is AtolError and result.max_abs == 1.0


def test_nan_and_inf_must_match_the_reference():
    expected = np.array([1.0, np.nan, np.inf])
    assert compare.compare_array("y", expected.copy(), expected, TIGHT).passed
    result = compare.compare_array("y", np.array([1.0, np.nan, -np.inf]), expected, TIGHT)
    assert result.error is AtolError and result.max_abs == float("inf") and "1 position" in result.reason
    result = compare.compare_array("y", np.array([np.nan, 0.0, np.inf]), np.array([1.0, 0.0, np.inf]), TIGHT)
    assert result.error is AtolError


def test_bfloat16_arrays_compare_by_value():
    import ml_dtypes

    want = np.array([[1.0, 2.0, 3.0]], np.float32)
    result = compare.compare_array("y", want.astype(ml_dtypes.bfloat16), want, tolerance("bfloat16"))
    assert result.passed and result.max_abs == 0.0


# ----------------------------------------------------------------- errors ----


def test_shape_error():
    result = compare.compare({"logits": np.zeros((2, 3))}, {"logits": np.zeros((2, 4))}, TIGHT)
    assert not result.passed and result.outputs[0].error is ShapeError
    with pytest.raises(ShapeError, match=r"output 'logits': shape \[2, 3\] != expected \[2, 4\]") as info:
        result.raise_for(ExportError, "ONNX Runtime differs from torch")
    assert isinstance(info.value, ExportError) and str(info.value).startswith("ONNX Runtime differs from torch: ")


def test_atol_error_names_the_output_and_the_miss():
    expected = {"a": np.ones(4), "b": np.ones(4)}
    actual = {"a": np.ones(4), "b": np.array([1.0, 1.0, 1.5, 1.0])}
    result = compare.compare(actual, expected, TIGHT)
    assert [c.passed for c in result.outputs] == [True, False]
    assert result.max_abs == 0.5
    with pytest.raises(AtolError, match=r"output 'b': max abs error 0.5 \(atol 0.0001, rtol 0.001\)") as info:
        result.raise_for(NotEquivalentError)
    assert isinstance(info.value, NotEquivalentError) and info.value.exit_code == 1


def test_output_match_error_for_a_missing_output():
    result = compare.compare({"logits": np.ones(2)}, {"logits": np.ones(2), "hidden": np.ones(2)}, TIGHT)
    assert result.outputs[1].error is OutputMatchError and result.outputs[1].max_abs is None  # nothing measured
    assert result.max_abs == 0.0  # the largest measured: "logits", equal
    with pytest.raises(OutputMatchError, match="'hidden': missing") as info:
        result.raise_for(ExportError)
    assert isinstance(info.value, ExportError) and info.value.exit_code == 2


def test_extra_actual_outputs_are_ignored_and_a_pass_raises_nothing():
    result = compare.compare({"logits": np.ones(2), "extra": np.zeros(3)}, {"logits": np.ones(2)}, TIGHT)
    assert result.passed and len(result.outputs) == 1
    result.raise_for(ExportError)


def test_error_kinds_stay_distinct_per_context():
    export_kind = compare.in_context(AtolError, ExportError)
    assert compare.in_context(AtolError, ExportError) is export_kind  # one class per pair
    assert not issubclass(export_kind, NotEquivalentError)
    assert issubclass(compare.in_context(ShapeError, NotEquivalentError), LoraDeployError)


def test_require_close_replaces_check_close():
    want = np.ones((2, 3), np.float32)
    compare.require_close(want + 1e-5, want, "float32", "with LoRA inputs fed")
    with pytest.raises(
        AtolError, match=r"^exported graph differs from PyTorch with LoRA inputs fed \(max abs error 0.5\)$"
    ) as info:
        compare.require_close(want + 0.5, want, "float32", "with LoRA inputs fed")
    assert isinstance(info.value, ExportError)
    with pytest.raises(ShapeError, match=r"\(max abs error nan\)") as info:
        compare.require_close(want[:1], want, "float32", "with default LoRA inputs")
    assert isinstance(info.value, ExportError)


def test_polygraphy_check_reports_polygraphy_figures():
    """Polygraphy's own max abs / rel difference; it measures no cosine or top-1, so those
    are None (tests/proof/test_verify_report.py checks the figures against polygraphy's)."""
    pytest.importorskip("polygraphy")
    reference = {"logits": np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], np.float32)}
    outputs = {"logits": reference["logits"] + np.float32(5e-5)}
    check = verify.polygraphy_check(reference, outputs, TIGHT)
    assert check.passed and check.top1 is None and check.cosine is None
    assert check.max_abs == pytest.approx(5e-5, rel=1e-2) and check.max_rel == pytest.approx(5e-5, rel=1e-2)
    outputs = {"logits": reference["logits"] + np.float32(0.25)}
    check = verify.polygraphy_check(reference, outputs, TIGHT)
    assert not check.passed and check.max_abs == pytest.approx(0.25)
