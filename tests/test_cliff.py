"""Seed 003: collapse detection, method status, cost, and the small study end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcdistill.analysis.cliff import RunCurve, collapse_step, method_rows, run_cost
from hpcdistill.cli import main
from hpcdistill.spec import expand, load_spec

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "cliff"


def test_collapse_is_a_fall_to_near_zero_that_stays():
    assert collapse_step({0: 0.5, 40: 0.5, 50: 0.17, 70: 0.0, 90: 0.0}, threshold=0.02) == 70
    assert collapse_step({0: 0.5, 50: 0.0, 70: 0.3}, threshold=0.02) is None  # recovered
    assert collapse_step({0: 0.0, 50: 0.0}, threshold=0.02) is None  # never above: not a collapse
    assert collapse_step({}, threshold=0.02) is None


def curve(method: str, seed: int, values: dict[int, float], family: str = "qwen") -> RunCurve:
    run = RunCurve(f"{method}-{seed}", method, family, seed, {"launch": {"gpus": {"rollout": 1, "teacher": 2,
                                                                                  "trainer": 1}}})
    run.metrics["eval/reward@0"] = dict(values)
    return run


def test_methods_table_has_the_seeds_statuses():
    runs = {}
    for seed in range(4):
        for run in [curve("teacher_seeded", seed, {0: 0.5, 100: 0.6 + 0.01 * seed}),
                    curve("on_policy_gkd", seed, {0: 0.5, 100: 0.5}),
                    curve("hybrid", seed, {0: 0.5, 50: 0.1, 70: 0.0, 100: 0.0}),
                    curve("replay_buffer", seed, {0: 0.5, 100: 0.0 if seed == 0 else 0.05})]:
            runs[run.run_id] = run
    (headers, rows), = method_rows(runs).values()
    status = {row[0]: row[-1] for row in rows}
    assert status == {"teacher_seeded": "Best", "on_policy_gkd": "Stable", "hybrid": "Collapsed",
                      "replay_buffer": "Partial"}
    hybrid = next(r for r in rows if r[0] == "hybrid")
    assert hybrid[2] == "4/4 (steps 70, 70, 70, 70)"
    assert rows[0][0] == "teacher_seeded" and rows[0][1].startswith("61.5% ±")


def test_cost_counts_device_hours_by_role_and_allocated_gpu_hours():
    run = curve("on_policy_gkd", 0, {0: 0.5})
    run.spec["launch"]["gpu_hour_price"] = 2.0
    run.metrics["rollout_seconds"] = {0: 1800.0}
    run.metrics["scoring_seconds"] = {0: 900.0}
    run.metrics["teacher_seconds"] = {0: 900.0}
    run.metrics["train_seconds"] = {0: 3600.0}
    run.metrics["step_seconds"] = {0: 7200.0}
    run.metrics["response_tokens"] = {0: 1000.0}
    run.metrics["scored_tokens"] = {0: 1000.0}
    cost = run_cost(run)
    assert cost["rollout_device_hours"] == pytest.approx(0.5)
    assert cost["teacher_device_hours"] == pytest.approx(1.0)  # 0.5 h on 2 teacher GPUs
    assert cost["trainer_device_hours"] == pytest.approx(1.0)
    assert cost["allocated_gpu_hours"] == pytest.approx(8.0)  # 2 h x 4 GPUs
    assert cost["cost"] == pytest.approx(16.0)


def test_full_study_expands_to_160_runs_in_one_array():
    runs = expand(load_spec(CONFIGS / "methods.toml"))
    assert len(runs) == 160
    methods = {r.spec.train.method for r in runs}
    assert len(methods) == 8
    assert {r.spec.train.steps for r in runs if r.spec.train.method == "extended_on_policy"} == {200}
    assert len({(r.spec.model.student, r.spec.model.teacher) for r in runs}) == 2


@pytest.mark.slow
def test_small_study_runs_every_method_and_reports_status_and_cost(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["submit", str(CONFIGS / "methods_small.toml"), "--executor", "debug",
                 "--set", f'experiment.output_dir="{out}"', "--set", "experiment.num_seeds=1",
                 "--set", "rollout.max_new_tokens=8", "--set", "eval.max_new_tokens=8",
                 "--set", "launch.cpus_per_task=2"]) == 0  # one seed: every method once (CI time)
    text = capsys.readouterr().out
    assert "8 runs submitted" in text
    assert "Methods: downstream accuracy and status" in text and "Cost per method" in text
    for method in ["on_policy_gkd", "hybrid", "extended_on_policy", "teacher_seeded", "mixture",
                   "replay_buffer", "kl_anchored", "reverse_curriculum"]:
        assert method in text
    assert (out / "cliff-methods-small" / "analysis" / "method_curves.png").exists()
