"""Quantized checkpoints: which format a base is in, block-scaled FP8 in and out, and
whether an adapter was trained against a quantized base.

Block-scaled FP8 (DeepSeek-V3 and the releases that copied its layout): each quantized
Linear weight is float8_e4m3fn, beside a float32 `<name>_scale_inv` holding one scale per
128 x 128 block (config.json: quantization_config.weight_block_size); the weight is
fp8 * scale_inv, the scale broadcast over its block. Requantizing writes the same names
and layout with fresh scales, amax / 448 per block (448: e4m3's largest finite value).

Other quantized formats (GPTQ/AWQ packed int4, compressed-tensors, bitsandbytes'
serialized 4/8-bit) are refused with one line naming the format: their packed weights
cannot be merged into without their own kernels' exact arithmetic.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from lora_deploy.dtypes import BY_NAME
from lora_deploy.errors import CheckpointError
from lora_deploy.io.checkpoint import Checkpoint

FP8_SCALE_SUFFIX = "_scale_inv"
FP8_CODE = "F8_E4M3"
FP8_MAX = np.float32(448.0)
FLOAT_CODES = {"F64", "F32", "F16", "BF16"}  # safetensors codes of unquantized weights
DEFAULT_BLOCK = (128, 128)
# A tensor-name ending that marks a format we do not merge into, and its name.
PACKED_SUFFIXES = {
    ".qweight": "GPTQ/AWQ (packed int4: qweight/qzeros/scales)",
    ".qzeros": "GPTQ/AWQ (packed int4: qweight/qzeros/scales)",
    ".g_idx": "GPTQ (packed int4: qweight/qzeros/scales/g_idx)",
    ".weight_packed": "compressed-tensors (packed weights)",
    ".weight_zero_point": "compressed-tensors (quantized weights with zero points)",
    ".weight.absmax": "bitsandbytes 4-bit (serialized Params4bit)",
    ".weight.quant_map": "bitsandbytes 4-bit (serialized Params4bit)",
    ".SCB": "bitsandbytes int8 (serialized Int8Params)",
}
QUANT_METHODS = {  # config.json quantization_config.quant_method -> its name in the refusal
    "gptq": "GPTQ",
    "awq": "AWQ",
    "compressed-tensors": "compressed-tensors",
    "bitsandbytes": "bitsandbytes",
    "fbgemm_fp8": "fbgemm FP8 (per-channel scales)",
    "hqq": "HQQ",
    "aqlm": "AQLM",
    "eetq": "EETQ",
    "torchao": "torchao",
    "quanto": "quanto",
    "bitnet": "BitNet",
    "higgs": "HIGGS",
    "vptq": "VPTQ",
}


def quantized_format(tensors: dict, config: dict) -> str | None:
    """'fp8-block' for a block-scaled FP8 checkpoint, None for a plain float one; any other
    quantized format is refused (CheckpointError naming it)."""
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    for name in tensors:
        for suffix, what in PACKED_SUFFIXES.items():
            if name.endswith(suffix):
                raise CheckpointError(
                    f"base checkpoint is {what} ({name}): lora-deploy merges float and block-scaled FP8 "
                    "checkpoints only"
                )
    packed = any(info.dtype not in FLOAT_CODES for info in tensors.values())
    if method in QUANT_METHODS and packed:  # a config alone may be left over on float weights
        raise CheckpointError(
            f"base checkpoint is {QUANT_METHODS[method]}-quantized (config.json quantization_config): "
            "lora-deploy merges float and block-scaled FP8 checkpoints only"
        )
    scaled = [n for n in tensors if n.endswith(FP8_SCALE_SUFFIX)]
    if scaled:
        return "fp8-block"
    fp8 = [n for n, info in tensors.items() if info.dtype == FP8_CODE]
    if fp8:
        raise CheckpointError(
            f"base checkpoint has float8 tensors without block scales ({fp8[0]}, no {fp8[0]}{FP8_SCALE_SUFFIX}): "
            "only block-scaled FP8 (weight_scale_inv) is supported"
        )
    return None


def block_size(config: dict, weight_shape: tuple[int, ...], scale_shape: tuple[int, ...], name: str) -> tuple[int, int]:
    """The (rows, columns) of one scale's block: from the config, else 128 x 128; checked
    against the two shapes."""
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    block = tuple(qc.get("weight_block_size") or DEFAULT_BLOCK) if isinstance(qc, dict) else DEFAULT_BLOCK
    if len(block) != 2 or len(weight_shape) != 2 or len(scale_shape) != 2:
        raise CheckpointError(f"{name}: block-scaled FP8 needs a 2-D weight and scale and a 2-D block size")
    expected = tuple(-(-d // b) for d, b in zip(weight_shape, block))
    if tuple(scale_shape) != expected:
        raise CheckpointError(
            f"{name}{FP8_SCALE_SUFFIX} is {list(scale_shape)}, but a {list(weight_shape)} weight in "
            f"{block[0]}x{block[1]} blocks needs {list(expected)}"
        )
    return int(block[0]), int(block[1])


def fp8_dequantize(q: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """fp8 * scale_inv, each scale over its block, float32."""
    out = q.astype(np.float32)
    rows, cols = out.shape
    for i in range(scale_inv.shape[0]):
        r = slice(i * block[0], min(rows, (i + 1) * block[0]))
        out[r] *= np.repeat(scale_inv[i].astype(np.float32), block[1])[:cols]
    return out


def fp8_quantize(w: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(float8_e4m3fn weight, float32 scale_inv): scale = amax / 448 per block, the weight
    divided by its block's scale and rounded to nearest e4m3 (an all-zero block keeps
    scale 1)."""
    rows, cols = w.shape
    nr, nc = -(-rows // block[0]), -(-cols // block[1])
    padded = np.zeros((nr * block[0], nc * block[1]), np.float32)
    padded[:rows, :cols] = w
    amax = np.abs(padded.reshape(nr, block[0], nc, block[1])).max(axis=(1, 3))
    scale = np.where(amax > 0, amax / FP8_MAX, np.float32(1)).astype(np.float32)
    full = np.repeat(np.repeat(scale, block[0], axis=0), block[1], axis=1)[:rows, :cols]
    q = np.clip(w / full, -FP8_MAX, FP8_MAX).astype(BY_NAME["float8_e4m3fn"].numpy)
    return q, scale


class FloatView:
    """A checkpoint as the merge plan sees it: FP8 weights shown as bfloat16, so a target
    in one is planned like any float weight (merge/quant.py dequantizes it)."""

    def __init__(self, base: Checkpoint):
        self.dir = base.dir
        self.files = base.files
        self.config = base.config
        self.tensors = {
            name: replace(info, dtype="BF16") if info.dtype == FP8_CODE else info for name, info in base.tensors.items()
        }

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)


