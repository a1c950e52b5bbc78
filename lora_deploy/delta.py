"""The merge math: pure functions on tensors, one place per layer kind and variant.

Every function computes in float32 and returns float32; the caller rounds once to the
output dtype. (PEFT instead rounds the delta to the weight's dtype and adds there, which
in float16/bfloat16 can land one ulp away from the correctly rounded sum.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .adapter import LoraModule

# How a base weight is laid out relative to the LoRA product B @ A:
#   linear      [out, in]            (nn.Linear)
#   transposed  [in, out]            (GPT-2's Conv1D; PEFT's fan_in_fan_out)
#   embedding   [num_embeddings, dim]
#   conv        [out, in, *kernel]   (nn.Conv1d/2d/3d, groups=1)
KINDS = ("linear", "transposed", "embedding", "conv")


def delta_weight(module: LoraModule, kind: str) -> torch.Tensor:
    """s * B A in the base weight's layout, float32."""
    a, b, s = module.a.float(), module.b.float(), module.scaling
    if kind == "linear":
        return (b @ a) * s
    if kind == "transposed":
        return (b @ a).T * s
    if kind == "embedding":
        return (b @ a).T * s
    if kind == "conv":
        return conv_delta(a, b) * s
    raise ValueError(f"unknown layer kind {kind!r}")


def conv_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B A for convolutions: A is [r, in, *k], B is [out, r, 1...]; result [out, in, *k]."""
    spatial = a.shape[2:]
    if all(k == 1 for k in spatial):
        flat = b.flatten(1) @ a.flatten(1)
        return flat.reshape(b.shape[0], a.shape[1], *spatial)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(spatial)]
    # Convolving A (as [in, r, *k]) with B (as a 1x1 kernel [out, r]) composes the two.
    return conv(a.transpose(0, 1), b).transpose(0, 1)


def merged_weight(module: LoraModule, kind: str, w0: torch.Tensor) -> torch.Tensor:
    """W0 + s B A (LoRA) or m / ||W0 + s B A|| * (W0 + s B A) (DoRA), float32."""
    w = w0.float() + delta_weight(module, kind)
    if module.magnitude is None:
        return w
    return dora_rescale(w, module.magnitude.float().flatten(), kind)


def dora_scale(w: torch.Tensor, magnitude: torch.Tensor, kind: str) -> torch.Tensor:
    """m / ||W|| per output feature: one value per row of a Linear weight, per column of a
    transposed one, per embedding dimension, per output channel of a convolution.

    The norm is taken over the input features, as PEFT computes DoRA.
    """
    if kind == "linear":
        return magnitude / w.norm(dim=1)
    if kind in ("transposed", "embedding"):
        return magnitude / w.norm(dim=0)
    if kind == "conv":
        return magnitude / w.flatten(1).norm(dim=1)
    raise ValueError(f"unknown layer kind {kind!r}")


def dora_rescale(w: torch.Tensor, magnitude: torch.Tensor, kind: str) -> torch.Tensor:
    """Scale each output feature of W to the learned magnitude."""
    scale = dora_scale(w, magnitude, kind)
    if kind == "linear":
        return w * scale.unsqueeze(1)
    if kind in ("transposed", "embedding"):
        return w * scale.unsqueeze(0)
    return w * scale.reshape(-1, *([1] * (w.dim() - 1)))


def merged_bias(module: LoraModule, b0: torch.Tensor) -> torch.Tensor:
    """Base bias plus the scaled lora_B bias (PEFT's lora_bias), float32."""
    return b0.float() + module.bias.float() * module.scaling


def expected_shapes(module: LoraModule, kind: str) -> tuple[tuple[int, ...], ...]:
    """Base weight shapes this module's factors fit, for a clear mismatch message."""
    out_f, in_f = module.b.shape[0], module.a.shape[1]
    if kind == "linear":
        return ((out_f, in_f),)
    if kind in ("transposed", "embedding"):
        return ((in_f, out_f),)
    return ((out_f, in_f, *module.a.shape[2:]),)


def delta_norm(module: LoraModule, kind: str) -> float:
    """Frobenius norm of s B A, for the manifest and `inspect`."""
    return float(delta_weight(module, kind).norm())
