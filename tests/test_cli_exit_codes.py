"""Exit codes the README promises for inspect and export (0 success, 2 bad input), each
with the one-line message that names the problem."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from lora_deploy.cli import main


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def test_inspect_a_good_adapter_exits_0(reference):
    base, adapter = reference("gpt2", "plain")
    result = run_cli("inspect", adapter, "--base", base, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert {m["module"] for m in info["modules"]} == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    assert run_cli("inspect", adapter).exit_code == 0  # the table, without --base


def test_inspect_bad_adapters_exit_2(reference, tmp_path):
    base, adapter = reference("llama", "plain")
    _, gpt2_adapter = reference("gpt2", "plain")
    assert_one_line_error(run_cli("inspect", tmp_path / "nope"), 2, "nope", "not found")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("inspect", tmp_path / "empty"), 2, "no adapter_config.json")
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "r": 0}))
    assert_one_line_error(run_cli("inspect", broken), 2, "adapter_config.json", "r must be a positive integer")
    assert_one_line_error(run_cli("inspect", gpt2_adapter, "--base", base), 2, "another base")


@pytest.mark.parametrize("case", ["missing", "not a checkpoint", "corrupt config"])
def test_export_of_a_bad_model_exits_2(reference, tmp_path, case):
    base, adapter = reference("llama", "plain")
    if case == "missing":
        model, fragments = tmp_path / "nope", ("model directory not found", "nope")
    elif case == "not a checkpoint":  # an adapter directory where the model belongs
        model, fragments = adapter, ("no config.json",)
    else:
        model = tmp_path / "model"
        shutil.copytree(base, model)
        (model / "config.json").write_text("{not json")
        fragments = ("config.json", "not a valid JSON")
    out = tmp_path / "model.onnx"
    assert_one_line_error(run_cli("export", "onnx", model, "-o", out), 2, *fragments)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".model.onnx.")]
