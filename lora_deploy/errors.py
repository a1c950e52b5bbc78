"""Typed errors. The CLI turns each into one line and an exit code:

0 success; 1 not equivalent, or a gate failed; 2 bad input (BadInputError, and
ExportError); 3 neither: an output could not be written (OutputError) or a bug
(InternalError, and any unexpected exception).
"""


class LoraDeployError(Exception):
    """Base class; exit code 2 (bad input) unless a subclass says otherwise."""

    exit_code = 2


class BadInputError(LoraDeployError):
    """A file, directory or option the user gave cannot be used."""


class AdapterError(BadInputError):
    """The adapter is malformed, unsupported, or does not fit the base."""


class CheckpointError(BadInputError):
    """The base checkpoint is missing, truncated or corrupt."""


class NonFiniteError(BadInputError):
    """NaN or Inf in the adapter or in a merged tensor."""


class OutputError(LoraDeployError):
    """Writing an output failed though the input was fine: disk full, an I/O error, a
    read-only file system, no permission, an output locked by another run."""

    exit_code = 3


class InternalError(LoraDeployError):
    """A bug in lora-deploy: something it relies on of its own code did not hold."""

    exit_code = 3


class ExportError(LoraDeployError):
    """ONNX export or its post-export check failed."""


class NotEquivalentError(LoraDeployError):
    """Verification ran and found the artifacts differ beyond tolerance."""

    exit_code = 1
