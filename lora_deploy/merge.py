"""Merge stage: base checkpoint + LoRA adapter -> an ordinary HF checkpoint, streamed.

Tensors are visited in the base's on-disk order. Untouched tensors are copied byte for
byte; adapted ones are read one at a time, merged in float32 and rounded once. Output is
built in a hidden sibling directory and renamed into place only when complete, so a
failure or Ctrl-C never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .adapter import Adapter, load_adapter
from .checkpoint import (
    DTYPES,
    FLOAT_DTYPES,
    INDEX_FILE,
    BinaryFile,
    Checkpoint,
    OutputTensor,
    TensorInfo,
    file_sha256,
    parse_size,
    tensor_bytes,
    write_checkpoint,
)
from .delta import merged_bias, merged_weight
from .errors import BadInputError, NonFiniteError
from .targets import MergePlan, Target, plan_merge
from .util import all_finite, library_versions

MANIFEST_FILE = "merge-manifest.json"
OUTPUT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
SKIP_FILES = {INDEX_FILE, "pytorch_model.bin.index.json", MANIFEST_FILE}
# Libraries whose versions the manifest records (lora-deploy itself is added too).
MANIFEST_LIBRARIES = ("torch", "safetensors", "numpy", "transformers")

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass
class MergeResult:
    out_dir: Path
    manifest: dict
    seconds: float
    merged: list[str] = field(default_factory=list)  # weight keys that changed

    def summary(self) -> str:
        size = self.manifest["output"]["total_bytes"]
        return (
            f"merged {len(self.merged)} tensors into {self.out_dir} "
            f"({size / 1e6:.1f} MB, {len(self.manifest['output']['files'])} files) in {self.seconds:.1f}s"
        )


def merge(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    durable: bool = False,
    progress: Progress | None = None,
) -> MergeResult:
    """Merge a PEFT LoRA adapter into a safetensors checkpoint directory, shard by shard.

    durable=True fsyncs every file and the directory before the final rename, so the
    output also survives a power loss (at the cost of waiting for the disk).
    """
    start = time.perf_counter()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if dtype != "auto" and dtype not in OUTPUT_DTYPES:
        raise BadInputError(f"unknown dtype {dtype!r} (choose auto, {', '.join(OUTPUT_DTYPES)})")
    shard_bytes = parse_size(max_shard_size)
    with Checkpoint(base_dir) as base:
        adapter = load_adapter(adapter_dir)
        check_output_dir(out_dir, [base_dir, Path(adapter_dir)], overwrite)
        plan = plan_merge(adapter, base)
        manifest = write_merged(base, adapter, plan, out_dir, dtype, shard_bytes, overwrite, durable, progress)
    return MergeResult(out_dir, manifest, time.perf_counter() - start, sorted(plan.targets))


def write_merged(base, adapter, plan, out_dir, dtype, shard_bytes, overwrite, durable, progress) -> dict:
    tensors = output_tensors(base, plan, dtype)
    with staging_dir(out_dir, overwrite) as tmp, ThreadPoolExecutor(1) as pool:
        hasher = InputHasher(base, adapter, tensors, pool)
        on_tensor = chain(progress_hook(tensors, progress), hasher.tensor_done)
        out_hashes = write_checkpoint(tmp, tensors, shard_bytes, on_tensor, durable)
        out_hashes.update(copy_side_files(base.dir, tmp, dtype, untied=bool(plan.untie)))
        manifest = build_manifest(base, adapter, plan, tensors, dtype, shard_bytes, hasher.result(), out_hashes)
        write_json(tmp / MANIFEST_FILE, manifest)
        if durable:
            sync_tree(tmp)
    return manifest


def check_output_dir(out_dir: Path, inputs: list[Path], overwrite: bool) -> None:
    resolved = out_dir.resolve()
    for path in inputs:
        # --overwrite removes OUT: it must not be, or contain, an input.
        if path.resolve() == resolved or resolved in path.resolve().parents:
            raise BadInputError(f"{out_dir}: output directory must not be or contain an input ({path})")
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInputError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise BadInputError(f"{out_dir}: not empty (pass --overwrite to replace it)")
    if not out_dir.parent.is_dir():
        raise BadInputError(f"{out_dir.parent}: parent directory does not exist")


class staging_dir:
    """A hidden sibling directory renamed onto `target` only if the block succeeds."""

    def __init__(self, target: Path, overwrite: bool):
        self.target = target
        self.overwrite = overwrite
        self.tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # includes KeyboardInterrupt
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        replace_dir(self.tmp, self.target)


def replace_dir(src: Path, target: Path) -> None:
    """Move src onto target; an existing target is swapped out first, then removed."""
    if not target.exists():
        os.replace(src, target)
        return
    trash = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, trash)
    try:
        os.replace(src, target)
    except OSError:
        os.replace(trash, target)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def output_dtype(info: TensorInfo, dtype: str) -> str:
    if dtype == "auto" or info.dtype not in FLOAT_DTYPES:
        return info.dtype
    return OUTPUT_DTYPES[dtype]


def output_tensors(base: Checkpoint, plan: MergePlan, dtype: str) -> list[OutputTensor]:
    """Every output tensor, in the base's on-disk order, with how to produce its bytes."""
    bias_of = {t.bias_key: t for t in plan.targets.values() if t.bias_key}
    out = []
    for info in sorted(base.tensors.values(), key=lambda i: (base.files.index(i.file), i.start)):
        out_dtype = output_dtype(info, dtype)
        if info.name in plan.targets:
            w0 = plan.replacements.get(info.name)  # PEFT loads a saved base layer before adding the LoRA
            produce = merged_producer(base, info, plan.targets[info.name], out_dtype, w0)
        elif info.name in bias_of:
            produce = bias_producer(base, info, bias_of[info.name], out_dtype)
        elif info.name in plan.replacements:
            produce = tensor_producer(plan.replacements[info.name], out_dtype, info.name)
        else:
            produce = copy_producer(base, info, out_dtype)
        out.append(OutputTensor(info.name, out_dtype, info.shape, produce))
        for tied_key, source in plan.untie.items():
            if source == info.name:
                out.append(OutputTensor(tied_key, out_dtype, info.shape, copy_producer(base, info, out_dtype)))
    return out


