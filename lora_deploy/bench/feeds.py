"""What every variant is fed at a shape, and the one checked call before any timing.

For every shape one feed is built from a fixed seed (identical values for all variants,
cast to each one's declared dtypes), or taken from `--inputs FILE.npz` or the plain
modules' own example_inputs(); each variant then runs it once, so a shape or adapter
that does not fit fails with one line *before* any timing.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lora_deploy.backends.base import Feed, TimedModel, check_feed
from lora_deploy.backends.onnxrt.loader import error_line, ort_errors
from lora_deploy.bench.shapes import Shape, shape_key
from lora_deploy.errors import BadInputError, LoraDeployError
from lora_deploy.modeling.samples import ATTENTION_MASK, INPUT_IDS, TOKEN_TYPE_IDS, sample_inputs
from lora_deploy.modeling.tasks import PAST_PREFIX

# Inputs that are always a (batch, sequence) matrix, whatever a graph declares.
TOKEN_INPUTS = (INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS)


def _canonical(dtype: Any) -> np.dtype | None:
    """The dtype values are drawn in: float32 for every float, int64 for every integer,
    so float16 and float32 variants (or int32 and int64 ones) get the same values."""
    if dtype is None:
        return None
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.floating):
        return np.dtype(np.float32)
    if np.issubdtype(dtype, np.integer):
        return np.dtype(np.int64)
    return dtype


def _resolve_dims(name: str, dims: Any, shape: Shape) -> tuple[tuple[int, ...], bool]:
    """Concrete dims for one input at a requested shape, and whether one of them is the
    sequence length. Token inputs are forced to (batch, sequence) even where a graph
    declares fixed dims, so a graph that cannot take the shape is caught by `check_feed`
    instead of being fed another shape. Elsewhere fixed dims stay; a dynamic dim on axis
    0, or named like "batch", is the batch; any other dynamic dim the sequence.

    A decode shape (batch, seq, past) feeds a KV-cache graph: a dynamic dim named like
    "past" (past_key_values.* [batch, heads, past_sequence, head_size]) is the past
    length, and the attention mask covers past + new tokens."""
    batch, seq = shape[0], shape[1]
    past = shape[2] if len(shape) > 2 else 0
    if name == ATTENTION_MASK:
        return (batch, past + seq), True
    if name in TOKEN_INPUTS or dims is None:
        return (batch, seq), True
    out, uses_seq = [], False
    for axis, dim in enumerate(dims):
        if isinstance(dim, (int, np.integer)) and dim >= 0:
            out.append(int(dim))
        elif axis == 0 or (isinstance(dim, str) and "batch" in dim.lower()):
            out.append(batch)
        elif isinstance(dim, str) and "past" in dim.lower():
            out.append(past)
        else:
            out.append(seq)
            uses_seq = True
    return tuple(out), uses_seq


def draw(name: str, dtype: np.dtype | None, dims: tuple[int, ...], shape: Shape, seed: int) -> np.ndarray:
    """One input's values, seeded by (seed, name) alone: the same whichever other inputs
    a variant has or in which order they come."""
    own_seed = (seed * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % 2**32
    return sample_inputs({name: (dtype, dims)}, batch=shape[0], seq=shape[1], seed=own_seed)[name]


def shape_of_inputs(arrays: Mapping[str, np.ndarray]) -> Shape:
    """(batch, seq) of supplied inputs: axis 0, and axis 1 of a token input (else of any
    input of rank >= 2, else 1)."""
    first = next(iter(arrays.values()))
    tokens = [a for n, a in arrays.items() if n in TOKEN_INPUTS and a.ndim == 2]
    wide = tokens or [a for a in arrays.values() if a.ndim >= 2]
    return int(first.shape[0]), int(wide[0].shape[1]) if wide else 1


def build_feeds(
    variants: Mapping[str, TimedModel],
    shape: Shape,
    seed: int,
    supplied: Mapping[str, np.ndarray] | None = None,
    source: str = "file",
) -> tuple[dict[str, Feed], dict[str, dict[str, Any]]]:
    """Each variant's feed at `shape` from its own input types, and what it really gets.

    Values are drawn once per input name (in float32 / int64, `_canonical`) and cast to
    each variant's declared dtype, so float16 and float32 variants take the same numbers;
    variants of the same dtype share the very same arrays. `supplied` arrays (--inputs)
    replace drawn ones by name. The second result maps each variant to
    {"batch", "seq" (None when no input has a sequence axis), "tokens" (takes token
    inputs), "inputs" ({name: shape}), "source"}: what throughput is computed from;
    "source" is `source` ("file": --inputs, "example": the modules' example_inputs())
    when supplied arrays were used, else "generated".
    """
    supplied = supplied or {}
    drawn: dict[tuple, np.ndarray] = {}
    feeds: dict[str, Feed] = {}
    fed: dict[str, dict[str, Any]] = {}
    for vname, variant in variants.items():
        meta = variant.runner.input_metadata()
        ordered = sorted(meta.items(), key=lambda item: item[0] not in TOKEN_INPUTS)
        feed: Feed = {}
        uses_seq = False
        for name, (dtype, dims) in ordered:
            target = None if dtype is None else np.dtype(dtype)
            if name in supplied:
                base, key = supplied[name], ("file", name)
                uses_seq = uses_seq or (name in TOKEN_INPUTS and base.ndim == 2)
            else:
                concrete, seq_dim = _resolve_dims(name, dims, shape)
                uses_seq = uses_seq or seq_dim
                key = (name, _canonical(target), concrete)
                if key not in drawn:
                    drawn[key] = draw(name, _canonical(target), concrete, shape, seed)
                base = drawn[key]
            if target is not None and base.dtype != target:
                cast_key = (*key, str(target))
                if cast_key not in drawn:
                    drawn[cast_key] = base.astype(target)
                base = drawn[cast_key]
            feed[name] = base
        ranked = [a for a in feed.values() if a.ndim >= 1]
        batch = int(ranked[0].shape[0]) if ranked else 1
        feed.update(variant.extra_inputs(batch))
        tokens = any(name in TOKEN_INPUTS for name in meta)
        # New tokens per row: input_ids' width (a KV-cache graph's mask also spans the past).
        token_arrays = [feed[n] for n in sorted(meta, key=lambda n: n != INPUT_IDS) if n in TOKEN_INPUTS]
        token_arrays = [a for a in token_arrays if a.ndim == 2]
        seq = int(token_arrays[0].shape[1]) if token_arrays else (shape[1] if uses_seq else None)
        past = past_length(meta, feed)
        feeds[vname] = feed
        fed[vname] = {
            "batch": batch,
            "seq": seq,
            **({"past": past} if past is not None else {}),
            "tokens": tokens,
            "inputs": {name: list(arr.shape) for name, arr in feed.items()},
            "dtypes": {name: str(arr.dtype) for name, arr in feed.items()},
            "source": source if any(n in supplied for n in meta) else "generated",
        }
    if source == "file":
        _refuse_unused(supplied, variants, feeds)
    return feeds, fed


def _refuse_unused(
    supplied: Mapping[str, np.ndarray], variants: Mapping[str, TimedModel], feeds: Mapping[str, Feed]
) -> None:
    """Refuse --inputs arrays that no variant takes (a misnamed array would otherwise be
    ignored and its input drawn at random). An array only some variants take (LoRA
    inputs, adapter_ids) is fine."""
    taken = {n for feed in feeds.values() for n in feed}
    taken.update(n for v in variants.values() for n in v.runner.input_metadata())
    unused = [n for n in supplied if n not in taken]
    if unused:
        wants = "; ".join(
            f"model {n!r} takes {', '.join(map(repr, v.runner.input_metadata()))}" for n, v in variants.items()
        )
        raise BadInputError(f"--inputs array(s) {', '.join(map(repr, unused))} fed to no model ({wants})")


def past_length(meta: Mapping[str, Any], feed: Feed) -> int | None:
    """The cached tokens a KV-cache graph is fed (axis 2 of its past_key_values.* inputs);
    None for a graph without a cache."""
    pasts = [n for n in meta if n.startswith(PAST_PREFIX) and n in feed and feed[n].ndim == 4]
    return int(feed[pasts[0]].shape[2]) if pasts else None


def shared_feed(metadatas: Sequence[Mapping[str, Any]], shape: Shape, seed: int) -> Feed:
    """One feed holding every input the given metadata name (first declaration wins),
    drawn as `build_feeds` draws them."""
    feed: Feed = {}
    for meta in metadatas:
        for name, (dtype, dims) in meta.items():
            if name not in feed:
                concrete, _ = _resolve_dims(name, dims, shape)
                target = None if dtype is None else np.dtype(dtype)
                arr = draw(name, _canonical(target), concrete, shape, seed)
                feed[name] = arr if target is None else arr.astype(target, copy=False)
    return feed


def _run_errors() -> tuple[type[BaseException], ...]:
    """What a backend raises when a model cannot run a feed (not our own bugs)."""
    return ort_errors() + (RuntimeError, ValueError, IndexError)


def _runs(bind: Callable[[Feed], Callable[[], None]], feed: Feed) -> bool:
    try:
        bind(feed)()
    except _run_errors():
        return False
    return True


def first_call(
    variant: TimedModel, feed: Feed, key: str, bind: Callable[[Feed], Callable[[], None]] | None = None
) -> Callable[[], None]:
    """Bind (with `bind`, else the model's own) and run once; a failure becomes one line
    blaming the adapter or the model."""
    try:
        call = (bind or variant.bind)(feed)
        call()
        return call
    except LoraDeployError:
        raise
    except _run_errors() as err:
        where = f"model {variant.name!r} ({variant.path})"
        if variant.adapter is not None and variant.bind_plain is not None and _runs(variant.bind_plain, feed):
            raise BadInputError(f"adapter {variant.adapter} does not fit {where}: {error_line(err)}") from err
        raise BadInputError(f"{where} cannot run shape {key}: {error_line(err)}") from err


def prepare_shape(
    variants: Mapping[str, TimedModel],
    shape: Shape,
    seed: int,
    supplied: Mapping[str, np.ndarray] | None = None,
    source: str = "file",
) -> tuple[dict[str, Callable[[], None]], dict[str, dict[str, Any]]]:
    """Timed calls for one shape, each validated by one inference, and what each is fed.

    A variant whose graph fixes another batch than the one asked for is refused (it
    would run its own batch under the requested shape's name)."""
    key = shape_key(shape)
    feeds, fed = build_feeds(variants, shape, seed, supplied, source)
    calls = {}
    for name, variant in variants.items():
        feed = feeds[name]
        if len(shape) > 2 and fed[name].get("past") is None:
            raise BadInputError(
                f"shape {key} is a decode step ({shape[1]} new token(s) after {shape[2]} cached): model {name!r} "
                f"({variant.path}) takes no {PAST_PREFIX}* inputs; export it with --task text-generation-with-past"
            )
        if fed[name]["batch"] != shape[0]:
            fixed = ", ".join(f"{n!r} {list(s)}" for n, s in fed[name]["inputs"].items())
            raise BadInputError(
                f"shape {key} does not fit model {name!r} ({variant.path}): its graph fixes batch "
                f"{fed[name]['batch']} (inputs {fixed}); ask for --shapes {fed[name]['batch']}x{shape[1]}"
            )
        try:
            check_feed(feed, variant.runner.input_metadata())
        except BadInputError as err:
            raise BadInputError(f"shape {key} does not fit model {name!r} ({variant.path}): {err}") from err
        calls[name] = first_call(variant, feed, key)
    return calls, fed


def same_inputs(fed: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> None:
    """Refuse two requested shapes that feed every variant the very same inputs (a model
    with no sequence axis: 1x1 and 1x128 are one measurement under two names)."""
    seen: dict[tuple, str] = {}
    for key, variants in fed.items():
        signature = tuple(sorted((n, str(f["inputs"])) for n, f in variants.items()))
        if signature in seen:
            raise BadInputError(
                f"shapes {seen[signature]} and {key} feed every model the same inputs (no model takes a "
                "sequence length): list only one"
            )
        seen[signature] = key


def declared_inputs(variants: Mapping[str, TimedModel], module: str | None) -> dict[str, np.ndarray] | None:
    """The inputs plain modules declare for themselves (example_inputs(); the first
    declaration of a name wins), or None. A plain module that declares neither them nor
    input_metadata() cannot be fed generated inputs: that is refused here."""
    examples: dict[str, np.ndarray] = {}
    for variant in variants.values():
        for name, arr in (variant.example_feed or {}).items():
            examples.setdefault(name, arr)
    if examples:
        return examples
    if module is not None:
        blind = [n for n, v in variants.items() if all(m == (None, None) for m in v.runner.input_metadata().values())]
        if blind:
            raise BadInputError(
                f"model {blind[0]!r} (--module {module}) declares no inputs: pass --inputs FILE.npz (arrays named "
                "like forward's arguments), or give the module example_inputs() (or input_metadata() for --shapes)"
            )
    return None
