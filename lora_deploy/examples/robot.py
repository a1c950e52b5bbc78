"""Reference robot controllers: plain ``nn.Module`` policies with PEFT-trained adapters.

Two controllers, the two ways VLA-style policies emit actions, small enough to build and
fine-tune in seconds on a CPU:

* :class:`ContinuousPolicy` (factory ``lora_deploy.examples.robot:build_policy``): image
  patches and proprioception -> a small transformer -> an action chunk
  ``actions`` [batch, CHUNK, ACTION_DIM] in action units.
* :class:`TokenVLA` (factory ``lora_deploy.examples.robot:build_vla``): image patches and
  an instruction's token ids feed a tiny LLaMA decoder (transformers' ``LlamaModel``);
  ``ACTION_DIM`` action query positions at the end are read out over the **last 256
  vocabulary tokens** (the action bins, as OpenVLA maps them), giving
  ``action_logits`` [batch, ACTION_DIM, 256]. Decoding all degrees of freedom in one pass
  (parallel decoding, as OpenVLA-OFT does) keeps the graph static. :func:`decode_actions`
  takes the argmax bin and un-normalizes it with the per-dataset statistics of a
  ``dataset_statistics.json`` side file.

Each module declares ``example_inputs()`` (recorded-observation shapes, batch first),
``output_names`` and ``action_kind`` (``"continuous"`` or ``"bins"``: how verify compares
actions). Checkpoints are plain state dicts (``torch.save``, read back weights-only);
adapters are PEFT LoRA on every linear layer, trained a few steps on a synthetic task so
that they really change the actions. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lora_deploy.examples.models import _seeded

IMAGE_SIZE = 32  # 3 x 32 x 32 camera image
PATCH = 8  # 16 patches of 8 x 8
PROPRIO_DIM = 8
ACTION_DIM = 7  # 6-DoF end effector delta + gripper
CHUNK = 8  # actions per chunk (continuous policy)
N_BINS = 256  # action bins = the last 256 vocabulary tokens (token VLA)
VLA_VOCAB = 512
PROMPT_LEN = 6
STATISTICS_FILE = "dataset_statistics.json"
DATASET = "synthetic_robot"

_HIDDEN = 64
_RANK = 16
_ALPHA = 32
_STEPS = 30
_LEARNING_RATE = 1e-2
POLICY_TARGETS = ["patch_embed", "proprio_embed", "q", "k", "v", "o", "fc1", "fc2", "action_head"]
VLA_TARGETS = ["patch_embed", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def patchify(image: torch.Tensor) -> torch.Tensor:
    """[batch, 3, H, W] -> [batch, patches, 3 * PATCH * PATCH] (reshapes only: static shapes)."""
    b, c, h, w = image.shape
    x = image.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


class Block(nn.Module):
    """Pre-norm transformer block with separate q/k/v/o projections (every one a Linear)."""

    def __init__(self, dim: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.norm1(x)

        def split(t):
            return t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        x = x + self.o((weights @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


def example_observations(batch: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic camera images and proprioception, as a robot would record them."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(0.0, 1.0, (batch, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    proprio = rng.normal(0.0, 0.5, (batch, PROPRIO_DIM)).astype(np.float32)
    return {"image": image, "proprio": proprio}


class ContinuousPolicy(nn.Module):
    """Vision patches + proprioception -> transformer -> action chunk [batch, CHUNK, ACTION_DIM]."""

    output_names = ("actions",)
    action_kind = "continuous"

    def __init__(self, dim: int = _HIDDEN, layers: int = 2):
        super().__init__()
        patches = (IMAGE_SIZE // PATCH) ** 2
        self.patch_embed = nn.Linear(3 * PATCH * PATCH, dim)
        self.proprio_embed = nn.Linear(PROPRIO_DIM, dim)
        self.position = nn.Parameter(torch.randn(patches + 1 + CHUNK, dim) * 0.02)
        self.action_queries = nn.Parameter(torch.randn(CHUNK, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.action_head = nn.Linear(dim, ACTION_DIM)

    def forward(self, image: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat(
            [
                self.patch_embed(patchify(image)),
                self.proprio_embed(proprio)[:, None],
                self.action_queries.expand(image.shape[0], -1, -1),
            ],
            dim=1,
        )
        x = tokens + self.position
        for block in self.blocks:
            x = block(x)
        return self.action_head(self.norm(x[:, -CHUNK:]))

    def example_inputs(self) -> dict[str, np.ndarray]:
        return example_observations()


def build_policy() -> ContinuousPolicy:
    """The factory (``--module lora_deploy.examples.robot:build_policy``)."""
    return ContinuousPolicy()


class TokenVLA(nn.Module):
    """Image patches + instruction ids -> tiny LLaMA -> logits of the 256 action bins per DoF."""

    output_names = ("action_logits",)
    action_kind = "bins"

    def __init__(self, dim: int = _HIDDEN):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=VLA_VOCAB,
            hidden_size=dim,
            intermediate_size=2 * dim,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
        self.patch_embed = nn.Linear(3 * PATCH * PATCH, dim)
        self.action_queries = nn.Parameter(torch.randn(ACTION_DIM, dim) * 0.02)
        self.llm = LlamaForCausalLM(config)

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = torch.cat(
            [
                self.patch_embed(patchify(image)),
                self.llm.model.embed_tokens(input_ids),
                self.action_queries.expand(image.shape[0], -1, -1),
            ],
            dim=1,
        )
        # No key/value cache: one parallel-decoding pass (and the language model is a part
        # that exports on its own: `--part llm.model`).
        hidden = self.llm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state[:, -ACTION_DIM:]
        return self.llm.lm_head(hidden)[..., -N_BINS:]

    def example_inputs(self) -> dict[str, np.ndarray]:
        return vla_observations()


def vla_observations(batch: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Camera images and an instruction's token ids (ids below the action tokens)."""
    rng = np.random.default_rng(seed)
    image = example_observations(batch, seed)["image"]
    ids = rng.integers(3, VLA_VOCAB - N_BINS, (batch, PROMPT_LEN)).astype(np.int64)
    return {"image": image, "input_ids": ids}


