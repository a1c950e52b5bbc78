"""lora-deploy: adapter in, merged or dynamic artifacts out, proof alongside."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lora-deploy")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+local"
