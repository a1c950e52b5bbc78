"""`lora-deploy verify BASE ADAPTER --genai DIR --generate N`: an onnxruntime-genai folder's
greedy tokens against PEFT's unmerged generate (proof.generate), token for token."""

from __future__ import annotations

import json

from click.testing import CliRunner

from lora_deploy.cli import main

N_NEW = 8


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_dynamic_folder_passes_with_its_adapter_and_with_none(genai_folder):
    folder, base, adapters = genai_folder("dynamic")
    adapter = adapters[1]  # not the one the graph was built with: its own ranks and scalings
    result = cli("verify", base, adapter, "--genai", folder, "--generate", N_NEW, "--seq", 10, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["equivalent"] is True
    names = [c["name"] for c in report["checks"]]
    shipped = f"{adapter.name}.onnx_adapter active vs peft"
    assert sum(shipped in n for n in names) == 2  # the folder's own file, on both prompt sets
    assert sum("no adapter vs base" in n for n in names) == 2
    assert all(c["status"] == "passed" for c in report["checks"])
    assert "model.onnx" in report["artifacts"]["genai"]["sha256"]


def test_folder_of_another_adapter_fails_with_the_divergence(genai_folder, reference):
    folder, base, _ = genai_folder("merged")  # the plain adapter, merged
    _, other = reference("llama", "all_linear")
    result = cli("verify", base, other, "--genai", folder, "--generate", N_NEW, "--seq", 10)
    assert result.exit_code == 1, result.output
    assert "first divergence" in result.output.replace("\n", " ")


def test_genai_needs_generate(genai_folder):
    folder, base, adapters = genai_folder("dynamic")
    result = cli("verify", base, adapters[0], "--genai", folder)
    assert result.exit_code == 2 and "--generate" in result.output
