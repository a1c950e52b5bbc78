"""Greedy generation over a KV-cache ONNX graph in ONNX Runtime (export --task text-generation-with-past).

`KvGraph(path)` opens the graph once (the one session loader, through DynamicSession so
an `.onnx_adapter` can be active per run) and reads its cache layout from its inputs:
`past_key_values.{i}.key/.value` [batch, kv_heads, past, head_size], `position_ids` when
it takes them. Graphs exported by other tools with Optimum's names run too.

`onnx_generator(graph, adapter=FILE | adapter_id=ID)` is a generator in the sense of
lora_deploy.backends.generation: prompts are left-padded into one batch, the prefill runs
them with an empty cache (past length 0), then each step feeds the chosen tokens, the
grown attention mask, the next positions and the returned `present.*` as the next
`past_key_values.*`; the token is the argmax of the last position's logits, and no row
stops early. `greedy` is that loop over any step function: `bench --generate` times it on
the sessions it opened for timing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from lora_deploy.backends.generation import Generation, Generator, check_prompts, left_pad, positions
from lora_deploy.backends.onnxrt.loader import SessionFromOnnx
from lora_deploy.backends.onnxrt.lora_format import A_SUFFIX, METADATA_KEY, graph_metadata, read_graph_inputs
from lora_deploy.backends.onnxrt.sessions import BASE_ID, IDS_INPUT, DynamicSession
from lora_deploy.dtypes import BY_ORT
from lora_deploy.errors import BadInputError
from lora_deploy.modeling.tasks import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    PAST_PREFIX,
    POSITION_IDS,
    TEXT_GENERATION_WITH_PAST,
    KvLayout,
)


def lora_input_names(onnx_path: str | os.PathLike) -> list[str]:
    """The graph's overridable LoRA A inputs (a dynamic-adapter graph has some), read
    without loading the weights."""
    return [n for n in read_graph_inputs(onnx_path).overridable if n.endswith(A_SUFFIX)]


def has_kv_cache(onnx_path: str | os.PathLike) -> bool:
    """Whether a graph takes past_key_values.* inputs, read without loading the weights;
    False for a file that is not a readable ONNX model (its own loader says why)."""
    import onnx

    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:  # protobuf raises several unrelated types for a non-ONNX file
        return False
    return any(value.name.startswith(PAST_PREFIX) for value in proto.graph.input)


def cache_layout(session, path: str | os.PathLike) -> tuple[KvLayout, np.dtype]:
    """The cache layout and dtype of a KV-cache graph, read from its session's inputs;
    BadInputError for a graph without past_key_values.* inputs."""
    inputs = {i.name: i for i in session.get_inputs()}
    pasts = sorted(n for n in inputs if n.startswith(PAST_PREFIX))
    if INPUT_IDS not in inputs or not pasts:
        raise BadInputError(
            f"{path}: not a KV-cache graph (no {PAST_PREFIX}* inputs); export it with "
            f"--task {TEXT_GENERATION_WITH_PAST}"
        )
    first = inputs[f"{PAST_PREFIX}0.key"] if f"{PAST_PREFIX}0.key" in inputs else inputs[pasts[0]]
    shape = list(first.shape)
    if len(shape) != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])):
        raise BadInputError(f"{path}: {first.name} is {shape}, not [batch, kv_heads, past, head_size]")
    layout = KvLayout(len(pasts) // 2, shape[1], shape[3], position_ids=POSITION_IDS in inputs)
    missing = [n for n in layout.past_names if n not in inputs]
    if missing:
        raise BadInputError(f"{path}: lacks cache input {missing[0]}")
    row = BY_ORT.get(first.type)
    return layout, np.dtype(row.numpy if row is not None else np.float32)


def greedy(
    step: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]],
    layout: KvLayout,
    cache_dtype: np.dtype,
    ids: np.ndarray,
    mask: np.ndarray,
    n_new: int,
    extra: Mapping[str, np.ndarray] | None = None,
    times: list[float] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Generation:
    """`n_new` greedy tokens from left-padded (ids, mask): a prefill with an empty cache, then
    one decode step per further token, each fed the chosen tokens, the grown mask, the next
    positions and the last step's present.* as past_key_values.*. `step(feed)` runs the
    graph once and returns its outputs by name; `extra` inputs (adapter_ids) go into every
    step. With `times`, the seconds each step took (the graph run and the next feed, so they
    add up to the generation) are appended to it: the prefill first, then each decode step."""
    batch = ids.shape[0]
    pos = positions(mask)
    empty = np.zeros((batch, layout.kv_heads, 0, layout.head_size), cache_dtype)
    feed = {INPUT_IDS: ids, ATTENTION_MASK: mask, **dict.fromkeys(layout.past_names, empty), **(extra or {})}
    if layout.position_ids:
        feed[POSITION_IDS] = pos
    tokens, logits = [], []
    for _ in range(n_new):
        start = clock() if times is not None else 0.0
        out = step(feed)
        last = out[LOGITS][:, -1, :].astype(np.float32)
        chosen = np.argmax(last, axis=-1).astype(np.int64)
        tokens.append(chosen)
        logits.append(last)
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        feed[INPUT_IDS] = chosen[:, None]
        feed[ATTENTION_MASK] = mask
        if layout.position_ids:
            feed[POSITION_IDS] = pos
        for past, present in zip(layout.past_names, layout.present_names):
            feed[past] = out[present]
        if times is not None:
            times.append(clock() - start)
    return Generation(np.stack(tokens, axis=1), np.stack(logits, axis=1))


class KvGraph:
    """A KV-cache graph opened once: its layout, its session, adapters loaded by name."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        self.path = Path(path)
        self.session = DynamicSession(self.path, options=SessionFromOnnx(self.path, threads=threads).options())
        self.layout, self.cache_dtype = cache_layout(self.session.session, self.path)
        self.lora_inputs = [n for n in self.session.overridable if n.endswith(A_SUFFIX)]
        self.adapter_ids = IDS_INPUT in {i.name for i in self.session.session.get_inputs()}
        self.adapters: list[str] = list(
            graph_metadata(self.session.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)).get(
                "adapters", []
            )
        )

    def adapter_id(self, adapter_dir) -> int:
        """The id of an adapter in a multi-adapter graph, by its directory name."""
        name = Path(adapter_dir).resolve().name
        matches = [i for i, n in enumerate(self.adapters) if n == name or n.startswith(f"{name}#")]
        if not self.adapter_ids or len(matches) != 1:
            raise BadInputError(f"{self.path}: holds adapters {self.adapters}, none named {name!r} exactly once")
        return matches[0]

    def step(self, feed: dict[str, np.ndarray], adapter: str | None = None) -> dict[str, np.ndarray]:
        return self.session.run(feed, adapter=adapter)


