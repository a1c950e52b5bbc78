"""Merge: the math (pure numpy, `delta`), the row-block pool (`blocks`) and the streaming
merge of a whole checkpoint (`streaming`). Nothing here imports torch."""

from lora_deploy.merge.streaming import MANIFEST_FILE, MergeResult, merge

__all__ = ["merge", "MergeResult", "MANIFEST_FILE"]