def copy_producer(base: Checkpoint, info: TensorInfo, out_dtype: str):
    if out_dtype == info.dtype:
        return lambda f: f.copy_from(info.file, info.start, info.end)
    return lambda f: f.write(tensor_bytes(base.read(info.name).to(torch_dtype(out_dtype))))


def merged_producer(base: Checkpoint, info: TensorInfo, target: Target, out_dtype: str, w0=None):
    def produce(f: BinaryFile) -> None:
        base_weight = base.read(info.name) if w0 is None else w0  # a saved base layer, at its own precision
        merged = merged_weight(target.module, target.kind, base_weight)
        target.delta_norm = float((merged - base_weight.float()).norm())
        f.write(tensor_bytes(finite(merged.to(torch_dtype(out_dtype)), info.name)))

    return produce


def bias_producer(base: Checkpoint, info: TensorInfo, target: Target, out_dtype: str):
    def produce(f: BinaryFile) -> None:
        merged = merged_bias(target.module, base.read(info.name))
        f.write(tensor_bytes(finite(merged.to(torch_dtype(out_dtype)), info.name)))

    return produce


def tensor_producer(tensor: torch.Tensor, out_dtype: str, name: str):
    return lambda f: f.write(tensor_bytes(finite(tensor.to(torch_dtype(out_dtype)), name)))


def finite(tensor: torch.Tensor, name: str) -> torch.Tensor:
    # Checked after rounding: a float16 output can overflow to Inf even when float32 didn't.
    if not all_finite(tensor):
        raise NonFiniteError(f"merged tensor {name} has NaN or Inf values (overflow in the output dtype?)")
    return tensor


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def progress_hook(tensors: list[OutputTensor], progress: Progress | None):
    if progress is None:
        return None
    total = sum(t.nbytes for t in tensors)
    done = 0

    def hook(t: OutputTensor) -> None:
        nonlocal done
        done += t.nbytes
        progress(done, total)

    return hook


def side_files(base_dir: Path) -> list[Path]:
    """Non-weight files of a checkpoint (config, tokenizer, pooling configs...), recursively."""
    out = []
    for path in sorted(base_dir.rglob("*")):
        rel = path.relative_to(base_dir)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if path.name in SKIP_FILES or path.suffix in WEIGHT_SUFFIXES:
            continue
        out.append(path)
    return out


