"""One runner interface across backends (after polygraphy's runners).

A runner is built cheaply and loads lazily: ``activate()`` creates the ONNX
Runtime session or loads the torch model, ``deactivate()`` drops it, and the
context manager does both. ``infer(feed)`` takes and returns numpy arrays
keyed by name, so comparing backends is a dict-to-dict comparison.

Feed checking lives once, in :meth:`Runner.infer`: names, dtypes, ranks,
fixed dims, and that a named dynamic dim (e.g. "batch") has the same size in
every input. Backends only implement ``_activate``, ``_deactivate``,
``_infer`` and ``_input_metadata``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lora_deploy.errors import BadInputError

# A metadata entry: (numpy dtype or None when unknown, shape). Shape entries
# are ints for fixed dims and strings for dynamic ones; a shape of None means
# the rank is unknown too. None parts are simply not checked.
InputMeta = tuple[Any, Any]
Feed = dict[str, np.ndarray]

_COUNTER = itertools.count()


class Runner:
    """Base class: lifecycle, feed checking, context manager."""

    def __init__(self, name: str | None = None):
        self.name = name or f"{type(self).__name__.lower()}-{next(_COUNTER)}"
        self.is_active = False
        self._metadata: dict[str, InputMeta] | None = None

    def activate(self) -> None:
        """Load the backend (session, model). Idempotent."""
        if not self.is_active:
            self._activate()
            self.is_active = True

    def deactivate(self) -> None:
        """Release the backend. Idempotent."""
        if self.is_active:
            self._deactivate()
            self.is_active = False
            self._metadata = None

    def input_metadata(self) -> dict[str, InputMeta]:
        """{name: (dtype, shape)}, shape with str for dynamic dims. Needs activate()."""
        self._require_active()
        if self._metadata is None:
            # Cached: infer() consults it on every call.
            self._metadata = self._input_metadata()
        return self._metadata

    def infer(self, feed: Mapping[str, np.ndarray], **options: Any) -> dict[str, np.ndarray]:
        """Check the feed against input_metadata, then run the backend.

        ``options`` go to the backend unchanged (e.g. ``run_options`` for
        ONNX Runtime). Raises BadInputError naming the offending input.
        """
        check_feed(feed, self.input_metadata(), self.optional_metadata())
        return self._infer(dict(feed), **options)

    def optional_metadata(self) -> dict[str, InputMeta]:
        """Inputs that may be fed but have a default (ONNX Runtime's overridable initializers)."""
        return {}

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.deactivate()

    def __repr__(self) -> str:
        state = "active" if self.is_active else "inactive"
        return f"<{type(self).__name__} {self.name} ({state})>"

    def _require_active(self) -> None:
        if not self.is_active:
            raise BadInputError(f"runner {self.name} is not active; call activate() or use it in a with-block")

    # Backends implement these.
    def _activate(self) -> None:
        raise NotImplementedError

    def _deactivate(self) -> None:
        raise NotImplementedError

    def _input_metadata(self) -> dict[str, InputMeta]:
        raise NotImplementedError

    def _infer(self, feed: dict[str, np.ndarray], **options: Any) -> dict[str, np.ndarray]:
        raise NotImplementedError


def check_feed(
    feed: Mapping[str, Any],
    metadata: Mapping[str, InputMeta],
    optional: Mapping[str, InputMeta] | None = None,
    reserved: Iterable[str] = (),
) -> None:
    """Raise BadInputError unless ``feed`` fits ``metadata`` exactly.

    `optional` inputs (overridable initializers: LoRA weights with a default) may be fed
    and are then checked like the others; `reserved` names are set through their own
    argument (adapter_ids) and may not appear in the feed.
    """
    optional = optional or {}
    if not isinstance(feed, Mapping):
        raise BadInputError(f"feed must be a dict of name -> numpy array, got {type(feed).__name__}")
    for name in feed:
        if name in reserved:
            raise BadInputError(f"{name} is set through its own argument, not feeds")
        if name not in metadata and name not in optional:
            raise BadInputError(f"unexpected input {name!r}, an unknown input: the model takes {', '.join(metadata)}")
    dim_sizes: dict[str, tuple[int, str]] = {}  # dynamic dim name -> (size, first input seen)
    for name, meta in metadata.items():
        if name not in feed:
            if name in reserved:
                continue
            raise BadInputError(f"missing input {name!r}")
        _check_input(name, feed[name], meta, dim_sizes)
    lora_sizes: dict[str, tuple[int, str]] = {}  # a layer's A and B share its rank dim
    for name, meta in optional.items():
        if name in feed:
            _check_input(name, feed[name], meta, lora_sizes)


def _check_input(name: str, array: Any, meta: InputMeta, dim_sizes: dict[str, tuple[int, str]]) -> None:
    dtype, shape = meta
    if not isinstance(array, np.ndarray):
        raise BadInputError(f"input {name!r} is a {type(array).__name__}, not a numpy array")
    if dtype is not None and array.dtype != np.dtype(dtype):
        raise BadInputError(f"input {name!r} has dtype {array.dtype}, expected {np.dtype(dtype)}")
    if shape is None:
        return
    if array.ndim != len(shape):
        raise BadInputError(f"input {name!r} has rank {array.ndim}, expected {len(shape)} {tuple(shape)}")
    for axis, (size, want) in enumerate(zip(array.shape, shape)):
        if isinstance(want, int) and want >= 0 and size != want:
            raise BadInputError(
                f"input {name!r} dim {axis} is {size}, expected {want} (the graph expects {list(shape)})"
            )
        if isinstance(want, str):
            seen = dim_sizes.setdefault(want, (size, name))
            if seen[0] != size:
                raise BadInputError(
                    f"input {name!r} dim {axis} ({want!r}) is {size} but input {seen[1]!r} has {seen[0]}"
                )


@dataclass
class TimedModel:
    """One model opened for timing: its runner and how to turn a feed into a timed call.

    `bind(feed)` returns a zero-argument callable running one inference on that feed
    (prepared once, so the timed call does no conversion) and returning only when the
    work is done. `bind_plain` does the same without the adapter, so a failure can be
    blamed on the adapter or on the model. `extra_inputs(batch)` supplies
    backend-specific inputs (adapter_ids). `example_feed` holds the inputs the model
    declares for itself (a plain torch module's `example_inputs()`), if any.
    `bind_generation(input_ids, attention_mask, n_new, record)`, for a model that can
    generate (a KV-cache graph), returns a zero-argument callable running one greedy
    generation of `n_new` tokens per row that ends by calling `record(step_seconds)` (the
    prefill, then each decode step) and returns the Generation (timing ignores it); None
    when the model cannot.
    """

    name: str
    path: Path
    runner: Runner
    bind: Callable[[Feed], Callable[[], None]]
    adapter: Path | None = None
    bind_plain: Callable[[Feed], Callable[[], None]] | None = None
    extra_inputs: Callable[[int], Feed] = lambda batch: {}
    details: dict[str, Any] = field(default_factory=dict)
    example_feed: Feed | None = None
    bind_generation: (
        Callable[[np.ndarray, np.ndarray, int, Callable[[list[float]], None]], Callable[[], Any]] | None
    ) = None

    def close(self) -> None:
        """Release the session or model."""
        self.runner.deactivate()
