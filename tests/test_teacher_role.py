"""The teacher role apart from the trainer (issue 18): its own process, and what it refuses.

- `models.split_scoring` (student half here, teacher half there) gives the in-process scores bit
  for bit (tiny random models, token sets, an empty rollout, a teacher response other than the
  student's);
- a run with the teacher in its own process (`launch.teacher_process = "always"`, on the CPU)
  writes the same shards' token columns as the run with the teacher in process, bit for bit, the
  teacher sampling the replay buffer's completions there too; the teacher process counts each
  scored token once (`teacher_role/scored_tokens` = `scoring/teacher_tokens`) and is gone after
  the run;
- on the local Slurm, `gpus = { teacher = 1, trainer = 2 }` runs the teacher in its own process
  beside two DeepSpeed ranks, each token scored once; the teacher killed mid-run fails the run
  with a message that names it, and `resubmit` resumes to the shards of a run never interrupted.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from hpcdistill.cli import main
from hpcdistill.devices import RoleDevices
from hpcdistill.errors import SpecError
from hpcdistill.models.loading import tiny_random_model
from hpcdistill.models.scoring import score_rollouts
from hpcdistill.models.split_scoring import LocalTeacher, score_rollouts_split
from hpcdistill.record import ShardReader
from hpcdistill.rundir import SweepPaths, read_json
from hpcdistill.spec import expand, load_spec
from hpcdistill.spec.teacher_rules import teacher_placement
from hpcdistill.train.loop import run_training
from vllmfixtures import require_vllm

TOKEN_COLUMNS = ("student_lp", "teacher_lp", "topk_kl", "entropy_s", "entropy_t", "student_topk_ids",
                 "teacher_at_student_topk_lp", "teacher_topk_ids", "teacher_topk_lp", "student_at_teacher_topk_lp")


def test_split_scoring_gives_the_in_process_scores_bit_for_bit():
    student, teacher = tiny_random_model(seed=0), tiny_random_model(seed=1)
    rng = np.random.default_rng(0)
    student_seqs = [(list(rng.integers(0, 256, 5)), list(rng.integers(0, 256, n))) for n in (7, 0, 12, 3, 9)]
    teacher_seqs = [(list(rng.integers(0, 256, 8)), response) for _, response in student_seqs]
    teacher_seqs[3] = (teacher_seqs[3][0], list(rng.integers(0, 256, 2)))  # a regenerated, shorter response
    kwargs = dict(top_k=5, chunk_size=4, batch_size=2, token_sets={"backtrack": [1, 5, 9]})
    local = LocalTeacher(teacher)
    expected = score_rollouts(student, teacher, student_seqs, teacher_seqs, **kwargs)
    got = score_rollouts_split(student, local, student_seqs, teacher_seqs, **kwargs)
    assert local.scored_tokens == sum(len(s) for s in expected) == 7 + 12 + 2 + 9
    for want, have in zip(expected, got):
        for field in dataclasses.fields(want):
            a, b = getattr(want, field.name), getattr(have, field.name)
            if isinstance(a, dict):
                assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), field.name
            elif a is None:
                assert b is None, field.name
            else:
                assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), field.name


BASE = """
[experiment]
name = "teacher-role"
seeds = [0]
output_dir = "{out}"
[model]
student = "tiny-random:0"
teacher = "{teacher}"
device = "cpu"
[task]
name = "code"
num_problems = 2
timeout_s = 2.0
[rollout]
samples_per_problem = 2
max_new_tokens = 6
batch_size = 2
[scoring]
top_k = 4
{scoring}
[train]
steps = {steps}
lr = 1e-3
{train}
[trainer]
{trainer}
[launch]
{launch}
"""


def write_spec(path: Path, *, teacher: str = "tiny-random:1", steps: int = 2, train: str = "", trainer: str = "",
               launch: str = "", teacher_section: str = "", scoring: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(BASE.format(out=path.parent / "runs", teacher=teacher, steps=steps, train=train,
                                trainer=trainer, launch=launch, scoring=scoring) + teacher_section)
    return path


def spec_errors(tmp_path: Path, **kwargs) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(tmp_path / "bad.toml", **kwargs))
    return str(info.value)


def test_placement_follows_launch_and_a_teacher_apart_refuses_what_it_cannot_serve(tmp_path):
    def placement(**kwargs):
        return teacher_placement(load_spec(write_spec(tmp_path / "ok.toml", **kwargs)).spec)

    assert placement() == "trainer"  # no teacher GPUs: in process, as before
    assert placement(launch='gpus = { teacher = 1 }') == "process"
    assert placement(launch='teacher_process = "always"') == "process"
    assert placement(launch='teacher_process = "never"\ngpus = { teacher = 1 }') == "trainer"
    assert placement(teacher="same", launch='gpus = { teacher = 1 }', teacher_section='[teacher]\nweights = "initial"\n') \
        == "process"  # the frozen initial student
    assert "key 'launch.gpus.teacher'" in spec_errors(tmp_path, teacher="same", launch="gpus = { teacher = 1 }")
    assert "key 'teacher.weights'" in spec_errors(tmp_path, teacher="same", launch='teacher_process = "always"',
                                                  teacher_section='[teacher]\nweights = "ema"\n')
    assert "key 'train.support'" in spec_errors(tmp_path, train='support = "full"', launch='teacher_process = "always"')
    assert "key 'scoring.full_vocab'" in spec_errors(
        tmp_path, launch='teacher_process = "always"', scoring="full_vocab = true")
    vllm = '[teacher]\nbackend = "vllm"\n'
    message = spec_errors(tmp_path, teacher_section=vllm)
    assert "key 'train.topk_support'" in message and "teacher.backend = 'transformers'" in message
    assert placement(train='topk_support = "teacher"', teacher_section=vllm) == "vllm"
    assert "key 'teacher.context'" in spec_errors(tmp_path, train='topk_support = "teacher"',
                                                  teacher_section=vllm + 'context = "regen"\n')
    assert "key 'trainer.strategy'" in spec_errors(tmp_path, train='topk_support = "teacher"', teacher_section=vllm,
                                                   trainer='strategy = "fsdp"\nnproc = 2')


def _run(tmp_path: Path, launch: str) -> tuple[Path, dict]:
    spec = write_spec(tmp_path / "spec.toml", train='method = "replay_buffer"\nreplay_size = 2\nreplay_every = 1', launch=launch)
    loaded = load_spec(spec)
    (run,) = expand(loaded)
    paths = SweepPaths.for_spec(loaded.spec.experiment.output_dir, loaded.spec.experiment.name).run(run.run_id)
    paths.root.mkdir(parents=True)
    run_training(run.spec, paths, RoleDevices((), (), ()))
    return paths.root, {"paths": paths}


def shard_tokens(run_dir: Path) -> list[dict[str, np.ndarray]]:
    out = []
    for shard in sorted((run_dir / "shards").glob("*.h5")):
        with ShardReader(shard) as reader:
            out.append({name: np.concatenate([reader.tokens(i, [name])[name] for i in range(reader.num_rollouts)])
                        for name in TOKEN_COLUMNS} | {"kind": reader.rollouts()["kind"],
                                                      "metrics": reader.metrics()})
    return out


def scored_once(shards: list[dict]) -> int:
    """The trainer ranks' scored tokens over `shard_tokens`' shards, each asserted equal to the
    teacher process's own count for its step (every token scored once)."""
    for shard in shards:
        metrics = shard["metrics"]
        assert metrics["teacher_role/scored_tokens"][1][0] == metrics["scoring/teacher_tokens"][1][0] > 0
    return sum(shard["metrics"]["scoring/teacher_tokens"][1][0] for shard in shards)


