"""Token-exact generation checks: greedy tokens equal PEFT's unmerged `generate`, token for token.

A *generator* is any callable `gen(prompts, n_new) -> Generation` (lora_deploy.backends.
generation: left padding is the generator's business, no early stop at end-of-sequence).
Here:

- `reference_generation(base_dir, adapter_dir | None, prompts, n_new)`: PEFT's unmerged
  model (`PeftModel.from_pretrained`) running transformers' greedy `generate` in float32;
  with adapter_dir None, the base alone.
- `compare_generation(label, got, want, dtype)` -> a verify `Check`: tokens equal
  everywhere, logits within the dtype's tolerance (lora_deploy.compare) at every step up to
  each prompt's first divergence; the first divergence reported with its prompt, step, both
  tokens and the reference's logit margin between them, flagged as a near-tie when the
  margin is within what the tolerance allows (a float16 near-tie is not a wrong weight).
- `generation_report(base, adapter, candidates, n_new, ...)` -> a `VerifyReport` (the same
  report, table and JSON as `verify`) over the sample prompts: one prompt alone, and a batch
  of prompts of different lengths (padding); `Candidate.adapter_active` False compares a
  candidate with the base (a dynamic graph with no adapter active).
- `verify_generation(...)`: `lora-deploy verify BASE ADAPTER --generate N` with --onnx /
  --dynamic / --multi KV-cache graphs (our greedy loop, backends.onnxrt.decode) and --merged
  (transformers' generate); more generators (an onnxruntime-genai folder's) come in as
  `candidates=[Candidate(label, generator, adapter_active)]`.

`Generation` and the generator type live in lora_deploy.backends.generation (backends sit
below proof, and a backend's generator returns one): import them from there inside
backends/, from here anywhere above.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_deploy.backends.generation import Generation, Generator, check_prompts, left_pad
from lora_deploy.compare import Tolerance, check_tolerances, compare_array, tolerance
from lora_deploy.errors import BadInputError
from lora_deploy.proof.verify import (
    FAILED,
    NO_EFFECT,
    Check,
    VerifyReport,
    effect_result,
    figure,
    loosest,
    onnx_dtype,
    outcome,
    require_cpu,
)

__all__ = [
    "Generation",
    "Generator",
    "Candidate",
    "Divergence",
    "reference_generation",
    "PeftReference",
    "hf_generate",
    "compare_generation",
    "first_divergence",
    "generation_report",
    "prompt_sets",
    "check_context",
    "verify_generation",
]

PEFT = "peft (unmerged)"


# ---------------------------------------------------------------- reference


def reference_generation(
    base_dir: str | os.PathLike, adapter_dir: str | os.PathLike | None, prompts: Sequence[Sequence[int]], n_new: int
) -> Generation:
    """PEFT's unmerged model (or the base alone when adapter_dir is None), greedy, float32."""
    return PeftReference(base_dir, adapter_dir)(prompts, n_new)


class PeftReference:
    """The reference loaded once: `ref(prompts, n_new)` generates with the adapter,
    `ref(prompts, n_new, adapter=False)` with it disabled (the base model)."""

    def __init__(self, base_dir: str | os.PathLike, adapter_dir: str | os.PathLike | None):
        from lora_deploy.modeling.hf import load_for_task

        self.model = load_for_task(base_dir, "causal-lm", "float32")
        self.peft = None
        if adapter_dir is not None:
            try:
                from peft import PeftModel
            except ImportError:
                raise BadInputError(
                    "the generation reference is PEFT's unmerged model: pip install 'lora-deploy[reference]'"
                ) from None
            self.peft = PeftModel.from_pretrained(self.model, str(adapter_dir)).eval()

    def __call__(self, prompts: Sequence[Sequence[int]], n_new: int, adapter: bool = True) -> Generation:
        if self.peft is None:
            return hf_generate(self.model, prompts, n_new)
        if adapter:
            return hf_generate(self.peft, prompts, n_new)
        with self.peft.disable_adapter():
            return hf_generate(self.peft, prompts, n_new)


