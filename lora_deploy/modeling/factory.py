"""Plain torch modules in the factory form: importable code that returns the `nn.Module`,
and a checkpoint loaded into it.

`--module package.module:build_policy` (or `path/to/policy.py:build_policy`) names a
callable taking no arguments (a function, or the `nn.Module` subclass itself) that
returns the module. The checkpoint is a directory of safetensors (`model.safetensors` or
a sharded index, checked by `io.checkpoint` like every checkpoint), one `.safetensors`
file, or a `.pt`/`.pth`/`.bin` state dict read with `torch.load(weights_only=True)`:
plain tensors only, nothing is ever unpickled as an object. Every tensor of the module's
state dict must come from the checkpoint with its shape, and nothing may be left over.

**Inputs a module declares for itself.** A module may carry `example_inputs()` (a
method, or a mapping attribute) returning `{forward argument name: array or tensor}`,
batch on axis 0: the same convention as an `--inputs FILE.npz` (array names = forward
argument names), kept on the module because the module is what export, verify and bench
all receive and what knows its own sizes (the TorchRunner already reads
`input_metadata()` and `output_names` there). bench times on them when no `--inputs` or
`--shapes` is given.

Everything that can go wrong with user code or a checkpoint ends as one BadInputError
line (exit 2): a factory that does not import, is not callable, raises, returns something
that is not a module, or does not fit the checkpoint; a state dict holding objects.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lora_deploy.adapter.read import read_pickle_weights_only, read_safetensors
from lora_deploy.arrays import from_torch, to_torch
from lora_deploy.errors import BadInputError
from lora_deploy.io.checkpoint import Checkpoint, read_header
from lora_deploy.util import first_line

if TYPE_CHECKING:
    from torch import nn

PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
CHECKPOINT_KINDS = "a directory of safetensors (model.safetensors or an index), a .safetensors file or a .pt state dict"
# module path (dotted) or a .py file, a colon, then an attribute path (dotted).
_SPEC_RE = re.compile(r"^(?P<module>[^:]+?)\s*:\s*(?P<attr>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)$")
_DOTTED_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*$")


def parse_factory(spec: str) -> tuple[str, str]:
    """'package.module:build' -> ('package.module', 'build'); syntax only, nothing imported."""
    match = _SPEC_RE.match(str(spec).strip())
    module = match.group("module").strip() if match else ""
    if not match or not (module.endswith(".py") or _DOTTED_RE.match(module)):
        raise BadInputError(
            f"bad --module {spec!r}: expected package.module:factory or path/to/file.py:factory "
            "(a callable returning the torch.nn.Module)"
        )
    return module, match.group("attr")


def import_factory(spec: str) -> Callable[[], Any]:
    """The factory callable named by `spec`. A dotted module is imported with the working
    directory on sys.path (as `python -m` has it); a .py path is loaded from that file."""
    module_name, attr = parse_factory(spec)
    try:
        module = _load_file(module_name) if module_name.endswith(".py") else _import(module_name)
    except BadInputError:
        raise
    except (Exception, SystemExit) as err:  # user code: any failure while importing it is bad input
        raise BadInputError(f"--module {spec}: cannot import {module_name} ({_error(err)})") from err
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise BadInputError(f"--module {spec}: {module_name} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise BadInputError(f"--module {spec}: {attr} is a {type(target).__name__}, not a callable returning a module")
    return target


def _import(name: str) -> Any:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    return importlib.import_module(name)


def _load_file(path_text: str) -> Any:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise BadInputError(f"--module {path_text}: no such file")
    name = f"lora_deploy_factory_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise BadInputError(f"--module {path_text}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {first_line(err, 200)}"


def build_module(spec: str) -> nn.Module:
    """Call the factory and check that it returned an nn.Module."""
    from torch import nn

    factory = import_factory(spec)
    try:
        module = factory()
    except Exception as err:  # user code
        raise BadInputError(f"--module {spec}: the factory raised {_error(err)}") from err
    if not isinstance(module, nn.Module):
        raise BadInputError(f"--module {spec}: the factory returned a {type(module).__name__}, not a torch.nn.Module")
    return module


# ---------------------------------------------------------------- checkpoints


def check_module_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> Path:
    """A checkpoint the factory form reads, validated without loading tensors (and
    without torch): a safetensors directory or file has its headers checked; a pickle is
    only checked to exist (weights-only loading refuses objects when it is read)."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{what} ({path}): not found")
    if path.is_dir():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles and not any(path.glob(f"*{SAFETENSORS_SUFFIX}")):
            raise BadInputError(
                f"{what} ({path}): a directory is read as safetensors (model.safetensors or an index); "
                f"pass the state dict file itself, e.g. {path / pickles[0]}"
            )
        with Checkpoint(path):  # headers and index, as for every checkpoint
            pass
    elif path.suffix == SAFETENSORS_SUFFIX:
        read_header(path)
    elif path.suffix not in PICKLE_SUFFIXES:
        raise BadInputError(f"{what} ({path}): with --module a checkpoint is {CHECKPOINT_KINDS}")
    return path


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """{name: torch tensor} of a checkpoint the factory form reads (`check_module_checkpoint`)."""
    path = check_module_checkpoint(path)
    if path.is_dir():
        with Checkpoint(path) as checkpoint:
            arrays = {name: checkpoint.read(name) for name in checkpoint.names()}
    elif path.suffix == SAFETENSORS_SUFFIX:
        arrays = read_safetensors(path)
    else:
        arrays = read_pickle_weights_only(path)  # refuses anything but a mapping of names to tensors
    return {name: to_torch(array) for name, array in arrays.items()}


