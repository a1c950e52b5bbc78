"""Read a PEFT LoRA adapter directory exactly as PEFT wrote it.

An adapter is adapter_config.json plus adapter_model.safetensors (or a pickle .bin, read
weights-only). This module turns them into plain data: one `LoraModule` per adapted layer
with its factors, rank, alpha and scaling resolved the way PEFT resolves them, plus the
whole tensors that replace base tensors (modules_to_save, trained biases, and the base
weight PEFT saves beside an adapted embedding: `saved_base`, not trained). No model is
built and nothing is merged here.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lora_deploy.adapter.variants import check_config, describe, short_repr
from lora_deploy.arrays import all_finite, from_torch
from lora_deploy.errors import AdapterError, NonFiniteError
from lora_deploy.util import first_line

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
SAVED_PREFIX = "base_model.model."
# No LoRA layer has more ranks than this (a rank is a dimension: int32 everywhere).
MAX_RANK = 2**31 - 1

# How a base weight is laid out relative to the LoRA product B @ A:
#   linear      [out, in]            (nn.Linear)
#   transposed  [in, out]            (GPT-2's Conv1D; PEFT's fan_in_fan_out)
#   embedding   [num_embeddings, dim]
#   conv        [out, in, *kernel]   (nn.Conv1d/2d/3d, groups=1)
KINDS = ("linear", "transposed", "embedding", "conv")


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of a PEFT LoraConfig that decide the merged weights."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    bias: str = "none"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: object = None
    modules_to_save: tuple[str, ...] = ()
    base_model_name_or_path: str | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    def rank_for(self, module: str) -> int:
        key = pattern_key(self.rank_pattern, module)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        key = pattern_key(self.alpha_pattern, module)
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    def scaling_for(self, module: str) -> float:
        r, alpha = self.rank_for(module), self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def pattern_key(patterns: dict, module: str) -> str | None:
    """The first pattern key matching module, with PEFT's rule: the key, regex-matched
    against the end of the module path at a dot boundary."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass
class LoraModule:
    """One adapted layer: factors and the resolved scaling.

    `name` is the module path inside the model PEFT wrapped (e.g.
    "model.layers.0.self_attn.q_proj"). For embeddings `a` is [r, num_embeddings] and
    `b` is [embedding_dim, r], as PEFT stores them.
    """

    name: str
    a: np.ndarray
    b: np.ndarray
    r: int
    alpha: float
    scaling: float
    embedding: bool = False
    bias: np.ndarray | None = None  # lora_B.bias, when trained with lora_bias
    magnitude: np.ndarray | None = None  # DoRA's m, one per output feature

    @property
    def variant(self) -> str:
        return "dora" if self.magnitude is not None else "lora"

    def num_parameters(self) -> int:
        extra = [t.size for t in (self.bias, self.magnitude) if t is not None]
        return self.a.size + self.b.size + sum(extra)


