"""Which engine weight is which checkpoint tensor, and the weights a refit writes.

TensorRT names refittable weights after the ONNX initializers they came from, and the
export keeps the checkpoint's tensor names on its initializers. `initializer_map` records
that correspondence (in the engine manifest), so a refit never guesses a name.

`refit_weights` computes, for an adapter, the tensors the streaming merge would write for
it: the same producers (lora_deploy.merge.streaming), so each is bit for bit the tensor
`lora-deploy merge --dtype D` writes. Every refit starts from the base: W0 + dW of the new
adapter, and W0 for refittable weights the new adapter leaves alone, so a weight an earlier
adapter changed is put back (refitting A, then B, then A gives A exactly).
Pure numpy and onnx: no TensorRT.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping

import numpy as np

from lora_deploy.adapter.plan import plan_merge
from lora_deploy.adapter.read import load_adapter
from lora_deploy.dtypes import BY_ONNX
from lora_deploy.errors import AdapterError, BadInputError
from lora_deploy.io.checkpoint import DTYPES, Checkpoint, TensorInfo
from lora_deploy.merge.streaming import output_tensors


def initializer_map(onnx_path: str | os.PathLike, checkpoint_dir: str | os.PathLike) -> dict[str, dict]:
    """{ONNX initializer name: {"checkpoint": name, "dtype": ..., "shape": [...]}} for every
    float initializer that is a checkpoint tensor of the same shape: by its own name, or with
    one leading prefix added or removed (a bare backbone checkpoint under a task model, or
    the reverse). Initializers that are no checkpoint tensor (constants, rotary tables) are
    left out: they are never refitted."""
    import onnx

    model = onnx.load(os.fspath(onnx_path), load_external_data=False)
    with Checkpoint(checkpoint_dir) as ckpt:
        shapes = {name: tuple(info.shape) for name, info in ckpt.tensors.items()}
    out = {}
    for init in model.graph.initializer:
        row = BY_ONNX.get(init.data_type)
        if row is None or not row.is_float:
            continue
        shape = tuple(int(d) for d in init.dims)
        name = checkpoint_name(init.name, shape, shapes)
        if name is not None:
            out[init.name] = {"checkpoint": name, "dtype": row.name, "shape": list(shape)}
    return out


def checkpoint_name(onnx_name: str, shape: tuple[int, ...], shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    candidates = [onnx_name]
    head, dot, rest = onnx_name.partition(".")
    if dot:
        candidates.append(rest)  # the graph has a prefix the checkpoint lacks
    candidates += sorted(k for k in shapes if k.endswith("." + onnx_name) and k.count(".") == onnx_name.count(".") + 1)
    for name in candidates:
        if shapes.get(name) == shape:
            return name
    return None


def adapter_weights(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike) -> set[str]:
    """The checkpoint tensors a merge of this adapter changes (weights, lora_B biases,
    modules_to_save replacements)."""
    with Checkpoint(base_dir) as base:
        plan = plan_merge(load_adapter(adapter_dir), base)
        return changed_names(plan)


def changed_names(plan) -> set[str]:
    return set(plan.targets) | {t.bias_key for t in plan.targets.values() if t.bias_key} | set(plan.replacements)


class _RandomAccess:
    """The part of CheckpointStream the merge's producers use, reading tensors in any order."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt

    def read(self, info: TensorInfo) -> np.ndarray:
        return self.ckpt.read(info.name)

    def copy_to(self, out, info: TensorInfo) -> None:
        out.write(self.ckpt.read_bytes(info))


def refit_weights(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    weights: Mapping[str, Mapping],
    refittable: Iterable[str] | None = None,
    reset: Iterable[str] = (),
) -> dict[str, np.ndarray]:
    """{ONNX initializer name: array} to refit an engine to base + this adapter.

    weights: the engine manifest's initializer map. refittable: the ONNX names the engine
    can refit (None: every weight). reset: more ONNX names to write (W0 unless the adapter
    changes them): weights an earlier adapter may have changed. Each array has its
    initializer's dtype and is what the merge writes at that dtype, bit for bit.

    Refuses (naming them) adapter tensors the engine has no weight for or cannot refit,
    and tied embeddings the merge would untie (that changes the graph: rebuild instead).
    """
    by_checkpoint = {entry["checkpoint"]: onnx_name for onnx_name, entry in weights.items()}
    allowed = set(weights) if refittable is None else set(refittable)
    with Checkpoint(base_dir) as base:
        adapter = load_adapter(adapter_dir)
        plan = plan_merge(adapter, base)
        if plan.untie:
            raise AdapterError(
                f"adapter {adapter_dir} changes tied embeddings ({', '.join(sorted(plan.untie))}): the merged model "
                "unties them, which a refit cannot do; merge, export and build a new engine instead"
            )
        changed = changed_names(plan)
        missing = sorted(n for n in changed if n not in by_checkpoint)
        if missing:
            raise AdapterError(f"the engine has no weight for adapter targets {', '.join(missing)}")
        fixed = sorted(n for n in changed if by_checkpoint[n] not in allowed)
        if fixed:
            raise AdapterError(
                f"adapter targets {', '.join(fixed)} are not refittable in this engine "
                "(built with --refittable adapter-targets for other targets?)"
            )
        unknown = sorted(set(reset) - set(weights))
        if unknown:
            raise BadInputError(f"the engine manifest lists no weight named {', '.join(unknown)}")
        wanted = {by_checkpoint[n] for n in changed} | set(reset)
        by_dtype: dict[str, set[str]] = {}
        for onnx_name in wanted:
            by_dtype.setdefault(weights[onnx_name]["dtype"], set()).add(weights[onnx_name]["checkpoint"])
        stream = _RandomAccess(base)
        out: dict[str, np.ndarray] = {}
        for dtype, names in by_dtype.items():
            # The merge's own producers, at this dtype (they use only read() and copy_to()).
            for tensor in output_tensors(stream, plan, dtype):  # type: ignore[arg-type]
                if tensor.name not in names:
                    continue
                buffer = io.BytesIO()
                tensor.produce(buffer)  # type: ignore[arg-type]
                array = np.frombuffer(buffer.getvalue(), dtype=DTYPES[tensor.dtype]).reshape(tensor.shape)
                out[by_checkpoint[tensor.name]] = array
    return out
