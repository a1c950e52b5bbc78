"""lora-deploy: adapter in, merged or dynamic artifacts out, proof alongside."""


def __getattr__(name: str) -> str:
    """`__version__`, read from the installed package's metadata on first use: importing
    importlib.metadata costs every command about 15 ms of start-up, and most never print
    or record the version."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    global __version__
    try:
        __version__ = version("lora-deploy")
    except PackageNotFoundError:  # running from a source tree that was never installed
        __version__ = "0.0.0+local"
    return __version__