def build_vla() -> TokenVLA:
    """The factory (``--module lora_deploy.examples.robot:build_vla``)."""
    return TokenVLA()


# ---------------------------------------------------------------- action decoding


def bin_centers() -> np.ndarray:
    """The normalized action of each bin: 256 equal bins over [-1, 1], their centers."""
    return -1.0 + (2.0 * np.arange(N_BINS) + 1.0) / N_BINS


def decode_actions(action_logits: np.ndarray, statistics: dict, dataset: str = DATASET) -> np.ndarray:
    """Action bins (argmax over the 256 action tokens) -> actions in action units:
    ``0.5 * (a + 1) * (q99 - q01) + q01`` per DoF where the mask is set, the normalized
    value ``a`` itself elsewhere (a gripper), as OpenVLA un-normalizes."""
    stats = statistics[dataset]["action"]
    q01, q99 = np.asarray(stats["q01"]), np.asarray(stats["q99"])
    mask = np.asarray(stats.get("mask", [True] * len(q01)), dtype=bool)
    normalized = bin_centers()[np.argmax(action_logits, axis=-1)]
    return np.where(mask, 0.5 * (normalized + 1.0) * (q99 - q01) + q01, normalized)


def dataset_statistics() -> dict:
    """Per-dataset action statistics in OpenVLA's layout (q01 / q99 / mask per DoF)."""
    q01 = [-0.05, -0.05, -0.05, -0.3, -0.3, -0.3, 0.0]
    q99 = [0.05, 0.05, 0.05, 0.3, 0.3, 0.3, 1.0]
    return {DATASET: {"action": {"q01": q01, "q99": q99, "mask": [True] * 6 + [False]}}}


