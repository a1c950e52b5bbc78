"""Bases that are one file, not a checkpoint directory: a plain torch state dict
(`.pt`/`.pth`/`.bin`, what `torch.save(module.state_dict())` writes) or a single
`.safetensors` file, and the side files given with them (`merge --side-file`).

The merge reads checkpoint directories (io.checkpoint), so a file base is presented as
one: a private temporary directory named after the file's stem holding `model.safetensors`
(a symlink to a safetensors base; a pickle is read weights-only, never unpickled as
objects, and written there as safetensors). The manifest still names and hashes the file
the user gave. Side files (dataset statistics, a separately saved head, a normalizer) are
copied next to the merged weights byte for byte and hashed as inputs and outputs.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lora_deploy.errors import BadInputError
from lora_deploy.io.checkpoint import SINGLE_FILE, read_header

PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
# Names the merge writes itself: a side file may not take one.
RESERVED = ("merge-manifest.json", "README.md", SINGLE_FILE, "model.safetensors.index.json")


@dataclass(frozen=True)
class BaseSource:
    """Where the merge reads the base (`read_dir`) and, for a file base, that file."""

    read_dir: Path
    file: Path | None = None


@contextmanager
def base_source(base: Path) -> Iterator[BaseSource]:
    """A checkpoint directory as is; a single file as a temporary checkpoint directory."""
    if base.is_dir():
        yield BaseSource(base)
        return
    if not base.is_file():
        raise BadInputError(f"base ({base}): not found")
    if base.suffix not in PICKLE_SUFFIXES + (SAFETENSORS_SUFFIX,):
        raise BadInputError(
            f"base ({base}): a file base is a .safetensors file or a .pt/.pth/.bin state dict (or give a directory)"
        )
    with tempfile.TemporaryDirectory(prefix="lora-deploy-base-") as tmp:
        read_dir = Path(tmp) / (base.stem or "base")  # the model card names the base by its directory
        read_dir.mkdir()
        if base.suffix == SAFETENSORS_SUFFIX:
            read_header(base)  # refused in one line before anything else
            os.symlink(base.resolve(), read_dir / SINGLE_FILE)
        else:
            write_state_dict(base, read_dir / SINGLE_FILE)
        yield BaseSource(read_dir, base)


def write_state_dict(path: Path, dest: Path) -> None:
    """A pickle state dict, loaded weights-only (objects refused in one line), as safetensors."""
    from safetensors.torch import save_file

    from lora_deploy.adapter.read import read_pickle_weights_only
    from lora_deploy.arrays import to_torch
    from lora_deploy.errors import AdapterError

    try:
        arrays = read_pickle_weights_only(path)
    except AdapterError as err:  # its wording says "adapter"-neutral things; name the role
        raise BadInputError(f"base {err}") from None
    if not arrays:
        raise BadInputError(f"base ({path}): the state dict holds no tensors")
    # Tied tensors (one storage, two names) are written as separate copies, as torch.save
    # read back gives them; the merge then treats each name as its own tensor.
    save_file({name: to_torch(array).contiguous().clone() for name, array in arrays.items()}, str(dest))


def check_side_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Side files to copy into the output: existing files, distinct names, none that the
    merge writes itself."""
    out: list[Path] = []
    for item in paths:
        path = Path(item)
        if not path.is_file():
            raise BadInputError(f"side file {path}: not a file")
        if path.name in RESERVED or path.name.endswith(SAFETENSORS_SUFFIX):
            raise BadInputError(f"side file {path}: {path.name} is a name the merged checkpoint uses itself")
        if any(p.name == path.name for p in out):
            raise BadInputError(f"side file {path}: two side files named {path.name}")
        out.append(path)
    return out
