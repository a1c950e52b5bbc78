"""The package as users get it: pyproject's metadata, the extras and the messages naming them,
and a built wheel that installs and runs outside the source tree."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = set(PYPROJECT["project"]["optional-dependencies"])
HINT = re.compile(r"lora-deploy\[([\w-]+)\]")


def package_sources() -> dict[Path, str]:
    return {p: p.read_text() for p in sorted((ROOT / "lora_deploy").rglob("*.py"))}


def test_license_is_an_spdx_expression_with_its_file():
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    [setuptools] = [r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    assert int(re.search(r">=(\d+)", setuptools).group(1)) >= 77  # PEP 639 support


def test_every_install_hint_names_an_extra_and_every_runtime_extra_has_one():
    named = {extra for text in package_sources().values() for extra in HINT.findall(text)}
    assert named <= EXTRAS, f"messages name extras pyproject.toml lacks: {named - EXTRAS}"
    # Every extra a command needs at run time is named by the message that command gives
    # without it (the test extra is for the test suite only).
    assert EXTRAS - {"test"} <= named, f"no message names: {EXTRAS - {'test'} - named}"


def test_the_readme_lists_every_extra():
    install = (ROOT / "README.md").read_text().split("## Install", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([\w-]+)` \|", install, re.M))
    assert listed == EXTRAS


# Every command path of the CLI, one per line ("merge", "export onnx", ...).
LIST_COMMANDS = """
import click
from lora_deploy.cli import main
def walk(group, path):
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            walk(command, path + [name])
        else:
            print(" ".join(path + [name]))
walk(main, [])
"""


@pytest.mark.slow
def test_a_built_wheel_installs_and_runs_every_command_outside_the_tree(tmp_path):
    """Build the wheel from the files a source distribution holds, install it into a clean
    virtual environment (system site-packages visible, so torch and the rest are not
    downloaded again) and run the CLI from a directory outside the repository."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):  # setup.py: the C kernels
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "lora_deploy", src / "lora_deploy", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(dist)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = dist.glob("lora_deploy-*.whl")

    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "lora_deploy").rglob("*") if p.is_file()}
    sources = {s for s in sources if "__pycache__" not in s}
    assert sources <= names, f"missing from the wheel: {sorted(sources - names)}"  # code and package data
    assert not [n for n in names if n.startswith("tests/")]
    dist_info = next(n.split("/")[0] for n in names if ".dist-info/" in n)
    assert f"{dist_info}/licenses/LICENSE" in names
    with zipfile.ZipFile(wheel) as zf:
        assert "License-Expression: Apache-2.0" in zf.read(f"{dist_info}/METADATA").decode()
        assert "def train_minilm_adapter" not in zf.read("lora_deploy/examples/models.py").decode()  # test-only

    # No pip of its own: a venv's bundled pip brings an old setuptools that would shadow the
    # system's (torch requires a newer one). This interpreter's pip installs into it.
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "-q", str(wheel)],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=run_dir, env=env, capture_output=True, text=True, timeout=600)

    where = run(str(python), "-c", "import lora_deploy; print(lora_deploy.__file__)")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(env_dir), where.stdout  # the wheel, not the tree

    cli = env_dir / "bin" / "lora-deploy"
    version = run(str(cli), "--version")  # the optional C kernels: built and loaded where a compiler is
    assert version.returncode == 0, version.stderr
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler):
        assert "float16 kernels: native" in version.stdout, version.stdout
    helped = run(str(cli), "--help")
    assert helped.returncode == 0, helped.stderr
    listed = run(str(python), "-c", LIST_COMMANDS)
    assert listed.returncode == 0, listed.stderr
    paths = [line.split() for line in listed.stdout.splitlines()]
    assert ["merge"] in paths and ["export", "onnx"] in paths
    for path in paths:  # every command imports what it needs to parse its options
        shown = run(str(cli), *path, "--help")
        assert shown.returncode == 0, (path, shown.stderr)
    demo = run(str(cli), "demo", "-o", "demo")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert (run_dir / "demo" / "merged" / "merge-manifest.json").is_file()
    assert (run_dir / "demo" / "merged.onnx").is_file()
