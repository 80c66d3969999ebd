"""Watching a run while it trains (issue 19): `[log]`'s backends (metrics.jsonl, TensorBoard,
W&B offline) hold every step once, equal to the step's shard, also across a resume; `hpcdistill
status --once` / `--watch` show each run's step, loss and state from metrics.jsonl.

Real tiny runs (tests/tinyspec.py) through the local executor; W&B's offline .wandb file is read
with W&B's own protobuf records (its LevelDB-style log format, 32 KiB blocks of framed records),
TensorBoard's event files with TensorBoard's EventAccumulator.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import io
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from hpcdistill.cli import main
from hpcdistill.errors import SpecError
from hpcdistill.launch import watch as watch_module
from hpcdistill.launch.submit import prepare_run_dir, submit
from hpcdistill.record import ShardReader
from hpcdistill.rundir import RunPaths, SweepPaths, read_json, write_json_atomic
from hpcdistill.spec import expand, load_spec
from hpcdistill.train import loop
from hpcdistill.train.tracking import append_line, read_metrics
from tinyspec import tiny_spec

ALL_BACKENDS = {"backends": ["jsonl", "tensorboard", "wandb"], "mode": "offline"}
PLANTED = "planted-secret-0a1b2c3d4e5f60718293"
needs_track = pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None or importlib.util.find_spec("tensorboard") is None,
    reason="wandb / tensorboard not installed (pip install 'hpcdistill[track]'; scripts/setup.sh "
           "--with-cluster-tools installs them)")


# ---------------------------------------------------------------------------- readers


def wandb_records(path: Path):
    """The protobuf Records of a .wandb file: a 7-byte header (":W&B", magic, version), then
    LevelDB-log framing (crc32 4, length 2, type 1: full / first / middle / last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data, pos, parts = path.read_bytes(), 7, []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the block's zero padding
            pos += left
            continue
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def wandb_runs(paths: RunPaths) -> list[dict]:
    """Each offline W&B run file of the run directory (one per task), oldest first: its run record
    and its history rows (step -> {metric: value}, W&B's own _step/_runtime/_timestamp left out)."""
    out = []
    for file in sorted(paths.root.glob("wandb/offline-run-*/run-*.wandb")):
        run, history = None, []
        for record in wandb_records(file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                history.append((record.history.step.num, {k: v for k, v in row.items() if not k.startswith("_")}))
        out.append({"run": run, "history": history,
                    "config": {u.key: json.loads(u.value_json) for u in run.config.update}})
    return out


def tensorboard_scalars(paths: RunPaths) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows them (events an earlier task logged from a
    resume's purge_step on are dropped, as TensorBoard drops them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(paths.tensorboard), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def shard_metrics(paths: RunPaths, step: int) -> dict[str, float]:
    with ShardReader(paths.shard(step)) as shard:
        metrics = shard.metrics()
    assert all(list(steps) == [step] for steps, _ in metrics.values())
    return {name: float(values[0]) for name, (_, values) in metrics.items()}


def line_metrics(line: dict) -> dict[str, float]:
    """A metrics.jsonl line without its step and time: the step's metrics."""
    return {k: v for k, v in line.items() if k not in ("step", "time")}


def assert_backends_hold_each_step_once(paths: RunPaths, steps: int, *, wandb_tasks: int = 1) -> dict:
    """metrics.jsonl and TensorBoard equal the shards of steps 0..steps, once each; W&B holds each
    step once over its `wandb_tasks` offline files. Returns W&B's rows by step."""
    shards = {k: shard_metrics(paths, k) for k in range(steps + 1)}
    lines = read_metrics(paths.metrics_log)
    assert [line["step"] for line in lines] == list(range(steps + 1))
    for line in lines:  # exact: the same floats, NaN included, as the shard's metrics group
        assert json.dumps(line_metrics(line), sort_keys=True) == json.dumps(shards[line["step"]], sort_keys=True)
    scalars = tensorboard_scalars(paths)
    assert set(scalars) == set().union(*shards.values())
    for tag, events in scalars.items():
        expected = [(k, shards[k][tag]) for k in range(steps + 1) if tag in shards[k]]
        assert [s for s, _ in events] == [s for s, _ in expected], tag
        assert [v for _, v in events] == pytest.approx([v for _, v in expected], rel=1e-6, nan_ok=True), tag
    runs = wandb_runs(paths)
    assert len(runs) == wandb_tasks
    assert {r["run"].run_id for r in runs} == {paths.wandb_id.read_text().strip()}
    rows = [row for r in runs for row in r["history"]]
    assert [step for step, _ in rows] == list(range(steps + 1))
    return dict(rows)


def assert_no_file_contains(root: Path, needle: str) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            assert needle.encode() not in path.read_bytes(), f"secret written to {path}"


@pytest.fixture
def offline_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_API_KEY", PLANTED)  # reaches the task by name; written nowhere


# ---------------------------------------------------------------------------- the spec


def test_log_backends_are_checked_when_the_spec_loads(tmp_path, monkeypatch):
    with pytest.raises(SpecError, match=r"key 'log.backends\[1\]': got 'mlflow'; allowed: 'jsonl', 'wandb', "
                                        r"'tensorboard'"):
        load_spec(tiny_spec(tmp_path, "bad", log={"backends": ["jsonl", "mlflow"]}))
    with pytest.raises(SpecError, match=r"key 'log.backends': names 'jsonl' twice"):
        load_spec(tiny_spec(tmp_path, "twice", log={"backends": ["jsonl", "jsonl"]}))
    # a backend not installed: the spec still loads (a shard's spec must read without wandb), but
    # submitting it is an error before anything is written
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    missing = load_spec(tiny_spec(tmp_path, "missing", log={"backends": ["wandb"]}))
    with pytest.raises(SpecError, match=r"key 'log.backends': names 'wandb', but wandb is not "
                                        r"installed .*pip install 'hpcdistill\[track\]'"):
        submit(missing, executor="local")
    assert not (tmp_path / "runs").exists()
    load_spec(tiny_spec(tmp_path, "fine", log={"backends": ["jsonl", "tensorboard"]}))


@needs_track
def test_log_section_is_not_science_the_run_id_stays(tmp_path):
    (plain,) = expand(load_spec(tiny_spec(tmp_path, "same")))
    (logged,) = expand(load_spec(tiny_spec(tmp_path, "same",
                                           log={**ALL_BACKENDS, "project": "p", "mode": "online"})))
    assert plain.run_id == logged.run_id
    assert logged.spec.log.project == "p" and plain.spec.log.backends == ["jsonl"]


# ---------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def tracked_sweep(tmp_path_factory):
    """A local sweep of a measurement (train.steps = 0) and a 2-step run, all three backends."""
    tmp_path = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as env:
        for name, value in (("WANDB_SILENT", "true"), ("WANDB_CONSOLE", "off"), ("WANDB_API_KEY", PLANTED)):
            env.setenv(name, value)
        result = submit(load_spec(tiny_spec(tmp_path, "tracked", log=ALL_BACKENDS,
                                            sweep={"grid": {"train.steps": [0, 2]}})), executor="local")
    runs = {run.spec.train.steps: result.sweep.run(run.run_id) for run in result.runs}
    for paths in runs.values():
        assert read_json(paths.status)["state"] == "completed", paths.log.read_text()[-3000:]
    return result.sweep, runs


@pytest.mark.slow
@needs_track
def test_every_backend_holds_each_step_of_the_shards_once(tracked_sweep):
    sweep, runs = tracked_sweep
    for steps, paths in runs.items():
        rows = assert_backends_hold_each_step_once(paths, steps)
        for line in read_metrics(paths.metrics_log):
            assert rows[line["step"]] == pytest.approx(line_metrics(line), nan_ok=True)
        (run,) = wandb_runs(paths)
        assert run["run"].display_name == paths.run_id and run["run"].run_group == "tracked"
        assert list(run["run"].tags) == [f"train.steps={steps}"]
        assert run["config"]["train"]["steps"] == steps
        assert run["config"]["log"]["backends"] == ALL_BACKENDS["backends"]
    assert "train/loss_total" in read_metrics(runs[2].metrics_log)[0]  # a training step's loss
    assert_no_file_contains(sweep.root, PLANTED)


@pytest.mark.slow
@needs_track
def test_status_once_shows_each_runs_last_step_and_loss(tracked_sweep, capsys):
    sweep, runs = tracked_sweep
    capsys.readouterr()
    assert main(["status", str(sweep.root), "--once"]) == 0
    out = capsys.readouterr().out
    loss = read_metrics(runs[2].metrics_log)[1]["train/loss_total"]  # step 1's: step 2 only measures
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert "completed" in rows[runs[2].run_id] and " 2/2 " in rows[runs[2].run_id]
    assert f"{loss:.4g}" in rows[runs[2].run_id]
    assert "completed" in rows[runs[0].run_id] and " 0/0 " in rows[runs[0].run_id]
    assert "runs ended 100%" in out and "| 2/2  2 completed" in out


@pytest.mark.slow
@needs_track
def test_a_run_killed_between_shard_and_checkpoint_logs_each_step_once_after_the_resubmit(
        tmp_path, monkeypatch, offline_wandb):
    """Step 1's shard and metrics are written, its checkpoint is not: the resumed task redoes
    step 1, and no backend shows it twice."""
    from hpcdistill import worker

    spec = tiny_spec(tmp_path, "resumed", log=ALL_BACKENDS)
    loaded = load_spec(spec)
    (run,) = expand(loaded)
    paths = prepare_run_dir(SweepPaths.for_spec(tmp_path / "runs", "resumed"), run, loaded.spec_hash)
    calls = []
    teacher_state_files = loop.teacher_state_files

    def dies_before_checkpoint_1(*args):  # the checkpoint's extra files are gathered first
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed between shard 1 and checkpoint 1")
        return teacher_state_files(*args)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "teacher_state_files", dies_before_checkpoint_1)
        with pytest.raises(RuntimeError, match="killed between"):
            worker.run(paths.root)  # the first task, in this process
    first_task = read_metrics(paths.metrics_log)
    assert paths.shard(1).exists() and [r["step"] for r in first_task] == [0, 1]
    submit(load_spec(spec), executor="local")  # the resubmitted task resumes after step 0
    status = read_json(paths.status)
    assert status["state"] == "completed" and status["attempts"] == 2
    assert "resuming after step 0" in paths.log.read_text()
    rows = assert_backends_hold_each_step_once(paths, 2, wandb_tasks=2)
    # W&B cannot take step 1 back: it keeps the first task's (metrics.jsonl and TensorBoard the redone one's)
    assert rows[1] == pytest.approx(line_metrics(first_task[1]), nan_ok=True)
    assert_no_file_contains(paths.root, PLANTED)


# ---------------------------------------------------------------------------- the watch table


def fake_sweep(root: Path, states: dict[str, str], steps: int = 5) -> SweepPaths:
    """A sweep directory as `submit` and running workers leave it: manifest, run.json, spec.toml,
    status.json and metrics.jsonl with steps 0..2 (a loss on each, an eval at step 1)."""
    sweep = SweepPaths(root)
    started = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=3)).isoformat(timespec="seconds")
    write_json_atomic(sweep.manifest, {"runs": {rid: {"seed": 0, "overrides": {}} for rid in states}})
    for run_id, state in states.items():
        paths = sweep.run(run_id)
        write_json_atomic(paths.run_json, {"run_id": run_id, "seed": 0, "overrides": {}})
        paths.spec.write_text(f'[experiment]\nname = "w"\n\n[train]\nsteps = {steps}\n')
        write_json_atomic(paths.status, {"state": state, "started": started})
        for k in range(3):
            append_line(paths.metrics_log, {"step": k, "time": 0.0, "train/loss_total": 1.0 / (k + 1),
                                            **({"eval/reward@1": 0.25, "eval/passed@1": 0.5} if k == 1 else {})})
    return sweep


