"""The README's promises, as one table over every command: bad input exits 2 with exactly one
line on stderr (no traceback), writes nothing, and --debug (before or after the subcommand)
shows the traceback instead."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_deploy.cli import main


def commands(tmp_path, missing):
    """(name, argv) for every command, each given an input that does not exist."""
    out = tmp_path / "out"
    return {
        "inspect": ["inspect", missing],
        "analyze": ["analyze", missing, "--plot", out / "p.png"],
        "compress": ["compress", missing, "-o", out, "--rank", "2"],
        "combine": ["combine", missing, missing, "-o", out],
        "merge": ["merge", missing, missing, "-o", out],
        "verify": ["verify", missing, missing, "--merged", missing, "--report", out / "r.json"],
        "export onnx": ["export", "onnx", missing, "-o", out / "m.onnx"],
        "export onnx --dynamic-adapters": [
            "export",
            "onnx",
            missing,
            "-o",
            out / "d.onnx",
            "--dynamic-adapters",
            "--targets",
            "q_proj",
        ],
        "export genai": ["export", "genai", missing, "-o", out / "genai"],
        "pack": ["pack", missing, "-o", out / "a.onnx_adapter"],
        "bench": ["bench", "--model", f"base={missing}", "--json", out / "b.json"],
        "run": ["run", missing, "--out", out / "bundle"],
    }


NAMES = list(commands(Path("t"), "m"))


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, name):
    argv = commands(tmp_path, tmp_path / "missing")[name]
    result = CliRunner().invoke(main, [str(a) for a in argv])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and "missing" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # not even the output's directory


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_on_either_side(tmp_path, name, where):
    argv = [str(a) for a in commands(tmp_path, tmp_path / "missing")[name]]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code != 0
    assert result.exception is not None and not isinstance(result.exception, SystemExit), result.output


@pytest.mark.parametrize("argv", [["merge"], ["export", "onnx"], ["bench"], ["verify", "x"], ["nope"]])
def test_usage_errors_are_one_line(argv):
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def test_usage_errors_are_json_too_when_json_was_asked_for():
    import json

    result = CliRunner().invoke(main, ["merge", "b", "a", "-o", "x", "--dtype", "foo", "--json"])
    assert result.exit_code == 2
    error = json.loads(result.stdout)
    assert error["exit_code"] == 2 and "--dtype" in error["error"]
    assert result.stderr.strip().startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert CliRunner().invoke(main, ["merge", "b", "a", "-o", "x", "--dtype", "foo"]).stdout == ""
