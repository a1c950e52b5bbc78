"""The references our outputs are compared with: PEFT and transformers, never our own code."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}
MIN_EXPONENT = {torch.float16: -14, torch.bfloat16: -126, torch.float32: -126}


def model_class(model_dir: Path):
    arch = json.loads((Path(model_dir) / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch)


def load_model(model_dir: Path, dtype=torch.float32):
    return model_class(model_dir).from_pretrained(model_dir, dtype=dtype).eval()


def peft_model(base_dir: Path, adapter_dir: Path, dtype=torch.float32):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(base_dir, dtype), adapter_dir).eval()


def peft_merged_state(base_dir: Path, adapter_dir: Path, dtype=torch.float32) -> dict[str, torch.Tensor]:
    merged = peft_model(base_dir, adapter_dir, dtype).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def read_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` values around x (float32 tensor), subnormals included."""
    _, exponent = torch.frexp(x.float().abs())
    e = torch.clamp(exponent - 1, min=MIN_EXPONENT[dtype])
    return torch.pow(2.0, (e - MANTISSA_BITS[dtype]).float())


def token_batch(vocab: int, batch: int = 2, seq: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, min(vocab, 200), (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


def policy_base(paths):
    """The reference continuous policy (examples/robot.py) with its saved base weights, in eval mode."""
    from lora_deploy.examples import robot as robots

    base = robots.build_policy()
    base.load_state_dict(torch.load(paths["base"], weights_only=True))
    return base.eval()


def policy_actions(paths, adapter, obs):
    """Actions of the policy in float32: the base (adapter None) or PEFT's unmerged adapter."""
    from peft import PeftModel

    model = policy_base(paths)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in obs.items()}).numpy()
