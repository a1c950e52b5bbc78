"""The LoRA variants lora-deploy can deploy, in one registry, and the allowlist of
adapter_config.json keys.

After PEFT's `lora_variants` map. Each `Variant` says which config keys it reads, how to
tell an adapter uses it, and whether it is an additive low-rank term on a layer's input
(what an ONNX adapter graph can carry). The variants with per-layer math (`layer_math`)
are the values of `LoraModule.variant`; their math lives one layer up, keyed by the same
name: `lora_deploy.merge.delta.MERGED_WEIGHT` (numpy) and
`lora_deploy.modeling.unmerged.COMBINE` (torch). The others change only how a layer's
factors are read (scaling, lora_B bias, per-module rank) or add whole tensors.

Every key PEFT writes is neutral, read by a variant, or refused with a reason. A key not
listed is refused whenever it is set: a field a newer PEFT adds for a new variant must
not be merged as plain LoRA.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_deploy.errors import AdapterError

if TYPE_CHECKING:  # read.py imports this module
    from lora_deploy.adapter.read import Adapter


@dataclass(frozen=True)
class Variant:
    name: str
    keys: tuple[str, ...]  # adapter_config.json keys this variant reads
    uses: Callable[[Adapter], bool]
    # Why an ONNX adapter graph cannot carry it, for one adapter; None when it can.
    refusal: Callable[[Adapter], str] | None = None
    layer_math: bool = False  # a value of LoraModule.variant, with its own merge math

    @property
    def additive(self) -> bool:
        return self.refusal is None


def dora_refusal(adapter: Adapter) -> str:
    return f"{adapter.path}: DoRA cannot be expressed as an additive low-rank input (merge it instead)"


def embedding_refusal(adapter: Adapter) -> str:
    embedded = next(m.name for m in adapter.modules.values() if m.embedding)
    return (
        f"{adapter.path}: embedding LoRA on {embedded} cannot be expressed as an additive low-rank input "
        "(merge it instead)"
    )


def replacement_refusal(adapter: Adapter) -> str:
    first = min(adapter.trained_replacements)
    return (
        f"{adapter.path}: the adapter replaces base tensors ({first}, modules_to_save or trained bias); "
        "that cannot be expressed as an additive low-rank input (merge it instead)"
    )


def saved_base_refusal(adapter: Adapter) -> str:
    first = min(adapter.saved_base)
    return (
        f"{adapter.path}: the adapter carries PEFT's saved copy of base tensor {first} (save_embedding_layers), "
        "which PEFT loads in place of the base's; that cannot be expressed as an additive low-rank input "
        "(merge it instead, or save the adapter with save_embedding_layers=False)"
    )


# In the order `describe` names them (what `lora-deploy inspect` shows). Exactly one of
# lora / rslora applies: rsLoRA only scales by alpha / sqrt(r) (AdapterConfig.scaling_for).
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            "lora",
            ("peft_type", "r", "lora_alpha", "fan_in_fan_out", "init_lora_weights"),
            lambda a: not a.config.use_rslora,
            layer_math=True,
        ),
        Variant("rslora", ("use_rslora",), lambda a: a.config.use_rslora),
        Variant("dora", ("use_dora",), lambda a: a.config.use_dora, dora_refusal, layer_math=True),
        Variant("lora_bias", ("lora_bias",), lambda a: a.config.lora_bias),
        Variant(
            "patterns",
            ("rank_pattern", "alpha_pattern"),
            lambda a: bool(a.config.rank_pattern or a.config.alpha_pattern),
        ),
        Variant("embedding", (), lambda a: any(m.embedding for m in a.modules.values()), embedding_refusal),
        # bias="all" / "lora_only" saves trained base biases, which replace the base ones.
        Variant(
            "modules_to_save",
            ("modules_to_save", "bias"),
            lambda a: bool(a.trained_replacements),
            replacement_refusal,
        ),
    )
}

# Keys that never change the weights: bookkeeping, training-only settings, and which
# layers were adapted (the saved tensors already say that).
NEUTRAL_KEYS = frozenset(
    {
        "task_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "lora_dropout",
        "runtime_config",
        "megatron_config",
        "megatron_core",
        "ensure_weight_tying",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        # Settings of an initialisation that init_lora_weights names: EVA leaves the base
        # alone; CorDA and QA-LoRA are refused through init_lora_weights and use_qalora.
        "eva_config",
        "corda_config",
        "qalora_group_size",
    }
)

# Keys refused whenever set, with the reason (the line after "<adapter dir>: ").
REFUSED_KEYS = {
    "loftq_config": "LoftQ adapters are only valid on their LoftQ-initialised base",
    "layer_replication": "unsupported adapter: layer_replication duplicates base layers",
    "target_parameters": "unsupported adapter: target_parameters adapts raw nn.Parameters (MoE experts)",
    "alora_invocation_tokens": (
        "unsupported adapter: activated LoRA applies only after invocation tokens and cannot be merged"
    ),
    "trainable_token_indices": "unsupported adapter: trainable_token_indices (trainable tokens) is not supported yet",
    "use_qalora": "unsupported adapter: QA-LoRA adapters target quantized bases",
    "arrow_config": "unsupported adapter: Arrow routing mixes several adapters per token",
    "monteclora_config": "unsupported adapter: MonteCLoRA samples its weights",
    "use_bdlora": "unsupported adapter: block-diagonal LoRA is not supported yet",
    "lora_ga_config": "unsupported adapter: LoRA-GA initialisation rewrites the base weights",
    "velora_config": "unsupported adapter: VeLoRA is not supported yet",
    "kasa_config": "unsupported adapter: KaSA is not supported yet",
}

# init_lora_weights values that only initialise A and B (MiCA also freezes B): the base
# stays as it was, so W0 + s B A is exact.
PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica")
# Initialisations that rewrite the base weights during training: the adapter is only
# correct on that rewritten base, which the user's base checkpoint is not.
BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def handled_keys() -> dict[str, str]:
    """Each config key a registered variant reads, to that variant's name."""
    return {key: v.name for v in VARIANTS.values() for key in v.keys}


