"""Quantized paths through the streaming merge, as one per-tensor hook (`QuantTransform`).

* `--onto nf4|fp4|int8`: every Linear weight bitsandbytes would have quantized for
  training (transformers' rule: all Linear layers but the output head, less
  `--skip-modules`) is replaced by dequant(quant(W)) (merge/bnb.py) before the adapter's
  update is added; untargeted ones are written as dequant(quant(W)) too. Output dtypes as
  in a plain merge.
* a block-scaled FP8 base (io/quant.py): its weights are dequantized and merged in
  float32, then written as bfloat16 (the scales dropped, `quantization_config` removed
  from config.json), or with `--requantize fp8` as float8 with fresh block scales under
  the same names (untouched FP8 weights are copied byte for byte with their scales).

For each layer it touches, the manifest's "quantization" section records
rel_error = ||written - (W0 + dW)||_F / ||W0 + dW||_F, against the exact float32 merge on
the original (for FP8: dequantized) W0, and for --onto also onto_vs_original = ||written -
plain merge as written||_F / ||plain merge||_F: what merging onto the dequantized weights
changes compared with merging onto the original ones.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from lora_deploy._native import kernel
from lora_deploy.arrays import round_to_float16, widen_float16
from lora_deploy.dtypes import BY_NAME
from lora_deploy.errors import BadInputError, OutputError
from lora_deploy.io.checkpoint import DTYPES, FLOAT_DTYPES, Checkpoint, TensorInfo
from lora_deploy.io.digests import file_digests
from lora_deploy.io.quant import (
    FP8_CODE,
    FP8_SCALE_SUFFIX,
    FloatView,
    block_size,
    fp8_dequantize,
    fp8_quantize,
    quantized_format,
    training_quantization_hint,
)
from lora_deploy.io.stream import OutputBuffers, OutputTensor, tensor_bytes
from lora_deploy.merge.blocks import for_each_block
from lora_deploy.merge.bnb import NATIVE_KINDS, BnbSpec, ErrorSums, fake_quant, raw_bits, store, widen
from lora_deploy.merge.delta import (
    BLOCK_ELEMENTS,
    block_scratch,
    checked_finite,
    factors,
    lora_norm,
    merged_weight,
)

REQUANTIZE_FORMATS = ("fp8",)
ERROR_CHUNK = 256 * 1024  # values per chunk of the error sums: float32 chunks stay in cache
# Module names that are not Linear layers bitsandbytes quantizes: embeddings (any path
# component naming one) and output heads (transformers leaves the output embedding and
# the last module unconverted).
EMBEDDING_PART = re.compile(r"(embed|^wte$|^wpe$|^shared$)")
HEAD_MODULES = {"lm_head", "embed_out", "output", "score", "classifier", "qa_outputs"}
# Architectures whose Linear layers are GPT-2's Conv1D ([in, out]): transformers
# transposes those weights before bitsandbytes quantizes them.
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}


def is_quantized_linear(name: str, info: TensorInfo, skip_modules: tuple[str, ...] = ()) -> bool:
    """Whether transformers' bitsandbytes integration would quantize this weight."""
    if not name.endswith(".weight") or len(info.shape) != 2 or info.dtype not in FLOAT_DTYPES:
        return False
    module = name[: -len(".weight")]
    parts = module.split(".")
    if any(EMBEDDING_PART.search(p) for p in parts) or parts[-1] in HEAD_MODULES:
        return False
    return not any(skipped(module, pattern) for pattern in skip_modules)


