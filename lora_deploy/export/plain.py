"""What exporting a plain torch module needs besides the exporter: its example inputs
(an `.npz` whose array names are `forward`'s arguments, or the module's own
`example_inputs()`), in `forward`'s order and checked against what the module declares,
and the float16 checks (every weight and every activation of a float32 run must fit
float16's range, 65504, before a float16 graph is exported).

The module itself comes from modeling.factory (`--module package.module:factory` plus a
checkpoint); the export is export.model's, checked in ONNX Runtime like every export.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from lora_deploy.arrays import from_torch, int_range, ints_fit
from lora_deploy.backends.base import check_feed
from lora_deploy.errors import BadInputError
from lora_deploy.io.npz import read_npz
from lora_deploy.modeling.factory import example_inputs

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


def forward_arguments(module: Any) -> tuple[list[str], list[str]]:
    """(every named argument of forward, the required ones)."""
    params = inspect.signature(module.forward).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = [p for p in params if p.kind in kinds]
    return [p.name for p in named], [p.name for p in named if p.default is inspect.Parameter.empty]


def module_feed(module: Any, inputs_path: str | os.PathLike | None, source: str) -> dict[str, np.ndarray]:
    """The feed a plain module is exported or verified on, in forward's argument order:
    the .npz when given, else the module's example_inputs(). An .npz is checked against
    forward's arguments and, where the module declares example inputs, against their
    dtypes and sizes (any batch). Floats are taken in the declared input's float dtype
    (else float32: recorded float16 observations feed a float32 module exactly), integers
    in the declared integer dtype when their values fit it (uint8 camera frames saved as
    int64), else int64. An array of another kind keeps its dtype, so a refusal names the
    dtype that was saved."""
    declared = example_inputs(module, source)
    if inputs_path is None:
        if declared is None:
            raise BadInputError(f"{source} declares no example_inputs(): give --inputs FILE.npz (names = forward's)")
        return _ordered(module, declared)
    dtypes = {name: arr.dtype for name, arr in (declared or {}).items()}
    try:
        feed = {name: _usual_dtype(name, arr, dtypes.get(name)) for name, arr in read_npz(inputs_path).items()}
    except BadInputError as err:
        raise BadInputError(f"--inputs {inputs_path} does not fit {source}: {err}") from None
    names, required = forward_arguments(module)
    metadata: Mapping[str, Any]
    if declared is not None:
        metadata = {name: (arr.dtype, ("batch", *arr.shape[1:])) for name, arr in declared.items()}
    else:
        metadata = {name: (None, None) for name in required}
    optional = {name: (None, None) for name in names if name not in metadata}
    try:
        check_feed(feed, metadata, optional)
    except BadInputError as err:
        raise BadInputError(f"--inputs {inputs_path} does not fit {source}: {err}") from None
    return _ordered(module, feed)


def _usual_dtype(name: str, arr: np.ndarray, declared: np.dtype | None) -> np.ndarray:
    """`arr` in the dtype its input is taken in (module_feed's rules); an array of another
    kind than the declared input's is returned as saved, for check_feed to refuse."""
    if arr.dtype.kind == "f" and (declared is None or declared.kind == "f"):
        return arr.astype(declared or np.float32, copy=False)
    if arr.dtype.kind in "iu" and (declared is None or declared.kind in "iu"):
        target = np.dtype(declared or np.int64)
        if not ints_fit(arr, target):
            low, high = int_range(arr)
            raise BadInputError(f"input {name!r} holds {arr.dtype} values {low}..{high}, which do not fit {target}")
        return arr.astype(target, copy=False)
    return arr


def _ordered(module: Any, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names, _ = forward_arguments(module)
    rank = {name: i for i, name in enumerate(names)}
    return {name: feed[name] for name in sorted(feed, key=lambda n: rank.get(n, len(rank)))}


def as_dtype(feed: Mapping[str, np.ndarray], dtype: np.dtype) -> dict[str, np.ndarray]:
    """Float inputs in `dtype` (a float16 graph takes float16 inputs), others unchanged."""
    return {name: arr.astype(dtype) if arr.dtype.kind == "f" else arr for name, arr in feed.items()}


def check_float16_range(module: Any, feed: Mapping[str, np.ndarray]) -> float:
    """Refuse a float16 export whose weights or float32 activations leave float16's range
    (they would become inf in the graph). Returns the largest |activation| seen."""
    import torch

    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and tensor.numel() and float(tensor.abs().max()) > FLOAT16_MAX:
            raise BadInputError(f"float16 overflow: weight {name} holds |x| = {float(tensor.abs().max()):.4g} > 65504")
    worst: dict[str, float] = {}

    def record(name):
        def hook(_module, _args, output):
            for item in output if isinstance(output, (tuple, list)) else (output,):
                if isinstance(item, torch.Tensor) and item.is_floating_point() and item.numel():
                    value = float(item.detach().abs().max())
                    if value > worst.get(name, -1.0):
                        worst[name] = value

        return hook

    handles = [sub.register_forward_hook(record(name or "(output)")) for name, sub in module.named_modules()]
    try:
        with torch.inference_mode():
            module(**{name: torch.from_numpy(arr) for name, arr in feed.items()})
    finally:
        for handle in handles:
            handle.remove()
    if not worst:
        return 0.0
    name = max(worst, key=worst.get)
    if not worst[name] <= FLOAT16_MAX:  # also catches NaN
        raise BadInputError(
            f"float16 overflow: {name} outputs |x| = {worst[name]:.4g} on the example inputs (float16 holds 65504); "
            "export float32"
        )
    return worst[name]


def check_float16_outputs(module: Any, feed: Mapping[str, np.ndarray]) -> None:
    """After the module is cast to float16: its outputs on the example inputs must be
    finite (an overflow inside a module, e.g. attention scores, shows up here as inf/NaN,
    which the parity check would otherwise accept where torch and ONNX Runtime agree)."""
    import torch

    from lora_deploy.modeling.hf import flatten_outputs

    with torch.inference_mode():
        outputs = flatten_outputs(module(**{name: torch.from_numpy(arr) for name, arr in feed.items()}))
    for index, tensor in enumerate(outputs):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise BadInputError(
                f"float16 overflow: output {index} is not finite in float16 on the example inputs "
                "(an activation inside a module leaves float16's range); export float32"
            )


def part_export(model: Any, part: str, feed: Mapping[str, np.ndarray], module: str, dtype: str):
    """What export_plain exports for one part of `model` (modeling/parts.py): (the part as a
    module taking its graph inputs by name, those inputs as recorded in the whole model's
    forward on `feed` (float16 when `dtype` is), its output names, the inputs whose axis 0
    is the observations' batch)."""
    from lora_deploy.modeling.parts import make_part_call, record_part

    source = f"the module from {module}"
    signature, recorded, _ = record_part(model, part, feed, source)
    call = make_part_call(model.get_submodule(part), signature).eval()
    part_feed = {name: np.ascontiguousarray(from_torch(tensor)) for name, tensor in recorded.items()}
    rows = len(next(iter(feed.values())))
    batched = [name for name, arr in part_feed.items() if arr.ndim and arr.shape[0] == rows]
    if dtype == "float16":
        call = call.half()
        part_feed = as_dtype(part_feed, np.dtype(np.float16))
        check_float16_outputs(call, part_feed)
    count = signature.output_count
    names = ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
    return call, part_feed, names, batched