def check_config(raw: dict, path: Path) -> None:
    """Refuse a config lora-deploy cannot merge exactly, in one line naming the reason."""
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{path}: adapter type {peft_type} is not LoRA; lora-deploy handles LoRA adapters only")
    check_init(raw.get("init_lora_weights", True), path)
    for key, why in REFUSED_KEYS.items():
        if raw.get(key):
            raise AdapterError(f"{path}: {why}")
    known = NEUTRAL_KEYS | handled_keys().keys()
    unknown = next((key for key, value in raw.items() if value and key not in known), None)
    if unknown is not None:
        raise AdapterError(
            f"{path}: unsupported adapter: unknown config key {unknown}={short_repr(raw[unknown])} "
            "(from a newer PEFT?); refusing rather than merging it as plain LoRA"
        )


def check_init(init: object, path: Path) -> None:
    if init is None or isinstance(init, bool):  # False / None: A and B as saved; True: default init
        return
    name = str(init).lower()
    if name.startswith(BASE_MUTATING_INITS):
        raise AdapterError(
            f"{path}: init_lora_weights={init!r} rewrote the base weights during training; "
            "this adapter is only valid on that rewritten base (convert it to a plain LoRA first)"
        )
    if name not in PLAIN_INITS:
        raise AdapterError(
            f"{path}: unsupported adapter: unknown init_lora_weights={short_repr(init)}; "
            "it may have rewritten the base weights during training"
        )


def short_repr(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def used_by(adapter: Adapter) -> list[Variant]:
    """The registered variants this adapter uses, in registry order."""
    return [v for v in VARIANTS.values() if v.uses(adapter)]


def describe(adapter: Adapter) -> str:
    """A short description such as "lora", "rslora+dora", "lora+lora_bias"."""
    return "+".join(v.name for v in used_by(adapter))


def refuse_non_additive(adapter: Adapter) -> None:
    """Refuse an adapter that is not an additive low-rank term on each layer's input."""
    for variant in used_by(adapter):
        if variant.refusal is not None:
            raise AdapterError(variant.refusal(adapter))
    # Not a variant (nothing trained it, so `describe` leaves it out), but the graph would
    # still run the base's tensor where PEFT runs the saved copy.
    if adapter.saved_base:
        raise AdapterError(saved_base_refusal(adapter))
