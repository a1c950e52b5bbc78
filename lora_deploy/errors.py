"""Typed errors. The CLI turns each into one line and an exit code."""


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


class ExportError(LoraDeployError):
    """ONNX export or its post-export check failed."""


class NotEquivalentError(LoraDeployError):
    """Verification ran and found the artifacts differ beyond tolerance."""

    exit_code = 1
