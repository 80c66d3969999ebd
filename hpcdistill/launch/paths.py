"""Every file name inside a sweep directory and a run directory, in one place.

Layout:
    <output_dir>/<experiment.name>/          SweepPaths.root
        manifest.json                        spec text, hash, versions, run ids, job ids
        spec.toml                            the submitted spec, merged (extends + --set)
        logs/                                submitit's folder: scripts, pickles, stdout/stderr
        analysis/ (replay/)                  `analyze` (and `replay`) reports, tables, figures
        <run_id>/                            RunPaths.root, one per run
            spec.toml                        the run's resolved spec (its seed, no sweep)
            run.json                         run id, seed, overrides, spec hash
            status.json                      state (running / completed / failed), times, error
            shards/step_000000.h5            one HDF5 shard per step, written atomically
            checkpoint/                      trainer state at the last completed step (+ the EMA teacher)
            model/                           the final student (train.save_model), loadable by id
            worker.log                       the worker's log
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SweepPaths:
    root: Path

    @classmethod
    def for_spec(cls, output_dir: str | Path, name: str) -> "SweepPaths":
        return cls(Path(output_dir).absolute() / name)

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def spec(self) -> Path:
        return self.root / "spec.toml"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def analysis(self) -> Path:
        return self.root / "analysis"

    @property
    def replay(self) -> Path:
        """`hpcdistill replay`'s report.md, replay.json and figure."""
        return self.analysis / "replay"

    def run(self, run_id: str) -> "RunPaths":
        return RunPaths(self.root / run_id)


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def spec(self) -> Path:
        return self.root / "spec.toml"

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    def shard(self, step: int) -> Path:
        return self.shards / f"step_{step:06d}.h5"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def model(self) -> Path:
        """The final student as a transformers model directory (train.save_model)."""
        return self.root / "model"

    @property
    def log(self) -> Path:
        return self.root / "worker.log"

    @property
    def run_id(self) -> str:
        return self.root.name


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
