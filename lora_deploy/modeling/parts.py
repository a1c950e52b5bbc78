"""Parts of a plain module (vision encoder, language model, action head): a submodule named
by its path (`blocks.0`, `llm.lm_head`), seen through the whole model's forward.

* `record_part`: one forward of the whole model with hooks on the part records what the
  part receives and returns (its first call), so a part's graph is exported on realistic
  inputs (the observations' own activations), not on guessed shapes.
* `PartCall`: the part as a module whose `forward` takes those inputs by name: tensors
  (a tuple or list of tensors becomes `name_0`, `name_1`, ...), with `None`, numbers,
  strings and bools baked in as they were recorded. Anything else (a cache object, a
  mapping) is refused in one line.
* `substituted`: while active, each named part's output is replaced by what a callable
  (e.g. its ONNX graph in ONNX Runtime) returns on the part's named inputs: the whole
  model then runs as a chain of part graphs with the model's own code between them
  (the glue: reshapes, concatenations, parameters outside every part), the way robot
  stacks deploy such a model part by part.
"""

from __future__ import annotations

import inspect
import keyword
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lora_deploy.errors import BadInputError

_CONSTANTS = (type(None), bool, int, float, str)


def find_part(model: nn.Module, name: str, source: str) -> nn.Module:
    """The submodule at `name` (a dotted path, as named_modules() spells it)."""
    modules = dict(model.named_modules())
    if not name or name not in modules:
        shown = [n for n in modules if n and "." not in n][:8]
        raise BadInputError(f"{source} has no part {name!r} (a submodule path; top level: {', '.join(shown)})")
    return modules[name]


@dataclass
class PartSignature:
    """How one recorded call of a part maps onto named graph inputs."""

    part: str
    args: list[tuple[str, Any]]  # (argument name, recorded value), positional then keyword, in call order
    positional: int  # how many of `args` were passed positionally
    input_names: list[str]
    output_count: int
    output_template: Any = None  # what the part returned (structure only: see rebuild_output)

    def call(self, module: nn.Module, inputs: Sequence[torch.Tensor]) -> Any:
        """Call `module` with the recorded structure, tensors taken from `inputs` in order."""
        values = iter(inputs)
        rebuilt = [(name, _rebuild(value, values)) for name, value in self.args]
        positional = [value for _, value in rebuilt[: self.positional]]
        return module(*positional, **dict(rebuilt[self.positional :]))

    def rebuild_output(self, outputs: Sequence[torch.Tensor]) -> Any:
        """Flat graph outputs in the structure the part returns (a tensor, a tuple, or a
        mapping such as transformers' ModelOutput, None entries kept)."""
        values = iter(outputs)
        template = self.output_template
        if isinstance(template, Mapping):
            return type(template)(**{k: _rebuild(v, values) for k, v in template.items()})
        return _rebuild(template, values)


