"""Match an adapter's modules to the base checkpoint's tensors.

PEFT names modules inside the model it wrapped (say LlamaForCausalLM: "model.layers.0...")
while the base checkpoint may be a bare backbone ("layers.0...") or the other way round.
Like transformers, we accept a base-model prefix on either side, pick the one mapping that
places every module, and fail loudly when none does.

Which layers store their weight transposed (GPT-2's Conv1D) and which weights are tied is
read from the architecture itself, built on the meta device (no memory, no weights), when
transformers knows it; otherwise from shapes and the adapter config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from lora_deploy.adapter.read import Adapter, LoraModule, weight_shape
from lora_deploy.errors import AdapterError
from lora_deploy.io.checkpoint import FLOAT_DTYPES, Checkpoint

log = logging.getLogger(__name__)


@dataclass
class Target:
    """Where one LoRA module lands in the base checkpoint."""

    module: LoraModule
    weight_key: str
    kind: str  # see adapter.read.KINDS
    bias_key: str | None = None  # set when the module carries a lora_B bias
    delta_norm: float | None = None  # ||W - W0||, filled in by the merge for the manifest


@dataclass
class Layout:
    """What the architecture says beyond tensor shapes."""

    transposed: set[str] = field(default_factory=set)  # module names of Conv1D-style layers
    tied: dict[str, str] = field(default_factory=dict)  # tied weight key -> source key
    known: bool = False  # False when the architecture could not be built


@dataclass
class MergePlan:
    targets: dict[str, Target]  # by weight key
    replacements: dict[str, np.ndarray]  # by base key
    untie: dict[str, str]  # weight key to write explicitly -> base key it was tied to
    rename: Callable[[str], str]
    layout: Layout


def read_layout(config: dict) -> Layout:
    """Build the architecture on the meta device to learn Conv1D layers and tied weights."""
    archs = config.get("architectures") or []
    if not archs or "model_type" not in config:
        return Layout()
    try:
        import torch
        import transformers
        from transformers.pytorch_utils import Conv1D

        cls = getattr(transformers, archs[0])
        hf_config = transformers.AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = cls(hf_config)
    except Exception as exc:  # any failure just means "unknown architecture": fall back to shapes
        log.debug("cannot build %s on the meta device: %s", archs, exc)
        return Layout()
    transposed = {name for name, mod in model.named_modules() if isinstance(mod, Conv1D)}
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    if not isinstance(tied, dict) or not getattr(hf_config, "tie_word_embeddings", True):
        tied = {}  # transformers 4.x listed tied keys without their source: treat as unknown
    return Layout(transposed=transposed, tied={str(k): str(v) for k, v in tied.items()}, known=True)


def candidate_renames(module_names: list[str], base_keys: Iterable[str]) -> list[tuple[str, Callable[[str], str]]]:
    """Ways to turn an adapter module path into a base module path, most literal first.

    `base_keys` are the base side's names (tensor keys or module paths); their first
    components are the prefixes an adapter path may lack.
    """
    renames: list[tuple[str, Callable[[str], str]]] = [("as is", lambda n: n)]
    firsts = {n.split(".", 1)[0] for n in module_names}
    if len(firsts) == 1:
        head = firsts.pop()
        renames.append((f"strip '{head}.'", lambda n, h=head: n[len(h) + 1 :] if n.startswith(h + ".") else n))
    for prefix in sorted({k.split(".", 1)[0] for k in base_keys if "." in k}):
        renames.append((f"add '{prefix}.'", lambda n, p=prefix: f"{p}.{n}"))
    return renames


def find_rename(
    names: list[str], base_keys: Iterable[str], exists: Callable[[str], bool]
) -> Callable[[str], str] | None:
    """The first candidate rename under which every name exists on the base side, or None.

    Shared by the merge (names checked against checkpoint tensors) and by the unmerged
    hooks and ONNX graphs (names checked against module paths).
    """
    for _label, rename in candidate_renames(names, base_keys):
        if all(exists(rename(n)) for n in names):
            return rename
    return None


def choose_prefix(names: list[str], modules: Mapping[str, object]) -> Callable[[str], str]:
    """Adapter module paths may carry one extra or one missing leading component."""
    rename = find_rename(names, modules, lambda name: name in modules)
    if rename is not None:
        return rename
    missing = next(n for n in names if n not in modules)
    raise AdapterError(f"adapter module {missing!r} not found in the model: is this adapter for another model?")


def closest_rename(
    names: list[str], base_keys: Iterable[str], exists: Callable[[str], bool]
) -> tuple[Callable[[str], str], int]:
    """The candidate placing the most names (the first on ties) and how many it places;
    for error messages once find_rename found none."""
    scored = [(rename, sum(exists(rename(n)) for n in names)) for _, rename in candidate_renames(names, base_keys)]
    return max(scored, key=lambda pair: pair[1])


def choose_rename(adapter: Adapter, base: Checkpoint) -> Callable[[str], str]:
    modules = list(adapter.modules)
    base_keys = base.names()

    def has_weight(name: str) -> bool:
        return f"{name}.weight" in base

    rename = find_rename(modules, base_keys, has_weight)
    if rename is not None:
        return rename
    best, best_hits = closest_rename(modules, base_keys, has_weight)
    missing = next(m for m in modules if not has_weight(best(m)))
    raise AdapterError(
        f"adapter module {missing!r} has no weight in the base checkpoint "
        f"({best_hits}/{len(modules)} modules found): is this adapter for another base model?"
    )


def layer_kind(module: LoraModule, key: str, shape: tuple[int, ...], layout: Layout, fan_in_fan_out: bool) -> str:
    if module.embedding:
        return "embedding"
    if len(shape) > 2:
        return "conv"
    out_f, in_f = module.b.shape[0], module.a.shape[1]
    if shape == (out_f, in_f) and shape != (in_f, out_f):
        return "linear"
    if shape == (in_f, out_f) and shape != (out_f, in_f):
        return "transposed"
    # Square (or mismatched) weights: the architecture decides, else the adapter config.
    module_name = key.rsplit(".", 1)[0]
    if layout.known:
        return "transposed" if module_name in layout.transposed else "linear"
    return "transposed" if fan_in_fan_out else "linear"


def plan_merge(adapter: Adapter, base: Checkpoint) -> MergePlan:
    """Resolve every module and replacement to base keys; raise on anything that doesn't fit."""
    config = base.config
    layout = read_layout(config) if needs_layout(adapter, base, config) else Layout()
    rename = choose_rename(adapter, base)
    targets = {}
    for name, module in adapter.modules.items():
        target = resolve_target(module, rename(name), base, layout, adapter.config.fan_in_fan_out)
        targets[target.weight_key] = target
    replacements = resolve_replacements(adapter, base, rename)
    untie = tied_to_write(targets, replacements, layout, base)
    return MergePlan(targets, replacements, untie, rename, layout)


