"""Hugging Face knowledge: which task a checkpoint serves, how to load it, what it takes and returns.

The exporters, the torch runner and verify all load checkpoints through here, so a model
is loaded the same way (float32 or float16, eval mode, eager attention) wherever it runs.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from lora_deploy import dtypes
from lora_deploy.errors import BadInputError, CheckpointError, ExportError
from lora_deploy.io.checkpoint import check_checkpoint
from lora_deploy.modeling.sentence import SENTENCE_EMBEDDING, SentencePooling, pooling_for_task
from lora_deploy.modeling.tasks import (
    AUTO,
    AUTO_CLASS,
    FEATURE_EXTRACTION,
    TASK_OUTPUT,
    TASKS,
    load_config,
    model_input_names,
    resolve_task,
)
from lora_deploy.options import EXPORT_DTYPES
from lora_deploy.util import first_line


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map "float32"/"float16" (or the torch dtypes) to a torch dtype."""
    name = dtypes.of_torch(dtype).name if isinstance(dtype, torch.dtype) else dtype
    return dtypes.dtype(name, EXPORT_DTYPES).torch()


def load_for_task(model_dir: str | os.PathLike, task: str = AUTO, dtype: str | torch.dtype = "float32") -> nn.Module:
    """Load a checkpoint with the auto class for ``task``, in eval mode.

    Attention is forced to the "eager" implementation: it exports on every
    architecture we tried, keeps masked rows finite in half precision, and
    ONNX Runtime fuses the pattern anyway.
    """
    import transformers

    config = load_config(model_dir)
    # The same validation as the merge's, before transformers opens a file: it would follow
    # a shard name out of the directory and read overlapping or truncated headers.
    check_checkpoint(model_dir)
    if getattr(config, "is_encoder_decoder", False):
        raise BadInputError(f"encoder-decoder models ({config.model_type}) are not supported")
    task = resolve_task(task, config)
    auto_class = getattr(transformers, AUTO_CLASS[task])
    try:
        model = auto_class.from_pretrained(model_dir, dtype=parse_dtype(dtype), attn_implementation="eager")
    except ValueError as err:
        # "Unrecognized configuration class ... for this kind of AutoModel"
        raise BadInputError(
            f"architecture {config.model_type} does not support task {task}: {first_line(err)}"
        ) from err
    except OSError as err:
        raise CheckpointError(f"cannot load weights from {model_dir}: {first_line(err)}") from err
    return model.eval()


class HFExportWrapper(nn.Module):
    """Call a transformers model with named tensors and return its output tensor(s).

    The ONNX graph gets exactly these inputs and outputs (Optimum's names):
    ``logits`` or ``last_hidden_state``, and for a sentence-transformers checkpoint
    exported for feature-extraction (``sentence`` given) ``sentence_embedding`` after it,
    pooled (and normalized) as its modules.json says. Decoders run with
    ``use_cache=False`` so no past-key-value outputs are traced.
    """

    # The attribute the model sits under; export strips it from initializer names.
    PARAM_PREFIX = "model."

    def __init__(
        self, model: nn.Module, task: str, input_names: Sequence[str], sentence: SentencePooling | None = None
    ):
        super().__init__()
        if task not in TASKS:
            raise BadInputError(f"unknown task {task!r}")
        self.model = model
        self.task = task
        self.input_names = list(input_names)
        self.output_names = [TASK_OUTPUT[task]]
        self.sentence = sentence if task == FEATURE_EXTRACTION else None
        if self.sentence is not None:
            self.output_names.append(SENTENCE_EMBEDDING)
        params = _forward_params(model)
        self._pass_use_cache = "use_cache" in params
        if "token_type_ids" in self.input_names and "token_type_ids" not in params:
            raise BadInputError(f"{type(model).__name__} does not take token_type_ids")

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "return_dict": True}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if self._pass_use_cache:
            kwargs["use_cache"] = False
        output = getattr(self.model(**kwargs), self.output_names[0])
        if self.sentence is None:
            return output
        return output, self.sentence(output, attention_mask)

    def input_metadata(self) -> dict[str, tuple[np.dtype, tuple]]:
        """Same format as Runner.input_metadata: all int64 (batch, sequence)."""
        return {name: (np.dtype(np.int64), ("batch", "sequence")) for name in self.input_names}


def wrap_checkpoint(
    model_dir: str | os.PathLike, task: str = AUTO, dtype: str | torch.dtype = "float32"
) -> HFExportWrapper:
    """Load a checkpoint and wrap it for export / TorchRunner (with sentence-transformers
    pooling when the checkpoint has it and the task is feature-extraction)."""
    config = load_config(model_dir)
    task = resolve_task(task, config)
    model = load_for_task(model_dir, task, dtype)
    return HFExportWrapper(model, task, model_input_names(config), pooling_for_task(model_dir, task))


def _forward_params(model: nn.Module) -> set[str]:
    """Parameter names of model.forward (HF forwards are plain signatures)."""
    return set(inspect.signature(model.forward).parameters)


def flatten_outputs(result: Any) -> list[torch.Tensor]:
    """Tensor -> [tensor]; tuple/list/dict (ModelOutput) -> tensors in order."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, Mapping):
        result = list(result.values())
    if isinstance(result, (tuple, list)):
        flat: list[torch.Tensor] = []
        for item in result:
            flat.extend(flatten_outputs(item))
        return flat
    if result is None:
        return []
    raise ExportError(f"module output of type {type(result).__name__} is not a tensor")