def _rebuild(value: Any, tensors: Iterator[torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return next(tensors)
    if isinstance(value, (tuple, list)):
        return type(value)(_rebuild(item, tensors) for item in value)
    return value


def _flatten(name: str, value: Any, source: str) -> list[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        return [(name, value)]
    if isinstance(value, (tuple, list)) and all(isinstance(v, (torch.Tensor, *_CONSTANTS)) for v in value):
        return [(f"{name}_{i}", v) for i, v in enumerate(value) if isinstance(v, torch.Tensor)]
    if isinstance(value, _CONSTANTS):
        return []
    raise BadInputError(
        f"{source}: argument {name!r} is a {type(value).__name__}; a part graph takes tensors (or tuples of "
        "tensors), with None, numbers and strings kept as recorded"
    )


def _identifier(name: str) -> str:
    text = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    text = text if text and not text[0].isdigit() else f"x_{text}"
    return f"{text}_" if keyword.iskeyword(text) else text


def record_part(model: nn.Module, part: str, feed: Mapping[str, np.ndarray], source: str):
    """One forward of `model` on `feed`: (the part's signature, its recorded input
    tensors by graph input name, its recorded outputs as a list of tensors)."""
    from lora_deploy.modeling.hf import flatten_outputs

    sub = find_part(model, part, source)
    what = f"{source}, part {part}"
    seen: dict[str, Any] = {}

    def before(_module, args, kwargs):
        if "args" not in seen:
            seen["args"], seen["kwargs"] = args, dict(kwargs)

    def after(_module, _args, _kwargs, output):
        if "output" not in seen:
            seen["output"] = output

    handles = [
        sub.register_forward_pre_hook(before, with_kwargs=True),
        sub.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        with torch.inference_mode():
            model(**{name: torch.from_numpy(arr) for name, arr in feed.items()})
    except BadInputError:
        raise
    except Exception as err:  # user code on its own inputs
        raise BadInputError(f"{source} fails on its inputs: {type(err).__name__}: {err}") from err
    finally:
        for handle in handles:
            handle.remove()
    if "output" not in seen:
        raise BadInputError(f"{what}: the model's forward never calls it on these inputs")
    try:
        names = list(inspect.signature(sub.forward).parameters)
    except (TypeError, ValueError):
        names = []
    positional = [(names[i] if i < len(names) else f"arg{i}", v) for i, v in enumerate(seen["args"])]
    args = positional + list(seen["kwargs"].items())
    flat = [(_identifier(n), t) for name, value in args for n, t in _flatten(name, value, what)]
    if not flat:
        raise BadInputError(f"{what}: it is called without tensor inputs")
    if len({n for n, _ in flat}) != len(flat):
        raise BadInputError(f"{what}: its inputs do not have distinct names ({', '.join(n for n, _ in flat)})")
    try:
        outputs = flatten_outputs(seen["output"])
    except Exception as err:
        raise BadInputError(f"{what}: returns a {type(seen['output']).__name__}, not tensors ({err})") from None
    if not outputs:
        raise BadInputError(f"{what}: returns no tensors")
    signature = PartSignature(part, args, len(seen["args"]), [n for n, _ in flat], len(outputs), seen["output"])
    return signature, {n: t.detach().clone() for n, t in flat}, [t.detach().clone() for t in outputs]


class PartCall(nn.Module):
    """The part as a module with one keyword argument per graph input (see make_part_call)."""

    def __init__(self, part: nn.Module, signature: PartSignature):
        super().__init__()
        self.part = part
        self.signature = signature

    def run(self, inputs: Sequence[torch.Tensor]) -> Any:
        return self.signature.call(self.part, inputs)


def make_part_call(part: nn.Module, signature: PartSignature) -> PartCall:
    """A PartCall whose forward's parameters are the graph input names (the exporter
    names graph inputs after them). The names are identifiers (see _identifier)."""
    names = signature.input_names
    if not all(n.isidentifier() and not keyword.iskeyword(n) for n in names):
        raise BadInputError(f"part {signature.part}: input names {names} are not identifiers")
    params = ", ".join(names)
    namespace: dict[str, Any] = {}
    exec(f"def forward(self, {params}):\n    return self.run([{params}])\n", namespace)  # identifiers only
    cls = type(f"PartCall_{_identifier(signature.part)}", (PartCall,), {"forward": namespace["forward"]})
    return cls(part, signature)


@contextmanager
def substituted(
    model: nn.Module,
    runners: Mapping[str, tuple[PartSignature, Callable[[dict[str, torch.Tensor]], list[torch.Tensor]]]],
):
    """While active, the output of each part in `runners` ({part: (its recorded signature,
    runner)}) is what the runner returns on the part's inputs by graph input name, in the
    structure the part returns. The part's own torch forward and hooks are skipped."""
    handles = []
    try:
        for part, (signature, runner) in runners.items():
            sub = find_part(model, part, "the model")
            handles.append(_replace_forward(sub, signature, runner))
        yield model
    finally:
        for restore in handles:
            restore()


def _replace_forward(sub: nn.Module, signature: PartSignature, runner: Callable) -> Callable[[], None]:
    try:
        names = list(inspect.signature(sub.forward).parameters)
    except (TypeError, ValueError):
        names = []
    had = "forward" in vars(sub)
    original = vars(sub).get("forward")

    def forward(*args, **kwargs):
        pairs = [(names[i] if i < len(names) else f"arg{i}", v) for i, v in enumerate(args)] + list(kwargs.items())
        what = f"part {signature.part}"
        flat = {_identifier(n): t for name, value in pairs for n, t in _flatten(name, value, what)}
        if list(flat) != signature.input_names:
            raise BadInputError(f"{what} is called with {list(flat)}; its graph takes {signature.input_names}")
        return signature.rebuild_output(runner(flat))

    # The graph stands for the part with whatever hooks it carries (e.g. an unmerged LoRA
    # hook on a layer that is itself a part): those are suspended, not run on its output.
    hooks, pre_hooks = sub._forward_hooks, sub._forward_pre_hooks
    sub._forward_hooks, sub._forward_pre_hooks = type(hooks)(), type(pre_hooks)()
    sub.forward = forward  # instance attribute: nn.Module.__call__ runs it

    def restore() -> None:
        sub._forward_hooks, sub._forward_pre_hooks = hooks, pre_hooks
        if had:
            sub.forward = original
        else:
            del sub.forward

    return restore
