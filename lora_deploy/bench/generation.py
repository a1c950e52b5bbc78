"""Generation mode (`bench --generate N`): every round one greedy generation of N new
tokens per row on each KV-cache graph, after a prompt shape (BATCHxPROMPT). The step
times of every timed generation are recorded, and each report entry gets a
"generation" block: prefill and per-token decode latencies, decode tokens/s."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lora_deploy.backends.base import TimedModel
from lora_deploy.bench.feeds import draw, first_call
from lora_deploy.bench.measure import BenchProgress
from lora_deploy.bench.schema import ms, validate_report
from lora_deploy.bench.shapes import Shape, shape_key
from lora_deploy.bench.stats import paired_ratios, session_ratio_ci, tail_percentile
from lora_deploy.errors import BadInputError
from lora_deploy.modeling.samples import ATTENTION_MASK, INPUT_IDS
from lora_deploy.modeling.tasks import PAST_PREFIX


def _p99_ms(seconds: list[float]) -> float | None:
    """The p99 in ms, None from fewer samples than a p99 needs (stats.TAIL_MIN_SAMPLES)."""
    p99 = tail_percentile(seconds, "p99")
    return None if p99 is None else ms(p99)


def check_generate(
    generate: int | None, shapes: Sequence[Shape] | None, inner: int, rate: Any, inputs_path: Any, module: Any
) -> None:
    """`--generate N` times whole generations after prompt shapes: one line for what does not go with it."""
    if generate is None:
        return
    if generate < 1:
        raise BadInputError(f"--generate must be >= 1 new token, got {generate}")
    if rate is not None or inputs_path is not None or module is not None:
        raise BadInputError(
            "--generate times greedy generations of KV-cache graphs: drop --rate, --inputs and --module"
        )
    if inner != 1:
        raise BadInputError("--generate times one whole generation per round: drop --inner")
    decode = [shape_key(s) for s in shapes or () if len(s) > 2]
    if decode:
        raise BadInputError(
            f"--generate takes prompt shapes BATCHxPROMPT (e.g. 1x32), not decode steps ({', '.join(decode)})"
        )


class StepRecorder:
    """The step times of one model's generations at one shape (`bench --generate`): every
    call's list lands in `pending`; at the end of each timed round (the measurement's
    progress tick) the last one, the round's timed call, moves to `rounds` and the
    untimed ones (first check, warmup) are dropped. Needs one call per round (inner 1)."""

    def __init__(self) -> None:
        self.pending: list[list[float]] = []
        self.rounds: list[list[float]] = []

    def __call__(self, step_seconds: list[float]) -> None:
        self.pending.append(list(step_seconds))

    def close_round(self) -> None:
        if self.pending:
            self.rounds.append(self.pending[-1])
            self.pending.clear()


def prepare_generation(
    variants: Mapping[str, TimedModel],
    shape: Shape,
    n_new: int,
    seed: int,
    recorders: Mapping[str, StepRecorder],
) -> tuple[dict[str, Callable[[], None]], dict[str, dict[str, Any]]]:
    """Per model a call running one greedy generation of `n_new` tokens per row after a
    prompt of shape (batch, prompt length), checked by one run, and what it is fed. Every
    model gets the same prompt (drawn from the seed, no padding)."""
    key = shape_key(shape)
    ids = draw(INPUT_IDS, np.dtype(np.int64), (shape[0], shape[1]), shape, seed)
    mask = np.ones_like(ids)
    calls, fed = {}, {}
    for name, variant in variants.items():
        if variant.bind_generation is None:
            raise BadInputError(
                f"--generate: model {name!r} ({variant.path}) cannot generate: it takes no {PAST_PREFIX}* inputs; "
                "export it with --task text-generation-with-past (ONNX Runtime backend)"
            )
        bind = lambda feed, variant=variant, name=name: variant.bind_generation(  # noqa: E731
            feed[INPUT_IDS], feed[ATTENTION_MASK], n_new, recorders[name]
        )
        calls[name] = first_call(variant, {INPUT_IDS: ids, ATTENTION_MASK: mask}, key, bind=bind)
        fed[name] = {
            "batch": shape[0],
            "seq": shape[1],
            "generated": n_new,
            "tokens": True,
            "inputs": {INPUT_IDS: list(ids.shape), ATTENTION_MASK: list(mask.shape)},
            "dtypes": {INPUT_IDS: str(ids.dtype), ATTENTION_MASK: str(mask.dtype)},
            "source": "generated",
        }
    return calls, fed


def closing_rounds(
    recorders: Mapping[str, Mapping[str, StepRecorder]], progress: BenchProgress | None
) -> BenchProgress:
    """A progress callback that closes every recorder's round of that shape, then reports."""

    def tick(key: str, done: int, total: int) -> None:
        for recorder in recorders[key].values():
            recorder.close_round()
        if progress is not None:
            progress(key, done, total)

    return tick