def planning_view(base: Checkpoint) -> Checkpoint | FloatView:
    """The base as plan_merge should see it: a block-scaled FP8 one as its FloatView; other
    quantized formats refused (quantized_format)."""
    return FloatView(base) if quantized_format(base.tensors, base.config) == "fp8-block" else base


QUANTIZED_NAME = re.compile(r"(bnb|4bit|4-bit|8bit|8-bit|nf4|fp4|int4|int8|gptq|awq|qlora)", re.IGNORECASE)


def training_quantization_hint(
    adapter_dir: str | os.PathLike, adapter_config: dict, base_config: dict | None = None
) -> str | None:
    """A one-line reason to think the adapter was trained against a quantized base (QLoRA),
    from its config, its model card (PEFT's training metadata) or the base's config.json;
    None when nothing suggests it."""
    name = str(adapter_config.get("base_model_name_or_path") or "")
    match = QUANTIZED_NAME.search(name)
    if match:
        return f"its base_model_name_or_path {name!r} names a quantized model ({match.group(1)})"
    qc = (base_config or {}).get("quantization_config")
    if isinstance(qc, dict):
        return f"the base's config.json has a quantization_config ({qc.get('quant_method', '?')})"
    card = Path(adapter_dir) / "README.md"
    try:
        text = card.read_text(errors="replace")[:200_000] if card.is_file() else ""
    except OSError:
        text = ""
    for marker in ("load_in_4bit: True", "load_in_8bit: True", "bnb_4bit_quant_type", "quant_method: bitsandbytes"):
        if marker in text:
            return f"its model card records the training quantization ({marker})"
    return None