def load_state(module: nn.Module, state: Mapping[str, Any], source: str) -> nn.Module:
    """Copy `state` into `module` (cast to the module's dtypes). Refused in one line when
    a tensor is missing, left over or of another shape; a tensor tied to another (one
    storage under two names, saved once) counts as present when its twin is."""
    expected = module.state_dict(keep_vars=True)
    storage: dict[tuple, list[str]] = {}
    for name, tensor in expected.items():
        if tensor.numel():
            storage.setdefault((tensor.data_ptr(), tuple(tensor.shape), tensor.dtype), []).append(name)
    twins = {name: names for names in storage.values() for name in names}
    missing = [n for n in expected if n not in state and not any(t in state for t in twins.get(n, ()))]
    unexpected = [n for n in state if n not in expected]
    wrong = [
        f"{n} {list(state[n].shape)} in the checkpoint, {list(expected[n].shape)} in the module"
        for n in state
        if n in expected and tuple(state[n].shape) != tuple(expected[n].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing from the checkpoint ({_names(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} not in the module ({_names(unexpected)})")
    if wrong:
        problems.append(f"shape of {wrong[0]}" + (f" (+{len(wrong) - 1} more)" if len(wrong) > 1 else ""))
    if problems:
        raise BadInputError(f"{source}: {'; '.join(problems)}")
    try:
        module.load_state_dict(dict(state), strict=False)
    except RuntimeError as err:  # e.g. a dtype that cannot be copied into the parameter
        raise BadInputError(f"{source}: {first_line(err, 200)}") from err
    return module


def _names(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def load_module(spec: str, checkpoint: str | os.PathLike) -> nn.Module:
    """The module the factory returns, the checkpoint loaded into it, in eval mode."""
    check_module_checkpoint(checkpoint)
    module = build_module(spec)
    state = read_state_dict(checkpoint)
    load_state(module, state, f"checkpoint {checkpoint} does not fit the module from {spec}")
    return module.eval()


# ---------------------------------------------------------------- declared inputs


def example_inputs(module: Any, source: str = "the module") -> dict[str, np.ndarray] | None:
    """The module's own `example_inputs()` as numpy arrays by forward argument name, or
    None when it declares none. Names that `forward` does not take, non-numeric or
    0-d arrays are refused in one line."""
    declared = getattr(module, "example_inputs", None)
    if declared is None:
        return None
    try:
        value = declared() if callable(declared) else declared
    except Exception as err:  # user code
        raise BadInputError(f"{source}: example_inputs() raised {_error(err)}") from err
    if not isinstance(value, Mapping) or not value:
        raise BadInputError(
            f"{source}: example_inputs must give a non-empty mapping of forward argument names to arrays, "
            f"got {type(value).__name__}"
        )
    params = inspect.signature(module.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    arrays = {}
    for name, item in value.items():
        if not takes_any and name not in params:
            raise BadInputError(f"{source}: example input {name!r} is not an argument of forward ({', '.join(params)})")
        arr = _as_array(item)
        if arr is None or arr.ndim == 0 or arr.dtype.kind not in "biuf":
            raise BadInputError(f"{source}: example input {name!r} must be a numeric array of rank >= 1")
        arrays[str(name)] = np.ascontiguousarray(arr)
    return arrays


def _as_array(item: Any) -> np.ndarray | None:
    if isinstance(item, np.ndarray):
        return item
    if type(item).__module__.startswith("torch") and hasattr(item, "detach"):
        arr = from_torch(item)
        return arr.astype(np.float32) if arr.dtype.isbuiltin == 2 else arr  # bfloat16: numpy has no native one
    try:
        return np.asarray(item)
    except (TypeError, ValueError):
        return None
