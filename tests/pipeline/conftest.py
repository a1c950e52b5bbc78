"""Pipeline fixtures: the tiny reference LLaMA and its adapters, and one step cache for the
session, so the base model's ONNX export (the one slow step) runs once for every test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def step_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipeline-cache")


@pytest.fixture(scope="session", autouse=True)
def one_tool_version():
    """The tool's digest (part of every cache key) taken once for the session: the source
    does not change under a CI run, but an edit made while the tests run here would turn
    every expected cache hit into a miss."""
    from lora_deploy.pipeline import run

    pinned = run.tool_version()
    original = run.tool_version
    run.tool_version = lambda: pinned
    yield
    run.tool_version = original


@pytest.fixture
def models(reference, tmp_path) -> tuple[Path, Path]:
    """(base, adapters dir) with one adapter, `a1`, a copy this test may change."""
    base, adapter = reference("llama")
    adapters = tmp_path / "adapters"
    shutil.copytree(adapter, adapters / "a1")
    return base, adapters


def write_pipeline(tmp_path: Path, text: str, **paths) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(text.format(**{k: str(v) for k, v in paths.items()}))
    return path


# Every step for every adapter, the bench short: the pipeline of test_run and test_fanout.
EVERY_STEP = """\
name: test
base: {base}
adapters: {adapters}/*
out: {out}
cache: {cache}
gates:
  max_overhead: 50%
steps:
  - inspect
  - merge
  - export-onnx
  - verify
  - bench:
      shapes: 1x16
      rounds: 3
      warmup: 1
"""


@pytest.fixture
def pipeline(models, tmp_path, step_cache) -> Path:
    """EVERY_STEP over `models`, its bundle at tmp_path/bundle (a test module with a pipeline
    of its own overrides this fixture)."""
    base, adapters = models
    return write_pipeline(tmp_path, EVERY_STEP, base=base, adapters=adapters, out=tmp_path / "bundle", cache=step_cache)
