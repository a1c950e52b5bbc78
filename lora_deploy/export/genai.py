"""An onnxruntime-genai model folder (`lora-deploy export genai MODEL -o DIR`).

onnxruntime-genai's model builder turns a local Hugging Face checkpoint into a decoder
graph with a KV cache and fused operators (GroupQueryAttention, SkipSimplifiedLayer-
Normalization; int4 MatMulNBits at --precision int4), plus genai_config.json and the
tokenizer files: a folder `onnxruntime_genai.Model(DIR)` loads. A merged checkpoint is just
MODEL. The builder runs as `python -m onnxruntime_genai.models.builder` in a subprocess:
importing it in-process would append its own directory to sys.path (its top-level modules
`builders`, `quantization`, `loaders`... would shadow or be shadowed) and print to stdout.
It runs offline (HF_HUB_OFFLINE) into a staging directory, so DIR appears whole or not at all.

Dynamic adapters (`--dynamic-adapters --adapter A1 --adapter A2 ...`): the builder is given
the first adapter as `adapter_path`, which keeps q/k/v unfused and bakes that adapter into
the graph as plain MatMul weights, Aᵀ [in, r] and (s·B)ᵀ [r, out]. Those initializers are
then rewritten to ONNX Runtime's multi-LoRA convention: graph inputs with a symbolic rank
dimension, each backed by a same-named rank-0 initializer (with none active the graph is the
base model). Every adapter is packed (lora_format.pack_adapter, the one writer) into
`<name>.onnx_adapter` under the builder's names, which the graph's metadata maps to ours
(LORA_NAMES, in backends/onnxrt/genai.py), so `lora-deploy pack A --onnx DIR/model.onnx`
writes the same files.
At int4 the LoRA MatMuls are kept out of quantization (nodes_to_exclude) so they stay
overridable float weights. The baked values of the first adapter stay as unreferenced bytes
in model.onnx.data (rank x (in + out) per layer).

Precision: fp32 and int4 build for the CPU; the builder has no fp16 CPU target (its fp16
CPU graph fails in ONNX Runtime here), so fp16 builds for CUDA, and the folder's load check
runs it on the CPU (genai_config's providers cleared).

The folder records what was built from what in genai-manifest.json (inputs' and outputs'
SHA-256 via lora_deploy.io.provenance).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lora_deploy.adapter.read import Adapter, load_adapter
from lora_deploy.adapter.variants import refuse_non_additive
from lora_deploy.backends.onnxrt.genai import GENAI_INSTALL, LORA_NAMES, genai_generator, import_genai
from lora_deploy.backends.onnxrt.genai_folder import GENAI_MANIFEST, read_genai_config
from lora_deploy.backends.onnxrt.lora_format import A_SUFFIX, B_SUFFIX, METADATA_KEY, pack_adapter
from lora_deploy.dtypes import BY_ONNX
from lora_deploy.errors import AdapterError, BadInputError, ExportError
from lora_deploy.io.checkpoint import check_checkpoint
from lora_deploy.io.provenance import artifact_hashes, report_header
from lora_deploy.io.staging import staging_dir
from lora_deploy.modeling.tasks import load_config
from lora_deploy.util import first_line

SCHEMA = "lora-deploy.genai/1"
MANIFEST = GENAI_MANIFEST
BUILDER = "onnxruntime_genai.models.builder"
# --precision (lora_deploy.options.GENAI_PRECISIONS) -> the builder's execution provider (-e) for it.
PRECISIONS = {"fp32": "cpu", "fp16": "cuda", "int4": "cpu"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
CACHE = ".builder-cache"  # the builder's -c, inside the staging directory, removed before commit


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


_LORA_PATTERNS = [(_pattern(peft), node) for peft, node in LORA_NAMES]


def builder_node(module: str) -> str | None:
    """The builder's MatMul node path for a PEFT module path (None: no such LoRA layer)."""
    for pattern, node in _LORA_PATTERNS:
        match = pattern.fullmatch(module)
        if match:
            return node.format(i=match["i"])
    return None


