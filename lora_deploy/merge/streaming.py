"""Merge stage: base checkpoint + LoRA adapter -> an ordinary HF checkpoint, streamed.

Tensors are visited in the base's on-disk order, so each base shard is read once, front
to back, and hashed by the same read. Untouched tensors are copied byte for byte; adapted
ones are merged in float32 and rounded once. Output is built in a hidden sibling
directory and renamed into place only when complete, so a failure or Ctrl-C never leaves
a half-written model behind. Nothing here imports torch.
"""

from __future__ import annotations

import json
import numbers
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from lora_deploy import __version__
from lora_deploy.adapter.plan import MergePlan, Target, plan_merge
from lora_deploy.adapter.read import Adapter, load_adapter
from lora_deploy.dtypes import BY_NAME
from lora_deploy.errors import BadInputError, CheckpointError, OutputError
from lora_deploy.io.checkpoint import DTYPES, FLOAT_DTYPES, INDEX_FILE, Checkpoint, TensorInfo, parse_size
from lora_deploy.io.digests import DEFAULT_ALGORITHMS, DigestMemo, Digests, file_digests
from lora_deploy.io.staging import check_output, staging_dir
from lora_deploy.io.stream import BinaryFile, CheckpointStream, OutputTensor, tensor_bytes, write_checkpoint
from lora_deploy.merge.card import CARD_FILE, merged_card
from lora_deploy.merge.delta import checked_finite, converted, lora_norm, merged_bias, merged_weight
from lora_deploy.merge.plain import BaseSource, base_source, check_side_files
from lora_deploy.merge.quant import QuantTransform, plan_base, quant_transform
from lora_deploy.util import library_versions

MANIFEST_FILE = "merge-manifest.json"
OUTPUT_DTYPES = ("float32", "float16", "bfloat16")  # --dtype choices besides auto; codes from lora_deploy.dtypes
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
SKIP_FILES = {INDEX_FILE, "pytorch_model.bin.index.json", MANIFEST_FILE}
# Libraries whose versions the manifest records (lora-deploy itself is added too).
MANIFEST_LIBRARIES = ("numpy", "ml_dtypes", "safetensors", "torch", "transformers")

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
            f"({size / 1e6:.1f} MB, {len(self.manifest['output'][DEFAULT_ALGORITHMS[0]])} files + {MANIFEST_FILE}) "
            f"in {self.seconds:.1f}s"
        )


def as_items(value) -> tuple:
    """A sequence argument as a tuple; one string or path alone is one item, not its
    characters; None is none."""
    if value is None:
        return ()
    return (value,) if isinstance(value, (str, bytes, os.PathLike)) else tuple(value)


