"""An ONNX file and the ``<name>.data`` file that may come with it: the output policy for
the pair, moving a staged pair into place, and reading the model (io/onnx_proto.py).
Nothing here imports torch or the onnx package, so `merge --onnx-like` (export/like.py)
starts without them."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lora_deploy.errors import BadInputError
from lora_deploy.io import staging
from lora_deploy.io.onnx_proto import read_model


def check_output(path: Path, inputs: Iterable[str | os.PathLike | None] = (), overwrite: bool = False) -> None:
    """The output policy (lora_deploy.io.staging.check_output) for an ONNX file and the
    ``<name>.data`` file that may come with it; call it before the export's work."""
    staging.check_parent(path)
    for output in (path, path.with_name(f"{path.name}.data")):
        staging.check_output(output, inputs, overwrite)


def move_into_place(tmp_path: Path, path: Path, external: bool, overwrite: bool = False) -> None:
    """Move the data file first, then the model, so a reader of the final model never
    sees it without its weights; with overwrite, drop a stale data file. Without it
    both are created only where nothing is (staging.place_file)."""
    data_name = f"{path.name}.data"
    final_data = path.with_name(data_name)
    if external:
        staging.place_file(tmp_path.with_name(data_name), final_data, overwrite)
    try:
        staging.place_file(tmp_path, path, overwrite)
    except BaseException:
        if external and not overwrite:  # created by us a moment ago: nobody else's
            final_data.unlink(missing_ok=True)
        raise
    if overwrite and not external and final_data.exists():
        final_data.unlink()  # left over from an earlier large export to this path


def load_model(path: Path) -> Any:
    """The ModelProto of an ONNX file, without its external data (onnx.load with
    load_external_data=False); not a model: BadInputError."""
    try:
        return read_model(path)
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except Exception as err:  # protobuf raises DecodeError and others
        raise BadInputError(f"{path}: not an ONNX model ({type(err).__name__})") from err
