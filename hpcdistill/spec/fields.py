"""Field metadata of the spec's tables: a key's default and its allowed range or pattern, which
the loader (`hpcdistill.spec.load`) checks after the type."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def rng(*, ge: float | None = None, gt: float | None = None, le: float | None = None,
        lt: float | None = None, pattern: str | None = None, doc: str = "") -> dict[str, Any]:
    """Field metadata: the allowed range (or regex) of a value, checked by the loader."""
    return {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, pattern=pattern, doc=doc).items()
            if v is not None and v != ""}


def opt(default: Any, **bounds: Any) -> Any:
    return field(default=default, metadata=rng(**bounds))


__all__ = ["rng", "opt"]
