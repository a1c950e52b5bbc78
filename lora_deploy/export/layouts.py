"""Where an exporter's graph keeps each checkpoint tensor: one small declarative map per
exporter, for `merge --onnx-like` (lora_deploy.export.like).

A Layout is a list of rules, initializer name pattern -> checkpoint tensor name(s) + one
transform, the same for every rule:

    initializer = concat(sources, axis 0), then transposed when `transpose`

(axis 0 is a Linear weight's output dimension, or a bias's only one). Two exporters:

* lora-deploy's own (`export onnx`): an initializer named like a checkpoint tensor is that
  tensor (identity); any other is a buffer or a constant.
* onnxruntime-genai's model builder (`export genai`, float graphs), for LLaMA-family
  decoders: a Linear weight W [out, in] is its MatMul node's Wᵀ [in, out], named by the node
  (`model.layers.{i}.attn.o_proj.MatMul.weight`; the nodes are backends/onnxrt/genai.py's LORA_NAMES);
  q, k and v are packed into one MatMul, concat(Wq, Wk, Wv)ᵀ [in, q+k+v]
  (`...attn.qkv_proj.MatMul.weight`, unpacked only in graphs built with an adapter); biases
  are `<node>.Add.bias`, packed alike (no transpose); norms keep their names except the
  final one (`model.layers.{num_layers}.final_norm_layernorm.weight`); the output layer is
  `lm_head.MatMul.weight`, the embeddingᵀ when the checkpoint ties it (no lm_head.weight).
  Checked on the reference LLaMA, fp32 and fp16 builds (tests/export/test_like_genai.py).

Placeholders: {i} a layer index, {name} any name. Rules with the same pattern are
alternatives: the first whose sources the checkpoint has wins. An initializer no rule maps
is unmapped (reported by the caller, not an error). The graph's layout is the one that maps
the most of its initializers (detect). Whether shapes and values agree is the caller's
check: Mapping.shape gives the shape the sources must make.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from lora_deploy.backends.onnxrt.genai import LORA_NAMES


@dataclass(frozen=True)
class Rule:
    """Initializer `graph` is concat(`sources`, axis 0), transposed when `transpose`."""

    graph: str
    sources: tuple[str, ...]
    transpose: bool = False


@dataclass(frozen=True)
class Layout:
    """One exporter's rules. `baked_lora`: a pattern of initializer names that hold LoRA
    weights inside the graph (a graph built with an adapter); such a graph is refused."""

    name: str
    rules: tuple[Rule, ...]
    baked_lora: str | None = None


@dataclass(frozen=True)
class Mapping:
    """Where one initializer comes from: checkpoint tensors and the transform."""

    sources: tuple[str, ...]
    transpose: bool = False

    def shape(self, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...] | None:
        """The initializer's shape given its sources' shapes; None when they do not combine
        (different trailing dimensions, or a transpose of something not 2-D)."""
        first = tuple(shapes[0])
        if len(shapes) > 1:
            if not first or any(len(s) != len(first) or tuple(s[1:]) != first[1:] for s in shapes):
                return None
            first = (sum(s[0] for s in shapes), *first[1:])
        if self.transpose:
            return first[::-1] if len(first) == 2 else None
        return first

    def apply(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """The initializer's values from its sources' (each already in the graph's dtype)."""
        values = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        return values.T if self.transpose else values

    def describe(self) -> str:
        how = [w for w, on in (("concatenated", len(self.sources) > 1), ("transposed", self.transpose)) if on]
        return ", ".join(self.sources) + (f" ({' and '.join(how)})" if how else "")


def node_weight(node: str, kind: str = "MatMul.weight") -> str:
    """The builder's name for a node's weight: '/model/layers.{i}/attn/q_proj' ->
    'model.layers.{i}.attn.q_proj.MatMul.weight'."""
    return f"{node[1:].replace('/', '.')}.{kind}"


def _genai_rules() -> tuple[Rule, ...]:
    rules = [Rule("model.embed_tokens.weight", ("model.embed_tokens.weight",))]
    for norm in ("input_layernorm", "post_attention_layernorm"):
        rules.append(Rule(f"model.layers.{{i}}.{norm}.weight", (f"model.layers.{{i}}.{norm}.weight",)))
    rules.append(Rule("model.layers.{i}.final_norm_layernorm.weight", ("model.norm.weight",)))
    qkv = [module for module, _ in LORA_NAMES if module.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")]
    packed = "/model/layers.{i}/attn/qkv_proj"
    rules.append(Rule(node_weight(packed), tuple(f"{m}.weight" for m in qkv), transpose=True))
    rules.append(Rule(node_weight(packed, "Add.bias"), tuple(f"{m}.bias" for m in qkv)))
    for module, node in LORA_NAMES:
        rules.append(Rule(node_weight(node), (f"{module}.weight",), transpose=True))
        rules.append(Rule(node_weight(node, "Add.bias"), (f"{module}.bias",)))
    rules.append(Rule("lm_head.MatMul.weight", ("lm_head.weight",), transpose=True))
    rules.append(Rule("lm_head.MatMul.weight", ("model.embed_tokens.weight",), transpose=True))  # tied
    rules.append(Rule("lm_head.Add.bias", ("lm_head.bias",)))
    return tuple(rules)


OURS = Layout("lora-deploy export onnx", (Rule("{name}", ("{name}",)),))
GENAI = Layout("onnxruntime-genai model builder", _genai_rules(), baked_lora=r"\.lora_[AB]\.MatMul\.weight$")
LAYOUTS = (OURS, GENAI)  # ties go to the first


def _pattern(template: str) -> re.Pattern:
    text = re.escape(template)
    text = text.replace(re.escape("{i}"), r"(?P<i>\d+)").replace(re.escape("{name}"), r"(?P<name>.+)")
    return re.compile(text)


@dataclass(frozen=True)
class Resolved:
    """A graph's initializers under one layout."""

    layout: Layout
    mapped: dict[str, Mapping]  # initializer -> its origin, in the graph's order
    unmapped: list[str]


def resolve(layout: Layout, names: Iterable[str], has: Callable[[str], bool]) -> Resolved:
    """Map each name by the first rule that matches it and whose sources `has` accepts."""
    compiled = [(_pattern(rule.graph), rule) for rule in layout.rules]
    mapped: dict[str, Mapping] = {}
    unmapped: list[str] = []
    for name in names:
        for pattern, rule in compiled:
            match = pattern.fullmatch(name)
            if match is None:
                continue
            sources = tuple(s.format(**match.groupdict()) for s in rule.sources)
            if all(has(s) for s in sources):
                mapped[name] = Mapping(sources, rule.transpose)
                break
        else:
            unmapped.append(name)
    return Resolved(layout, mapped, unmapped)


def detect(names: Collection[str], checkpoint: Collection[str], layouts: Sequence[Layout] = LAYOUTS) -> Resolved | None:
    """The layout that maps the most of the graph's initializers onto the checkpoint's
    tensors (None: no layout maps any)."""
    best: Resolved | None = None
    for layout in layouts:
        found = resolve(layout, names, checkpoint.__contains__)
        if found.mapped and (best is None or len(found.mapped) > len(best.mapped)):
            best = found
    return best
