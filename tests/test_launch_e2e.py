"""The launch path for real: submitit's Local, Debug and Slurm executors running the worker.

The Slurm tests submit to the one-node cluster that `scripts/local-slurm.sh start` runs on this
machine (CI starts it before pytest). Runs use a tiny random Llama with the bundled tokenizer
("tiny-random:0") so that each task is a real model, real sandbox and real shard, in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcdistill.cli import main
from hpcdistill.rundir import SweepPaths, read_json
from hpcdistill.launch.submit import render_script, submit
from hpcdistill.record import ShardReader
from hpcdistill.spec import expand, load_spec

PLANTED = "planted-secret-9f8e7d6c5b4a39281706"

TINY = """
[experiment]
name = "{name}"
seeds = {seeds}
output_dir = "{out}"

[model]
student = "tiny-random:0"
device = "cpu"

[task]
name = "code"
num_problems = 1
timeout_s = 2.0

[rollout]
samples_per_problem = 1
max_new_tokens = 4
batch_size = 1

[teacher]
context = "feedback"

[scoring]
top_k = 4

[launch]
executor = "local"
time = "00:10:00"
array_parallelism = 12
cpus_per_task = 1
pass_env = ["WANDB_API_KEY"]
"""


def make_spec(tmp_path: Path, name: str, extra: str = "", seeds: str = "[0]") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(TINY.format(name=name, seeds=seeds, out=tmp_path / "runs") + extra)
    return path


def statuses(sweep: SweepPaths) -> dict[str, dict]:
    manifest = read_json(sweep.manifest)
    return {rid: read_json(sweep.run(rid).status) for rid in manifest["runs"]
            if sweep.run(rid).status.exists()}


def assert_no_file_contains(root: Path, needle: str) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            assert needle.encode() not in path.read_bytes(), f"secret written to {path}"


# ---------------------------------------------------------------------------- local and debug


@pytest.mark.slow
def test_local_executor_runs_every_task_and_a_second_submit_skips_completed(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", PLANTED)
    spec = make_spec(tmp_path, "local-sweep", '[sweep]\ngrid = { "rollout.temperature" = [0.7, 1.0] }\n')
    loaded = load_spec(spec)
    result = submit(loaded, executor="local")
    assert len(result.submitted) == 2
    sweep = result.sweep
    done = statuses(sweep)
    assert {s["state"] for s in done.values()} == {"completed"}
    for run_id, status in done.items():
        assert status["env_passed"] == {"WANDB_API_KEY": True}
        with ShardReader(sweep.run(run_id).shard(0)) as shard:
            assert shard.num_rollouts == 1
            assert shard.attrs["run_id"] == run_id
    again = submit(load_spec(spec), executor="local")
    assert again.submitted == [] and len(again.skipped) == 2
    manifest = read_json(sweep.manifest)
    assert len(manifest["submissions"]) >= 1 and manifest["spec_hash"]
    assert all(r["job_id"] for r in manifest["runs"].values())
    assert_no_file_contains(sweep.root, PLANTED)


@pytest.mark.slow
def test_debug_executor_runs_in_process(tmp_path):
    spec = make_spec(tmp_path, "debug-run")
    result = submit(load_spec(spec), executor="debug")
    assert [read_json(result.sweep.run(r.run_id).status)["state"] for r in result.runs] == ["completed"]


@pytest.mark.slow
def test_more_gpus_than_allocated_fails_before_loading_a_model(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    spec = make_spec(tmp_path, "too-many-gpus", "gpus = { rollout = 2, teacher = 0, trainer = 1 }\n")
    result = submit(load_spec(spec), executor="debug")
    paths = result.sweep.run(result.runs[0].run_id)
    status = read_json(paths.status)
    assert status["state"] == "failed"
    assert "asks for 3 GPUs" in status["error"] and "allocation has 2" in status["error"]
    assert "loaded" not in paths.log.read_text()


@pytest.mark.slow
def test_failed_run_is_resubmitted_alone(tmp_path, capsys):
    problems = tmp_path / "problems.jsonl"
    spec = make_spec(tmp_path, "resubmit", f'[sweep]\ngrid = {{ "task.source" = ["bundled", "{problems}"] }}\n')
    assert main(["submit", str(spec), "--no-analyze"]) == 0
    sweep = SweepPaths.for_spec(tmp_path / "runs", "resubmit")
    states = {rid: s["state"] for rid, s in statuses(sweep).items()}
    assert sorted(states.values()) == ["completed", "failed"]
    failed = next(r for r, s in states.items() if s == "failed")
    capsys.readouterr()
    assert main(["status", str(sweep.root)]) == 0
    table = capsys.readouterr().out
    assert failed in table and "failed" in table and "completed" in table

    from hpcdistill.tasks import get_task  # write the missing problem file from the bundled set
    import hpcdistill

    bundled = Path(hpcdistill.__file__).parent / "data" / "code_problems.jsonl"
    problems.write_text(bundled.read_text())
    completed_before = {r: sweep.run(r).shard(0).stat().st_mtime_ns for r, s in states.items() if s == "completed"}
    assert main(["resubmit", str(sweep.root), "--failed"]) == 0
    assert "1 runs resubmitted" in capsys.readouterr().out
    assert {s["state"] for s in statuses(sweep).values()} == {"completed"}
    for run_id, mtime in completed_before.items():  # the completed run was not run again
        assert sweep.run(run_id).shard(0).stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_interrupted_local_task_is_requeued_and_resumes_from_its_last_step(tmp_path):
    spec = make_spec(tmp_path, "preempt", '[train]\nsteps = 20\nlr = 1e-3\n')
    loaded = load_spec(spec)
    result = submit(loaded, executor="local", wait=False)
    (job,) = result.jobs
    paths = result.sweep.run(result.runs[0].run_id)
    deadline = time.monotonic() + 240
    while not paths.shard(1).exists():
        assert time.monotonic() < deadline, "the run never finished step 1"
        assert job.state in ("RUNNING", "UNKNOWN"), job.state
        time.sleep(0.2)
    first_shard_mtime = paths.shard(0).stat().st_mtime_ns
    # The preemption signal, delivered to the task as Slurm's --signal=USR2 does (submitit's
    # LocalJob._interrupt signals the local controller, which does not forward USR2).
    subprocess.run(["pkill", "-USR2", "-P", str(job._process.pid)], check=True)
    job.result()
    status = read_json(paths.status)
    assert status["state"] == "completed" and status["attempts"] == 2
    assert sorted(p.name for p in paths.shards.glob("*.h5")) == [f"step_{k:06d}.h5" for k in range(21)]
    assert paths.shard(0).stat().st_mtime_ns == first_shard_mtime  # not redone
    log = paths.log.read_text()
    assert "resuming after step" in log
    steps = []
    for k in range(21):
        with ShardReader(paths.shard(k)) as shard:
            steps += list(shard.rollouts()["step"])
    assert steps == list(range(21))  # every step once


# ---------------------------------------------------------------------------- slurm


def _slurm_ready() -> bool:
    if shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and any(state in out.stdout for state in ("idle", "mix", "alloc"))


@pytest.fixture(scope="module")
def slurm():
    """The local one-node cluster; started here if CI has not started it already."""
    if not _slurm_ready():
        script = Path(__file__).resolve().parents[1] / "scripts" / "local-slurm.sh"
        subprocess.run(["bash", str(script), "start"], check=True)
    assert _slurm_ready(), "the local Slurm cluster is not up (scripts/local-slurm.sh start)"


def counting_sbatch(tmp_path: Path) -> Path:
    """A directory to put first on PATH whose `sbatch` logs each call, then runs the real one."""
    shim_dir = tmp_path / "shim"
    shim_dir.mkdir()
    real = shutil.which("sbatch")
    shim = shim_dir / "sbatch"
    shim.write_text(f'#!/bin/sh\necho "$@" >> {shim_dir}/calls\nexec {real} "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    return shim_dir


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_sweep_of_12_runs_is_one_job_array_and_every_task_completes(slurm, tmp_path, monkeypatch, capsys):
    shim = counting_sbatch(tmp_path)
    monkeypatch.setenv("PATH", f"{shim}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("WANDB_API_KEY", PLANTED)
    spec = make_spec(tmp_path, "slurm-sweep",
                     'gpus = { rollout = 1, teacher = 0, trainer = 2 }\n'
                     '[sweep]\ngrid = { "rollout.temperature" = [0.5, 1.0, 1.5], "scoring.top_k" = [4, 8] }\n',
                     seeds="[0, 1]")
    assert len(expand(load_spec(spec))) == 12
    assert main(["submit", str(spec), "--executor", "slurm", "--wait"]) == 0
    calls = (shim / "calls").read_text().splitlines()
    assert len(calls) == 1, calls  # one sbatch call for the whole sweep
    sweep = SweepPaths.for_spec(tmp_path / "runs", "slurm-sweep")
    manifest = read_json(sweep.manifest)
    (submission,) = manifest["submissions"]
    (array,) = submission["arrays"]
    assert len(array["run_ids"]) == 12
    done = statuses(sweep)
    assert len(done) == 12 and {s["state"] for s in done.values()} == {"completed"}
    for run_id, status in done.items():
        assert manifest["runs"][run_id]["job_id"].startswith(array["job_id"] + "_")
        assert status["job_id"] == manifest["runs"][run_id]["job_id"]
        assert status["roles"] == {"rollout": ["0"], "teacher": [], "trainer": ["1", "2"]}
        assert status["env_passed"] == {"WANDB_API_KEY": True}
        assert sweep.run(run_id).shard(0).exists()
    capsys.readouterr()
    assert main(["status", str(sweep.root)]) == 0  # no sacct on the local cluster
    assert capsys.readouterr().out.count("completed") >= 12
    assert_no_file_contains(sweep.root, PLANTED)
    # `hpcdistill render` prints exactly the script submitit submitted (it uses a private submitit
    # hook, so this pins the behaviour of the pinned submitit version)
    (submitted,) = sweep.logs.rglob("*_submission.sh")
    assert render_script(load_spec(spec)) == [submitted.read_text()]


@pytest.mark.slow
@pytest.mark.slurm
def test_preempted_slurm_task_is_requeued_and_resumes(slurm, tmp_path):
    spec = make_spec(tmp_path, "slurm-preempt", '[train]\nsteps = 20\nlr = 1e-3\n')
    result = submit(load_spec(spec), executor="slurm")
    (job,) = result.jobs
    paths = result.sweep.run(result.runs[0].run_id)
    deadline = time.monotonic() + 300
    while not paths.shard(1).exists():
        assert time.monotonic() < deadline, "the run never finished step 1"
        time.sleep(0.5)
    first_shard_mtime = paths.shard(0).stat().st_mtime_ns
    job._interrupt()  # submitit's SlurmJob: scancel --signal USR2 (the preemption signal)
    deadline = time.monotonic() + 300
    while read_json(paths.status).get("state") != "completed":
        assert time.monotonic() < deadline, read_json(paths.status)
        time.sleep(1.0)
    status = read_json(paths.status)
    assert status["attempts"] >= 2
    assert paths.shard(0).stat().st_mtime_ns == first_shard_mtime
    assert sorted(p.name for p in paths.shards.glob("*.h5")) == [f"step_{k:06d}.h5" for k in range(21)]


@pytest.mark.slow
def test_run_killed_mid_way_resumes_with_every_step_once_and_the_same_result(tmp_path):
    """SIGKILL (no checkpoint signal, as when a node dies), then the worker again on the same run."""
    import signal

    from hpcdistill.launch.submit import prepare_run_dir

    steps = 8
    results = {}
    for label in ("killed", "straight"):
        (tmp_path / label).mkdir()
        spec = make_spec(tmp_path / label, "kill", f'[train]\nsteps = {steps}\nlr = 1e-3\n')
        loaded = load_spec(spec)
        (run,) = expand(loaded)
        sweep = SweepPaths.for_spec(tmp_path / label / "runs", "kill")
        paths = prepare_run_dir(sweep, run, loaded.spec_hash)
        worker = [sys.executable, "-m", "hpcdistill.worker", str(paths.root)]
        if label == "killed":
            proc = subprocess.Popen(worker, start_new_session=True, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 240
            while not paths.shard(3).exists():
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            assert read_json(paths.status)["state"] == "running"  # died without a trace
            assert not paths.shard(steps).exists()
        subprocess.run(worker, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
        status = read_json(paths.status)
        assert status["state"] == "completed"
        assert sorted(p.name for p in paths.shards.glob("*.h5")) == [f"step_{k:06d}.h5" for k in range(steps + 1)]
        assert not list(paths.shards.glob("*.tmp-*"))
        with ShardReader(paths.shard(steps)) as shard:
            results[label] = {name: values[0] for name, (_, values) in shard.metrics().items()
                              if not name.endswith("seconds")}
            assert list(shard.rollouts()["step"]) == [steps]
    (log,) = (tmp_path / "killed" / "runs" / "kill").rglob("worker.log")
    assert "resuming after step" in log.read_text()
    for name, value in results["straight"].items():
        assert results["killed"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