def hf_generate(model, prompts: Sequence[Sequence[int]], n_new: int) -> Generation:
    """transformers' greedy `generate` on left-padded prompts: exactly n_new tokens per prompt
    (no end-of-sequence stop), with the raw logits each token was chosen from."""
    import torch
    from transformers import GenerationConfig

    prompts = check_prompts(prompts, n_new)
    config = getattr(model, "config", None)
    pad_id = getattr(config, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    ids, mask = left_pad(prompts, pad_id)
    settings = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=n_new,
        eos_token_id=None,
        pad_token_id=pad_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    # transformers fills every setting left at its default (eos_token_id=None included) from
    # the model's own generation_config: its end-of-sequence would stop rows early (padded),
    # its repetition_penalty & co. would change the greedy choice. Plain defaults meanwhile.
    owner = model.get_base_model() if hasattr(model, "get_base_model") else model
    own = owner.generation_config
    owner.generation_config = GenerationConfig()
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), generation_config=settings
            )
    finally:
        owner.generation_config = own
    tokens = out.sequences[:, ids.shape[1] :].numpy()
    logits = torch.stack([step.float() for step in out.logits], dim=1).numpy()
    return Generation(tokens, logits)


def hf_generator(model_dir: str | os.PathLike) -> Generator:
    """A generator over a checkpoint in transformers (e.g. a merged one), float32."""
    from lora_deploy.modeling.hf import load_for_task

    model = load_for_task(model_dir, "causal-lm", "float32")
    return lambda prompts, n_new: hf_generate(model, prompts, n_new)


# ---------------------------------------------------------------- comparison


@dataclass(frozen=True)
class Divergence:
    """The first step (earliest, then lowest prompt index) where a candidate chose another token."""

    prompt: int
    step: int
    got: int  # the candidate's token
    want: int  # the reference's token
    margin: float  # reference logit of `want` minus its logit of `got` (>= 0 for greedy)
    allowed: float  # how far two logits within tolerance can move apart
    rows: int  # how many prompts diverge at some step

    @property
    def near_tie(self) -> bool:
        """The two logits are within what the tolerance allows of each other, either way round;
        NaN (the candidate's token is outside the reference's vocabulary) is never a near-tie."""
        return abs(self.margin) <= self.allowed

    def describe(self) -> str:
        if self.near_tie:
            tie = f"near-tie: within the {figure(self.allowed)} the logit tolerance allows"
        elif self.margin < 0:  # the reference's own logits put `got` clearly ahead of its token
            tie = (
                f"not a near-tie: the reference's logits favour token {self.got} beyond the "
                f"{figure(self.allowed)} the tolerance allows, so its token {self.want} was not its top-1"
            )
        else:
            tie = f"not a near-tie: token {self.got} is clearly wrong, tolerance allows {figure(self.allowed)}"
        return (
            f"first divergence: prompt {self.prompt}, step {self.step}: token {self.got} instead of {self.want} "
            f"(reference logit margin {figure(self.margin)}, {tie}); {self.rows} prompt(s) diverge"
        )


def first_divergence(got: Generation, want: Generation, tol: Tolerance) -> Divergence | None:
    """Where the candidate's tokens first leave the reference's; None when they never do.

    The margin is the reference's own: its top-1 logit minus its logit for the candidate's
    token. Each of the two logits may be off by atol + rtol * |logit| and still pass, so a
    margin up to twice that can be flipped by a within-tolerance difference: a near-tie."""
    differ = got.tokens != want.tokens
    if not differ.any():
        return None
    rows = np.flatnonzero(differ.any(axis=1))
    firsts = [(int(np.argmax(differ[r])), int(r)) for r in rows]
    step, prompt = min(firsts)
    g, w = int(got.tokens[prompt, step]), int(want.tokens[prompt, step])
    logits = want.logits[prompt, step].astype(np.float64)
    lg, lw = float(logits[g]) if g < logits.size else float("nan"), float(logits[w])
    allowed = 2 * (tol.atol + tol.rtol * max(abs(lw), abs(lg) if np.isfinite(lg) else 0.0))
    return Divergence(prompt, step, g, w, lw - lg, allowed, len(rows))


