"""Where a report came from: its schema, when it was made, by which version, and the
SHA-256 of every artifact it speaks about, so a report can be matched to the exact bytes.
(SHA-256, what `sha256sum` prints and the Hugging Face Hub names files by; an artifact
file the digest memo knows unchanged is not read again: lora_deploy.io.digests.)

A file artifact is hashed whole (an ONNX model with its external data files); for a
directory (a checkpoint, an adapter), each weight file and the configs that decide how
the weights are read (config.json, adapter_config.json: the LoRA scaling lives there;
an onnxruntime-genai folder's genai_config.json).
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lora_deploy import __version__
from lora_deploy.errors import BadInputError
from lora_deploy.io.digests import DigestMemo, file_digests

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".data", ".onnx_data", ".onnx_adapter")
CONFIG_FILES = ("config.json", "adapter_config.json", "genai_config.json")


def report_header(schema: str) -> dict[str, Any]:
    """The fields every JSON report starts with."""
    return {
        "schema": schema,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lora_deploy_version": __version__,
    }


def artifact_files(path: str | os.PathLike) -> list[Path]:
    """The files whose bytes an artifact is: see the module docstring."""
    path = Path(path)
    if path.is_dir():
        return sorted(
            p for p in path.iterdir() if p.is_file() and (p.name.endswith(WEIGHT_SUFFIXES) or p.name in CONFIG_FILES)
        )
    if not path.is_file():
        raise BadInputError(f"{path}: not found")
    return [path, *onnx_external_files(path)] if path.suffix == ".onnx" else [path]


def onnx_external_files(path: Path) -> list[Path]:
    """The external data files an ONNX model's initializers point to (none for most)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX after all: its own bytes are the artifact
        return []
    locations = set()
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            locations |= {e.value for e in tensor.external_data if e.key == "location"}
    return [path.parent / name for name in sorted(locations) if (path.parent / name).is_file()]


def artifact_hashes(path: str | os.PathLike) -> dict[str, Any]:
    """{"path": ..., "sha256": {file name (relative to a directory artifact): hex digest}}."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    memo = DigestMemo()
    digests = {str(f.relative_to(root)): file_digests(f, ("sha256",), memo) for f in artifact_files(path)}
    return {"path": str(path), "sha256": {name: d["sha256"] for name, d in digests.items()}}