def builder_weight(node: str, part: str) -> str:
    """'/model/layers.0/attn/q_proj', 'lora_A' -> 'model.layers.0.attn.q_proj.lora_A.MatMul.weight'."""
    return f"{node[1:].replace('/', '.')}.{part}.MatMul.weight"


@dataclass
class GenaiFolder:
    """What export_genai wrote: the folder, its build, and its adapter files by name."""

    path: Path
    precision: str
    execution_provider: str
    architecture: str
    adapters: dict[str, Path] = field(default_factory=dict)  # name -> .onnx_adapter (dynamic folders)
    lora_inputs: dict[str, str] = field(default_factory=dict)  # our name -> the graph's
    manifest: dict = field(default_factory=dict)

    @property
    def dynamic(self) -> bool:
        return bool(self.lora_inputs)


def export_genai(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    adapters: Sequence[str | os.PathLike] = (),
    precision: str = "fp32",
    overwrite: bool = False,
    note: Callable[[str], None] | None = None,
) -> GenaiFolder:
    """Build an onnxruntime-genai folder from MODEL (a checkpoint directory) at `out`.

    With `adapters`, a dynamic folder: the first adapter's targets become overridable LoRA
    inputs and every adapter is written as `<its directory name>.onnx_adapter`. Refused
    before any work (BadInputError, exit 2): an architecture the installed builder does
    not dispatch on, a checkpoint without tokenizer files, an adapter that is not additive
    LoRA, targets a layer the builder has no LoRA name for, or a target the first adapter
    lacks. `out` follows the output policy (never an input; replaced only with overwrite).
    """
    og = import_genai()
    model = Path(model)
    if precision not in PRECISIONS:
        raise BadInputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    architecture = check_model(model)
    if adapters and importlib.util.find_spec("peft") is None:  # the builder loads the first adapter with PEFT
        raise BadInputError(f"--dynamic-adapters: the model builder needs PEFT, not installed here: {GENAI_INSTALL}")
    loaded = [load_adapter(a) for a in adapters]
    names = adapter_names(adapters)
    modules = lora_modules(loaded)
    provider = PRECISIONS[precision]
    with staging_dir(Path(out), overwrite=overwrite, inputs=[model, *adapters]) as tmp:
        cache = tmp / CACHE
        command = builder_command(model, tmp, precision, provider, cache, adapters[0] if adapters else None, modules)
        run_builder(command, cache)
        shutil.rmtree(cache, ignore_errors=True)
        lora_inputs: dict[str, str] = {}
        files: dict[str, Path] = {}
        if adapters:
            onnx_path = tmp / read_genai_config(tmp)["model"]["decoder"]["filename"]
            lora_inputs, dtype = make_switchable(onnx_path, modules)
            for name, adapter_dir in zip(names, adapters):
                files[name] = pack_adapter(
                    adapter_dir, tmp / f"{name}.onnx_adapter", onnx_path=onnx_path, dtype=dtype, note=note
                )
        check_loads(tmp, files)
        folder = GenaiFolder(Path(out), precision, provider, architecture, lora_inputs=lora_inputs)
        folder.manifest = manifest(folder, og.__version__, model, adapters, names, loaded, tmp)
        (tmp / MANIFEST).write_text(json.dumps(folder.manifest, indent=2) + "\n")
    folder.adapters = {name: folder.path / path.name for name, path in files.items()}
    return folder


