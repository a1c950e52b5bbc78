"""export_dynamic(default_rank=1): rank-1 zero defaults instead of rank-0 ones, for runtimes
whose MatMul fails on an inner dim of 0 (ONNX Runtime's CUDA and DirectML providers have).
Checked in ONNX Runtime on the CPU: with no adapter the graph gives the rank-0 graph's
outputs exactly, and packed adapters still fit, load and switch."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from lora_deploy.backends.onnxrt.lora_format import METADATA_KEY, pack_adapter
from lora_deploy.backends.onnxrt.sessions import DynamicSession
from lora_deploy.cli import main
from lora_deploy.errors import BadInputError
from lora_deploy.export.dynamic import export_dynamic
from lora_deploy.modeling.samples import sample_inputs
from lora_deploy.modeling.tasks import load_config


def defaults(path):
    model = onnx.load(str(path))
    inputs = {v.name for v in model.graph.input}
    return {t.name: (list(t.dims), onnx.numpy_helper.to_array(t)) for t in model.graph.initializer if t.name in inputs}


def test_rank_one_zero_defaults_are_the_base_and_adapters_still_switch(reference, tmp_path):
    base, adapter = reference("llama", "plain")
    rank0 = export_dynamic(base, tmp_path / "r0.onnx", adapters=[adapter])
    rank1 = export_dynamic(base, tmp_path / "r1.onnx", adapters=[adapter], default_rank=1)
    found = defaults(rank1.path)
    assert found and all(0 not in dims for dims, _ in found.values())  # no inner dim of 0 left
    assert all(dims[-1] == 1 or dims[0] == 1 for dims, _ in found.values()) and all(
        not a.any() for _, a in found.values()
    )
    metadata = {p.key: p.value for p in onnx.load(str(rank1.path), load_external_data=False).metadata_props}
    assert json.loads(metadata[METADATA_KEY])["default_rank"] == 1
    packed = pack_adapter(adapter, tmp_path / "a.onnx_adapter", onnx_path=rank1.path)  # check_parameters accepts it
    feed = sample_inputs(load_config(base), batch=2, seq=16, seed=0)
    runs = {}
    for graph in (rank0, rank1):
        session = DynamicSession(graph.path)
        session.load_adapter("a", packed)
        runs[graph.path.name] = [session.run(feed)["logits"], session.run(feed, adapter="a")["logits"]]
        runs[graph.path.name].append(session.run(feed)["logits"])  # and back to the base
    (base0, with0, _), (base1, with1, again1) = runs["r0.onnx"], runs["r1.onnx"]
    assert np.array_equal(base1, base0) and np.array_equal(again1, base0)  # x @ 0 @ 0 adds exact zeros
    np.testing.assert_allclose(with1, with0, rtol=0, atol=1e-6)
    assert np.abs(with1 - base1).max() > 1e-2  # the adapter really switched in


def test_default_rank_is_refused_where_it_does_not_apply(reference, tmp_path):
    base, adapter = reference("llama", "plain")
    with pytest.raises(BadInputError, match="choose 0 or 1"):
        export_dynamic(base, tmp_path / "x.onnx", adapters=[adapter], default_rank=2)
    result = CliRunner().invoke(
        main, ["export", "onnx", str(base), "-o", str(tmp_path / "x.onnx"), "--default-rank", "1"]
    )
    assert result.exit_code == 2 and "--default-rank needs --dynamic-adapters" in result.output
    multi = ["--multi-adapter", "--adapter", str(adapter), "--default-rank", "1"]
    result = CliRunner().invoke(main, ["export", "onnx", str(base), "-o", str(tmp_path / "x.onnx"), *multi])
    assert result.exit_code == 2 and "--default-rank is for --dynamic-adapters" in result.output
    assert not (tmp_path / "x.onnx").exists()
