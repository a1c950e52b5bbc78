"""`--inputs FILE.npz`: named arrays saved with np.savez (tokenized text, recorded
observations), read without unpickling anything. The one reader of such files: verify's
golden inputs (proof.inputs), a plain module's example inputs (export.plain, verify
--module) and bench's inputs each check the arrays against their model afterwards."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from lora_deploy.arrays import all_finite
from lora_deploy.errors import BadInputError
from lora_deploy.util import first_line


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{name: array} of an .npz archive, each array numeric, of rank >= 1, not empty and
    (floats) finite, C-contiguous;
    anything else is BadInputError in one line starting `--inputs PATH:`. Never unpickles."""
    path = Path(path)
    where = f"--inputs {path}"
    if not path.is_file():
        raise BadInputError(f"{where}: {'a directory, not a file' if path.is_dir() else 'file not found'}")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):  # a bare .npy array
            raise BadInputError(f"{where}: not an .npz archive of named arrays (np.savez)")
        with archive:
            arrays = {name: archive[name] for name in archive.files}
    except ValueError as exc:  # object arrays need pickle, which is never allowed
        raise BadInputError(f"{where}: cannot be read without pickle ({first_line(exc)})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise BadInputError(f"{where}: not a readable .npz file ({type(exc).__name__}: {first_line(exc)})") from None
    if not arrays:
        raise BadInputError(f"{where}: holds no arrays")
    for name, arr in arrays.items():
        if arr.ndim == 0 or arr.dtype.kind not in "biuf":
            raise BadInputError(f"{where}: {name!r} must be a numeric array of rank >= 1, got {arr.dtype} {arr.shape}")
        if arr.size == 0:  # nothing to run, so nothing any check could measure
            raise BadInputError(f"{where}: {name!r} is empty, shape {arr.shape}")
        native = arr.astype(arr.dtype.newbyteorder("="), copy=False)  # all_finite reads native floats
        if not all_finite(native):  # outputs on NaN/Inf inputs cannot be compared
            raise BadInputError(f"{where}: {name!r} holds NaN or Inf values")
    # After the rank check: ascontiguousarray turns a rank-0 array into shape (1,).
    return {name: np.ascontiguousarray(arr) for name, arr in arrays.items()}