def generation_summary(
    step_rounds: Sequence[Sequence[float]],
    batch: int,
    reference_rounds: Sequence[Sequence[float]] | None = None,
    reference: str = "",
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
    sessions: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The step figures of a model's timed generations: per round the step seconds
    (prefill first, then each decode step). The prefill's latency per round, every decode
    step's latency pooled over rounds (median and p99), decode tokens/s (rows per median
    step), and with `reference_rounds` the per-round ratio of the median decode step to
    the reference's (median and CI; with `sessions`, the session of every round, the
    session is the unit: `stats.session_ratio_ci`): a whole generation's ratio is the entry's own."""
    prefill = [float(r[0]) for r in step_rounds]
    decode = [[float(t) for t in r[1:]] for r in step_rounds]
    pooled = [t for r in decode for t in r]
    out: dict[str, Any] = {
        "new_tokens": len(step_rounds[0]),
        "prefill_s": prefill,
        "decode_step_s": decode,
        "prefill_p50_ms": ms(float(np.median(prefill))),
        "prefill_p99_ms": _p99_ms(prefill),
        "decode_p50_ms": None,
        "decode_p99_ms": None,
        "decode_tokens_per_s": None,
        "decode_ratio": None,
    }
    if pooled:
        step = float(np.median(pooled))
        out.update(
            decode_p50_ms=ms(step),
            decode_p99_ms=_p99_ms(pooled),
            decode_tokens_per_s=batch / step if step > 0 else None,
        )
        if reference_rounds is not None:
            mine = [float(np.median(r)) for r in decode]
            theirs = [float(np.median(r[1:])) for r in reference_rounds]
            labels = [0] * len(mine) if sessions is None else sessions
            median, low, high = session_ratio_ci(
                [paired_ratios(theirs, mine)], labels, confidence=confidence, resamples=resamples, seed=seed
            )
            out["decode_ratio"] = {"vs": reference, "median": median, "low": low, "high": high}
    return out


def add_generation(report: dict[str, Any], steps: Mapping[str, Mapping[str, Sequence[Sequence[float]]]], n_new: int):
    """Put each model's `generation_summary` into a `bench --generate` report (its blocks get
    "generate": n_new); `steps` is {shape key: {model: step seconds per round}}."""
    config = report["config"]
    reference = config["reference"]
    ci = {k: config[k] for k in ("confidence", "resamples", "seed") if k in config}
    for key, block in report["results"].items():
        block["generate"] = n_new
        rounds = steps[key]
        for name, entry in block["variants"].items():
            if len(rounds[name]) != entry["n"]:
                raise RuntimeError(f"{key}/{name}: {len(rounds[name])} recorded generations for {entry['n']} rounds")
            other = None if name == reference else rounds[reference]
            entry["generation"] = generation_summary(
                rounds[name], block["batch"], other, reference, **ci, sessions=entry.get("sample_sessions")
            )
    return validate_report(report)
