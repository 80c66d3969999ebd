"""The run directory, the ground floor: every file name inside a sweep directory and a run
directory, in one place (as submitit's JobPaths). Every layer above (train, launch, analysis, the
CLI) asks these classes for a path; no other module spells a file name of the layout.

Layout:
    <output_dir>/<experiment.name>/          SweepPaths.root
        manifest.json                        spec text, hash, versions, run ids, job ids
        spec.toml                            the submitted spec, merged (extends + --set)
        logs/                                submitit's folder: scripts, pickles, stdout/stderr
        analysis/                            `analyze` reports: report.md, tables, figures
            replay/                          `replay`: report.md, replay.json, figure
            probe_report.md                  `probe`'s report
        probe/                               `probe`'s run (a RunPaths: shards/step_000000.h5)
        <run_id>/                            RunPaths.root, one per run
            spec.toml                        the run's resolved spec (its seed, no sweep)
            run.json                         run id, seed, overrides, spec hash
            status.json                      state (running / completed / failed), times, error
            shards/step_000000.h5            one HDF5 shard per step, written atomically
            checkpoint/                      trainer state at the last completed step: meta.json
                                             and state.pt (single), ds/ (deepspeed) or dcp/ (fsdp),
                                             with teacher_ema.safetensors (EMA teacher) and
                                             policy_lag.pt (rollout.policy_lag's held weights)
            rollout_weights/                 the weights the vLLM rollout server loads
            vllm.log                         the rollout server's log
            teacher.log                      the teacher role's log, when it runs apart (launch.teacher_process)
            model/                           the final student (train.save_model), loadable by id
            worker.log                       the worker's log
            metrics.jsonl                    one line per step: {"step", "time", **metrics} (`[log]`)
            tensorboard/                     TensorBoard's event files (log.backends "tensorboard")
            wandb_id                         the run's W&B id, kept for a resumed task (log.backends "wandb")
            wandb/                           W&B's own folder (offline-run-*/ or run-*/), made by wandb.init

    <output_dir>/<experiment.name>/          LoopPaths.root, `hpcdistill loop`'s directory
        loop.json                            the loop record (named by loop.record_file)
        spec.toml                            the loop spec, merged
        roundNN-<key>/                       LoopRoundPaths.root, one per attempt of a round
            gepa/                            GEPA's run_dir (asserted empty before use)
            distill.toml                     the round's generated distillation spec
            distill/                         its sweep (a SweepPaths: <run_id>/model/ ...)
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


MANIFEST = "manifest.json"
RUN_JSON = "run.json"
# the trainer's own files inside RunPaths.checkpoint (train.trainer_checkpoint): the format record
# every strategy writes, then its state (single: one file; deepspeed, fsdp: a folder each)
CHECKPOINT_META = "meta.json"
CHECKPOINT_STATE = "state.pt"
CHECKPOINT_DEEPSPEED = "ds"
CHECKPOINT_DCP = "dcp"
# files inside RunPaths.checkpoint besides the trainer's own state
CHECKPOINT_EMA_TEACHER = "teacher_ema.safetensors"
CHECKPOINT_POLICY_LAG = "policy_lag.pt"
LOOP_RECORD = "loop.json"  # loop.record_file's default
LOOP_DISTILL = "distill"  # a loop round's sweep: its experiment.name, so <round>/distill/<run_id>/


@dataclass(frozen=True)
class SweepPaths:
    root: Path

    @classmethod
    def for_spec(cls, output_dir: str | Path, name: str) -> "SweepPaths":
        return cls(Path(output_dir).absolute() / name)

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

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
    def report(self) -> Path:
        """`hpcdistill analyze`'s report.md."""
        return self.analysis / "report.md"

    @property
    def replay(self) -> Path:
        """`hpcdistill replay`'s report.md, replay.json and figure."""
        return self.analysis / "replay"

    @property
    def replay_report(self) -> Path:
        return self.replay / "report.md"

    @property
    def probe_run(self) -> "RunPaths":
        """`hpcdistill probe`'s run (seed 001): a run directory beside the sweep's other runs."""
        return RunPaths(self.root / "probe")

    @property
    def probe_report(self) -> Path:
        return self.analysis / "probe_report.md"

    def run_dirs(self) -> list["RunPaths"]:
        """The sweep's run directories (those with a run.json), in name order."""
        if not self.root.is_dir():
            return []
        return [RunPaths(p) for p in sorted(self.root.iterdir()) if (p / RUN_JSON).exists()]

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
        return self.root / RUN_JSON

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

    def checkpoint_file(self, name: str) -> Path:
        """A named file the checkpoint folder holds besides the trainer's state
        (CHECKPOINT_EMA_TEACHER, CHECKPOINT_POLICY_LAG)."""
        return self.checkpoint / name

    @property
    def rollout_weights(self) -> Path:
        """The student's current weights for the rollout server (written atomically)."""
        return self.root / "rollout_weights"

    @property
    def vllm_log(self) -> Path:
        return self.root / "vllm.log"

    @property
    def teacher_log(self) -> Path:
        return self.root / "teacher.log"

    def staging(self, final: Path) -> Path:
        """A hidden sibling of `final` (a folder of this run) to write into and rename into place."""
        return final.with_name(f".{final.name}.tmp-{os.getpid()}")

    @property
    def resume_state(self) -> tuple[Path, ...]:
        """What a completed run drops: the checkpoint and the served weights copy."""
        return (self.checkpoint, self.rollout_weights)

    @property
    def log(self) -> Path:
        return self.root / "worker.log"

    @property
    def metrics_log(self) -> Path:
        """metrics.jsonl: one JSON line per recorded step, appended by rank 0 after the step's shard."""
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def wandb_id(self) -> Path:
        """The W&B run id of this run (one line), written by its first task, read by a resumed one."""
        return self.root / "wandb_id"

    @property
    def run_id(self) -> str:
        return self.root.name