def needs_layout(adapter: Adapter, base: Checkpoint, config: dict) -> bool:
    """Building the architecture costs seconds of imports: do it only when shapes can't decide.

    PEFT saves fan_in_fan_out=True whenever it met a Conv1D layer, so with it false every
    square weight is an ordinary Linear. Tied weights matter only when an embedding changes.
    """
    ambiguous = adapter.config.fan_in_fan_out and any(
        m.a.shape[1] == m.b.shape[0] and not m.embedding for m in adapter.modules.values()
    )
    touches_embeddings = any(m.embedding for m in adapter.modules.values()) or bool(adapter.replacements)
    return ambiguous or (touches_embeddings and config.get("tie_word_embeddings", True) is not False)


def resolve_target(
    module: LoraModule, base_name: str, base: Checkpoint, layout: Layout, fan_in_fan_out: bool
) -> Target:
    key = f"{base_name}.weight"
    shape = base.tensors[key].shape
    if base.tensors[key].dtype not in FLOAT_DTYPES:
        raise AdapterError(
            f"base weight {key} is {base.tensors[key].dtype}: merging into quantized weights is not supported"
        )
    kind = layer_kind(module, key, shape, layout, fan_in_fan_out)
    if module.a.ndim != (len(shape) if kind == "conv" else 2):  # a 1x1 "conv" pair on a Linear weight
        raise AdapterError(
            f"adapter module {module.name!r} does not fit the base: weight {key} is {list(shape)} ({kind}), "
            f"but its LoRA factors A {list(module.a.shape)} and B {list(module.b.shape)} are {module.a.ndim}-D"
        )
    if shape != weight_shape(module, kind):
        raise AdapterError(
            f"adapter module {module.name!r} does not fit the base: weight {key} is {list(shape)}, "
            f"LoRA factors A {list(module.a.shape)} and B {list(module.b.shape)}"
        )
    if module.magnitude is not None and module.magnitude.size != (
        shape[1] if kind in ("transposed", "embedding") else shape[0]
    ):
        raise AdapterError(f"adapter module {module.name!r}: DoRA magnitude has the wrong length for {key}")
    bias_key = None
    if module.bias is not None:
        bias_key = f"{base_name}.bias"
        if bias_key not in base:
            raise AdapterError(
                f"adapter module {module.name!r} has a lora_B bias but base layer {base_name} has no bias"
            )
        if tuple(base.tensors[bias_key].shape) != tuple(module.bias.shape):
            raise AdapterError(f"adapter module {module.name!r}: lora_B bias shape does not match {bias_key}")
    return Target(module, key, kind, bias_key)


def resolve_replacements(adapter: Adapter, base: Checkpoint, rename: Callable[[str], str]) -> dict[str, np.ndarray]:
    out = {}
    for name, tensor in adapter.replacements.items():
        key = next((k for k in (rename(name), name) if k in base), None)
        if key is None:
            raise AdapterError(
                f"adapter tensor {name!r} (modules_to_save or trained bias) has no counterpart in the base "
                "checkpoint: save the base with the same task head the adapter was trained on"
            )
        if tuple(base.tensors[key].shape) != tuple(tensor.shape):
            raise AdapterError(
                f"adapter tensor {name!r} is {list(tensor.shape)} but base {key} is {list(base.tensors[key].shape)}"
            )
        out[key] = tensor
    return out


def tied_to_write(targets: dict[str, Target], replacements: dict, layout: Layout, base: Checkpoint) -> dict[str, str]:
    """Tied weights that must be written out untied so the merged model stays exact.

    Unmerged, an embedding LoRA changes only the lookup; the tied output projection keeps
    W0. Merging into the shared tensor would silently change the output layer too (as
    PEFT's merge_and_unload does), so we store the output weight as W0 and untie.
    """
    untie = {}
    changed = set(targets) | set(replacements)
    for tied_key, source_key in layout.tied.items():
        if source_key in changed and tied_key not in base and source_key in base:
            untie[tied_key] = source_key
    return untie
