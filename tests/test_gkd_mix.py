"""GKD's lambda (train.on_policy_fraction) and what teacher samples train with (train.off_policy_loss),
on real runs of a tiny random model: which rollouts each step records, and how the parts are weighted."""

from __future__ import annotations

import numpy as np
import pytest

from hpcdistill.rundir import read_json
from hpcdistill.launch.submit import submit
from hpcdistill.record import iter_shards
from hpcdistill.spec import load_spec
from hpcdistill.spec.load import validate
from hpcdistill.tasks import Problem
from tinyspec import tiny_spec
from hpcdistill.train.update import split_on_policy

def _steps(tmp_path, name, fraction, off):
    path = tiny_spec(tmp_path, name, task={"num_problems": 4}, rollout={"max_new_tokens": 6},
                     train={"steps": 3, "on_policy_fraction": fraction, "off_policy_loss": off})
    result = submit(load_spec(path), executor="debug")
    assert read_json(result.sweep.run(result.runs[0].run_id).status)["state"] == "completed"
    out = {}
    for shard in iter_shards([result.sweep.root]):
        rows = shard.rollouts()
        metrics = {k: float(v[1][0]) for k, v in shard.metrics().items()}
        out[int(shard.attrs["step"])] = (list(rows["kind"]), list(rows["problem_id"]), rows["length"], metrics)
    return out


def test_each_problem_of_a_step_is_the_students_or_the_teachers_and_the_parts_weigh_by_tokens(tmp_path):
    steps = _steps(tmp_path, "half", 0.5, "divergence")
    seen_teacher = False
    for step, (kinds, problems, lengths, metrics) in sorted(steps.items()):
        students = {p for k, p in zip(kinds, problems) if k == "original"}
        teachers = {p for k, p in zip(kinds, problems) if k == "teacher"}
        assert not students & teachers and len(students | teachers) == 4  # every problem, one side each
        if step == 3:  # the last step only measures: all the student's
            assert not teachers
            continue
        seen_teacher |= bool(teachers)
        on_tokens = sum(n for k, n in zip(kinds, lengths) if k == "original")
        off_tokens = sum(n for k, n in zip(kinds, lengths) if k == "teacher")
        assert metrics["train/on_policy_weight"] == pytest.approx(on_tokens / (on_tokens + off_tokens))
        assert metrics["train/off_policy_weight"] == pytest.approx(off_tokens / (on_tokens + off_tokens))
        if teachers:  # the teacher's samples trained with the distill objective (GKD)
            assert "train/off_divergence" in metrics and "train/off_nll" not in metrics
    assert seen_teacher


def test_lambda_zero_is_sequence_level_kd_on_teacher_samples_and_one_is_on_policy(tmp_path):
    kd = _steps(tmp_path, "kd", 0.0, "sft")
    for step in (0, 1, 2):
        kinds, _, _, metrics = kd[step]
        assert set(kinds) == {"teacher"} and metrics["train/off_policy_weight"] == 1.0
        assert "train/off_nll" in metrics and "train/loss" not in metrics
    problems = [Problem(str(i), "x", {}) for i in range(8)]
    on_policy = validate({"experiment": {"name": "x"}, "train": {"steps": 2}}, {}, "test")
    assert split_on_policy(on_policy, problems, 0) == (problems, [])
    half = validate({"experiment": {"name": "x"}, "train": {"steps": 2, "on_policy_fraction": 0.5}}, {}, "test")
    draws = [split_on_policy(half, problems, step) for step in (0, 1)]
    assert draws[0] == split_on_policy(half, problems, 0)  # seeded by (seed, step)
    assert draws[0] != draws[1] and np.mean([len(d[0]) for d in draws]) > 0
