"""What a run reports while it trains (issue 19, docs/tracking.md). Right after step k's shard is
written, rank 0 hands the step's metrics (the dict the shard's metrics group holds) to each
`[log]` backend, in this order:

    tensorboard  RUN_DIR/tensorboard/: add_scalar(name, value, k) for each metric
    wandb        one W&B run per run (name = run id, group = experiment.name, tags = the sweep's
                 overrides, config = the resolved spec), its id kept in RUN_DIR/wandb_id
    jsonl        RUN_DIR/metrics.jsonl: {"step": k, "time": unix seconds, **metrics}, one line per
                 step, appended with one os.write (O_APPEND): a reader never sees half a line

Resume. A task killed between shard k and checkpoint k redoes step k (train.loop), so a backend
may already hold it. metrics.jsonl drops its lines of steps >= the resumed step, and TensorBoard
hides its events from that step on (SummaryWriter's purge_step): both then hold the redone step,
as the shard does. W&B cannot take a step back: it is not sent the steps metrics.jsonl held before
the resume (jsonl is written last, so a line means W&B has that step), nor those before the
resumed step. wandb and tensorboard are imported only when `log.backends` names them.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any, Mapping

from hpcdistill.rundir import RunPaths, read_json, write_atomic
from hpcdistill.spec.load import spec_to_dict
from hpcdistill.spec.schema import Spec

log = logging.getLogger(__name__)

WANDB_TAG_CHARS = 64  # W&B refuses longer tags


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The step records of a metrics.jsonl, in file order ([] when there is none); a line that
    does not parse (a torn write after a crash) is left out."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def _drop_steps_from(path: Path, step: int) -> None:
    """Rewrite metrics.jsonl without its lines of steps >= `step` (atomically; untouched if none)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _line_step(line) is not None and _line_step(line) < step]
    if len(kept) != len(lines):
        write_atomic(path, "".join(kept))


def _line_step(line: str) -> int | None:
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def append_line(path: Path, record: Mapping[str, Any]) -> None:
    """One JSON line appended in a single write: concurrent readers see whole lines only."""
    data = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def wandb_tags(overrides: Mapping[str, Any]) -> list[str]:
    """The run's sweep overrides as W&B tags, "train.lr=1e-05" (cut to W&B's 64 characters)."""
    return [f"{key}={value}"[:WANDB_TAG_CHARS] for key, value in overrides.items()]


class Tracker:
    """The backends of one run, opened on rank 0 before its first step of this task."""

    def __init__(self, paths: RunPaths, *, jsonl: bool, tensorboard: Any = None, wandb_run: Any = None,
                 wandb_after: int = -1):
        self.paths = paths
        self.jsonl = jsonl
        self.tensorboard = tensorboard  # torch.utils.tensorboard.SummaryWriter
        self.wandb_run = wandb_run
        self.wandb_after = wandb_after  # W&B already holds the steps up to this one

    @classmethod
    def open(cls, spec: Spec, paths: RunPaths, resume_step: int) -> "Tracker":
        """The `[log]` backends of `spec` for a task that starts at step `resume_step` (0: fresh)."""
        backends = spec.log.backends
        held = read_metrics(paths.metrics_log)
        if "jsonl" in backends and held:
            _drop_steps_from(paths.metrics_log, resume_step)
        tracker = cls(paths, jsonl="jsonl" in backends,
                      wandb_after=max([resume_step - 1] + [r["step"] for r in held]))
        try:
            if "tensorboard" in backends:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: TensorBoard hides what an earlier task logged from resume_step on
                tracker.tensorboard = SummaryWriter(log_dir=str(paths.tensorboard), purge_step=resume_step)
            if "wandb" in backends:
                tracker.wandb_run = open_wandb(spec, paths)
        except BaseException:
            tracker.close(failed=True)
            raise
        return tracker

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Step `step`'s metrics to every backend; the jsonl line last (it marks the step logged)."""
        values = {name: float(value) for name, value in metrics.items()}
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(name, value, step)
            self.tensorboard.flush()  # steps are minutes apart: make each visible at once
        if self.wandb_run is not None and step > self.wandb_after:
            self.wandb_run.log(values, step=step)
        if self.jsonl:
            append_line(self.paths.metrics_log, {"step": step, "time": time.time(), **values})

    def close(self, failed: bool = False) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)
            self.wandb_run = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(failed=kind is not None)


def open_wandb(spec: Spec, paths: RunPaths) -> Any:
    """wandb.init for this run: a resumed task reuses the id its first task kept in RUN_DIR/wandb_id.
    The config is the resolved spec, which holds no secret (launch.pass_env has names only; the
    W&B key reaches the task as WANDB_API_KEY, by name)."""
    import wandb

    if paths.wandb_id.exists():
        run_id = paths.wandb_id.read_text(encoding="utf-8").strip()
    else:
        run_id = secrets.token_hex(4)  # W&B ids: [a-z0-9], unique in the project
        write_atomic(paths.wandb_id, run_id + "\n")
    overrides = read_json(paths.run_json).get("overrides", {}) if paths.run_json.exists() else {}
    log.info("W&B run %s (%s) in %s", run_id, spec.log.mode, paths.root)
    return wandb.init(project=spec.log.project or spec.experiment.name, entity=spec.log.entity,
                      mode=spec.log.mode, dir=str(paths.root), id=run_id, resume="allow",
                      name=paths.run_id, group=spec.experiment.name, tags=wandb_tags(overrides),
                      config=spec_to_dict(spec))


__all__ = ["Tracker", "read_metrics", "append_line", "wandb_tags", "open_wandb"]