def teacher_log_tokens(log: str) -> int:
    """The tokens the teacher process says it scored, over its log's "scored ..." lines."""
    return sum(int(n) for n in re.findall(r"scored \d+ sequences, (\d+) tokens", log))


def _assert_same_tokens(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert list(x["kind"]) == list(y["kind"])
        for name in TOKEN_COLUMNS:
            assert np.array_equal(x[name], y[name], equal_nan=True), name


@pytest.mark.slow
def test_teacher_in_its_own_process_writes_the_in_process_shards(tmp_path):
    inline, _ = _run(tmp_path / "inline", 'teacher_process = "never"')
    apart, info = _run(tmp_path / "apart", 'teacher_process = "always"')
    a, b = shard_tokens(inline), shard_tokens(apart)
    _assert_same_tokens(a, b)
    assert any("teacher" in set(shard["kind"]) for shard in b)  # the replay buffer's completions, sampled by the teacher process
    counted = scored_once(b)
    assert "teacher_role/scored_tokens" not in a[0]["metrics"]
    log = info["paths"].teacher_log.read_text()
    assert teacher_log_tokens(log) == counted
    pid = int(re.search(r"teacher\[(\d+)\]", log).group(1))
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped with the run


def _slurm_ready() -> bool:
    import shutil

    if shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and any(state in out.stdout for state in ("idle", "mix", "alloc"))


def _wait(paths, states: set[str], timeout: float = 420) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = read_json(paths.status) if paths.status.exists() else {}
        if status.get("state") in states:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_teacher_gpu_runs_the_teacher_apart_and_a_killed_teacher_resumes_to_the_same_shards(tmp_path):
    if not _slurm_ready():
        subprocess.run(["bash", str(Path(__file__).resolve().parents[1] / "scripts" / "local-slurm.sh"), "start"],
                       check=True)
    trainer = 'strategy = "deepspeed"\nzero_stage = 2'
    common = 'executor = "slurm"\ntime = "00:15:00"\ncpus_per_task = 2\n'
    sweeps = {}
    for label, launch in (("straight", common + 'teacher_process = "never"\ngpus = { trainer = 2 }'),
                          ("apart", common + "gpus = { teacher = 1, trainer = 2 }")):
        spec = write_spec(tmp_path / label / "spec.toml", steps=4, trainer=trainer, launch=launch)
        assert main(["submit", str(spec), "--no-analyze"]) == 0
        sweeps[label] = SweepPaths.for_spec(tmp_path / label / "runs", "teacher-role")
    (paths,) = sweeps["apart"].run_dirs()
    deadline = time.monotonic() + 420
    while not paths.shard(1).exists():
        state = read_json(paths.status).get("state") if paths.status.exists() else None
        assert time.monotonic() < deadline and state != "failed", state
        time.sleep(0.2)
    pid = int(re.search(r"teacher\[(\d+)\]", paths.teacher_log.read_text()).group(1))
    os.kill(pid, signal.SIGKILL)  # the teacher dies mid-run
    status = _wait(paths, {"failed", "completed"})
    assert status["state"] == "failed", status
    assert "teacher process" in status["error"] and "resubmit" in status["error"], status["error"]
    assert status["roles"] == {"rollout": [], "teacher": ["0"], "trainer": ["1", "2"]}
    assert main(["resubmit", str(sweeps["apart"].root)]) == 0
    deadline = time.monotonic() + 120
    while read_json(paths.status).get("state") == "failed":  # until the resubmitted task starts
        assert time.monotonic() < deadline, read_json(paths.status)
        time.sleep(0.5)
    assert _wait(paths, {"completed", "failed"})["state"] == "completed", read_json(paths.status)
    (straight,) = sweeps["straight"].run_dirs()
    assert _wait(straight, {"completed", "failed"})["state"] == "completed", read_json(straight.status)
    a, b = shard_tokens(straight.root), shard_tokens(paths.root)
    assert len(b) == 5
    _assert_same_tokens(a, b)
    scored_once(b)  # two ranks, each token scored once by the teacher process
    assert len(re.findall(r"listening on", paths.teacher_log.read_text())) == 2  # the resumed task's teacher


@pytest.mark.slow
@pytest.mark.vllm
def test_a_vllm_teacher_scores_a_training_run_like_the_teacher_in_process(tmp_path):
    """teacher.backend = "vllm" (the frozen initial student, on vLLM's CPU server) against the same
    run with the teacher in process: the teacher's own log-probs and top-k within vLLM's float
    tolerance, the columns it cannot serve NaN, and the update trained on the teacher's top-k."""
    require_vllm()
    runs = {}
    for label, section in (("inline", '[teacher]\nweights = "initial"\n'),
                           ("vllm", '[teacher]\nweights = "initial"\nbackend = "vllm"\n')):
        spec = write_spec(tmp_path / label / "spec.toml", teacher="same", steps=1, train='topk_support = "teacher"',
                          teacher_section=section)
        text = spec.read_text().replace('student = "tiny-random:0"', 'student = "bundled:smollm2-135m-instruct"')
        spec.write_text(text)
        loaded = load_spec(spec)
        (run,) = expand(loaded)
        paths = SweepPaths.for_spec(loaded.spec.experiment.output_dir, "teacher-role").run(run.run_id)
        paths.root.mkdir(parents=True)
        run_training(run.spec, paths, RoleDevices((), (), ()))
        runs[label] = (shard_tokens(paths.root), paths)
    (a, _), (b, paths) = runs["inline"], runs["vllm"]
    step0_a, step0_b = a[0], b[0]
    assert np.array_equal(step0_a["student_lp"], step0_b["student_lp"])  # the same rollouts, scored here
    assert np.array_equal(step0_a["teacher_topk_ids"][:, 0], step0_b["teacher_topk_ids"][:, 0])
    np.testing.assert_allclose(step0_b["teacher_topk_lp"], step0_a["teacher_topk_lp"], atol=1e-3)
    np.testing.assert_allclose(step0_b["teacher_lp"], step0_a["teacher_lp"], atol=1e-3)  # r = s: its own token
    assert np.isnan(step0_b["entropy_t"]).all()
    served = ~np.isnan(step0_b["teacher_at_student_topk_lp"])  # the student's ids among those vLLM returned
    np.testing.assert_allclose(step0_b["teacher_at_student_topk_lp"][served],
                               step0_a["teacher_at_student_topk_lp"][served], atol=1e-3)
    whole = served.all(-1)  # the top-k KL where every id of the student's top-k was served, NaN elsewhere
    assert np.isnan(step0_b["topk_kl"][~whole]).all() and (~whole).any()
    np.testing.assert_allclose(step0_b["topk_kl"][whole], step0_a["topk_kl"][whole], atol=1e-3)
    assert step0_b["metrics"]["teacher_role/scored_tokens"][1][0] == step0_b["metrics"]["scoring/teacher_tokens"][1][0]
    assert np.isfinite(step0_b["metrics"]["train/loss_total"][1][0])
