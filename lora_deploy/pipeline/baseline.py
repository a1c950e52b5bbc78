"""`gates: baseline: previous`: each bench result gated against the same adapter's and
target's in the bundle this run replaces.

The previous result is the bench report its manifest lists, and it is used only when its
bytes are the ones that manifest recorded. Where there is none (a first run, a new
adapter, a bundle from before the bench step, a report changed since) the regression gate
is skipped with the reason, never passed. A previous report from another machine or with
other library versions is still compared, and its gates are inconclusive with the
differences named (the pipeline's on_inconclusive decides what that does).
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_deploy.pipeline.cache import Hasher
from lora_deploy.pipeline.manifest import MANIFEST, MANIFEST_SCHEMA
from lora_deploy.pipeline.steps import Baseline


def previous_bench(bundle: Path, unit: str, target: str, hasher: Hasher) -> Baseline:
    """The bench report of `unit` on `target` in the bundle at `bundle`, or why there is none."""
    path = bundle / MANIFEST
    if not path.is_file():
        return Baseline(None, f"no previous bundle at {bundle}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return Baseline(None, f"the previous bundle's {MANIFEST} is unreadable ({exc})")
    if not isinstance(manifest, dict) or manifest.get("schema") != MANIFEST_SCHEMA:
        return Baseline(None, f"the previous bundle's {MANIFEST} is not {MANIFEST_SCHEMA}")
    source = {"bundle": str(bundle), "manifest_created": manifest.get("created")}
    step = next(
        (
            s
            for s in manifest.get("steps") or []
            if isinstance(s, dict) and (s.get("step"), s.get("unit"), s.get("target")) == ("bench", unit, target)
        ),
        None,
    )
    report = ((step or {}).get("result") or {}).get("report")
    if not report:
        return Baseline(None, f"the previous bundle has no bench result for {unit} @{target}", source)
    listed = {name: digest for name, digest in (step.get("outputs") or {}).items() if name.endswith("/" + report)}
    if len(listed) != 1:
        return Baseline(None, f"the previous bundle's manifest lists no {report} for {unit} @{target}", source)
    (name, digest), *_ = listed.items()
    file = bundle / name
    try:
        actual = hasher.file(file)
    except OSError:
        return Baseline(None, f"the previous bundle has no {name}", source)
    if actual != digest:
        return Baseline(None, f"the previous bundle's {name} changed since its manifest was written", source)
    return Baseline(file, None, {**source, "report": name, "sha256": digest, "status": step.get("status")})