@dataclass(frozen=True)
class LoopPaths:
    """`hpcdistill loop`'s directory: the record, the loop spec and one folder per round attempt."""

    root: Path
    record_file: str = LOOP_RECORD  # loop.record_file

    @classmethod
    def for_spec(cls, output_dir: str | Path, name: str, record_file: str = LOOP_RECORD) -> "LoopPaths":
        return cls(Path(output_dir).absolute() / name, record_file)

    @property
    def record(self) -> Path:
        return self.root / self.record_file

    @property
    def spec(self) -> Path:
        return self.root / "spec.toml"

    def round(self, index: int, key: str) -> "LoopRoundPaths":
        """Round `index` computed from `key` (the loop spec, the round's student and prompt)."""
        return LoopRoundPaths(self.root / f"round{index:02d}-{key}")

    def round_dir(self, name: str) -> "LoopRoundPaths":
        """A round by its folder name, as the record's `dir` holds it."""
        return LoopRoundPaths(self.root / name)


@dataclass(frozen=True)
class LoopRoundPaths:
    root: Path

    @property
    def gepa(self) -> Path:
        """GEPA's run_dir (gepa_state.bin, ...)."""
        return self.root / "gepa"

    @property
    def distill_spec(self) -> Path:
        return self.root / f"{LOOP_DISTILL}.toml"

    @property
    def distill(self) -> SweepPaths:
        """The round's distillation sweep (experiment.name = LOOP_DISTILL, output_dir = this round)."""
        return SweepPaths.for_spec(self.root, LOOP_DISTILL)

    def stale(self, stamp: str) -> Path:
        """Where an interrupted attempt is moved aside (kept for inspection, never reused)."""
        return self.root.with_name(f"{self.root.name}.stale-{stamp}")


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


def read_manifest(sweep: SweepPaths) -> dict[str, Any]:
    """The sweep's manifest ({} when there is none yet)."""
    from hpcdistill.errors import LaunchError

    if not sweep.manifest.exists():
        return {}
    try:
        return read_json(sweep.manifest)
    except ValueError as exc:
        raise LaunchError(f"{sweep.manifest}: manifest is not valid JSON ({exc}); "
                          "it was not written by hpcdistill or was edited by hand") from None
