"""Merge: the math (pure numpy, `delta`), the row-block pool (`blocks`) and the streaming
merge of a whole checkpoint (`streaming`). Nothing here imports torch."""

__all__ = ["merge", "MergeResult", "MANIFEST_FILE"]


def __getattr__(name: str):
    # Imported when first asked for: `merge --onnx-like` uses the math (merge.delta) but
    # not the streaming merge, its hashing and its quantized paths.
    if name in __all__:
        from lora_deploy.merge import streaming

        return getattr(streaming, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