def skipped(module: str, pattern: str) -> bool:
    """transformers' should_convert_module rule: a prefix at a module boundary, a regex
    with the same boundary, or a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    try:
        by_regex = re.match(rf"(?:{pattern}){boundary}", module) is not None
    except re.error:
        by_regex = False
    return by_regex or module.endswith(pattern)


def check_skip_modules(base: Checkpoint, skip_modules: tuple[str, ...]) -> None:
    """Refuses a --skip-modules pattern that is not a valid regex, or that matches no Linear
    layer --onto would quantize in this base (a typo would otherwise quantize everything)."""
    if not skip_modules:
        return
    modules = [name[: -len(".weight")] for name, info in base.tensors.items() if is_quantized_linear(name, info)]
    for pattern in skip_modules:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise BadInputError(f"--skip-modules '{pattern}' is not a valid regular expression ({exc})") from None
        if not any(skipped(module, pattern) for module in modules):
            example = f" (e.g. {modules[0]!r} or a suffix such as {modules[0].rsplit('.', 1)[-1]!r})" if modules else ""
            raise BadInputError(f"--skip-modules '{pattern}' matches no quantizable Linear layer of this base{example}")


def split_patterns(entry: str) -> list[str]:
    """A --skip-modules value cut at its commas, but not at those inside (), [] or {}
    (a regex such as `layers\\.[0-9]{1,2}\\.mlp` stays one pattern); empty parts dropped."""
    parts, depth, start, i, in_class = [], 0, 0, 0, False
    while i < len(entry):
        char = entry[i]
        if char == "\\":
            i += 2  # an escaped character never opens, closes or separates
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            i += 1 + (entry[i + 1 : i + 2] == "^")
            i += entry[i : i + 1] == "]"  # `[]...]`: a leading ] is a member
            continue
        elif char in "({":
            depth += 1
        elif char in ")}":
            depth = max(0, depth - 1)
        elif char == "," and depth == 0:
            parts.append(entry[start:i])
            start = i + 1
        i += 1
    parts.append(entry[start:])
    return [part for part in parts if part]


def quant_transform(
    base: Checkpoint,
    onto: str | None = None,
    blocksize: int | None = None,
    double_quant: bool = False,
    skip_modules: tuple[str, ...] = (),
    requantize: str | None = None,
    dtype: str = "auto",
) -> QuantTransform | None:
    """The hook for this base and these options, or None for a plain merge. Refuses
    quantized formats other than block-scaled FP8, and options that do not fit the base."""
    fmt = quantized_format(base.tensors, base.config)
    skip_modules = tuple(part for entry in skip_modules for part in split_patterns(entry))
    if requantize is not None and requantize not in REQUANTIZE_FORMATS:
        raise BadInputError(f"unknown --requantize {requantize!r} (choose {', '.join(REQUANTIZE_FORMATS)})")
    if fmt == "fp8-block":
        if onto is not None or double_quant or skip_modules or blocksize is not None:
            raise BadInputError(
                "--onto (--blocksize, --double-quant, --skip-modules) applies to float checkpoints; "
                "this base is block-scaled FP8"
            )
        return QuantTransform(base, None, skip_modules, requantize, dtype)
    if requantize is not None:
        raise BadInputError("--requantize fp8 needs a block-scaled FP8 base (float8 weights with weight_scale_inv)")
    if onto is None:
        if double_quant or skip_modules or blocksize is not None:
            raise BadInputError("--blocksize, --double-quant and --skip-modules apply with --onto only")
        return None
    if onto == "int8" and (double_quant or blocksize is not None):
        raise BadInputError("--double-quant and --blocksize apply to --onto nf4|fp4 (bitsandbytes' 4-bit)")
    check_skip_modules(base, skip_modules)
    spec = BnbSpec(onto, 64 if blocksize is None else blocksize, double_quant)
    return QuantTransform(base, spec, tuple(skip_modules), None)


def plan_base(base: Checkpoint, transform: QuantTransform | None):
    """What plan_merge should see: the base, or its float view for an FP8 base."""
    return FloatView(base) if transform is not None and transform.fp8 else base


class QuantTransform:
    """Produces the output tensors of a quantized path; collects the per-layer report."""

    def __init__(
        self,
        base: Checkpoint,
        spec: BnbSpec | None,
        skip_modules: tuple[str, ...],
        requantize: str | None,
        dtype: str = "auto",
    ):
        self.base = base
        # what dequantized FP8 weights are written as: --dtype, bfloat16 for auto
        self.float_dtype = BY_NAME["bfloat16" if dtype == "auto" else dtype].safetensors
        self.spec = spec
        self.fp8 = spec is None
        self.skip_modules = skip_modules
        self.requantize = requantize
        self.transposed_model = base.config.get("model_type") in CONV1D_MODEL_TYPES
        self.layers: list[dict] = []
        self._scales: dict[str, np.ndarray] = {}  # requantized scale_inv by its tensor name
        self._buffers = OutputBuffers()  # the untargeted layers' outputs, reused
        self._float32 = np.empty(0, np.float32)  # dequant(quant(W)) before the merge, reused
        self._exact = np.empty(0, np.float32)  # W0 + dW in float32, for the figures, reused

    def outputs(self, stream, info: TensorInfo, out_dtype: str, plan) -> list[OutputTensor] | None:
        """The output tensors for `info` (possibly none), or None to leave it to the plain merge."""
        if self.fp8:
            return self._fp8_outputs(stream, info, out_dtype, plan)
        if not is_quantized_linear(info.name, info, self.skip_modules):
            return None
        target = plan.targets.get(info.name)
        if target is None and info.name in plan.replacements:
            return None  # modules_to_save: the adapter's own full-precision tensor, written as it is
        transposed = target.kind == "transposed" if target is not None else self.transposed_model
        if target is not None and target.kind not in ("linear", "transposed"):
            return None
        w0 = plan.replacements.get(info.name)

        def produce(f) -> None:
            weight = stream.read(info)  # read (and hashed) even when a saved base layer replaces it
            if w0 is not None:
                weight = w0
            np_dtype = DTYPES[out_dtype]
            checked = False  # known finite without a pass over `out`
            what = "merged" if target is not None else "quantized"
            slot = None
            if target is None:
                slot, out = self._buffers.take(info.shape, np_dtype)
                if transposed or weight.dtype != np_dtype:
                    store(self._fake_quant(weight, transposed, info.name), out)
                    self._record(info.name, False, out, weight, onto=True)
                else:  # rounded and measured block by block: no float32 copy, no second pass
                    errors = ErrorSums()
                    named(info.name, fake_quant, weight, self.spec, out=out, errors=errors)
                    error = errors.relative()  # a plain merge writes W0 itself: both figures are one
                    # finite sums of (written - w)^2: every value written is finite
                    checked = bool(np.isfinite(list(errors.values())).all())
                    self.layers.append(
                        {"weight": info.name, "merged": False, "rel_error": error, "onto_vs_original": error}
                    )
            else:
                quantized = self._fake_quant(weight, transposed, info.name)
                if target.module.variant == "lora" and np_dtype != np.float64:  # one product s B A for both
                    if self._exact.size < weight.size:
                        self._exact = np.empty(weight.size, np.float32)
                    exact = self._exact[: weight.size].reshape(weight.shape)
                    distances: dict[int, tuple[float, ...]] = {}
                    out = merged_onto(target.module, target.kind, quantized, weight, np_dtype, exact, distances)
                    target.delta_norm = lora_norm(target.module)  # set_delta_norm's, without `exact`
                    if distances:  # summed on the way, `exact` left unwritten
                        self._record_sums(info.name, True, chunk_totals(distances), onto=True)
                    else:
                        self._record(info.name, True, out, exact, onto=True)
                else:
                    out = merged_weight(target.module, target.kind, quantized, np_dtype)
                    exact = merged_weight(target.module, target.kind, weight)
                    set_delta_norm(target, exact, weight)
                    self._record(info.name, True, out, exact, onto=True)
            f.write(tensor_bytes(out if checked else checked_finite(out, info.name, weight, what)))
            if slot is not None:
                self._buffers.written(slot, f)

        return [OutputTensor(info.name, out_dtype, info.shape, produce)]

    def _fake_quant(self, weight: np.ndarray, transposed: bool, name: str) -> np.ndarray:
        if transposed:  # Conv1D: transformers hands bitsandbytes the [out, in] transpose
            return named(name, fake_quant, np.ascontiguousarray(weight.T), self.spec).T
        # into one float32 array reused from tensor to tensor (used up before the next one)
        if self._float32.size < weight.size:
            self._float32 = np.empty(weight.size, np.float32)
        return named(name, fake_quant, weight, self.spec, out=self._float32[: weight.size].reshape(weight.shape))

    def _fp8_outputs(self, stream, info: TensorInfo, out_dtype: str, plan) -> list[OutputTensor] | None:
        base = self.base.tensors
        if info.name.endswith(FP8_SCALE_SUFFIX):
            weight_name = info.name[: -len(FP8_SCALE_SUFFIX)]
            if weight_name not in base or base[weight_name].dtype != FP8_CODE:
                return None
            if self.requantize and weight_name not in plan.targets:
                if out_dtype == info.dtype:
                    return None  # copied with its weight, byte for byte
                # its weight is copied as it is, so its scales too: never cast by --dtype
                return [
                    OutputTensor(info.name, info.dtype, info.shape, lambda f: f.write(tensor_bytes(stream.read(info))))
                ]
            return []  # dropped (dequantized output), or written right after its weight
        if info.dtype != FP8_CODE:
            return None
        scale_info = base.get(info.name + FP8_SCALE_SUFFIX)
        if scale_info is None:
            raise BadInputError(f"{info.name}: float8 weight without {info.name}{FP8_SCALE_SUFFIX}")
        target = plan.targets.get(info.name)
        if self.requantize and target is None:
            return None  # unchanged: copied as it is
        block = block_size(self.base.config, info.shape, scale_info.shape, info.name)
        float_dtype = self.float_dtype
        w0 = plan.replacements.get(info.name)

        def weight_values() -> np.ndarray:
            dequantized = fp8_dequantize(stream.read(info), stream.read(scale_info), block)
            return dequantized if w0 is None else w0.astype(np.float32)

        def produce(f) -> None:
            w = weight_values()
            exact = merged_weight(target.module, target.kind, w) if target is not None else w
            if target is not None:
                set_delta_norm(target, exact, w)
            if self.requantize:
                q, scale = fp8_quantize(exact, block)
                self._scales[scale_info.name] = scale
                self._record(info.name, target is not None, fp8_dequantize(q, scale, block), exact)
                f.write(tensor_bytes(q))
            else:
                np_dtype = DTYPES[float_dtype]
                out = (
                    merged_weight(target.module, target.kind, w, np_dtype) if target is not None else w.astype(np_dtype)
                )
                self._record(info.name, target is not None, out, exact)
                f.write(tensor_bytes(checked_finite(out, info.name, w)))

        if not self.requantize:
            return [OutputTensor(info.name, float_dtype, info.shape, produce)]

        def produce_scale(f) -> None:
            f.write(tensor_bytes(self._scales.pop(scale_info.name)))

        return [
            OutputTensor(info.name, FP8_CODE, info.shape, produce),
            OutputTensor(scale_info.name, "F32", scale_info.shape, produce_scale),
        ]

    def _record(self, name: str, merged: bool, written: np.ndarray, exact: np.ndarray, onto: bool = False) -> None:
        """The layer's figures; `onto`: onto_vs_original too, against the plain merge as
        written, which is `exact` rounded once to the output dtype."""
        self._record_sums(name, merged, distance_sums(written, exact, onto), onto)

    def _record_sums(self, name: str, merged: bool, sums: np.ndarray, onto: bool = False) -> None:
        entry = {"weight": name, "merged": merged, "rel_error": ratio(sums[0], sums[1])}
        if onto:
            entry["onto_vs_original"] = ratio(sums[2], sums[3])
        self.layers.append(entry)

    def report(self) -> dict:
        """The manifest's "quantization" section."""
        if self.fp8:
            output = "fp8 (requantized, block scales amax/448)" if self.requantize else "dequantized"
            head = {"base_format": "fp8-block", "output": output}
        else:
            head = {
                "onto": self.spec.quant_type,
                "blocksize": None if self.spec.quant_type == "int8" else self.spec.blocksize,
                "double_quant": self.spec.double_quant,
                "skip_modules": list(self.skip_modules),
                "quantized_layers": len(self.layers),
            }
        worst = max((entry["rel_error"] for entry in self.layers), default=0.0)
        return {**head, "max_rel_error": worst, "layers": sorted(self.layers, key=lambda e: e["weight"])}

    def fix_config(self, out_dir, hashes: dict, algorithms) -> None:
        """A dequantized FP8 model is a plain float model: drop quantization_config."""
        path = out_dir / "config.json"
        if not self.fp8 or self.requantize or not path.is_file():
            return
        config = json.loads(path.read_text())
        if config.pop("quantization_config", None) is None:
            return
        try:
            path.write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
        hashes["config.json"] = file_digests(path, algorithms)


