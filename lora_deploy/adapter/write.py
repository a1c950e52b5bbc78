"""Write a PEFT LoRA adapter directory (the inverse of adapter.read), atomically.

New factors are written with scaling 1: lora_alpha = r (and alpha = rank in alpha_pattern
wherever rank_pattern gives a module another rank), use_rslora false; whatever scaling the
factors had is folded into them by the caller. Per-module ranks and alphas are keyed by
each module's escaped full name, which PEFT's pattern rule (`(.*\\.)?(key)$`) matches
exactly once. The directory is built in a hidden staging sibling, read back with
load_adapter, and renamed into place only then (io.staging's output policy).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_deploy.adapter.read import CONFIG_FILE, SAFETENSORS_FILE, SAVED_PREFIX, load_adapter
from lora_deploy.dtypes import of_numpy
from lora_deploy.errors import InternalError, OutputError
from lora_deploy.io.checkpoint import SINGLE_FILE
from lora_deploy.io.staging import staging_dir
from lora_deploy.io.stream import OutputTensor, tensor_bytes, write_checkpoint

# Config keys that select modules by position or exclusion: an output that lists its
# modules by full name drops them.
SELECTION_KEYS = ("layers_to_transform", "layers_pattern", "exclude_modules")


@dataclass
class Factors:
    """One module of an adapter to write: B @ A is its whole update (scaling 1).

    a and b in PEFT's stored shapes ([r, in(, kh, kw)] and [out, r(, 1, 1)]); for an
    embedding, lora_embedding_A [r, num_embeddings] and lora_embedding_B [dim, r].
    """

    a: np.ndarray
    b: np.ndarray
    embedding: bool = False
    bias: np.ndarray | None = None  # lora_B.bias, already scaled

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


def lora_config(template: dict, modules: dict[str, Factors], target_modules=None) -> dict:
    """`template` (an input's adapter_config.json) with ranks and alphas for `modules` at
    scaling 1; target_modules replaced when given (SELECTION_KEYS then dropped)."""
    ranks = {name: f.rank for name, f in modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    others = {re.escape(name): rank for name, rank in ranks.items() if rank != r}
    config = dict(template)
    config.update(
        r=r,
        lora_alpha=r,
        use_rslora=False,
        use_dora=False,
        rank_pattern=others,
        alpha_pattern=dict(others),
        lora_bias=any(f.bias is not None for f in modules.values()),
    )
    if target_modules is not None:
        config["target_modules"] = target_modules
        for key in SELECTION_KEYS:
            config.pop(key, None)
    return config


def saved_tensors(modules: dict[str, Factors]) -> dict[str, np.ndarray]:
    """The tensors under the names PEFT saves them with (in the factors' own dtypes)."""
    out = {}
    for name, f in modules.items():
        key = f"{SAVED_PREFIX}{name}"
        a_key, b_key = (
            (".lora_embedding_A", ".lora_embedding_B") if f.embedding else (".lora_A.weight", ".lora_B.weight")
        )
        out[key + a_key] = np.ascontiguousarray(f.a)
        out[key + b_key] = np.ascontiguousarray(f.b)
        if f.bias is not None:
            out[key + ".lora_B.bias"] = np.ascontiguousarray(f.bias)
    return out


def write_adapter(
    out: str | os.PathLike,
    config: dict,
    tensors: dict[str, np.ndarray],
    *,
    overwrite: bool = False,
    inputs=(),
) -> Path:
    """adapter_config.json + adapter_model.safetensors into `out`, atomically; the result is
    read back (load_adapter) before it is moved into place."""
    target = Path(out)
    with staging_dir(target, overwrite=overwrite, inputs=inputs) as tmp:
        try:
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str) + "\n")
        except OSError as exc:
            raise OutputError(f"{target / CONFIG_FILE}: cannot write ({exc.strerror or exc})") from exc
        entries = [
            OutputTensor(name, of_numpy(t.dtype).safetensors, tuple(t.shape), lambda f, t=t: f.write(tensor_bytes(t)))
            for name, t in tensors.items()
        ]
        total = sum(e.nbytes for e in entries)
        write_checkpoint(tmp, entries, max_shard_size=total + 1)
        try:
            os.replace(tmp / SINGLE_FILE, tmp / SAFETENSORS_FILE)
        except OSError as exc:
            raise OutputError(f"{target / SAFETENSORS_FILE}: cannot write ({exc.strerror or exc})") from exc
        written = load_adapter(tmp)
        if any(abs(m.scaling - 1.0) > 1e-12 for m in written.modules.values()):
            raise InternalError(f"{target}: written with a scaling other than 1")
    return target
