"""PyTorch behind the runner contract: a torch module, or an HF checkpoint directory."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lora_deploy.backends.base import InputMeta, Runner
from lora_deploy.errors import BadInputError
from lora_deploy.util import first_line


class TorchRunner(Runner):
    """Run a torch module, or an HF checkpoint directory, under inference_mode.

    A directory is loaded at activate() with ``modeling.hf.wrap_checkpoint`` and
    wrapped like the ONNX export, so its inputs and output names match the
    exported graph. For a plain module, input names come from ``forward``'s
    signature (or ``input_metadata=``), and outputs are named from
    ``output_names=``, the module's ``output_names`` attribute, or
    "output"/"output_<i>". A module without ``input_metadata()`` but with
    ``example_inputs()`` takes their dtypes and sizes, any batch. ``device``/``dtype``
    move a given module in place, like ``nn.Module.to``.
    """

    def __init__(
        self,
        module_or_model_dir: Any,
        *,
        task: str = "auto",
        device: str = "cpu",
        dtype: Any = None,
        name: str | None = None,
        input_metadata: Mapping[str, InputMeta] | None = None,
        output_names: Sequence[str] | None = None,
    ):
        super().__init__(name)
        self.source = module_or_model_dir
        self.task = task
        self.device = device
        self.dtype = dtype
        self._given_metadata = dict(input_metadata) if input_metadata is not None else None
        self._given_output_names = list(output_names) if output_names is not None else None
        self.module: Any = None

    def _activate(self) -> None:
        import torch
        from torch import nn

        from lora_deploy.modeling.hf import parse_dtype, wrap_checkpoint

        if isinstance(self.source, (str, os.PathLike)):
            self.module = wrap_checkpoint(self.source, self.task, self.dtype or "float32")
        elif isinstance(self.source, nn.Module):
            self.module = self.source
            if self.dtype is not None:
                self.module.to(parse_dtype(self.dtype))
        else:
            raise BadInputError(f"TorchRunner needs an nn.Module or a checkpoint dir, got {type(self.source).__name__}")
        try:
            self.module.to(torch.device(self.device))
        except (RuntimeError, AssertionError) as err:
            # torch raises AssertionError("Torch not compiled with CUDA enabled").
            raise BadInputError(f"cannot use device {self.device!r}: {first_line(err)}") from err
        self.module.eval()

    def _deactivate(self) -> None:
        self.module = None

    def example_feed(self) -> dict[str, np.ndarray] | None:
        """The module's own example inputs (``example_inputs()``, see modeling.factory), or None."""
        from lora_deploy.modeling.factory import example_inputs

        self._require_active()
        return example_inputs(self.module, f"model {self.name!r}")

    def _input_metadata(self) -> dict[str, InputMeta]:
        if self._given_metadata is not None:
            return self._given_metadata
        declared = getattr(self.module, "input_metadata", None)
        if callable(declared):
            return dict(declared())
        examples = self.example_feed()
        if examples is not None:
            # Their dtypes and sizes, axis 0 the batch: other batch sizes fit, other sizes do not.
            return {name: (arr.dtype, ("batch", *arr.shape[1:])) for name, arr in examples.items()}
        # Unknown dtypes and shapes: only the names are checked.
        params = inspect.signature(self.module.forward).parameters.values()
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return {
            param.name: (None, None)
            for param in params
            if param.kind in kinds and param.default is inspect.Parameter.empty
        }

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from lora_deploy.modeling.hf import flatten_outputs

        tensors = {name: torch.from_numpy(np.ascontiguousarray(array)).to(self.device) for name, array in feed.items()}
        with torch.inference_mode():
            result = self.module(**tensors)
        outputs = flatten_outputs(result)
        names = self._output_names(result, len(outputs))
        return {name: _to_numpy(tensor) for name, tensor in zip(names, outputs)}

    def _output_names(self, result: Any, count: int) -> list[str]:
        names = self._given_output_names or getattr(self.module, "output_names", None)
        if names is None and isinstance(result, Mapping) and len(result) == count:
            names = list(result.keys())
        if names is None:
            names = ["output"] if count == 1 else [f"output_{index}" for index in range(count)]
        if len(names) != count:
            raise BadInputError(f"{count} output(s) but {len(names)} output name(s): {list(names)}")
        return list(names)


def _to_numpy(tensor: Any) -> np.ndarray:
    """numpy has no bfloat16: such outputs come back as float32."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()