def merge(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    durable: bool = False,
    sha256: bool = False,
    rehash: bool = False,
    progress: Progress | None = None,
    side_files: Sequence[str | os.PathLike] = (),
    onto: str | None = None,
    blocksize: int | None = None,
    double_quant: bool = False,
    skip_modules: Sequence[str] = (),
    requantize: str | None = None,
) -> MergeResult:
    """Merge a PEFT LoRA adapter into a safetensors checkpoint directory, shard by shard.

    onto="nf4"|"fp4"|"int8" (with blocksize, double_quant, skip_modules) merges onto the
    weights bitsandbytes would have trained against; a block-scaled FP8 base is dequantized,
    or with requantize="fp8" written back as FP8 (merge/quant.py). blocksize is an int
    (nf4/fp4 only; None: 64); skip_modules a list of patterns, or one string (one pattern,
    or several separated by commas outside (), [] and {}, as --skip-modules takes them).

    The base may also be one file: a `.safetensors` file or a plain torch state dict
    (`.pt`/`.pth`/`.bin`, read weights-only; merge/plain.py); `side_files` (dataset
    statistics, a separately saved head) are copied into the output and hashed in the
    manifest (`inputs.<algorithm>.side_files`, and the output's); one path may be given
    alone, not in a list.

    durable=True fsyncs every file and the directory before the final rename, so the
    output also survives a power loss (at the cost of waiting for the disk). An existing
    non-empty out_dir is replaced only with overwrite=True; out_dir is never an input, nor
    inside or around one (lora_deploy.io.staging.check_output).

    The manifest records every input and output file's BLAKE3; sha256=True adds SHA-256
    (the Hugging Face Hub's LFS ids; costs about 1 s of CPU per GB here). An input whose
    digests the memo (lora_deploy.io.digests) holds for its unchanged identity is not
    hashed again; rehash=True reads and hashes every input anyway.
    """
    start = time.perf_counter()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if dtype != "auto" and dtype not in OUTPUT_DTYPES:
        raise BadInputError(f"unknown dtype {dtype!r} (choose auto, {', '.join(OUTPUT_DTYPES)})")
    shard_bytes = parse_size(max_shard_size)
    side_files, skip_modules = as_items(side_files), as_items(skip_modules)
    if not all(isinstance(pattern, str) for pattern in skip_modules):
        raise BadInputError(f"skip_modules takes strings (names, suffixes or regexes), not {skip_modules!r}")
    if blocksize is not None and (isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral)):
        raise BadInputError(f"blocksize must be an int such as 64, not {type(blocksize).__name__} {blocksize!r}")
    blocksize = None if blocksize is None else int(blocksize)
    extra = check_side_files(side_files)
    inputs = [base_dir, Path(adapter_dir), *extra]
    if not base_dir.is_dir():  # before a pickle base is converted
        check_output_dir(out_dir, inputs, overwrite)
    # The products are rank-r thin: BLAS threads would gain nothing and, spinning between
    # calls, take the second core from the hashing threads (3 s of CPU on a 2 GB merge).
    with (
        base_source(base_dir) as source,
        Checkpoint(source.read_dir) as base,
        threadpool_limits(limits=1, user_api="blas"),
    ):
        adapter = load_adapter(adapter_dir)
        check_output_dir(out_dir, inputs, overwrite)
        # --onto / a block-scaled FP8 base: a per-tensor hook (merge/quant.py); None for a plain merge
        transform = quant_transform(base, onto, blocksize, double_quant, tuple(skip_modules), requantize, dtype)
        plan = plan_merge(adapter, plan_base(base, transform))
        digests = Hashing(DEFAULT_ALGORITHMS + (("sha256",) if sha256 else ()), DigestMemo(refresh=rehash))
        manifest = write_merged(
            base,
            adapter,
            plan,
            out_dir,
            dtype,
            shard_bytes,
            durable,
            progress,
            overwrite,
            inputs,
            digests,
            source=source,
            extra=extra,
            transform=transform,
        )
    return MergeResult(out_dir, manifest, time.perf_counter() - start, sorted(plan.targets))


@dataclass(frozen=True)
class Hashing:
    """Which digests the manifest records, and the memo of input digests."""

    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    memo: DigestMemo | None = None

    def file(self, path: Path) -> Digests:
        return file_digests(path, self.algorithms, self.memo)


def write_merged(
    base,
    adapter,
    plan,
    out_dir,
    dtype,
    shard_bytes,
    durable,
    progress,
    overwrite=False,
    inputs=(),
    digests=Hashing(),
    source: BaseSource | None = None,
    extra: Sequence[Path] = (),
    transform: QuantTransform | None = None,
) -> dict:
    with staging_dir(out_dir, overwrite=overwrite, inputs=inputs) as tmp:
        stream = CheckpointStream(base, digests.algorithms, digests.memo)
        try:
            tensors = output_tensors(stream, plan, dtype, transform)
            hook = progress_hook(tensors, progress)
            out_hashes = write_checkpoint(tmp, tensors, shard_bytes, hook, durable, digests.algorithms)
            in_hashes = input_hashes(base, adapter, stream.digests(), digests)
            if source is not None and source.file is not None:  # the file given, not its temporary view
                in_hashes["base"] = {source.file.name: digests.file(source.file)}
            if extra:
                in_hashes["side_files"] = {path.name: digests.file(path) for path in extra}
        except BaseException:
            stream.abort()  # stop its helper threads; the original error is what matters
            raise
        out_hashes.update(
            copy_side_files(base.dir, tmp, dtype, bool(plan.untie), in_hashes["base"], adapter, digests.algorithms)
        )
        for path in extra:  # byte-for-byte copies of files hashed as inputs
            if path.name in out_hashes:
                raise BadInputError(f"side file {path}: the base already has a file named {path.name}")
            copy_file(path, tmp / path.name)
            out_hashes[path.name] = in_hashes["side_files"][path.name]
        if transform is not None:
            transform.fix_config(tmp, out_hashes, digests.algorithms)
        manifest = build_manifest(
            base, adapter, plan, tensors, dtype, shard_bytes, in_hashes, out_hashes, digests.algorithms
        )
        if transform is not None:
            manifest["quantization"] = transform.report()
        if source is not None and source.file is not None:
            manifest["inputs"]["base"] = str(source.file.resolve())
        write_json(tmp / MANIFEST_FILE, manifest)
        if durable:
            sync_tree(tmp)
    return manifest