def test_watch_redraws_until_every_run_has_ended(tmp_path, capsys):
    sweep = fake_sweep(tmp_path / "w", {"run-a": "running", "run-b": "completed"})

    def the_run_completes(seconds):
        status = sweep.run("run-a").status
        write_json_atomic(status, {**read_json(status), "state": "completed"})

    out = io.StringIO()
    watch_module.watch(sweep.root, lambda overrides: "-", interval_s=10.0, out=out, sleep=the_run_completes)
    first, second = out.getvalue().split("run_id")[1:]
    row = next(line for line in first.splitlines() if line.startswith("run-a"))
    assert row.split()[2:6] == ["running", "2/5", "0.3333", "0.25"] and "(eval/reward@1)" in row
    assert "3m0" in row  # elapsed since the attempt started, 3 minutes ago
    assert "runs ended  50%" in first and "1/2  1 completed, 1 running" in first
    assert "runs ended 100%" in second and "2 completed" in second
    assert main(["status", str(sweep.root), "--watch", "--interval", "0"]) == 0  # all ended: draws once
    assert capsys.readouterr().out.count("runs ended 100%") == 1


# ---------------------------------------------------------------------------- a Slurm sweep


def _slurm_ready() -> bool:
    if shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and any(state in out.stdout for state in ("idle", "mix", "alloc"))


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.timeout(900)
@needs_track
def test_status_watch_follows_a_slurm_sweep_to_its_end(tmp_path, capsys, offline_wandb):
    if not _slurm_ready():
        subprocess.run(["bash", str(Path(__file__).resolve().parents[1] / "scripts" / "local-slurm.sh"), "start"],
                       check=True)
    spec = tiny_spec(tmp_path, "watched", log=ALL_BACKENDS, train={"steps": 1},
                     sweep={"grid": {"rollout.temperature": [0.7, 1.0]}},
                     launch={"executor": "slurm", "time": "00:10:00", "cpus_per_task": 1})
    result = submit(load_spec(spec), executor="slurm")
    capsys.readouterr()
    assert main(["status", str(result.sweep.root), "--watch", "--interval", "2"]) == 0  # returns when all ended
    last = capsys.readouterr().out.rsplit("run_id", 1)[1]
    for run in result.runs:
        row = next(line for line in last.splitlines() if line.startswith(run.run_id))
        assert "completed" in row and " 1/1 " in row
        assert_backends_hold_each_step_once(result.sweep.run(run.run_id), 1)
    assert "runs ended 100%" in last


@pytest.mark.slow
@needs_track
def test_only_rank_zero_logs_a_run_over_two_trainer_ranks(tmp_path, offline_wandb):
    result = submit(load_spec(tiny_spec(tmp_path, "ranks", log=ALL_BACKENDS, train={"steps": 1},
                                        trainer={"strategy": "fsdp", "nproc": 2})), executor="local")
    paths = result.sweep.run(result.runs[0].run_id)
    assert read_json(paths.status)["state"] == "completed", paths.log.read_text()[-3000:]
    assert_backends_hold_each_step_once(paths, 1)  # one line, one event, one W&B row per step
    assert len(list(paths.tensorboard.iterdir())) == 1  # one writer
