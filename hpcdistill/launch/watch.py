"""`hpcdistill status --watch` / `--once`: a sweep's runs while they train.

Per run: its state (launch.status), the last step its metrics.jsonl records of its steps 0..n
(train.steps), the last `train/loss_total`, the last eval reward (the first `eval/reward@...` key
of the latest step that evaluated) and the current attempt's elapsed time; under the table, one
bar of the runs that have ended. Reads metrics.jsonl, not the shards: a refresh costs a few small
files per run.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from tqdm import tqdm

from hpcdistill.analysis.tables import format_table
from hpcdistill.launch.status import NEEDS_RERUN, RunStatus, sweep_from_dir, sweep_status
from hpcdistill.rundir import RunPaths, read_json
from hpcdistill.spec.load import get_dotted, read_toml
from hpcdistill.train.tracking import read_metrics

LOSS = "train/loss_total"
REWARD_PREFIX = "eval/reward@"
# states a run does not leave by itself; "missing" (not started yet) is not one of them
ENDED = frozenset({"completed"} | (NEEDS_RERUN - {"missing", "unknown"}))


@dataclass(frozen=True)
class RunProgress:
    status: RunStatus
    step: int | None  # the last step metrics.jsonl records (None: none yet)
    steps: int | None  # train.steps: the run records steps 0..steps (None: no spec yet)
    loss: float | None  # train/loss_total of the latest step that has one
    reward: tuple[str, float] | None  # (key, value) of the latest eval
    elapsed_s: float | None  # the current attempt, from status.json

    @property
    def ended(self) -> bool:
        return self.status.state in ENDED


def run_progress(status: RunStatus, paths: RunPaths, now: dt.datetime) -> RunProgress:
    records = read_metrics(paths.metrics_log)
    loss = next((r[LOSS] for r in reversed(records) if LOSS in r), None)
    reward = next(((k, r[k]) for r in reversed(records) for k in r if k.startswith(REWARD_PREFIX)), None)
    steps = get_dotted(read_toml(paths.spec), "train.steps", 0) if paths.spec.exists() else None
    return RunProgress(status, records[-1]["step"] if records else None, steps, loss, reward,
                       _elapsed(paths, status.state, now))


def _elapsed(paths: RunPaths, state: str, now: dt.datetime) -> float | None:
    """Seconds of the current attempt: started -> ended, or -> now while it has not ended."""
    if not paths.status.exists():
        return None
    try:
        record = read_json(paths.status)
        started = dt.datetime.fromisoformat(record["started"])
        ended = dt.datetime.fromisoformat(record["ended"]) if record.get("ended") else None
    except (ValueError, KeyError, OSError):
        return None
    if state not in ENDED or ended is None or ended < started:
        ended = now
    return (ended - started).total_seconds()


def sweep_progress(path: str | Path) -> list[RunProgress]:
    sweep = sweep_from_dir(path)
    now = dt.datetime.now(dt.timezone.utc)
    return [run_progress(s, sweep.run(s.run_id), now) for s in sweep_status(sweep.root)]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def progress_table(progress: list[RunProgress], overrides_text: Callable[[dict], str]) -> str:
    """The table (overrides written by `overrides_text`, as the CLI's other tables write them),
    then the bar of ended runs and the count of each state."""
    rows = [[p.status.run_id, overrides_text(p.status.overrides), p.status.state,
             "-" if p.step is None else f"{p.step}/{p.steps if p.steps is not None else '?'}",
             _number(p.loss), "-" if p.reward is None else f"{_number(p.reward[1])} ({p.reward[0]})",
             _duration(p.elapsed_s)] for p in progress]
    table = format_table(["run_id", "overrides", "state", "step", "loss", "eval reward", "elapsed"], rows)
    counts: dict[str, int] = {}
    for p in progress:
        counts[p.status.state] = counts.get(p.status.state, 0) + 1
    bar = tqdm.format_meter(sum(p.ended for p in progress), len(progress), 0, ncols=60,
                            bar_format="runs ended {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}")
    return f"{table}\n{bar}  " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))


def watch(path: str | Path, overrides_text: Callable[[dict], str], interval_s: float = 10.0,
          out: TextIO | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
    """Redraw the table every `interval_s` until every run has ended (Ctrl-C stops it sooner);
    `out`: the terminal (sys.stdout)."""
    out = out or sys.stdout
    while True:
        progress = sweep_progress(path)
        if out.isatty():
            out.write("\033[H\033[J")  # cursor home, clear: redraw in place
        out.write(progress_table(progress, overrides_text) + "\n")
        out.flush()
        if all(p.ended for p in progress):
            return
        sleep(interval_s)


__all__ = ["RunProgress", "ENDED", "sweep_progress", "progress_table", "watch"]
