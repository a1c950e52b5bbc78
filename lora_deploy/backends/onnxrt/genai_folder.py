"""An onnxruntime-genai model folder's own files: its config and lora-deploy's manifest.

Apart from genai.py (which imports numpy and, on use, onnxruntime-genai), so that `merge
--onnx-like` can read a folder before it imports anything heavy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lora_deploy.errors import BadInputError
from lora_deploy.util import first_line

GENAI_CONFIG = "genai_config.json"
GENAI_MANIFEST = "genai-manifest.json"  # what `export genai` built, from what (export/genai.py)


def read_genai_config(model_dir: str | os.PathLike) -> dict:
    """A folder's genai_config.json; BadInputError when it is not a genai model folder."""
    path = Path(model_dir) / GENAI_CONFIG
    if not path.is_file():
        raise BadInputError(f"{model_dir}: no {GENAI_CONFIG}: not an onnxruntime-genai model folder")
    try:
        config = json.loads(path.read_text())
        model = config["model"]
        int(model["vocab_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInputError(f"{path}: not a readable onnxruntime-genai config ({first_line(exc, 120)})") from None
    return config