def compare_generation(
    label: str, got: Generation, want: Generation, dtype: str, *, atol: float | None = None, rtol: float | None = None
) -> Check:
    """One candidate's generation against the reference's, as a verify check named
    `generate: {label}`: passed when every token is equal and the logits are within the
    dtype's tolerance at every step up to each prompt's first divergence (after it the
    contexts differ and logits are not comparable)."""
    tol = tolerance(dtype, atol, rtol)
    name = f"generate: {label}"
    if got.tokens.shape != want.tokens.shape or got.logits.shape[-1] != want.logits.shape[-1]:
        return Check(
            name,
            FAILED,
            atol=tol.atol,
            rtol=tol.rtol,
            detail=f"shape: tokens {list(got.tokens.shape)}, logits {list(got.logits.shape)} != reference "
            f"{list(want.tokens.shape)}, {list(want.logits.shape)}",
            inputs="prompts",
        )
    divergence = first_divergence(got, want, tol)
    differ = got.tokens != want.tokens
    keep = np.ones(got.tokens.shape, dtype=bool)
    for row in np.flatnonzero(differ.any(axis=1)):
        keep[row, int(np.argmax(differ[row])) + 1 :] = False  # the diverging step itself is comparable
    logits = compare_array("logits", got.logits[keep], want.logits[keep], tol)
    problems = [] if divergence is None else [divergence.describe()]
    if not logits.passed:
        problems.append(f"logits: {logits.reason}")
    batch, steps = got.tokens.shape
    detail = "; ".join(problems) if problems else f"{batch} prompt(s) x {steps} tokens equal"
    return Check(
        name,
        outcome(not problems),
        max_abs=logits.max_abs,
        max_rel=logits.max_rel,
        cosine=logits.cosine,
        top1=float(np.mean(~differ)),  # share of steps whose token matches
        atol=tol.atol,
        rtol=tol.rtol,
        detail=detail,
        inputs="prompts",
    )


# ---------------------------------------------------------------- report


@dataclass
class Candidate:
    """A generator to check: against base + adapter (adapter_active) or the base alone."""

    label: str
    generate: Generator
    adapter_active: bool = True


