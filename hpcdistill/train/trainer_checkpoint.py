"""The trainer's checkpoint folder: its format record, and publishing it whole or not at all.

    <checkpoint>/meta.json        {"format", "step", "strategy", "world_size", "zero_stage"}
    <checkpoint>/<the strategy's state>   state.pt | ds/ | dcp/ (`train.distributed`'s trainers)
    <checkpoint>/<extra files>    state the loop owns (the EMA teacher, policy_lag's weights)

Every rank writes its part under `.<name>.tmp`; rank 0 adds meta.json last and swaps the folder in
with two renames, keeping the previous one as `.<name>.old` until the new one is in place. A kill
between the renames leaves `.old` as the last published checkpoint (`published`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from hpcdistill.rundir import CHECKPOINT_META

CHECKPOINT_FORMAT = 1


def staging(final: Path) -> tuple[Path, Path]:
    """(tmp, old): where a checkpoint of `final` is written, and where the previous one waits."""
    return final.with_name(f".{final.name}.tmp"), final.with_name(f".{final.name}.old")


def publish(tmp: Path, final: Path, meta: dict[str, Any]) -> None:
    """Rank 0, after every rank wrote its state into `tmp`: the format record, then the swap."""
    old = staging(final)[1]
    (tmp / CHECKPOINT_META).write_text(json.dumps({"format": CHECKPOINT_FORMAT, **meta}, indent=1))
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def published(directory: Path) -> Path | None:
    """The checkpoint folder `publish` published last, or None (also after a kill between its renames)."""
    old = staging(directory)[1]
    if not (directory / CHECKPOINT_META).exists() and (old / CHECKPOINT_META).exists():
        return old
    return directory if (directory / CHECKPOINT_META).exists() else None


def read_meta(final: Path) -> dict[str, Any]:
    """The format record of a published checkpoint folder."""
    meta = json.loads((final / CHECKPOINT_META).read_text())
    meta.setdefault("strategy", "single")  # written by the loop before trainer strategies existed
    return meta


def checkpoint_file(directory: str | os.PathLike, name: str) -> Path | None:
    """A file `Trainer.save(extra=...)` wrote into the last published checkpoint, or None."""
    final = published(Path(directory))
    return final / name if final is not None and (final / name).exists() else None


__all__ = ["CHECKPOINT_FORMAT", "staging", "publish", "published", "read_meta", "checkpoint_file"]