def quant_summary(report: dict) -> str:
    """One line from the manifest's "quantization" section."""
    if "onto" in report:
        spec = BnbSpec(report["onto"], report["blocksize"] or 64, report["double_quant"])
        what = f"--onto {spec.describe()}"
    else:
        what = f"block-scaled FP8 base, written {report['output']}"
    layers = report["layers"]
    line = f"{what}: {len(layers)} layers, max relative error vs the exact float32 merge {report['max_rel_error']:.3g}"
    apart = [e["onto_vs_original"] for e in layers if e["merged"] and "onto_vs_original" in e]
    if apart:
        line += f"; merged layers onto-dequantized vs onto-original up to {max(apart):.3g}"
    return line


def quantized_training_hint(adapter_dir, base_dir) -> str | None:
    """Why the adapter looks trained on a quantized base, as a one-line hint, or None."""
    try:
        adapter_config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    try:
        base_config = json.loads((Path(base_dir) / "config.json").read_text())
    except (OSError, ValueError):
        base_config = {}
    if not isinstance(adapter_config, dict) or not isinstance(base_config, dict):
        return None
    why = training_quantization_hint(adapter_dir, adapter_config, base_config)
    if why is None:
        return None
    return f"the adapter looks trained on a quantized base ({why}); --onto nf4|fp4|int8 merges onto what training saw"


