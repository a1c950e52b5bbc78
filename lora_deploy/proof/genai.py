"""`lora-deploy verify BASE ADAPTER --genai DIR --generate N`: an onnxruntime-genai folder's
greedy generation against PEFT's unmerged `generate`, through lora_deploy.proof.generate.

A merged folder (no LoRA inputs) is checked against base + adapter. A dynamic folder
(`export genai --dynamic-adapters`) twice: with ADAPTER's .onnx_adapter active against base +
adapter, and with none active against the base. The adapter file is the folder's own when its
genai-manifest.json lists one built from ADAPTER's exact bytes (the shipped file is what is
checked); otherwise ADAPTER is packed for the folder's graph on the fly.

Tolerances follow the folder's dtype, as verify's do: float32 or float16 by its logits,
and the loosest row (bfloat16's) for int4-quantized weights, whose tokens need not match.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lora_deploy.backends.onnxrt.genai import genai_generator
from lora_deploy.backends.onnxrt.genai_folder import GENAI_MANIFEST, read_genai_config
from lora_deploy.backends.onnxrt.lora_format import pack_adapter, read_graph_inputs
from lora_deploy.compare import check_tolerances, tolerance
from lora_deploy.dtypes import BY_ONNX
from lora_deploy.errors import BadInputError
from lora_deploy.io.provenance import artifact_hashes
from lora_deploy.proof.generate import Candidate, verify_generation
from lora_deploy.proof.verify import VerifyReport, require_cpu

MANIFEST = GENAI_MANIFEST  # written by lora_deploy.export.genai
QUANTIZED = "bfloat16"  # the tolerance row for int4 weights: the loosest the table has


def decoder_path(folder: str | os.PathLike) -> Path:
    """The folder's decoder graph, as genai_config.json names it."""
    config = read_genai_config(folder)
    try:
        return Path(folder) / config["model"]["decoder"]["filename"]
    except (KeyError, TypeError):
        raise BadInputError(f"{Path(folder) / 'genai_config.json'}: no model.decoder.filename") from None


def genai_dtype(folder: str | os.PathLike) -> str:
    """The dtype name whose tolerances apply: the logits' dtype, or QUANTIZED for int4 weights."""
    import onnx

    proto = onnx.load(str(decoder_path(folder)), load_external_data=False)
    if any(node.op_type == "MatMulNBits" for node in proto.graph.node):
        return QUANTIZED
    logits = next((o for o in proto.graph.output if o.name == "logits"), None)
    row = BY_ONNX.get(logits.type.tensor_type.elem_type) if logits is not None else None
    return row.name if row is not None else "float32"


def stored_adapter(folder: Path, adapter_dir: str | os.PathLike) -> Path | None:
    """The folder's .onnx_adapter built from exactly ADAPTER's files, if its manifest lists one."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    wanted = artifact_hashes(adapter_dir)["sha256"]
    for entry in manifest.get("adapters", []) if isinstance(manifest, dict) else []:
        try:
            same = entry["source"]["sha256"] == wanted
            path = folder / entry["file"]
        except (KeyError, TypeError):
            continue
        if same and path.is_file():
            return path
    return None


@contextlib.contextmanager
def genai_candidates(adapter_dir: str | os.PathLike, folder: str | os.PathLike) -> Iterator[list[Candidate]]:
    """The generators to check for a genai folder (see the module docstring)."""
    folder = Path(folder)
    graph = decoder_path(folder)
    if not read_graph_inputs(graph).names:
        yield [Candidate("onnxruntime-genai", genai_generator(folder))]
        return
    with tempfile.TemporaryDirectory() as tmp:
        packed = stored_adapter(folder, adapter_dir)
        label = f"onnxruntime-genai, {packed.name} active" if packed else "onnxruntime-genai, ADAPTER packed, active"
        if packed is None:
            packed = pack_adapter(
                adapter_dir, Path(tmp) / "adapter.onnx_adapter", onnx_path=graph, dtype=lora_dtype(graph)
            )
        yield [
            Candidate(label, genai_generator(folder, packed)),
            Candidate("onnxruntime-genai, no adapter", genai_generator(folder), adapter_active=False),
        ]


def lora_dtype(graph: Path) -> str:
    """The dtype of a dynamic graph's LoRA inputs (what an adapter file for it must hold)."""
    dtypes = {dtype for _, dtype in read_graph_inputs(graph).overridable.values()}
    return dtypes.pop() if len(dtypes) == 1 else "float32"


def verify_genai(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    genai_dir: str | os.PathLike,
    n_new: int,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    **others,
) -> VerifyReport:
    """verify_generation with the genai folder's candidates (and any other artifact in
    `others`), at the folder's tolerances unless atol/rtol are given."""
    require_cpu("--genai", **others)  # before the folder is opened
    check_tolerances(atol, rtol)
    dtype = genai_dtype(genai_dir)
    row = tolerance(dtype)
    atol = row.atol if atol is None and dtype != "float32" else atol
    rtol = row.rtol if rtol is None and dtype != "float32" else rtol
    with genai_candidates(adapter_dir, genai_dir) as candidates:
        report = verify_generation(base_dir, adapter_dir, n_new, candidates=candidates, atol=atol, rtol=rtol, **others)
    report.inputs["genai"] = str(genai_dir)
    report.artifacts["genai"] = artifact_hashes(genai_dir)
    return report
