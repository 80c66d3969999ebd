"""The analyses compute what the seeds say (issue 15, helper C's items):

- seed 000 exp. 3: a fixed evaluation set (step 0's rollouts re-scored at every step), and the
  convergence bands' stderr taken over problems, not rollouts;
- seed 002's sigma_A: the std along each realised trajectory, averaged over trajectories;
- seed 002's diagnosis compares step 0 and the last step on the same instances.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from tinyspec import tiny_spec
from hpcdistill.analysis import prefix_corruption as pc
from hpcdistill.analysis import teachability, training
from hpcdistill.devices import RoleDevices
from hpcdistill.launch.submit import submit
from hpcdistill.record import ShardReader, ShardWriter
from hpcdistill.spec import load_spec
from hpcdistill.spec.load import validate

K = 4


def _tokens(values: np.ndarray, rng, teacher_lp: np.ndarray | None = None) -> dict[str, np.ndarray]:
    n = len(values)
    return {
        "ids": rng.integers(0, 1000, n).astype(np.int32),
        "student_lp": np.zeros(n, np.float32),
        "teacher_lp": (np.zeros(n) if teacher_lp is None else teacher_lp).astype(np.float32),
        "student_topk_ids": rng.integers(0, 1000, (n, K)).astype(np.int32),
        "student_topk_lp": -rng.exponential(1.0, (n, K)).astype(np.float32),
        "teacher_at_student_topk_lp": -rng.exponential(1.0, (n, K)).astype(np.float32),
        "topk_kl": np.asarray(values, np.float32),
    }


def _row(problem: str, sample: int, step: int, kind: str) -> dict:
    return {"problem_id": problem, "sample_idx": sample, "step": step, "kind": kind, "reward": 0.0,
            "seed": 0, "weight_version": 0}


def _by_key(reader: ShardReader, kind: str) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    out = {}
    for record in reader.iter_rollouts(columns=["ids", "topk_kl"]):
        if record.row["kind"] == kind:
            out[(record.row["problem_id"], int(record.row["sample_idx"]))] = {
                k: np.array(v) for k, v in record.tokens.items()}
    return out


def _fixed_rows(reader: ShardReader) -> dict[tuple, dict[str, np.ndarray]]:
    regen = _by_key(reader, "fixed_regenerated")
    return _by_key(reader, "fixed") | {("regen",) + key: value for key, value in regen.items()}


# ------------------------------------------------------------------ seed 000 exp. 3: fixed set


@pytest.fixture(scope="module")
def fixed_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fixed")
    path = tiny_spec(tmp, "fixed", teacher={"context": "regen"}, scoring={"rescore_step0": True},
                     train={"steps": 2, "lr": 1e-2})
    result = submit(load_spec(path), executor="debug")
    return result.sweep, result.sweep.run(result.runs[0].run_id)


def test_fixed_rows_rescore_step0_token_ids_with_each_steps_weights(fixed_run):
    _, paths = fixed_run
    shards = {step: ShardReader(paths.shard(step)) for step in range(3)}
    try:
        original, regen = _by_key(shards[0], "original"), _by_key(shards[0], "regenerated")
        assert len(original) == 4 and len(regen) == 4  # 2 problems x 2 rollouts
        # step 0: the fixed set is step 0's own rows
        for kind, fresh in (("fixed", original), ("fixed_regenerated", regen)):
            fixed0 = _by_key(shards[0], kind)
            assert fixed0.keys() == fresh.keys()
            for key in fresh:
                np.testing.assert_array_equal(fixed0[key]["ids"], fresh[key]["ids"])
                np.testing.assert_array_equal(fixed0[key]["topk_kl"], fresh[key]["topk_kl"])
        for step in (1, 2):
            for kind, fresh in (("fixed", original), ("fixed_regenerated", regen)):
                fixed = _by_key(shards[step], kind)
                assert fixed.keys() == fresh.keys()
                for key in fresh:  # the same token sequences ...
                    np.testing.assert_array_equal(fixed[key]["ids"], fresh[key]["ids"])
                # ... measured with the trained weights (lr 1e-2 moves a random model)
                moved = np.concatenate([fixed[key]["topk_kl"] - fresh[key]["topk_kl"] for key in fresh])
                assert np.max(np.abs(moved)) > 1e-3, (step, kind)
            rows = shards[step].rollouts()
            assert set(rows["weight_version"][np.isin(rows["kind"], ["fixed", "fixed_regenerated"])]) == {0}
            # the fresh rollouts of the step are still recorded (and are what the step trains on)
            assert list(rows["kind"]).count("original") == 4
            metrics = shards[step].metrics()
            assert "fixed/topk_kl_mean" in metrics and "fixed/regen_topk_kl_mean" in metrics
    finally:
        for reader in shards.values():
            reader.close()


def test_resumed_run_rebuilds_the_fixed_set_from_the_step0_shard(fixed_run):
    from hpcdistill.train.loop import run_training as run_pipeline

    _, paths = fixed_run
    with ShardReader(paths.shard(2)) as reader:
        before = _fixed_rows(reader)
    backup = paths.shard(2).with_suffix(".bak")
    paths.shard(2).rename(backup)
    try:
        spec = load_spec(paths.spec).spec  # the checkpoint holds w_2: the run redoes step 2 only
        run_pipeline(spec, paths, RoleDevices((), (), ()))
        with ShardReader(paths.shard(2)) as reader:
            after = _fixed_rows(reader)
    finally:
        if not paths.shard(2).exists():
            backup.rename(paths.shard(2))
        backup.unlink(missing_ok=True)
    assert after.keys() == before.keys() and len(after) == 8
    for key in before:
        np.testing.assert_array_equal(after[key]["ids"], before[key]["ids"])
        np.testing.assert_allclose(after[key]["topk_kl"], before[key]["topk_kl"], rtol=1e-4, atol=1e-5)


def test_convergence_analysis_uses_the_fixed_set_of_a_real_run(fixed_run):
    sweep, _ = fixed_run
    result = pc.collect([sweep.root])
    source, by_step = training.convergence_source(result)
    assert source == "fixed" and sorted(by_step) == [0, 1, 2]
    assert all(len(by_step[s]) == 2 for s in by_step)  # two problems
    headers, rows = training.convergence_rows(result)
    assert headers[:2] == ["step", "problems"] and [r[1] for r in rows] == ["2", "2", "2"]


def test_convergence_stderr_is_over_problems_not_rollouts(tmp_path):
    # 2 problems x 4 rollouts of 10 tokens: one token per decile, so a rollout's decile means are
    # its token values. Problem a's rollouts spread widely, b's not: the two stderrs differ.
    rng = np.random.default_rng(0)
    delta = {("a", i): rng.normal(1.0, 2.0, 10) for i in range(4)} | {("b", i): rng.normal(-1.0, 0.1, 10)
                                                                     for i in range(4)}
    standard = {key: rng.exponential(1.0, 10) for key in delta}
    for step in (0, 1):
        with ShardWriter(tmp_path / f"step_{step:06d}.h5", attrs={"run_id": "r", "step": step}, top_k=K) as w:
            for (problem, i), d in delta.items():
                # fresh rollouts with another delta: ignored once a fixed set is recorded
                w.append(_row(problem, i, step, "original"), _tokens(standard[(problem, i)], rng))
                w.append(_row(problem, i, step, "regenerated"), _tokens(standard[(problem, i)] + 5.0, rng))
                w.append(_row(problem, i, step, "fixed"), _tokens(standard[(problem, i)], rng))
                w.append(_row(problem, i, step, "fixed_regenerated"),
                         _tokens(standard[(problem, i)] + d * (step + 1), rng))
    result = pc.collect([tmp_path])
    source, by_step = training.convergence_source(result)
    assert source == "fixed"
    for step in (0, 1):
        per_rollout = np.array([d * (step + 1) for d in delta.values()], dtype=np.float32).astype(np.float64)
        per_problem = np.stack([per_rollout[:4].mean(0), per_rollout[4:].mean(0)])  # [2, 10]
        expected_mean = per_problem.mean(0)
        expected_err = per_problem.std(0, ddof=1) / np.sqrt(2)
        over_rollouts = per_rollout.std(0, ddof=1) / np.sqrt(8)
        assert not np.allclose(expected_err, over_rollouts, rtol=0.1)  # the two definitions differ here
        mean, err, n = training.convergence_stats(by_step[step])
        np.testing.assert_allclose(mean, expected_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(err, expected_err, rtol=1e-5, atol=1e-6)
        assert list(n) == [2] * 10
    _, rows = training.convergence_rows(result)
    assert rows[1][1] == "2" and rows[1][2] == f"{per_problem.mean(0)[0]:+.3f}±{expected_err[0]:.3f}"


def test_without_a_fixed_set_the_convergence_reads_the_fresh_rollouts_per_problem(tmp_path):
    rng = np.random.default_rng(1)
    with ShardWriter(tmp_path / "step_000000.h5", attrs={"run_id": "r", "step": 0}, top_k=K) as w:
        for problem, offset in (("a", 1.0), ("b", 3.0)):
            for i in range(3):
                w.append(_row(problem, i, 0, "original"), _tokens(np.zeros(10), rng))
                w.append(_row(problem, i, 0, "regenerated"), _tokens(np.full(10, offset + i), rng))
    source, by_step = training.convergence_source(pc.collect([tmp_path]))
    mean, err, n = training.convergence_stats(by_step[0])
    assert source == "fresh"
    np.testing.assert_allclose(mean, np.full(10, 3.0), rtol=1e-6)  # problem means 2 and 4
    np.testing.assert_allclose(err, np.full(10, np.std([2.0, 4.0], ddof=1) / np.sqrt(2)), rtol=1e-6)


def test_rescore_step0_needs_training_steps():
    from hpcdistill.errors import SpecError

    with pytest.raises(SpecError, match="rescore_step0.*train.steps"):
        validate({"experiment": {"name": "x"}, "scoring": {"rescore_step0": True}}, {}, "test")


# ------------------------------------------------------------------ seed 002: sigma_A


def _sigma_per_trajectory(trajectories: list[np.ndarray]) -> np.ndarray:
    """The seed's sigma_A in numpy: per trajectory and bin, the std of its tokens (>= 2 there),
    then the mean over trajectories."""
    per = np.full((len(trajectories), teachability.NUM_BINS), np.nan)
    for j, values in enumerate(trajectories):
        bins = np.minimum(np.arange(len(values)) * 20 // len(values), 19)
        for b in range(20):
            if np.sum(bins == b) >= 2:
                per[j, b] = np.std(values[bins == b])
    return np.nanmean(per, axis=0)


def test_sigma_a_is_zero_for_constant_trajectories_that_differ_from_each_other():
    stats = teachability.BinStats()
    stats.add(np.full(40, 1.0))
    stats.add(np.full(40, -1.0))
    np.testing.assert_array_equal(stats.std(), np.zeros(20))  # along each trajectory: no spread
    np.testing.assert_allclose(stats.std(pooled=True), np.ones(20))  # pooled: the gap between them
    assert stats.overall_std() == 0.0 and stats.overall_std(pooled=True) == pytest.approx(1.0)


def test_sigma_a_matches_a_per_trajectory_numpy_computation():
    rng = np.random.default_rng(3)
    trajectories = [rng.normal(rng.normal(0, 3), rng.uniform(0.1, 2.0), int(rng.integers(25, 130)))
                    for _ in range(12)]
    stats = teachability.BinStats()
    for values in trajectories:
        stats.add(values)
    np.testing.assert_allclose(stats.std(), _sigma_per_trajectory(trajectories), rtol=1e-9, atol=1e-12)
    pooled = np.concatenate(trajectories)
    pooled_bins = np.concatenate([np.minimum(np.arange(len(v)) * 20 // len(v), 19) for v in trajectories])
    np.testing.assert_allclose(stats.std(pooled=True), [np.std(pooled[pooled_bins == b]) for b in range(20)],
                               rtol=1e-9)
    assert stats.overall_std() == pytest.approx(np.mean([np.std(v) for v in trajectories]))
    assert not np.allclose(stats.std(), stats.std(pooled=True), rtol=0.1)


def _teach_shard(path: Path, step: int, steps: int, rollouts: list[tuple[str, np.ndarray]], rng) -> None:
    spec_toml = f'[experiment]\nname = "t"\n[train]\nsteps = {steps}\n[scoring]\ntop_k = {K}\n'
    with ShardWriter(path, attrs={"run_id": "r", "step": step, "spec_toml": spec_toml}, top_k=K) as w:
        for i, (problem, advantage) in enumerate(rollouts):
            w.append(_row(problem, i, step, "original"), _tokens(np.zeros(len(advantage)), rng, advantage))


def test_teachability_collect_reports_sigma_a_along_trajectories(tmp_path):
    rng = np.random.default_rng(4)
    _teach_shard(tmp_path / "step_000000.h5", 0, 0, [("a", np.full(40, 2.0)), ("b", np.full(40, -2.0))], rng)
    result = teachability.collect([tmp_path])
    stats = result.advantage["student (step 0)"]
    np.testing.assert_array_equal(stats.std(), np.zeros(20))
    np.testing.assert_allclose(stats.std(pooled=True), np.full(20, 2.0), rtol=1e-6)
    _, rows = teachability.bin_rows(result.advantage, normalise=False)
    _, pooled_rows = teachability.bin_rows(result.advantage, normalise=False, pooled=True)
    assert rows[0][-1] == "0.0000" and pooled_rows[0][-1] == "2.0000"


# ------------------------------------------------------------------ seed 002: same instances


def test_diagnosis_compares_only_problems_measured_at_both_steps(tmp_path):
    rng = np.random.default_rng(5)
    _teach_shard(tmp_path / "step_000000.h5", 0, 2, [("a", rng.normal(size=30)), ("b", rng.normal(size=30))], rng)
    _teach_shard(tmp_path / "step_000002.h5", 2, 2, [("b", rng.normal(size=30)), ("c", rng.normal(size=30))], rng)
    result = teachability.collect([tmp_path])
    assert result.common_problems == {"r": 1}
    assert result.problems == {"student (step 0)": 1, "trained (step 2)": 1}
    assert result.advantage["student (step 0)"].count.sum() == 30  # problem a left out
    assert "same 1 problems" in teachability.comparison_note(result)
    everything = teachability.collect([tmp_path], same_problems=False)
    assert everything.problems == {"student (step 0)": 2, "trained (step 2)": 2}


def test_measure_problems_step0_makes_the_last_step_sample_step0s_problems(tmp_path):
    from hpcdistill.train.collect import step_problems

    path = tiny_spec(tmp_path, "same", task={"num_problems": 4}, train={
        "steps": 2, "problems_per_step": 2, "measure_problems": "step0"})
    loaded = load_spec(path)
    spec = loaded.spec
    problems = list(range(4))
    drawn = validate(tomllib.loads(path.read_text()) | {"train": {"steps": 2, "problems_per_step": 2}}, {}, "t")
    assert step_problems(spec, problems, 2) == step_problems(spec, problems, 0)
    assert [step_problems(drawn, problems, s) for s in range(3)] != [step_problems(drawn, problems, 0)] * 3
    result = submit(loaded, executor="debug")
    sweep, run_id = result.sweep, result.runs[0].run_id
    ids = {}
    for step in (0, 2):
        with ShardReader(sweep.run(run_id).shard(step)) as reader:
            rows = reader.rollouts()
            ids[step] = {p for p, k in zip(rows["problem_id"], rows["kind"]) if k == "original"}
    assert ids[0] == ids[2] and len(ids[0]) == 2
    teach = teachability.collect([sweep.root])
    assert teach.common_problems == {run_id: 2}
    assert teach.problems == {"student (step 0)": 2, "trained (step 2)": 2}


def test_measure_problems_needs_problems_per_step():
    from hpcdistill.errors import SpecError

    with pytest.raises(SpecError, match="measure_problems.*problems_per_step"):
        validate({"experiment": {"name": "x"}, "train": {"steps": 1, "measure_problems": "step0"}}, {}, "test")
