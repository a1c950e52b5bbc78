"""verify_module (verify --module --dynamic / --multi) on the float16 adapter graphs of a
plain module: each skill's actions against its unmerged float32 PEFT reference at
float16's tolerance, no adapter against the base, and a failure when the graph runs
another skill than the one verified."""

from __future__ import annotations

import pytest

from lora_deploy.backends.onnxrt.lora_format import pack_adapter
from lora_deploy.compare import tolerance
from lora_deploy.export.dynamic_module import export_dynamic_module, export_multi_module
from lora_deploy.proof.plain import verify_module

F16 = tolerance("float16")


@pytest.fixture(scope="module")
def static16(robot, policy_skill_r4, tmp_path_factory):
    """The policy's float16, fully static skills graph (rank fixed to 16), via the Python API."""
    paths = robot("policy")
    graph = tmp_path_factory.mktemp("static16") / "skills16.onnx"
    result = export_dynamic_module(
        paths["base"],
        graph,
        module=paths["spec"],
        adapters=[paths["adapter"], policy_skill_r4],
        inputs_path=paths["obs1"],
        dtype="float16",
        static=True,
    )
    assert (result.dtype, result.rank) == ("float16", 16)
    return graph


def dynamic_checks(report) -> dict[str, object]:
    return {c.name: c for c in report.checks if "dynamic" in c.name}


@pytest.mark.parametrize("skill", ["adapter", "r4"])
def test_each_skill_of_a_float16_static_graph_verifies_against_peft(robot, policy_skill_r4, static16, skill):
    paths = robot("policy")
    adapter = paths["adapter"] if skill == "adapter" else policy_skill_r4
    report = verify_module(
        paths["base"], adapter, module=paths["spec"], dynamic_path=static16, inputs_path=paths["obs1"], batch=3
    )
    assert report.equivalent, [c.name + ": " + (c.detail or "") for c in report.failures()]
    checks = dynamic_checks(report)
    for inputs in ("generated", "obs1.npz"):
        active = checks[f"actions [{inputs}]: dynamic (adapter active) vs unmerged"]
        idle = checks[f"actions [{inputs}]: dynamic (no adapter) vs base"]
        assert (active.atol, active.rtol) == (F16.atol, F16.rtol)  # the float16 graph's tolerance
        assert 0 < active.max_abs < F16.atol and idle.max_abs < F16.atol
    assert report.effect["obs1.npz"]["max_abs"] > 0.1  # the skill changes the actions: a real check


def test_the_graph_running_another_skill_fails_verification(robot, policy_skill_r4, static16, tmp_path):
    """--packed with skill r4 while verifying the reference adapter: the actions differ."""
    paths = robot("policy")
    other = pack_adapter(policy_skill_r4, tmp_path / "r4.onnx_adapter", onnx_path=static16)
    report = verify_module(
        paths["base"],
        paths["adapter"],
        module=paths["spec"],
        dynamic_path=static16,
        packed_path=other,
        inputs_path=paths["obs1"],
        batch=2,
    )
    assert not report.equivalent
    assert any(c.name.startswith("actions") and "adapter active" in c.name for c in report.failures())


def test_a_float16_multi_adapter_graph_verifies_each_skill(robot, policy_skill_r4, tmp_path):
    """The float16 multi-adapter graph with a dynamic batch (banks of per-layer ranks)."""
    paths = robot("policy")
    graph = tmp_path / "multi16.onnx"
    skills = [paths["adapter"], policy_skill_r4]
    export_multi_module(paths["base"], graph, skills, module=paths["spec"], dtype="float16")
    report = verify_module(paths["base"], policy_skill_r4, module=paths["spec"], multi_path=graph, batch=4)
    assert report.equivalent, [c.name + ": " + (c.detail or "") for c in report.failures()]
    multi = [c for c in report.checks if c.name.startswith("actions") and "multi" in c.name]
    assert len(multi) == 2 and all(c.atol == F16.atol for c in multi)
