"""Run base + adapter unmerged on any torch module: the reference the merge is checked against.

`attach(model, adapter)` adds h = W0 x + s B A x to each adapted layer through forward
hooks, computing what PEFT's LoRA layers compute (DoRA's magnitude rescaling included),
without PEFT and without touching the base weights. It works on Hugging Face models and
on a robot controller alike: anything whose submodule names match the adapter's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lora_deploy.adapter.plan import choose_prefix
from lora_deploy.adapter.read import Adapter, LoraModule, load_adapter
from lora_deploy.arrays import from_torch, to_torch
from lora_deploy.errors import AdapterError
from lora_deploy.merge.delta import delta_weight, dora_scale, f32


@dataclass
class AttachedAdapter:
    """Handle returned by `attach`; `detach()` restores the model exactly."""

    model: nn.Module
    hooks: list = field(default_factory=list)
    restore: list = field(default_factory=list)  # (module, attribute, original Parameter)

    def detach(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for owner, attr, original in reversed(self.restore):
            setattr(owner, attr, original)
        self.hooks.clear()
        self.restore.clear()

    def __enter__(self) -> "AttachedAdapter":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def attach(model: nn.Module, adapter: Adapter | str | os.PathLike) -> AttachedAdapter:
    """Hook every adapted layer of `model`; returns a handle that can detach again."""
    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter)
    modules = dict(model.named_modules())
    rename = choose_prefix(list(adapter.modules), modules)
    handle = AttachedAdapter(model)
    for name, lora in adapter.modules.items():
        layer = modules[rename(name)]
        handle.hooks.append(layer.register_forward_hook(lora_hook(layer, lora)))
    replace_parameters(model, adapter, rename, handle)
    return handle


def layer_kind(layer: nn.Module) -> str:
    if isinstance(layer, nn.Embedding):
        return "embedding"
    if isinstance(layer, nn.Linear):
        return "linear"
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if type(layer).__name__ == "Conv1D" and hasattr(layer, "nf"):  # transformers' GPT-2 layer
        return "transposed"
    raise AdapterError(f"LoRA on {type(layer).__name__} layers is not supported")


def lora_hook(layer: nn.Module, lora: LoraModule):
    kind = layer_kind(layer)
    if kind == "conv" and layer.groups != 1:
        raise AdapterError(f"{lora.name}: LoRA on grouped convolutions is not supported")

    placed: dict[torch.device, tuple] = {}  # factors moved to a device once, not every forward
    combine = COMBINE[lora.variant](kind, lora)

    def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if x.device not in placed:
            placed[x.device] = place_factors(lora, x.device)
        update = lora_update(mod, kind, lora, x, *placed[x.device]).to(output.dtype)
        return combine(mod, output, update)

    return hook


def lora_combine(kind: str, lora: LoraModule):
    """LoRA: the layer's output plus the update."""
    return lambda mod, output, update: output + update


def dora_combine(kind: str, lora: LoraModule):
    """DoRA: the sum rescaled per output feature (the scale computed once per device)."""
    scales: dict[torch.device, torch.Tensor] = {}

    def combine(mod: nn.Module, output: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        if output.device not in scales:
            scales[output.device] = dora_feature_scale(mod, kind, lora).to(output.device)
        return dora_output(mod, kind, scales[output.device], output, update)

    return combine


def place_factors(lora: LoraModule, device: torch.device) -> tuple:
    """A, B and the lora_B bias on `device`, in the adapter's precision (float32 for half)."""
    a, b = to_torch(lora.a), to_torch(lora.b)
    dtype = torch.promote_types(a.dtype, torch.float32)
    bias = None if lora.bias is None else to_torch(lora.bias).to(device, dtype)
    return a.to(device, dtype), b.to(device, dtype), bias


def lora_update(layer: nn.Module, kind: str, lora: LoraModule, x: torch.Tensor, a, b, bias) -> torch.Tensor:
    """s * B A x (plus s * lora_B bias), computed in the factors' precision."""
    dtype = a.dtype
    if kind == "embedding":
        looked_up = F.embedding(
            x,
            a.T,
            padding_idx=layer.padding_idx,
            max_norm=layer.max_norm,
            norm_type=layer.norm_type,
            scale_grad_by_freq=layer.scale_grad_by_freq,
            sparse=layer.sparse,
        )
        return looked_up @ b.T * lora.scaling
    if kind == "conv":
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[a.dim()]
        hidden = conv(x.to(dtype), a, None, layer.stride, layer.padding, layer.dilation)
        return conv(hidden, b, bias) * lora.scaling
    return F.linear(F.linear(x.to(dtype), a), b, bias) * lora.scaling


def dora_feature_scale(layer: nn.Module, kind: str, lora: LoraModule) -> torch.Tensor:
    """m / ||W0 + s B A|| per output feature, float32.

    Like PEFT, the norm is of the unmerged weight and treated as a constant: it depends
    only on the weights, so it is computed once, not on every forward.
    """
    w = f32(from_torch(layer.weight.detach().float())) + delta_weight(lora, kind)
    return to_torch(dora_scale(w, f32(lora.magnitude).reshape(-1), kind))


def dora_output(layer: nn.Module, kind: str, scale: torch.Tensor, output: torch.Tensor, update: torch.Tensor):
    """DoRA: scale (W0 x + s B A x) per output feature, keeping the base bias unscaled."""
    bias = getattr(layer, "bias", None)
    bias_shape = (1, -1) + (1,) * (output.dim() - 2) if kind == "conv" else (-1,)
    scale = scale.reshape(bias_shape).to(output.dtype)
    b = 0 if bias is None else bias.reshape(bias_shape)
    return scale * (output - b + update) + b


# How each variant with per-layer math joins the update to the layer's output (see
# lora_deploy.adapter.variants); the merged counterpart is merge.delta.MERGED_WEIGHT.
COMBINE = {"lora": lora_combine, "dora": dora_combine}


def replace_parameters(model: nn.Module, adapter: Adapter, rename, handle: AttachedAdapter) -> None:
    """modules_to_save and trained biases replace the base tensors outright.

    The replacement gets its own Parameter, so a weight tied to it elsewhere (an output
    projection tied to the embedding) keeps the base values, as it does in PEFT.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, tensor in adapter.replacements.items():
        key = next((k for k in (rename(name), name) if k in params), None)
        if key is None:
            raise AdapterError(f"adapter tensor {name!r} has no counterpart in the model")
        if tuple(params[key].shape) != tuple(tensor.shape):
            raise AdapterError(f"adapter tensor {name!r} does not fit {key}")
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        original = getattr(owner, attr)
        handle.restore.append((owner, attr, original))
        replacement = nn.Parameter(
            to_torch(tensor).to(original.dtype).to(original.device).clone(), requires_grad=original.requires_grad
        )
        setattr(owner, attr, replacement)
