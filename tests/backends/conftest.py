"""Fixtures of the backend tests: the example models exported to ONNX once per session."""

from __future__ import annotations

import onnx
import pytest

from lora_deploy.examples import models as ref
from lora_deploy.modeling.samples import sample_inputs
from lora_deploy.modeling.tasks import load_config


@pytest.fixture(scope="session")
def example_graphs(tmp_path_factory):
    """{family: (base dir, fp32 graph, feed)} for the example models (seed 0: the bases the
    `reference` fixture builds), each exported once; the feed is verify's sample inputs."""
    from lora_deploy.export import export_checkpoint

    root = tmp_path_factory.mktemp("example-graphs")
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            base = ref.build_base(family, root / family)
            path = export_checkpoint(base, root / f"{family}.onnx").path
            names = {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}
            feed = sample_inputs(load_config(base), batch=2, seq=16, seed=0)
            cache[family] = (base, path, {k: v for k, v in feed.items() if k in names})
        return cache[family]

    return get