def merged_onto(
    module, kind: str, quantized: np.ndarray, w0: np.ndarray, dtype, exact: np.ndarray, distances: dict | None = None
) -> np.ndarray:
    """merged_weight(module, kind, quantized, dtype), returned, and merged_weight(module,
    kind, w0) (float32), into `exact`, from one product s B A per block of rows: the same
    blocks and the same float32 steps as merged_weight's (a LoRA module), so the same bits,
    at one matrix product instead of two. Each block is one pass of the compiled kernel
    where it is built (merge_onto).

    With `distances` (a dict), the kernel, and blocks of rows that are distance_sums'
    chunks (a row length dividing ERROR_CHUNK, or a single block): `exact` is not written;
    instead distances[chunk start] = distance_sums' figures of that chunk (onto=True),
    summed on the way by the same float32/float64 steps, so chunk_totals(distances) is
    distance_sums(out, exact, True). Otherwise `distances` stays empty."""
    left, right = factors(module, kind)
    scaling = np.float32(module.scaling)
    shape = left.shape[0], right.shape[1]
    base, onto, exact_rows = w0.reshape(shape), quantized.reshape(shape), exact.reshape(shape)
    out = np.empty(shape, dtype)
    rows = max(1, BLOCK_ELEMENTS // max(1, right.shape[1]))
    quant4 = kernel("_quant4")  # the steps below in one pass per block, where it is built
    kinds = NATIVE_KINDS.get(base.dtype.name), NATIVE_KINDS.get(out.dtype.name)
    fused = quant4 is not None and hasattr(quant4, "merge_onto") and None not in kinds and onto.dtype == np.float32
    fused = fused and all(a.flags.c_contiguous for a in (base, onto, exact_rows))
    chunks = rows * shape[1] == ERROR_CHUNK or base.size <= ERROR_CHUNK  # each block one chunk
    measured = fused and distances is not None and chunks

    def merge_block(i: int) -> None:
        w = base[i : i + rows]
        product, wide, scratch = block_scratch(w.size)
        block = product[: w.size].reshape(w.shape)
        np.matmul(left[i : i + rows], right, out=block)
        if fused:
            raw = raw_bits(w.reshape(-1)), raw_bits(out[i : i + rows].reshape(-1))
            into = None if measured else exact_rows[i : i + rows]
            sums = quant4.merge_onto(block, raw[0], kinds[0], onto[i : i + rows], scaling, raw[1], kinds[1], into)
            if measured:
                distances[i * shape[1]] = sums
            return
        block *= scaling
        w32 = widen_float16(w, wide[: w.size]).reshape(w.shape) if w.dtype == np.float16 else w
        np.add(block, w32, out=exact_rows[i : i + rows])
        block += onto[i : i + rows]
        if out.dtype == np.float16:
            round_to_float16(block, out[i : i + rows], scratch)  # the one rounding
        else:
            out[i : i + rows] = block  # the one rounding

    for_each_block(merge_block, range(0, shape[0], rows))
    return out.reshape(w0.shape)


def distance_sums(written: np.ndarray, exact: np.ndarray, onto: bool) -> np.ndarray:
    """[sum((written - exact)^2), sum(exact^2)] and, with `onto`, [sum((written - plain)^2),
    sum(plain^2)] where plain is `exact` rounded once to written's dtype (what a plain merge
    writes): float32 chunk by chunk on every core, no whole-size temporary; float64 totals.
    Reported figures, not written values: the compiled and numpy sums may differ in the
    last bits (their order of addition)."""
    flat, reference = written.reshape(-1), exact.reshape(-1)
    sums: dict[int, tuple[float, ...]] = {}
    dtypes = flat.dtype.name in NATIVE_KINDS and reference.dtype.name in NATIVE_KINDS
    quant4 = kernel("_quant4") if dtypes else None  # one pass per chunk where it is built
    if quant4 is not None:
        kinds = NATIVE_KINDS[flat.dtype.name], NATIVE_KINDS[reference.dtype.name]
        raw = raw_bits(np.ascontiguousarray(flat)), raw_bits(np.ascontiguousarray(reference))

    def chunk(start: int) -> None:
        stop = start + ERROR_CHUNK
        if quant4 is not None:
            sums[start] = quant4.distance_sums(raw[0][start:stop], kinds[0], raw[1][start:stop], kinds[1], onto)
            return
        w, e = widen(flat[start:stop]), widen(reference[start:stop])
        d = w - e
        figures = [np.dot(d, d), np.dot(e, e)]
        if onto:
            rounded = np.empty(e.size, flat.dtype)
            store(e, rounded)
            p = widen(rounded)
            np.subtract(w, p, out=d)
            figures += [np.dot(d, d), np.dot(p, p)]
        sums[start] = tuple(float(v) for v in figures)

    for_each_block(chunk, range(0, flat.size, ERROR_CHUNK))
    return chunk_totals(sums)


def chunk_totals(sums: dict[int, tuple[float, ...]]) -> np.ndarray:
    """distance_sums' figures from its chunks' (by chunk start), added in the order of the
    chunks, not of the threads finishing them: the same figures every run."""
    return np.sum([sums[start] for start in sorted(sums)], axis=0) if sums else np.zeros(4)


def ratio(distance2: float, norm2: float) -> float:
    """sqrt(distance2 / norm2), or sqrt(distance2) when the reference is all zeros."""
    return float(np.sqrt(distance2 / norm2)) if norm2 > 0 else float(np.sqrt(distance2))


def named(name: str, fake_quant_fn, *args, **kwargs) -> np.ndarray:
    """fake_quant, its refusals (LLM.int8's float16 range) naming the tensor they concern."""
    try:
        return fake_quant_fn(*args, **kwargs)
    except BadInputError as exc:
        raise BadInputError(f"{name}: {exc}") from None


def set_delta_norm(target, exact: np.ndarray, w0: np.ndarray) -> None:
    """||W - W0|| for the manifest, as the plain merge records it."""
    if target.module.magnitude is None:
        target.delta_norm = lora_norm(target.module)
    else:
        target.delta_norm = float(np.linalg.norm(exact - w0.astype(exact.dtype)))  # float64 for a float64 base