@dataclass
class Adapter:
    path: Path
    config: AdapterConfig
    modules: dict[str, LoraModule]
    # Whole tensors that replace base tensors, by name inside the model
    # (modules_to_save, and biases trained with bias="all" / "lora_only").
    replacements: dict[str, np.ndarray]
    files: list[Path]
    # Which replacements are PEFT's saved copy of an adapted layer's base weight
    # (`<module>.base_layer.weight`, written by save_embedding_layers when an embedding or
    # lm_head is targeted): PEFT loads them as that layer's base, so the merge uses them as
    # W0, but nothing trained them.
    saved_base: frozenset[str] = frozenset()

    @property
    def trained_replacements(self) -> dict[str, np.ndarray]:
        """The replacements training produced: modules_to_save and trained biases."""
        return {name: t for name, t in self.replacements.items() if name not in self.saved_base}

    def num_parameters(self) -> int:
        """Trainable parameters, as PEFT counts them (saved base copies are not)."""
        trained = sum(t.size for t in self.trained_replacements.values())
        return sum(m.num_parameters() for m in self.modules.values()) + trained

    @property
    def variant(self) -> str:
        """A short description such as "lora", "rslora+dora", "lora+lora_bias"."""
        return describe(self)


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Read and validate an adapter directory. Raises AdapterError on anything unusable."""
    root = Path(path)
    if not root.is_dir():
        raise AdapterError(f"{root}: adapter directory not found")
    config = read_config(root)
    tensors, files = read_tensors(root)
    modules, replacements, saved_base = group_tensors(tensors, config, root)
    check_finite(modules, replacements, root)
    return Adapter(root, config, modules, replacements, files, saved_base)


def read_config(root: Path) -> AdapterConfig:
    path = root / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{root}: no {CONFIG_FILE} (is this a PEFT adapter directory?)") from None
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{path}: unreadable ({first_line(exc, 200)})") from None
    except RecursionError:
        raise AdapterError(f"{path}: unreadable (JSON nested too deeply)") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{path}: not a JSON object")
    check_config(raw, path)
    check_numbers(raw, path)
    check_kinds(raw, path)
    try:
        return AdapterConfig(
            r=int(raw.get("r", 8)),
            lora_alpha=float(raw.get("lora_alpha", 8)),
            use_rslora=bool(raw.get("use_rslora", False)),
            fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
            use_dora=bool(raw.get("use_dora", False)),
            lora_bias=bool(raw.get("lora_bias", False)),
            bias=str(raw.get("bias", "none")),
            rank_pattern=dict(raw.get("rank_pattern") or {}),
            alpha_pattern=dict(raw.get("alpha_pattern") or {}),
            target_modules=raw.get("target_modules"),
            modules_to_save=tuple(raw.get("modules_to_save") or ()),
            base_model_name_or_path=raw.get("base_model_name_or_path"),
            raw=raw,
        )
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"{path}: malformed LoRA config ({exc})") from None


def check_numbers(raw: dict, path: Path) -> None:
    """r and alpha (and their per-module patterns) must be positive numbers: r an integer
    up to MAX_RANK, alpha a finite float; pattern keys must be valid regular expressions."""

    def positive(value, integer: bool) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if integer:
            return (isinstance(value, int) or value.is_integer()) and 0 < value <= MAX_RANK
        try:
            number = float(value)  # JSON's 1 followed by 400 zeros is an int no float holds
        except OverflowError:
            return False
        return number > 0 and math.isfinite(number)

    for key, integer in (("r", True), ("lora_alpha", False)):
        if key in raw and not positive(raw[key], integer):
            kind = f"integer up to {MAX_RANK}" if integer else "finite number"
            raise AdapterError(f"{path}: {key} must be a positive {kind}, got {short_repr(raw[key])}")
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = raw.get(key) or {}
        if not isinstance(pattern, dict) or not all(positive(v, integer) for v in pattern.values()):
            raise AdapterError(f"{path}: {key} must map module patterns to positive numbers")
        for regex in pattern:
            try:
                re.compile(regex)
                re.compile(rf"(.*\.)?({regex})$")  # as pattern_key matches it
            except re.error as exc:
                raise AdapterError(
                    f"{path}: {key} key {short_repr(regex)} is not a valid regular expression ({exc})"
                ) from None


FLAGS = ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias")


def check_kinds(raw: dict, path: Path) -> None:
    """Switches must be JSON booleans: the string "false" is true to Python (and to PEFT),
    so it would silently turn rsLoRA's scaling on. target_modules: a regex string or a
    list of names (an int used to end as an internal error)."""
    for key in FLAGS:
        if raw.get(key) is not None and not isinstance(raw[key], bool):
            raise AdapterError(f"{path}: {key} must be true or false, got {short_repr(raw[key])}")
    targets = raw.get("target_modules")
    if targets is not None and not isinstance(targets, str):
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise AdapterError(
                f"{path}: target_modules must be a regex string or a list of module names, got {short_repr(targets)}"
            )


def read_tensors(root: Path) -> tuple[dict[str, np.ndarray], list[Path]]:
    st_path, bin_path = root / SAFETENSORS_FILE, root / PICKLE_FILE
    if st_path.is_file():
        return read_safetensors(st_path), [root / CONFIG_FILE, st_path]
    if bin_path.is_file():
        return read_pickle_weights_only(bin_path), [root / CONFIG_FILE, bin_path]
    raise AdapterError(f"{root}: no {SAFETENSORS_FILE} (or {PICKLE_FILE})")


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, as writable arrays over one buffer."""
    from lora_deploy.errors import CheckpointError
    from lora_deploy.io.checkpoint import as_array, read_header

    try:
        infos, _ = read_header(path)  # validates the header and byte ranges, naming truncation
        data = bytearray(path.stat().st_size)
        with open(path, "rb") as f:
            if f.readinto(data) != len(data):
                raise AdapterError(f"{path}: truncated while reading")
    except CheckpointError as exc:
        raise AdapterError(str(exc)) from None
    except OSError as exc:
        raise AdapterError(f"{path}: cannot read ({exc.strerror})") from None
    view = memoryview(data)
    return {name: as_array(view[i.start : i.end], i) for name, i in infos.items()}


