"""Small helpers shared by several modules (kept free of heavy imports)."""

from __future__ import annotations

from collections.abc import Iterable
from importlib import metadata


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first non-blank line of an error's message (its type name when it has none).

    Library errors often carry pages of context; our errors are one line each.
    `limit` cuts the line to that many characters.
    """
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if limit is None else line[:limit]


def library_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed version of each distribution in `names`; ones not installed are left out.

    Read from package metadata, so nothing heavy (torch) is imported.
    """
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def all_finite(tensor) -> bool:
    """True when no element is NaN or Inf.

    A finite sum proves it (any NaN or Inf poisons the sum) at a fraction of the cost of
    an element-wise check; only a non-finite sum, or an overflowing one, needs that check.
    """
    import torch

    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(tensor).all())