def check_model(model: Path) -> str:
    """The checkpoint's architecture, when the installed builder supports it; else BadInputError."""
    config = load_config(model)
    check_checkpoint(model)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    supported = builder_architectures()
    if architecture is None or (supported and architecture not in supported):
        known = [a for a in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM") if a in supported]
        raise BadInputError(
            f"{model / 'config.json'}: architecture {architecture or '(none listed)'} is not one of the "
            f"{len(supported)} onnxruntime-genai's model builder supports "
            f"({', '.join(known or sorted(supported)[:3])}, ...)"
        )
    if not any((model / name).is_file() for name in TOKENIZER_FILES):
        raise BadInputError(f"{model}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); the genai folder needs one")
    return architecture


def builder_architectures() -> set[str]:
    """The architectures the installed builder dispatches on, read from its source (importing
    it would change sys.path, see the module docstring); empty when not found, and the
    builder's own refusal then decides."""
    spec = importlib.util.find_spec("onnxruntime_genai")
    if spec is None or not spec.submodule_search_locations:
        return set()
    source = Path(list(spec.submodule_search_locations)[0]) / "models" / "builder.py"
    try:
        text = source.read_text()
    except OSError:
        return set()
    return set(re.findall(r'config\.architectures\[0\] == "(\w+)"', text))


def adapter_names(adapters: Sequence[str | os.PathLike]) -> list[str]:
    """Each adapter's name (og.Adapters, and its file's stem): its directory's name."""
    names = [re.sub(r"[^A-Za-z0-9._-]", "_", Path(os.path.abspath(a)).name) or "adapter" for a in adapters]
    for name in names:
        if names.count(name) > 1:
            raise BadInputError(f"two adapters are named {name!r} (by their directories): rename one")
    return names


def lora_modules(adapters: Sequence[Adapter]) -> dict[str, str]:
    """PEFT module -> builder node for the first adapter's targets, after checking every
    adapter: additive LoRA only, on layers the builder names, within the first one's targets."""
    if not adapters:
        return {}
    for adapter in adapters:
        refuse_non_additive(adapter)
        for module in adapter.modules:
            if builder_node(module) is None:
                raise AdapterError(
                    f"{adapter.path}: module {module} has no LoRA layer in an onnxruntime-genai graph "
                    "(dynamic adapters: the q/k/v/o and gate/up/down projections of LLaMA-family decoders)"
                )
    first = adapters[0]
    for adapter in adapters[1:]:
        extra = [m for m in adapter.modules if m not in first.modules]
        if extra:
            raise AdapterError(
                f"{adapter.path}: targets {extra[0]}, which the first adapter ({first.path}) does not; the graph "
                "takes LoRA inputs only where the first --adapter has them (give the widest one first)"
            )
    return {module: builder_node(module) for module in first.modules}


def builder_command(
    model: Path, out: Path, precision: str, provider: str, cache: Path, adapter, modules: dict[str, str]
) -> list[str]:
    """`python -m onnxruntime_genai.models.builder ...` for this build."""
    # Absolute: the builder runs in `cache`, and reads the tokenizer from a path it is given.
    command = [sys.executable, "-m", BUILDER, "-i", os.path.abspath(model), "-o", os.path.abspath(out)]
    command += ["-p", precision, "-e", provider, "-c", os.path.abspath(cache)]
    extra = []
    if adapter is not None:
        extra.append(f"adapter_path={os.path.abspath(adapter)}")
        if precision == "int4":  # keep the LoRA MatMuls float: they become inputs
            nodes = [f"{node}/{part}/MatMul" for node in modules.values() for part in ("lora_A", "lora_B")]
            extra.append("nodes_to_exclude=" + ",".join(nodes))
    return command + (["--extra_options", *extra] if extra else [])


def run_builder(command: list[str], cache: Path) -> None:
    """Run the builder offline; its output goes to a log, its failure becomes ExportError (or
    BadInputError for an architecture it does not support) with its last error line."""
    cache.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log = cache / "builder.log"
    with open(log, "wb") as sink:
        # A Ctrl-C or SIGTERM raised while waiting kills the builder (subprocess.run does) and
        # the staging directory is removed by the caller.
        done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=cache, check=False)
    if done.returncode == 0:
        return
    reason = builder_error(log.read_text(errors="replace"))
    if "not currently supported" in reason:
        raise BadInputError(f"onnxruntime-genai's model builder does not support this model: {reason}")
    raise ExportError(f"onnxruntime-genai's model builder failed (exit {done.returncode}): {reason}")