def read_pickle_weights_only(path: Path) -> dict[str, np.ndarray]:
    """Load a .bin adapter without executing pickled code: only tensors are allowed."""
    import pickle

    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise AdapterError(
            f"{path}: refused to load pickle: it holds more than plain tensors or is corrupt ({first_line(exc, 120)})"
        ) from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise AdapterError(f"{path}: not a mapping of tensor names to tensors")
    try:
        return {name: from_torch(tensor) for name, tensor in data.items()}
    except TypeError as exc:  # a dtype numpy cannot hold (e.g. float8_e4m3fnuz)
        raise AdapterError(f"{path}: unsupported tensor dtype ({first_line(exc, 120)})") from None


# Suffixes PEFT writes for each part of a LoRA layer (adapter name already stripped).
PARTS = {
    ".lora_A.weight": "a",
    ".lora_B.weight": "b",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "a_emb",
    ".lora_embedding_B": "b_emb",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
}


def group_tensors(
    tensors: dict[str, np.ndarray], config: AdapterConfig, root: Path
) -> tuple[dict[str, LoraModule], dict[str, np.ndarray], frozenset[str]]:
    parts: dict[str, dict[str, np.ndarray]] = {}
    replacements: dict[str, np.ndarray] = {}
    saved_base: set[str] = set()
    for key, tensor in tensors.items():
        name = key[len(SAVED_PREFIX) :] if key.startswith(SAVED_PREFIX) else key
        module, part = split_part(name)
        if part is not None:
            parts.setdefault(module, {})[part] = tensor
        elif ".lora_" in name or name.startswith("lora_"):
            raise AdapterError(f"{root}: unrecognised LoRA tensor {key!r}")
        else:
            # modules_to_save copies and saved base embeddings carry a wrapper segment.
            base_name = name.replace(".modules_to_save.", ".").replace(".base_layer.", ".")
            replacements[base_name] = tensor
            if name.endswith(".base_layer.weight"):  # a base_layer.bias is trained (bias="all")
                saved_base.add(base_name)
    if not parts:
        raise AdapterError(f"{root}: the adapter contains no LoRA weights")
    modules = {name: build_module(name, p, config, root) for name, p in parts.items()}
    return modules, replacements, frozenset(saved_base)


def split_part(name: str) -> tuple[str, str | None]:
    for suffix, part in PARTS.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], part
    return name, None


def build_module(name: str, parts: dict[str, np.ndarray], config: AdapterConfig, root: Path) -> LoraModule:
    embedding = "a_emb" in parts or "b_emb" in parts
    a = parts.get("a_emb" if embedding else "a")
    b = parts.get("b_emb" if embedding else "b")
    if a is None or b is None:
        raise AdapterError(f"{root}: module {name} has only one of its two LoRA factors")
    if not factor_shapes_fit(a.shape, b.shape):
        raise AdapterError(
            f"{root}: module {name} has LoRA factors shaped {list(a.shape)} and {list(b.shape)}, "
            "which no LoRA layer produces"
        )
    r = config.rank_for(name)
    if a.shape[0] != r or b.shape[1] != r:
        raise AdapterError(
            f"{root}: module {name} has rank {a.shape[0]} (A) / {b.shape[1]} (B) but the config says r={r}"
        )
    magnitude = parts.get("magnitude")
    if magnitude is not None and not config.use_dora:
        raise AdapterError(f"{root}: module {name} has a DoRA magnitude but use_dora is false")
    if magnitude is None and config.use_dora:
        raise AdapterError(f"{root}: use_dora is set but module {name} has no magnitude vector")
    return LoraModule(
        name=name,
        a=a,
        b=b,
        r=r,
        alpha=config.alpha_for(name),
        scaling=config.scaling_for(name),
        embedding=embedding,
        bias=parts.get("bias"),
        magnitude=magnitude,
    )


def factor_shapes_fit(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Linear and embedding factors are matrices; a convolution's B is a 1x1 kernel."""
    if len(a) != len(b) or len(a) < 2:
        return False
    return all(k == 1 for k in b[2:])


def check_finite(modules: dict[str, LoraModule], replacements: dict[str, np.ndarray], root: Path) -> None:
    for m in modules.values():
        for label, t in (("lora_A", m.a), ("lora_B", m.b), ("lora_B.bias", m.bias), ("magnitude", m.magnitude)):
            if t is not None and not all_finite(t):
                raise NonFiniteError(f"{root}: NaN or Inf in {m.name}.{label}")
    for name, t in replacements.items():
        if not all_finite(t):
            raise NonFiniteError(f"{root}: NaN or Inf in {name}")


def weight_shape(module: LoraModule, kind: str) -> tuple[int, ...]:
    """The shape of the base weight this module's factors fit."""
    out_f, in_f = module.b.shape[0], module.a.shape[1]
    if kind == "linear":
        return (out_f, in_f)
    if kind in ("transposed", "embedding"):
        return (in_f, out_f)
    return (out_f, in_f, *module.a.shape[2:])