def onnx_generator(
    graph: KvGraph | str | os.PathLike,
    *,
    adapter: str | os.PathLike | None = None,
    adapter_id: int | None = None,
    pad_id: int = 0,
) -> Generator:
    """A greedy generator over a KV-cache graph: with `adapter` (an .onnx_adapter) active on
    every run of a dynamic-adapter graph, or every row on `adapter_id` (-1: the base) in a
    multi-adapter graph."""
    if not isinstance(graph, KvGraph):
        graph = KvGraph(graph)
    active = None
    if adapter is not None:
        if not graph.lora_inputs:
            raise BadInputError(f"{graph.path}: has no LoRA inputs, so adapter {adapter} cannot be activated")
        active = f"adapter-{len(graph.session.adapters)}"
        graph.session.load_adapter(active, adapter)
    if graph.adapter_ids and adapter_id is None:
        raise BadInputError(f"{graph.path}: a multi-adapter graph: say which adapter id each row uses (-1: base)")
    if adapter_id is not None and not graph.adapter_ids:
        raise BadInputError(f"{graph.path}: not a multi-adapter graph (no {IDS_INPUT} input)")
    if adapter_id is not None and not BASE_ID <= adapter_id < len(graph.adapters):
        raise BadInputError(
            f"adapter id {adapter_id} is out of range for {graph.path} ({len(graph.adapters)} adapters)"
        )

    def generate(prompts, n_new: int) -> Generation:
        rows = check_prompts(prompts, n_new)
        ids, mask = left_pad(rows, pad_id)
        extra = {} if adapter_id is None else {IDS_INPUT: np.full((len(rows),), adapter_id, dtype=np.int64)}
        return greedy(lambda feed: graph.step(feed, active), graph.layout, graph.cache_dtype, ids, mask, n_new, extra)

    return generate
