"""ONNX Runtime's multi-LoRA convention: how LoRA weights are named, oriented and packed.

Every targeted layer of an adapter graph takes

    <module>.lora_A.weight   [in_features, rank]   = PEFT's lora_A.weight transposed
    <module>.lora_B.weight   [rank, out_features]  = (scaling * PEFT's lora_B.weight) transposed
    <module>.lora_B.bias     [out_features]        = scaling * PEFT's lora_B.bias
                                                     (only in graphs exported with lora_bias)

as overridable initializers: graph inputs with a same-named rank-0 default. `pack_adapter`
writes a PEFT adapter in ONNX Runtime's adapter format (.onnx_adapter) under those names,
scaling folded into B; `check_parameters` is the one check that an adapter fits a graph,
used when packing, loading into a session, and benchmarking.

A graph exported with a fixed rank (export onnx --module --dynamic-adapters --static:
every dim a number, for TensorRT) takes A [in, R] and B [R, out] with all-zero defaults
of rank R. Packed for it, an adapter of a smaller rank r is zero-padded to R (A's extra
columns and B's extra rows are 0, so x @ A @ B adds exactly the same); a larger rank is
refused. With a graph, the packed dtype defaults to the graph's LoRA dtype.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lora_deploy.adapter.plan import choose_prefix
from lora_deploy.adapter.read import Adapter, load_adapter
from lora_deploy.adapter.variants import refuse_non_additive
from lora_deploy.dtypes import BY_ONNX, BY_ORT
from lora_deploy.dtypes import dtype as dtype_row
from lora_deploy.errors import AdapterError, BadInputError, NonFiniteError, OutputError
from lora_deploy.io.staging import check_output, write_path_atomic
from lora_deploy.merge.delta import f32
from lora_deploy.options import PACK_DTYPES  # the dtypes A and B may be packed in (pack --dtype)
from lora_deploy.util import first_line

# The adapter-graph exporters' metadata_props key.
METADATA_KEY = "lora_deploy"
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
BIAS_SUFFIX = ".lora_B.bias"

# (shape, dtype name) per parameter or graph input; a graph's dims may be symbolic (str).
Shapes = Mapping[str, tuple[list, str]]


def split_lora_name(name: str) -> tuple[str, str]:
    """'m.lora_A.weight' -> ('m', '.lora_A.weight')."""
    for suffix in (A_SUFFIX, B_SUFFIX, BIAS_SUFFIX):
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    raise ValueError(f"{name!r} is not a LoRA input name")


def adapter_parameters(adapter: Adapter, dtype=np.float32) -> dict[str, np.ndarray]:
    """A^T, (s B)^T and s bias per module, computed in float32 and rounded once."""
    out = {}
    for lora in adapter.modules.values():
        scaling = np.float32(lora.scaling)
        arrays = {
            lora.name + A_SUFFIX: f32(lora.a).T,
            lora.name + B_SUFFIX: (f32(lora.b) * scaling).T,
        }
        if lora.bias is not None:
            arrays[lora.name + BIAS_SUFFIX] = f32(lora.bias) * scaling
        for name, values in arrays.items():
            array = np.ascontiguousarray(values.astype(dtype))
            if not np.isfinite(array).all():
                raise NonFiniteError(f"{adapter.path}: {name} overflows {np.dtype(dtype).name}")
            out[name] = array
    return out


@dataclass
class GraphInputs:
    """Overridable inputs of a saved graph: name -> (dims, dtype name).

    `uncomputed`: modules of the exported model that the graph's outputs do not depend
    on (e.g. BertModel's pooler in a feature-extraction graph), from the exporter's
    metadata; an adapter's LoRA there is skipped, not refused.

    `names`: for a graph whose LoRA inputs are named otherwise (an onnxruntime-genai
    folder's `model.layers.0.attn.q_proj.lora_A.MatMul.weight`), our name -> the graph's,
    from its metadata; `overridable` lists those inputs under our names
    (`model.layers.0.self_attn.q_proj.lora_A.weight`) and `graph_names` maps back.
    """

    path: Path
    overridable: dict[str, tuple[list, str]]
    uncomputed: tuple[str, ...] = ()
    names: dict[str, str] = field(default_factory=dict)
    required: tuple[str, ...] = ()  # LoRA inputs without a default (export --lora-defaults none, for TensorRT)

    def graph_names(self, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Parameters renamed from our names to the graph's input names."""
        return {self.names.get(name, name): array for name, array in params.items()}

    def lora_dtype(self) -> str:
        """The dtype of the graph's LoRA inputs (float32 when it has none)."""
        dtypes = {dtype for name, (_, dtype) in self.overridable.items() if name.endswith(A_SUFFIX)}
        return dtypes.pop() if len(dtypes) == 1 else "float32"


def read_graph_inputs(onnx_path: str | os.PathLike) -> GraphInputs:
    """Inputs that have a default initializer, and LoRA inputs without one (`required`),
    read without loading the weights."""
    import onnx

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise BadInputError(f"{onnx_path}: ONNX file not found")
    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # OSError, protobuf's DecodeError and friends
        raise BadInputError(f"{onnx_path}: not a readable ONNX model ({type(exc).__name__})") from None
    initialized = {t.name for t in proto.graph.initializer}
    overridable = {}
    required = []
    for value in proto.graph.input:
        if value.name in initialized or is_lora_name(value.name):
            if value.name not in initialized:
                required.append(value.name)
            tensor = value.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim]
            row = BY_ONNX.get(tensor.elem_type)
            overridable[value.name] = (dims, row.name if row else str(tensor.elem_type))
    info = graph_metadata(next((e.value for e in proto.metadata_props if e.key == METADATA_KEY), None))
    names = {ours: theirs for ours, theirs in info["names"].items() if theirs in overridable}
    renamed = set(names.values())
    overridable = {ours: overridable[theirs] for ours, theirs in names.items()} | {
        name: value for name, value in overridable.items() if name not in renamed
    }
    return GraphInputs(onnx_path, overridable, tuple(info["uncomputed"]), names, tuple(required))


def is_lora_name(name: str) -> bool:
    """Whether a graph input is named as a LoRA input (<module>.lora_A.weight etc.)."""
    return name.endswith((A_SUFFIX, B_SUFFIX, BIAS_SUFFIX))


def graph_metadata(text: str | None) -> dict:
    """What an adapter-graph exporter wrote under METADATA_KEY ({} when absent or unreadable)."""
    try:
        info = json.loads(text) if text else {}
    except ValueError:
        return {}
    if not isinstance(info, dict):
        return {}
    if not isinstance(info.get("uncomputed", []), list):
        info["uncomputed"] = []
    info["uncomputed"] = [str(m) for m in info.get("uncomputed", [])]
    names = info.get("names", {})
    info["names"] = {str(k): str(v) for k, v in names.items()} if isinstance(names, dict) else {}
    return info


def session_inputs(session) -> dict[str, tuple[list, str]]:
    """A session's overridable inputs, and its LoRA inputs without a default (a graph for
    TensorRT, export --lora-defaults none), in the same (dims, dtype name) form."""
    values = list(session.get_overridable_initializers())
    values += [a for a in session.get_inputs() if is_lora_name(a.name)]
    return {a.name: (list(a.shape), _ort_name(a.type)) for a in values}


def read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, tuple[list, str]], object]:
    """An .onnx_adapter's parameter shapes and the loaded onnxruntime.LoraAdapter."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: adapter file not found")
    try:
        params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
    except Exception as exc:  # onnxruntime raises its own types for a corrupt flatbuffer
        raise AdapterError(f"{path}: not an ONNX Runtime adapter file ({first_line(exc, 200)})") from None
    return {n: (list(v.shape()), _ort_name(v.data_type())) for n, v in params.items()}, adapter


def _ort_name(type_string: str) -> str:
    row = BY_ORT.get(type_string)
    return row.name if row else type_string


def check_parameters(params: Shapes, graph_inputs: Shapes, where, graph_name: str) -> None:
    """Adapter parameters against a graph's overridable inputs.

    Names must exist, static dims and dtype must match, and each module's A and B come
    together with one rank: ONNX Runtime would otherwise fail mid-run in a MatMul.
    """
    for name, (shape, dtype) in params.items():
        if name not in graph_inputs:
            hint = " (export the graph with lora_bias=True)" if name.endswith(BIAS_SUFFIX) else ""
            raise AdapterError(f"{where}: {name!r} is not a LoRA input of {graph_name}{hint}")
        dims, graph_dtype = graph_inputs[name]
        if len(dims) != len(shape) or any(isinstance(d, int) and d != n for d, n in zip(dims, shape)):
            shown = [d if isinstance(d, int) else "rank" for d in dims]
            raise AdapterError(
                f"{where}: {name} is {list(shape)} but {graph_name} expects {shown} (pack it with --onnx {graph_name})"
            )
        if dtype != graph_dtype:
            raise AdapterError(
                f"{where}: {name} is {dtype} but {graph_name} expects {graph_dtype} "
                f"(pack it with --dtype {graph_dtype})"
            )
    for name, (shape, _) in params.items():
        if not name.endswith(A_SUFFIX):
            continue
        b_name = name[: -len(A_SUFFIX)] + B_SUFFIX
        if b_name not in params or params[b_name][0][0] != shape[1]:
            other = "missing" if b_name not in params else f"rank {params[b_name][0][0]}"
            raise AdapterError(f"{where}: {name} has rank {shape[1]} but {b_name} is {other}")
    for name in params:
        if name.endswith(B_SUFFIX) and name[: -len(B_SUFFIX)] + A_SUFFIX not in params:
            raise AdapterError(f"{where}: {name} comes without its lora_A")


def pack_adapter(
    adapter_dir: str | os.PathLike,
    path: str | os.PathLike,
    *,
    onnx_path: str | os.PathLike | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    note: Callable[[str], None] | None = None,
) -> Path:
    """Write a PEFT adapter as an ONNX Runtime adapter file (.onnx_adapter).

    Layers the adapter does not target are absent and keep their rank-0 defaults. With
    `onnx_path`, every name must be an overridable input of that graph and fit its shape
    and dtype (`dtype` None: the graph's LoRA dtype; without a graph, float32); adapter
    module paths are renamed to the graph's (one leading component added or stripped)
    when needed; a graph with a fixed rank gets the adapter zero-padded to it. Modules
    of the model that the graph does not compute (BertModel's pooler in a
    feature-extraction graph) are left out, each reported by one line to `note`. An
    existing file is replaced only with
    overwrite=True, and never an input (lora_deploy.io.staging.check_output).
    """
    import onnxruntime as ort

    path = Path(path)
    if dtype is not None:
        dtype_row(dtype, PACK_DTYPES)
    inputs = [adapter_dir, onnx_path]
    check_output_file(path, inputs, overwrite)
    graph = read_graph_inputs(onnx_path) if onnx_path is not None else None
    dtype = dtype or (graph.lora_dtype() if graph is not None else "float32")
    row = dtype_row(dtype, PACK_DTYPES, "LoRA input dtype")
    adapter = load_adapter(adapter_dir)
    refuse_non_additive(adapter)
    params = adapter_parameters(adapter, row.numpy)
    if graph is not None:
        params = graph.graph_names(fit_to_graph(params, adapter, graph, dtype, note))
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(arr) for name, arr in params.items()})
    return write_path_atomic(path, lambda tmp: export_adapter_file(fmt, tmp), overwrite=overwrite, inputs=inputs)


def export_adapter_file(fmt, path: Path) -> None:
    """fmt.export_adapter(path); a failed write (a full disk) is an OutputError naming the
    file. ONNX Runtime reports it as a RuntimeError quoting its C++ source, not an OSError."""
    try:
        fmt.export_adapter(str(path))
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    except Exception as exc:  # onnxruntime's pybind11 error types
        text = str(exc)
        written = re.search(r"failed to write\W*(\d+) bytes", text, re.IGNORECASE)
        if written is None and "open" not in text.lower():
            raise  # not a write failure: a bug, reported as one
        raise OutputError(f"{path}: cannot write ({write_failure(path, written)})") from None


def write_failure(path: Path, written: re.Match | None) -> str:
    """Why ONNX Runtime could not write `path`, in words: a full disk where it is."""
    try:
        stats = os.statvfs(path.parent)
        full = stats.f_bavail * stats.f_frsize < (int(written.group(1)) if written else 1)
    except (OSError, AttributeError):  # AttributeError: no statvfs on this platform
        full = False
    if full:
        return "No space left on device"
    return f"ONNX Runtime failed to write {written.group(1)} bytes" if written else "ONNX Runtime cannot open it"


def check_output_file(path: Path, inputs: Iterable[str | os.PathLike | None] = (), overwrite: bool = False) -> None:
    """The output policy (check_output) for a file: a missing parent is created when it is written."""
    check_output(path, inputs, overwrite)
    if path.is_dir():
        raise BadInputError(f"{path}: is a directory; give a file path")


def fit_to_graph(
    params: dict[str, np.ndarray],
    adapter: Adapter,
    graph: GraphInputs,
    dtype: str,
    note: Callable[[str], None] | None = None,
) -> dict[str, np.ndarray]:
    """Rename parameters to the graph's module paths and check shapes and dtype.

    A module with no LoRA input that the exported model has but the graph does not
    compute (graph.uncomputed) is dropped and reported to `note`; any other module
    without a LoRA input is an error.
    """
    modules = {split_lora_name(n)[0]: None for n in graph.overridable if n.endswith(A_SUFFIX)}
    if not modules:
        raise AdapterError(
            f"{graph.path}: the graph has no LoRA inputs, so it is not a dynamic-adapter graph (export one with "
            "lora-deploy export onnx --dynamic-adapters)"
        )
    idle = {m: None for m in graph.uncomputed if m not in modules}
    known = {**modules, **idle}
    try:
        rename = choose_prefix(list(adapter.modules), known)
    except AdapterError:
        missing = first_unplaced(list(adapter.modules), known)
        raise AdapterError(
            f"{adapter.path}: module {missing} has no LoRA input in {graph.path.name} "
            "(adapter for another base, or a layer the graph was not exported to target)"
        ) from None
    out: dict[str, np.ndarray] = {}
    skipped: dict[str, None] = {}  # adapter module names, in order
    for name, array in params.items():
        module, suffix = split_lora_name(name)
        if rename(module) in idle:
            skipped[module] = None
            continue
        out[rename(module) + suffix] = array
    if not out:
        raise AdapterError(
            f"{adapter.path}: every module of the adapter is one {graph.path.name} does not compute "
            f"({', '.join(skipped)}): it would change nothing"
        )
    for module in skipped:
        if note is not None:
            note(f"skipped {module}: {graph.path.name} does not compute it, so its LoRA changes no output")
    out = pad_to_fixed_rank(out, graph, adapter.path)
    shapes = {n: (list(a.shape), dtype) for n, a in out.items()}
    check_parameters(shapes, graph.overridable, adapter.path, graph.path.name)
    return out


def pad_to_fixed_rank(params: dict[str, np.ndarray], graph: GraphInputs, where) -> dict[str, np.ndarray]:
    """A and B zero-padded to the rank a static graph fixes (A's extra columns and B's
    extra rows are zero: x @ A @ B is unchanged); a rank above it is refused."""
    out = dict(params)
    for name, a in params.items():
        if not name.endswith(A_SUFFIX) or name not in graph.overridable:
            continue
        fixed = graph.overridable[name][0][-1] if graph.overridable[name][0] else None
        if not isinstance(fixed, int) or a.ndim != 2 or a.shape[1] == fixed:
            continue
        if a.shape[1] > fixed:
            raise AdapterError(
                f"{where}: {name[: -len(A_SUFFIX)]} has rank {a.shape[1]} but {graph.path.name} fixes rank {fixed} "
                "(export the graph with --max-rank at least this)"
            )
        b_name = name[: -len(A_SUFFIX)] + B_SUFFIX
        out[name] = np.pad(a, ((0, 0), (0, fixed - a.shape[1])))
        if b_name in params:
            b = params[b_name]
            out[b_name] = np.pad(b, ((0, fixed - b.shape[0]), (0, 0)))
    return out


def first_unplaced(names: list[str], modules: Mapping[str, object]) -> str:
    """The first adapter module no graph layer matches, even with a prefix added or stripped."""
    for name in names:
        if not any(m == name or m.endswith("." + name) or name.endswith("." + m) for m in modules):
            return name
    return names[0]
