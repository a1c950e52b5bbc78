"""merge --onto's targeted layers take one product s B A for the merge onto dequant(quant(W))
and for the exact float32 merge it is measured against (merge.quant.merged_onto): both must
be exactly what two merged_weight calls give, for every dtype and layout."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from lora_deploy._native import kernel
from lora_deploy.adapter.read import LoraModule
from lora_deploy.merge.bnb import BnbSpec, fake_quant
from lora_deploy.merge.delta import merged_weight
from lora_deploy.merge.quant import chunk_totals, distance_sums, merged_onto

DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


@pytest.mark.parametrize("kind", ["linear", "transposed"])
@pytest.mark.parametrize("base_dtype", list(DTYPES))
@pytest.mark.parametrize("out_dtype", list(DTYPES))
def test_one_product_gives_both_merges_bit_for_bit(kind, base_dtype, out_dtype):
    rng = np.random.default_rng(7)
    rows, cols, r = 300, 1100, 8  # several row blocks of the merge, the last one partial
    a = rng.standard_normal((r, cols if kind == "linear" else rows)).astype(np.float32)
    b = rng.standard_normal((rows if kind == "linear" else cols, r)).astype(np.float32) * 0.05
    module = LoraModule("m", a, b, r=r, alpha=2.0 * r, scaling=2.0)
    w0 = rng.standard_normal((rows, cols)).astype(DTYPES[base_dtype])  # [out, in], or Conv1D's [in, out]
    quantized = fake_quant(w0, BnbSpec("nf4"))
    exact = np.full(w0.shape, np.nan, np.float32)
    out = merged_onto(module, kind, quantized, w0, DTYPES[out_dtype], exact)
    expected_out = merged_weight(module, kind, quantized, DTYPES[out_dtype])
    expected_exact = merged_weight(module, kind, w0)
    assert out.dtype == expected_out.dtype and out.shape == expected_out.shape
    assert out.tobytes() == expected_out.tobytes()
    assert exact.tobytes() == expected_exact.tobytes()


@pytest.mark.parametrize("out_dtype", list(DTYPES))
@pytest.mark.parametrize("cols", [1024, 1100])
def test_distances_summed_on_the_way_are_distance_sums(out_dtype, cols):
    """With `distances`, where the kernel is built and each block of rows is one of
    distance_sums' chunks (1024 columns: 256 rows a block), the figures are summed while
    merging, `exact` is left unwritten, and they are distance_sums' own, bit for bit;
    elsewhere (1100 columns) nothing is summed and `exact` is written as before."""
    rng = np.random.default_rng(cols)
    rows, r = 600, 4
    module = LoraModule(
        "m",
        rng.standard_normal((r, cols)).astype(np.float32),
        rng.standard_normal((rows, r)).astype(np.float32) * 0.05,
        r=r,
        alpha=2.0 * r,
        scaling=2.0,
    )
    w0 = rng.standard_normal((rows, cols)).astype(np.float16)
    quantized = fake_quant(w0, BnbSpec("nf4"))
    exact, distances = np.full(w0.shape, np.nan, np.float32), {}
    out = merged_onto(module, "linear", quantized, w0, DTYPES[out_dtype], exact, distances)
    expected_exact = merged_weight(module, "linear", w0)
    assert out.tobytes() == merged_weight(module, "linear", quantized, DTYPES[out_dtype]).tobytes()
    expected = distance_sums(out, expected_exact, True)
    if cols == 1100 or kernel("_quant4") is None:
        assert not distances and exact.tobytes() == expected_exact.tobytes()
    else:
        assert sorted(distances) == [0, 262144, 524288] and np.isnan(exact).all()
        assert chunk_totals(distances).tobytes() == expected.tobytes()