def prompt_sets(config, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, list[list[int]]]:
    """The sample prompts: one prompt of `seq` tokens alone, and a batch of `batch` (at least
    2) prompts of different lengths, from `seq` down to a third of it (left padding)."""
    from lora_deploy.modeling.samples import sample_prompts

    rows = max(batch, 2)
    lengths = [max(1, round(seq - (seq - max(1, seq // 3)) * i / (rows - 1))) for i in range(rows)]
    return {
        "prompt": sample_prompts(config, [seq], seed=seed),
        "padded batch": sample_prompts(config, lengths, seed=seed + 1),
    }


def check_context(config, prompts: dict[str, list[list[int]]], n_new: int, where: str = "config.json") -> None:
    """A prompt plus the new tokens must fit the model's positions: exit 2 otherwise."""
    from lora_deploy.modeling.samples import check_input_size
    from lora_deploy.modeling.tasks import text_config

    text = text_config(config)
    longest = max(len(p) for group in prompts.values() for p in group)
    positions = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    if positions and longest + n_new > positions:
        raise BadInputError(
            f"generate: a prompt of {longest} tokens plus {n_new} new tokens is longer than the model's "
            f"{positions} positions ({where})"
        )
    rows = max(len(group) for group in prompts.values())
    check_input_size(rows, longest + n_new, config, what="generate", copies=2, where=where)


def generation_report(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    candidates: Sequence[Candidate],
    n_new: int,
    *,
    prompts: dict[str, list[list[int]]] | None = None,
    dtype: str = "float32",
    atol: float | None = None,
    rtol: float | None = None,
    batch: int = 2,
    seq: int = 16,
    seed: int = 0,
    allow_no_effect: bool = False,
    inputs: dict | None = None,
) -> VerifyReport:
    """Every candidate on every prompt set against PEFT's generation; the adapter's effect on
    the generation (adapter vs base) first, as verify reports it for outputs."""
    from lora_deploy.modeling.tasks import load_config

    if not candidates:
        raise BadInputError("nothing to generate with: give a KV-cache graph (--onnx, --dynamic, --multi) or --merged")
    config = load_config(base_dir)
    if prompts is None:
        prompts = prompt_sets(config, batch, seq, seed)
    check_context(config, prompts, n_new, where=str(Path(base_dir) / "config.json"))
    tol = tolerance(dtype, atol, rtol)
    report = VerifyReport(inputs={"base": str(base_dir), "adapter": str(adapter_dir), "generate": n_new})
    report.inputs.update(inputs or {})
    report.inputs.update(batch=batch, seq=seq, seed=seed, prompts=prompts, allow_no_effect=allow_no_effect)
    reference = PeftReference(base_dir, adapter_dir)
    for label, group in prompts.items():
        want = reference(group, n_new)
        base = reference(group, n_new, adapter=False)
        effect = effect_on_generation(want, base, dtype, tol, label, allow_no_effect)
        report.checks.append(effect)
        report.effect[label] = {
            "tokens_changed": None if effect.top1 is None else 1.0 - effect.top1,
            "max_abs": effect.max_abs,
            "no_effect": effect.detail.startswith(NO_EFFECT),
        }
        for candidate in candidates:
            got = candidate.generate(group, n_new)
            against = want if candidate.adapter_active else base
            who = PEFT if candidate.adapter_active else "base"
            check = compare_generation(
                f"[{label}] {candidate.label} vs {who}", got, against, dtype, atol=atol, rtol=rtol
            )
            check.inputs = label
            report.checks.append(check)
    return report


def effect_on_generation(
    want: Generation, base: Generation, dtype: str, tol: Tolerance, label: str, allow: bool
) -> Check:
    """The adapter's effect: base + adapter's generation against the base's. When the base
    would pass the generation check as this adapter's, the checks prove nothing."""
    same = compare_generation("effect", base, want, dtype, atol=tol.atol, rtol=tol.rtol)
    changed = 1.0 - same.top1 if same.top1 is not None else None
    shown = f"tokens changed at {100 * changed:.1f}% of steps, max |delta logit| {figure(same.max_abs)}"
    no_effect = (
        f"base + adapter generates what the base generates on the {label} (within tolerance: {shown}), "
        "so the generation checks cannot tell the adapter from its absence"
    )
    changes = f"the adapter changes the generation: {shown}" if same.failed else None
    name = f"effect [{label}]: generation, base + adapter vs base"
    return effect_result(name, same, tol, label, changes, no_effect, allow)


# ---------------------------------------------------------------- verify --generate


def verify_generation(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    n_new: int,
    *,
    merged_dir: str | os.PathLike | None = None,
    onnx_path: str | os.PathLike | None = None,
    dynamic_path: str | os.PathLike | None = None,
    packed_path: str | os.PathLike | None = None,
    multi_path: str | os.PathLike | None = None,
    candidates: Sequence[Candidate] = (),
    atol: float | None = None,
    rtol: float | None = None,
    batch: int = 2,
    seq: int = 16,
    seed: int = 0,
    task: str = "auto",
    inputs_path: str | os.PathLike | None = None,
    allow_no_effect: bool = False,
    device: str = "cpu",
    provider: str | None = None,
    trt_fp16: bool = False,
    trt_cache: str | os.PathLike | None = None,
) -> VerifyReport:
    """`verify --generate N`: each artifact's greedy generation against PEFT's.

    --onnx: a KV-cache graph (export --task text-generation-with-past) run by our greedy loop;
    a dynamic-adapter graph given as --onnx or --dynamic is checked with the adapter active
    (--packed, or ADAPTER packed on the fly) and with none (against the base); --multi with
    every row on this adapter and on none; --merged through transformers' generate.
    Prompts: prompt_sets (batch, seq, seed), and each row of `inputs_path` (an .npz with
    input_ids and attention_mask) too. `candidates`: more generators to check alongside
    (an onnxruntime-genai folder's). The keywords are verify's (VerifyOptions); generation
    runs on the CPU, so `device` other than cpu and ONNX Runtime's GPU options are refused."""
    import tempfile

    from lora_deploy.adapter.read import load_adapter
    from lora_deploy.io.provenance import artifact_hashes
    from lora_deploy.modeling.tasks import CAUSAL_LM, TEXT_GENERATION_WITH_PAST, load_config

    require_cpu("--generate", device, provider, trt_fp16, trt_cache)
    check_tolerances(atol, rtol)
    if task not in ("auto", CAUSAL_LM, TEXT_GENERATION_WITH_PAST):
        raise BadInputError(
            f"--generate checks decoders: --task must be auto, {CAUSAL_LM} or {TEXT_GENERATION_WITH_PAST}"
        )
    paths = {"onnx": onnx_path, "dynamic": dynamic_path, "packed": packed_path, "multi": multi_path}
    for path in [*paths.values(), inputs_path]:
        if path is not None and not Path(path).is_file():
            raise BadInputError(f"{path}: file not found")
    if packed_path is not None and onnx_path is None and dynamic_path is None:
        raise BadInputError("--packed is activated on a dynamic-adapter graph: give it with --dynamic (or --onnx)")
    config = load_config(base_dir)
    prompts = prompt_sets(config, batch, seq, seed)
    if inputs_path is not None:
        prompts[Path(inputs_path).name] = golden_prompts(inputs_path, config)
    check_context(config, prompts, n_new, where=str(Path(base_dir) / "config.json"))
    load_adapter(adapter_dir)  # a malformed adapter fails here, before any graph is loaded
    dtypes = ["float32"] + [onnx_dtype(Path(p)) for p in (onnx_path, dynamic_path, multi_path) if p is not None]
    with tempfile.TemporaryDirectory() as tmp:
        found = generation_candidates(
            adapter_dir, Path(tmp), merged_dir, onnx_path, dynamic_path, packed_path, multi_path
        )
        report = generation_report(
            base_dir,
            adapter_dir,
            [*found, *candidates],
            n_new,
            prompts=prompts,
            dtype=loosest(dtypes),
            atol=atol,
            rtol=rtol,
            batch=batch,
            seq=seq,
            seed=seed,
            allow_no_effect=allow_no_effect,
            inputs={role: None if p is None else str(p) for role, p in {**paths, "merged": merged_dir}.items()}
            | {"golden_inputs": None if inputs_path is None else str(inputs_path)},
        )
    roles = {"base": base_dir, "adapter": adapter_dir, "merged": merged_dir, **paths, "golden_inputs": inputs_path}
    report.artifacts = {role: artifact_hashes(path) for role, path in roles.items() if path is not None}
    return report


def golden_prompts(path, config) -> list[list[int]]:
    """Each row's real tokens (attention_mask 1) of an .npz of tokenized text, as prompts."""
    from lora_deploy.proof.inputs import load_golden_inputs

    feed = load_golden_inputs(path, config).feed
    ids = feed["input_ids"]
    mask = feed.get("attention_mask", np.ones_like(ids))
    return [row[keep == 1].tolist() for row, keep in zip(ids, mask)]


def generation_candidates(
    adapter_dir, tmp: Path, merged_dir, onnx_path, dynamic_path, packed_path, multi_path
) -> list[Candidate]:
    """The generators for the artifacts given."""
    from lora_deploy.backends.onnxrt.decode import KvGraph, onnx_generator

    found: list[Candidate] = []
    if merged_dir is not None:
        found.append(Candidate("merged (transformers)", hf_generator(merged_dir)))
    for path in (onnx_path, dynamic_path):
        if path is None:
            continue
        graph = KvGraph(path)
        if graph.adapter_ids:
            raise BadInputError(f"{path}: a multi-adapter graph: give it with --multi")
        if graph.lora_inputs:
            packed = packed_path or pack_for(adapter_dir, path, tmp)
            found.append(Candidate("kv-cache onnx, dynamic (adapter active)", onnx_generator(graph, adapter=packed)))
            found.append(Candidate("kv-cache onnx, dynamic (no adapter)", onnx_generator(graph), adapter_active=False))
        elif path == dynamic_path:
            raise BadInputError(f"{path}: has no LoRA inputs, so it is not a dynamic-adapter graph (give it as --onnx)")
        elif packed_path is not None and dynamic_path is None:
            raise BadInputError(f"{path}: has no LoRA inputs to activate --packed on")
        else:
            found.append(Candidate("kv-cache onnx", onnx_generator(graph)))
    if multi_path is not None:
        graph = KvGraph(multi_path)
        own = graph.adapter_id(adapter_dir)
        found.append(Candidate(f"kv-cache onnx, multi (adapter_ids={own})", onnx_generator(graph, adapter_id=own)))
        found.append(Candidate("kv-cache onnx, multi (no adapter)", onnx_generator(graph, adapter_id=-1), False))
    return found


def pack_for(adapter_dir, graph, tmp: Path) -> Path:
    """ADAPTER packed as an .onnx_adapter (checked against `graph` when given)."""
    from lora_deploy.backends.onnxrt.lora_format import pack_adapter

    return pack_adapter(adapter_dir, tmp / f"adapter-{len(list(tmp.iterdir()))}.onnx_adapter", onnx_path=graph)
