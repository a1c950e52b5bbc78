"""The step cache: a step whose inputs (by content), options and tool are unchanged is not
run again; its earlier outputs are reused.

An entry lives at `ROOT/steps/<step>/<key>/`: `out/` (the step's files) and `entry.json`
(what the step said, its result, and the SHA-256 and identity of every file). The key is
the SHA-256 of the step's name, its options, the digests of its inputs (files and
directories by content, an earlier step's outputs by their recorded digests), the tool
(lora-deploy's version and the digest of its source, the libraries' versions) and, for
what is measured or built for one machine (bench, TensorRT), the machine.

A hit is checked cheaply: each file's inode, size and mtime_ns must be those recorded when
it was stored (a file rewritten in place changes its mtime); a file that differs there is
hashed and must match its digest, else the entry is ignored and the step runs again. Only
steps that passed are stored. Entries are written in a locked staging directory and
renamed into place (lora_deploy.io.staging), so a killed run leaves no half entry, and two
runs storing the same key store the same files.

Input files are hashed through the digest memo (lora_deploy.io.digests): an unchanged
base or adapter is read once, not on every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_deploy import __version__
from lora_deploy.errors import InternalError
from lora_deploy.io.digests import DigestMemo, default_root, file_digests
from lora_deploy.io.staging import output_error, staging_dir
from lora_deploy.util import library_versions

CACHE_FORMAT = 1
ALGORITHM = "sha256"  # what the manifest records and `sha256sum` prints
ENTRY = "entry.json"
OUT = "out"
# Libraries whose version is part of every key (the ones whose output a step writes).
LIBRARIES = (
    "torch",
    "transformers",
    "safetensors",
    "numpy",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-genai",
    "peft",
    "polygraphy",
    "tensorrt",
)


def default_cache_root() -> Path | None:
    root = default_root()
    return None if root is None else root / "pipeline"


def json_key(material: Any) -> str:
    text = json.dumps(material, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class Hasher:
    """SHA-256 of input files and directories, through the digest memo."""

    def __init__(self, memo: DigestMemo | None = None):
        self.memo = memo if memo is not None else DigestMemo()

    def file(self, path: Path) -> str:
        return file_digests(path, (ALGORITHM,), self.memo)[ALGORITHM]

    def tree(self, path: Path) -> dict[str, str]:
        """{relative name: digest} of a file, or of every file under a directory."""
        path = Path(path)
        if path.is_file():
            return {path.name: self.file(path)}
        return {rel: self.file(path / rel) for rel in files_under(path)}


def files_under(root: Path) -> list[str]:
    """Every file under `root` (links followed), as sorted relative POSIX names."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in filenames:
            full = Path(dirpath) / name
            if full.is_file():
                found.append(full.relative_to(root).as_posix())
    return sorted(found)


def tree_key(digests: dict[str, str]) -> str:
    """One digest for a set of files: the SHA-256 of their sorted names and digests."""
    return json_key(sorted(digests.items()))


def tool_version() -> dict[str, Any]:
    """lora-deploy's version and source digest, and the versions of the libraries it drives."""
    package = Path(__file__).resolve().parent.parent
    source = hashlib.sha256()
    for rel in files_under(package):
        if rel.endswith(".py"):
            source.update(rel.encode() + b"\0" + (package / rel).read_bytes() + b"\0")
    return {"lora_deploy": __version__, "source": source.hexdigest(), "libraries": library_versions(LIBRARIES)}


@dataclass
class Entry:
    """A stored step: its outputs under `out`, and what it said."""

    path: Path
    key: str
    detail: str
    result: dict[str, Any]
    files: dict[str, str]  # relative name -> digest
    seconds: float
    created: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.path / OUT


class StepCache:
    """Entries by step and key under `root/steps`."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def entry_dir(self, step: str, key: str) -> Path:
        return self.root / "steps" / step / key

    def lookup(self, step: str, key: str, hasher: Hasher) -> Entry | None:
        """The stored entry, if it is there and its files are intact."""
        path = self.entry_dir(step, key)
        try:
            data = json.loads((path / ENTRY).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("key") != key:
            return None
        files = data.get("files") or {}
        identities = data.get("identities") or {}
        for rel, digest in files.items():
            file = path / OUT / rel
            try:
                st = file.stat()
            except OSError:
                return None
            if identities.get(rel) != identity(st) and hasher.file(file) != digest:
                return None
        return Entry(
            path,
            key,
            data.get("detail", ""),
            data.get("result") or {},
            files,
            data.get("seconds", 0.0),
            data.get("created", ""),
            data.get("notes") or [],
        )

    def staging(self, step: str, key: str) -> staging_dir:
        """Where a step writes a new entry: a locked hidden sibling, renamed into place
        when the block succeeds (an entry of the same key is replaced)."""
        target = self.entry_dir(step, key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise output_error(target.parent, exc, "cannot create the pipeline cache") from exc
        return staging_dir(target, overwrite=True)


def identity(st: os.stat_result) -> list[int]:
    """What a stored file must still have for a hit to be taken without hashing it."""
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def write_entry(
    tmp: Path, key: str, detail: str, result: dict, files: dict[str, str], seconds: float, created: str, notes=()
) -> None:
    identities = {rel: identity((tmp / OUT / rel).stat()) for rel in files}
    data = {
        "format": CACHE_FORMAT,
        "key": key,
        "created": created,
        "detail": detail,
        "result": result,
        "seconds": seconds,
        "notes": list(notes),
        "files": files,
        "identities": identities,
    }
    (tmp / ENTRY).write_text(json.dumps(data, indent=1, default=str) + "\n")


def link_tree(src: Path, dest: Path) -> None:
    """Every file under `src` into `dest` (same relative names): hard links where the file
    system allows, copies where not (another file system)."""
    for rel in files_under(src):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src / rel, target)
        except FileExistsError:
            raise InternalError(f"{target}: written by two steps") from None
        except OSError:
            shutil.copy2(src / rel, target)
