"""Adapter sessions: one graph loaded once, the adapter chosen per call.

`DynamicSession` serves a dynamic-adapter graph (export/dynamic.py): packed adapters are
loaded by name and one is activated per call through RunOptions.add_active_adapter.
ONNX Runtime ignores active adapters when IO binding is used, so these sessions never
bind. `MultiSession` serves a multi-adapter graph (export/multi.py): each batch row picks
its adapter through the `adapter_ids` input. Both are runners, so feeds are checked by
the runner contract and sessions come from the one loader.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from lora_deploy.backends.onnxrt.loader import CPU, SessionFromOnnx
from lora_deploy.backends.onnxrt.lora_format import (
    METADATA_KEY,
    check_parameters,
    graph_metadata,
    is_lora_name,
    read_adapter_file,
    session_inputs,
    split_lora_name,
)
from lora_deploy.backends.onnxrt.runner import OnnxrtRunner
from lora_deploy.errors import AdapterError, BadInputError

IDS_INPUT = "adapter_ids"
BASE_ID = -1


class DynamicSession(OnnxrtRunner):
    """A dynamic-adapter graph loaded once; adapters loaded by name and chosen per call.

    >>> s = DynamicSession("model.onnx")
    >>> s.load_adapter("task-a", "a.onnx_adapter")
    >>> s.run({"input_ids": ids, "attention_mask": mask}, adapter="task-a")["logits"]
    """

    def __init__(self, onnx_path: str | os.PathLike, *, providers: Sequence[str] | None = None, options=None):
        super().__init__(
            SessionFromOnnx(onnx_path, providers=providers or CPU, session_options=options), name=str(onnx_path)
        )
        self.activate()
        self.overridable = session_inputs(self.session)
        self.adapters: dict[str, object] = {}
        # A graph for TensorRT (export --lora-defaults none): LoRA inputs are required, so
        # "no adapter" is zeros fed and an adapter is its packed arrays fed (over the zeros).
        self.zeros = required_zeros(self.session, self.path)
        self.arrays: dict[str, dict[str, np.ndarray]] = {}

    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Load a packed adapter (once, memory-mapped) under `name`, after checking it fits the graph."""
        shapes, adapter = read_adapter_file(path)
        idle = sorted({split_lora_name(n)[0] for n in shapes if n not in self.overridable} & set(self.uncomputed()))
        if idle:
            raise AdapterError(
                f"{path}: carries LoRA for {idle[0]}, which {self.path.name} does not compute; "
                f"pack it with --onnx {self.path.name} to leave such modules out"
            )
        check_parameters(shapes, self.overridable, path, self.path.name)
        self.adapters[name] = adapter
        if self.zeros:
            self.arrays[name] = adapter_arrays(path)

    def uncomputed(self) -> list[str]:
        """Modules the exporter found the graph's outputs do not depend on (its metadata)."""
        return graph_metadata(self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY))["uncomputed"]

    def unload_adapter(self, name: str) -> None:
        self.adapters.pop(name, None)
        self.arrays.pop(name, None)

    def run(self, feeds: Mapping[str, np.ndarray], adapter: str | None = None) -> dict[str, np.ndarray]:
        """One forward pass with `adapter` active (None: the base model). Returns outputs by name."""
        import onnxruntime as ort

        options = ort.RunOptions()
        if adapter is not None:
            if adapter not in self.adapters:
                raise BadInputError(f"adapter {adapter!r} is not loaded (loaded: {', '.join(self.adapters) or 'none'})")
            if not self.zeros:
                options.add_active_adapter(self.adapters[adapter])
        if self.zeros:
            lora = {**self.zeros, **(self.arrays[adapter] if adapter is not None else {})}
            return self.infer({**_arrays(feeds), **lora}, run_options=options)
        return self.infer(_arrays(feeds), run_options=options)


class MultiSession(OnnxrtRunner):
    """A multi-adapter graph loaded once; each call picks an adapter per batch row.

    >>> s = MultiSession("multi.onnx")
    >>> s.run({"input_ids": ids, "attention_mask": mask}, adapter_ids=[0, 1, -1, 1])["logits"]

    Ids may also be adapter names (as listed in `adapters`) or None for the base model.
    Feeding `<module>.lora_A.bank` etc. in `feeds` replaces that bank for the call.
    """

    def __init__(self, onnx_path: str | os.PathLike, *, providers: Sequence[str] | None = None, options=None):
        super().__init__(
            SessionFromOnnx(onnx_path, providers=providers or CPU, session_options=options), name=str(onnx_path)
        )
        self.activate()
        info = graph_metadata(self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY))
        if info.get("format") != "multi":
            raise BadInputError(f"{self.path}: not a multi-adapter graph (export it with export_multi)")
        self.adapters: list[str] = list(info["adapters"])
        self.batch_input: str = info["inputs"][0]

    def run(self, feeds: Mapping[str, np.ndarray], adapter_ids: Sequence[int | str | None]) -> dict[str, np.ndarray]:
        """One forward pass; returns outputs by name."""
        feeds = _arrays(feeds)
        if IDS_INPUT in feeds:
            raise BadInputError(f"{IDS_INPUT} is set through its own argument, not feeds")
        rows = feeds[self.batch_input].shape[0] if self.batch_input in feeds else len(adapter_ids)
        return self.infer({**feeds, IDS_INPUT: self.ids_array(adapter_ids, rows)})

    def ids_array(self, adapter_ids: Sequence[int | str | None], batch: int) -> np.ndarray:
        """Validated int64 ids, one per row: BadInputError for anything out of range."""
        ids = [self.adapter_id(x) for x in adapter_ids]
        if len(ids) != batch:
            raise BadInputError(f"adapter_ids has {len(ids)} entries but the batch has {batch} rows")
        return np.asarray(ids, dtype=np.int64)

    def adapter_id(self, value: int | str | None) -> int:
        if value is None:
            return BASE_ID
        if isinstance(value, str):
            if value not in self.adapters:
                raise BadInputError(f"unknown adapter {value!r} (the graph holds {', '.join(self.adapters)})")
            return self.adapters.index(value)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise BadInputError(f"adapter id {value!r} is not an integer")
        if not BASE_ID <= int(value) < len(self.adapters):
            raise BadInputError(
                f"adapter id {int(value)} is out of range: use 0..{len(self.adapters) - 1}, or -1 for the base model"
            )
        return int(value)


def required_zeros(session, path) -> dict[str, np.ndarray]:
    """Zeros for each LoRA input without a default ("no adapter"); {} for a graph with defaults."""
    from lora_deploy.dtypes import BY_ORT

    zeros = {}
    for value in session.get_inputs():
        if not is_lora_name(value.name):
            continue
        if not all(isinstance(d, int) for d in value.shape) or value.type not in BY_ORT:
            raise BadInputError(f"{path}: LoRA input {value.name} has no default and no fixed shape and float dtype")
        zeros[value.name] = np.zeros(value.shape, BY_ORT[value.type].numpy)
    return zeros


def adapter_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A packed adapter's arrays by name (to feed a graph whose LoRA inputs are required)."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat.read_adapter(str(path))
    # Copied while `fmt` lives: the OrtValues' numpy views point into its buffer.
    return {name: np.array(value.numpy(), copy=True) for name, value in fmt.get_parameters().items()}


def _arrays(feeds: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Lists and scalars as arrays: these sessions have always accepted them."""
    return {name: np.asarray(value) for name, value in feeds.items()}