# ---------------------------------------------------------------- synthetic tasks


def _policy_batch(step: int, batch: int = 16) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Reach toward the image's brightest quadrant, damped by the arm's state, over the chunk."""
    obs = {k: torch.from_numpy(v) for k, v in example_observations(batch, 1_000_000 + step).items()}
    quadrants = obs["image"].mean(1).reshape(batch, 2, IMAGE_SIZE // 2, 2, IMAGE_SIZE // 2).mean((2, 4))
    goal = torch.cat([quadrants.reshape(batch, 4) - 0.5, obs["proprio"][:, :3]], dim=1) * 4
    ramp = torch.linspace(1.0, 0.2, CHUNK)[None, :, None]
    return obs, torch.tanh(goal)[:, None, :] * ramp


def _vla_batch(step: int, batch: int = 16) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The bin of each DoF follows the mean brightness of one image row band."""
    obs = {k: torch.from_numpy(v) for k, v in vla_observations(batch, 1_000_000 + step).items()}
    bands = obs["image"].mean((1, 3))[:, : ACTION_DIM * 4].reshape(batch, ACTION_DIM, 4).mean(-1)
    target = ((bands - 0.5) * 40 + N_BINS / 2).clamp(0, N_BINS - 1).long()
    return obs, target


def lora_config(kind: str):
    """PEFT LoRA on every linear layer of the controller (r 16, alpha 32)."""
    from peft import LoraConfig

    targets = POLICY_TARGETS if kind == "policy" else VLA_TARGETS
    return LoraConfig(r=_RANK, lora_alpha=_ALPHA, lora_dropout=0.0, target_modules=list(targets))


def train_adapter(kind: str, base: nn.Module, out_dir, *, steps: int = _STEPS, seed: int = 0) -> Path:
    """Fine-tune a LoRA adapter on the synthetic task of `kind` ("policy" or "vla") and save
    exactly what PeftModel.save_pretrained writes. `base` is left unchanged."""
    import copy

    from peft import get_peft_model

    with _seeded(seed):
        model = get_peft_model(copy.deepcopy(base), lora_config(kind))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=_LEARNING_RATE, weight_decay=0.0)
        model.train()
        for step in range(steps):
            if kind == "policy":
                obs, target = _policy_batch(step)
                loss = torch.nn.functional.mse_loss(model(**obs), target)
            else:
                obs, target = _vla_batch(step)
                loss = torch.nn.functional.cross_entropy(model(**obs).reshape(-1, N_BINS), target.reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
    model.save_pretrained(out_dir)
    return Path(out_dir)


def build_controller(kind: str, out_dir, *, seed: int = 0, steps: int = _STEPS) -> dict[str, Path]:
    """Write a reference controller and its adapter under `out_dir`:

    * ``base.pt``: the plain state dict (``torch.save``), random weights from `seed`;
    * ``adapter/``: the PEFT LoRA adapter trained on the synthetic task;
    * ``observations.npz``: 64 recorded observations (array names = forward arguments);
    * ``dataset_statistics.json`` (token VLA): the action statistics decode_actions uses.

    Returns {role: path}."""
    if kind not in ("policy", "vla"):
        raise ValueError(f"kind must be 'policy' or 'vla', got {kind!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _seeded(seed):
        model = (build_policy() if kind == "policy" else build_vla()).eval()
    paths = {"base": out / "base.pt", "adapter": out / "adapter", "observations": out / "observations.npz"}
    torch.save({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, paths["base"])
    train_adapter(kind, model, paths["adapter"], steps=steps, seed=seed)
    observations = example_observations(64, seed=7) if kind == "policy" else vla_observations(64, seed=7)
    np.savez(paths["observations"], **observations)
    if kind == "vla":
        paths["statistics"] = out / STATISTICS_FILE
        paths["statistics"].write_text(json.dumps(dataset_statistics(), indent=2) + "\n")
    return paths