def check_output_dir(out_dir: Path, inputs: list[Path], overwrite: bool) -> None:
    """The output policy (an empty directory counts as absent), before any work is done."""
    check_output(out_dir, inputs, overwrite, directory=True)
    if out_dir.parent.exists() and not out_dir.parent.is_dir():
        raise BadInputError(f"{out_dir.parent}: is a file, not a directory")
    if not out_dir.parent.is_dir():
        raise BadInputError(f"{out_dir.parent}: parent directory does not exist")


def output_dtype(info: TensorInfo, dtype: str) -> str:
    if dtype == "auto" or info.dtype not in FLOAT_DTYPES:
        return info.dtype
    return BY_NAME[dtype].safetensors


def output_tensors(
    stream: CheckpointStream, plan: MergePlan, dtype: str, transform: QuantTransform | None = None
) -> list[OutputTensor]:
    """Every output tensor, in the base's on-disk order, with how to produce its bytes."""
    base = stream.ckpt
    bias_of = {t.bias_key: t for t in plan.targets.values() if t.bias_key}
    out = []
    for info in sorted(base.tensors.values(), key=lambda i: (base.files.index(i.file), i.start)):
        out_dtype = output_dtype(info, dtype)
        handled = transform.outputs(stream, info, out_dtype, plan) if transform is not None else None
        if handled is not None:  # a quantized path's tensor (merge/quant.py)
            out.extend(handled)
            continue
        if info.name in plan.targets:
            w0 = plan.replacements.get(info.name)  # PEFT loads a saved base layer before adding the LoRA
            produce = merged_producer(stream, info, plan.targets[info.name], out_dtype, w0)
        elif info.name in bias_of:
            produce = bias_producer(stream, info, bias_of[info.name], out_dtype)
        elif info.name in plan.replacements:
            produce = tensor_producer(stream, info, plan.replacements[info.name], out_dtype)
        else:
            produce = copy_producer(stream, info, out_dtype)
        out.append(OutputTensor(info.name, out_dtype, info.shape, produce))
        for tied_key, source in plan.untie.items():
            if source == info.name:
                out.append(OutputTensor(tied_key, out_dtype, info.shape, copy_producer(stream, info, out_dtype)))
    return out


def copy_producer(stream: CheckpointStream, info: TensorInfo, out_dtype: str):
    def produce(f: BinaryFile) -> None:
        if out_dtype == info.dtype:
            stream.copy_to(f, info)
        else:
            f.write(tensor_bytes(converted(stream.read(info), DTYPES[out_dtype], info.name)))

    return produce


def merged_producer(stream: CheckpointStream, info: TensorInfo, target: Target, out_dtype: str, w0=None):
    def produce(f: BinaryFile) -> None:
        base_weight = stream.read(info)  # read (and hashed) even when a saved base layer replaces it
        if w0 is not None:
            base_weight = w0
        module, dtype = target.module, DTYPES[out_dtype]
        if module.magnitude is None:
            merged = merged_weight(module, target.kind, base_weight, dtype)
            target.delta_norm = lora_norm(module)
        else:  # DoRA also rescales W0: measure the whole change
            exact = merged_weight(module, target.kind, base_weight)
            target.delta_norm = float(np.linalg.norm(exact - base_weight.astype(exact.dtype)))
            merged = exact.astype(dtype, copy=False)
        f.write(tensor_bytes(checked_finite(merged, info.name, base_weight)))

    return produce


def bias_producer(stream: CheckpointStream, info: TensorInfo, target: Target, out_dtype: str):
    def produce(f: BinaryFile) -> None:
        base_bias = stream.read(info)
        merged = merged_bias(target.module, base_bias)
        f.write(tensor_bytes(checked_finite(merged.astype(DTYPES[out_dtype], copy=False), info.name, base_bias)))

    return produce