def copy_side_files(base_dir: Path, out_dir: Path, dtype: str, untied: bool) -> dict[str, str]:
    """Copy config, tokenizer and other non-weight files; fix up config.json if needed."""
    hashes = {}
    for path in side_files(base_dir):
        rel = path.relative_to(base_dir)
        dest = out_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if rel == Path("config.json"):
            write_json(dest, updated_config(json.loads(path.read_text()), dtype, untied))
        else:
            shutil.copy2(path, dest)
        hashes[str(rel)] = file_sha256(dest)
    return hashes


def updated_config(config: dict, dtype: str, untied: bool) -> dict:
    if dtype != "auto":
        # transformers 5 writes "dtype", 4.x wrote "torch_dtype"; keep whichever is there.
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = dtype
        if "dtype" not in config and "torch_dtype" not in config:
            config["dtype"] = dtype
    if untied:
        config["tie_word_embeddings"] = False
    return config


def sync_tree(path: Path) -> None:
    """fsync every file of a directory, then the directory itself."""
    for child in path.rglob("*"):
        if not child.is_file():
            continue
        fd = os.open(child, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class InputHasher:
    """SHA-256 of every input file, computed on a helper thread.

    Each base shard is hashed right after the merge has read past it, so the hash reads
    come from the page cache instead of racing the merge for the disk.
    """

    def __init__(self, base: Checkpoint, adapter: Adapter, tensors: list[OutputTensor], pool: ThreadPoolExecutor):
        self.base, self.pool = base, pool
        self.jobs: dict[str, object] = {}
        self.last_tensor = {info.file: info.name for info in sorted(base.tensors.values(), key=lambda i: i.start)}
        self.pending = {name: path for path, name in self.last_tensor.items()}
        for path in side_files(base.dir):
            self.submit(str(path.relative_to(base.dir)), path)
        for path in adapter.files:
            self.submit(f"adapter/{path.name}", path)

    def submit(self, key: str, path: Path) -> None:
        self.jobs[key] = self.pool.submit(file_sha256, path)

    def tensor_done(self, tensor: OutputTensor) -> None:
        path = self.pending.pop(tensor.name, None)
        if path is not None:
            self.submit(str(path.relative_to(self.base.dir)), path)

    def result(self) -> dict[str, dict[str, str]]:
        for name, path in list(self.pending.items()):  # shards of tensors never visited (none expected)
            self.tensor_done(OutputTensor(name, "F32", (), lambda f: None))
        hashes = {key: job.result() for key, job in self.jobs.items()}
        return {
            "base": dict(sorted((k, v) for k, v in hashes.items() if not k.startswith("adapter/"))),
            "adapter": {k.removeprefix("adapter/"): v for k, v in hashes.items() if k.startswith("adapter/")},
        }


def chain(*hooks):
    hooks = [h for h in hooks if h is not None]
    return lambda tensor: [h(tensor) for h in hooks]


def build_manifest(base, adapter: Adapter, plan: MergePlan, tensors, dtype, shard_bytes, in_hashes, out_hashes) -> dict:
    modules = [
        {
            "module": t.module.name,
            "weight": key,
            "kind": t.kind,
            "variant": t.module.variant,
            "r": t.module.r,
            "alpha": t.module.alpha,
            "scaling": t.module.scaling,
            "delta_norm": t.delta_norm,
            "bias": t.bias_key,
        }
        for key, t in sorted(plan.targets.items())
    ]
    return {
        "tool": "lora-deploy",
        "versions": {"lora-deploy": __version__, **library_versions(MANIFEST_LIBRARIES)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": {
            "base": str(base.dir.resolve()),
            "adapter": str(adapter.path.resolve()),
            "sha256": in_hashes,
        },
        "adapter_config": adapter.config.raw,
        "options": {"dtype": dtype, "max_shard_size": shard_bytes},
        "modules": modules,
        "replaced": sorted(plan.replacements),
        "untied": plan.untie,
        "output": {
            "total_bytes": sum(t.nbytes for t in tensors),
            "files": out_hashes,
            "dtypes": sorted({t.dtype for t in tensors}),
        },
    }


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")