def builder_error(text: str) -> str:
    """The builder's error line: the last 'SomethingError: ...' line, else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b", line)]
    return first_line(RuntimeError((errors or lines or ["no output"])[-1]), 300)


def make_switchable(onnx_path: Path, modules: dict[str, str]) -> tuple[dict[str, str], str]:
    """Turn the baked LoRA initializers into overridable inputs (symbolic rank, rank-0
    default) and record our names for them in the graph's metadata. Returns (our name ->
    graph name, the LoRA inputs' dtype name). The weights file is not rewritten.

    The builder also declares x·A's shape with the baked rank ([batch, sequence, r]); ONNX
    Runtime plans buffers by it (another rank then fails: "Shape mismatch attempting to
    re-use buffer"), so that dimension becomes the symbolic rank too."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {t.name: t for t in proto.graph.initializer}
    shapes = {v.name: v for v in proto.graph.value_info}
    consumers: dict[str, list[str]] = {}
    for graph_node in proto.graph.node:
        for name in graph_node.input:
            consumers.setdefault(name, []).extend(graph_node.output)
    names: dict[str, str] = {}
    dtypes = set()
    for module, node in modules.items():
        rank = "rank_" + node[1:].replace("/", "_").replace(".", "_")
        for part, suffix in (("lora_A", A_SUFFIX), ("lora_B", B_SUFFIX)):
            name = builder_weight(node, part)
            if name not in initializers:
                raise ExportError(f"{onnx_path.name}: the builder wrote no {name} for {module} (builder version?)")
            tensor = initializers[name]
            inner, outer = tensor.dims
            row = BY_ONNX[tensor.data_type]
            shape, empty = ([inner, rank], (inner, 0)) if part == "lora_A" else ([rank, outer], (0, outer))
            proto.graph.initializer.remove(tensor)
            proto.graph.initializer.append(numpy_helper.from_array(np.zeros(empty, dtype=row.numpy), name))
            proto.graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, shape))
            if part == "lora_A":
                for output in consumers.get(name, []):
                    dims = shapes[output].type.tensor_type.shape.dim if output in shapes else []
                    if dims:
                        dims[-1].Clear()
                        dims[-1].dim_param = rank
            names[module + suffix] = name
            dtypes.add(row.name)
    info = {"format": "genai", "version": 1, "names": names, "uncomputed": []}
    entry = next((e for e in proto.metadata_props if e.key == METADATA_KEY), None)
    if entry is None:
        entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(info)
    onnx.save(proto, str(onnx_path))
    if len(dtypes) != 1:
        raise ExportError(f"{onnx_path.name}: LoRA weights of several dtypes ({', '.join(sorted(dtypes))})")
    return names, dtypes.pop()


def check_loads(folder: Path, adapter_files: dict[str, Path]) -> None:
    """The folder loads in onnxruntime-genai (on the CPU) and generates a token, with no
    adapter and with each adapter file active."""
    bos = read_genai_config(folder)["model"].get("bos_token_id")
    prompt = [[int(bos[0] if isinstance(bos, list) else bos or 0)]]
    genai_generator(folder)(prompt, 1)
    for name, path in adapter_files.items():
        genai_generator(folder, path, name)(prompt, 1)


def manifest(
    folder: GenaiFolder,
    builder_version: str,
    model: Path,
    adapters: Sequence[str | os.PathLike],
    names: list[str],
    loaded: list[Adapter],
    staged: Path,
) -> dict:
    """genai-manifest.json: what was built, how, from what (SHA-256 of inputs and outputs)."""
    written = artifact_hashes(staged)
    return {
        **report_header(SCHEMA),
        "builder": {"package": "onnxruntime-genai", "version": builder_version, "module": BUILDER},
        "precision": folder.precision,
        "execution_provider": folder.execution_provider,
        "architecture": folder.architecture,
        "model": artifact_hashes(model),
        "dynamic_adapters": folder.dynamic,
        "adapters": [
            {
                "name": name,
                "file": f"{name}.onnx_adapter",
                "modules": len(adapter.modules),
                "source": artifact_hashes(path),
            }
            for name, path, adapter in zip(names, adapters, loaded)
        ],
        "lora_inputs": folder.lora_inputs,
        "output": {"path": str(folder.path), "sha256": written["sha256"]},
    }