def tensor_producer(stream: CheckpointStream, info: TensorInfo, tensor: np.ndarray, out_dtype: str):
    def produce(f: BinaryFile) -> None:
        stream.read(info)  # the base tensor is replaced, but its bytes still go into the input hash
        f.write(tensor_bytes(checked_finite(tensor.astype(DTYPES[out_dtype]), info.name)))

    return produce


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


def copy_side_files(
    base_dir: Path,
    out_dir: Path,
    dtype: str,
    untied: bool,
    in_hashes: dict[str, Digests],
    adapter: Adapter | None = None,
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS,
) -> dict[str, Digests]:
    """Copy config, tokenizer and other non-weight files; fix up config.json if needed.

    With `adapter`, the model card (README.md) gets a section on what was merged
    (merge/card.py), and is written when the base has none."""
    hashes = {}
    for path in side_files(base_dir):
        rel = path.relative_to(base_dir)
        dest = out_dir / rel
        make_dirs(dest.parent)
        if rel == Path("config.json"):
            write_json(dest, updated_config(json.loads(path.read_text()), dtype, untied))
            hashes[str(rel)] = file_digests(dest, algorithms)
        elif rel == Path(CARD_FILE) and adapter is not None:
            write_bytes(dest, merged_card(path.read_bytes(), adapter, dtype, base_dir.resolve().name))
            hashes[str(rel)] = file_digests(dest, algorithms)
        else:
            copy_file(path, dest)
            hashes[str(rel)] = in_hashes[str(rel)]  # a byte-for-byte copy of a file hashed as input
    card = out_dir / CARD_FILE
    if adapter is not None and not card.exists():
        write_bytes(card, merged_card(None, adapter, dtype, base_dir.resolve().name))
        hashes[CARD_FILE] = file_digests(card, algorithms)
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


def input_hashes(
    base: Checkpoint, adapter: Adapter, shard_hashes: dict[Path, Digests], digests: Hashing
) -> dict[str, dict[str, Digests]]:
    """Digests of every input: base shards (hashed while merging), index, side files, adapter."""
    hashes = {str(path.relative_to(base.dir)): digest for path, digest in shard_hashes.items()}
    index = [base.dir / INDEX_FILE] if (base.dir / INDEX_FILE).is_file() else []
    hashes.update({str(path.relative_to(base.dir)): digests.file(path) for path in side_files(base.dir) + index})
    return {
        "base": dict(sorted(hashes.items())),
        "adapter": {path.name: digests.file(path) for path in adapter.files},
    }


def by_algorithm(files: dict[str, Digests], algorithms: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """{file: {algorithm: digest}} -> {algorithm: {file: digest}}, as the manifest records them."""
    return {name: {f: d[name] for f, d in sorted(files.items())} for name in algorithms}


def build_manifest(
    base, adapter: Adapter, plan: MergePlan, tensors, dtype, shard_bytes, in_hashes, out_hashes, algorithms
) -> dict:
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
            **{
                name: {role: by_algorithm(files, (name,))[name] for role, files in in_hashes.items()}
                for name in algorithms
            },
        },
        "adapter_config": adapter.config.raw,
        "options": {"dtype": dtype, "max_shard_size": shard_bytes},
        "modules": modules,
        "replaced": sorted(plan.replacements),
        "untied": plan.untie,
        "output": {
            "total_bytes": sum(t.nbytes for t in tensors),
            **by_algorithm(out_hashes, algorithms),
            "dtypes": sorted({t.dtype for t in tensors}),
        },
    }


def write_json(path: Path, data: dict) -> None:
    write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode("utf-8"))


# Output files of the merge, written inside the staging directory: a failure is the disk's
# (OutputError, exit 3) and names the file (under OUT once staging_dir renames it).


def write_bytes(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc


def make_dirs(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create the directory ({exc.strerror or exc})") from exc


def copy_file(source: Path, dest: Path) -> None:
    """A side file copied byte for byte; a failure to read it is the input's."""
    try:
        shutil.copy2(source, dest)
    except OSError as exc:
        if exc.filename2 is None and exc.filename == str(source):
            raise CheckpointError(f"{source}: cannot read ({exc.strerror or exc})") from exc
        raise OutputError(f"{dest}: cannot write ({exc.strerror or exc})") from exc
