"""The studies end to end on the embedded default: bundled model, bundled problems, CPU, real shards.

Each test runs a shipped config (the README's quickstart, the *_small variants), then `analyze`,
and checks the numbers in the shards and the report, not only that it ran.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hpcdistill.cli import main
from hpcdistill.rundir import SweepPaths, read_json
from hpcdistill.record import ShardReader, iter_shards

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def run_config(tmp_path: Path, config: str, *extra: str, executor: str = "local") -> SweepPaths:
    out = tmp_path / "runs"
    args = ["submit", str(CONFIGS / config), "--set", f'experiment.output_dir="{out}"',
            "--executor", executor, *[a for x in extra for a in ("--set", x)]]
    assert main(args) == 0
    from hpcdistill.spec import load_spec

    name = load_spec(CONFIGS / config).spec.experiment.name
    sweep = SweepPaths.for_spec(out, name)
    manifest = read_json(sweep.manifest)
    states = {rid: read_json(sweep.run(rid).status)["state"] for rid in manifest["runs"]}
    assert set(states.values()) == {"completed"}, states
    return sweep


@pytest.mark.slow
def test_quickstart_prints_the_decile_table_and_writes_the_figure(tmp_path, capsys):
    sweep = run_config(tmp_path, "quickstart.toml")
    out = capsys.readouterr().out
    assert "Experiment 2: per-decile delta-KL" in out
    assert "0-10%" in out and "90-100%" in out
    assert (sweep.analysis / "delta_kl_by_decile.png").stat().st_size > 10_000
    report = (sweep.analysis / "report.md").read_text()
    assert "Experiment 1: reward on regeneration" in report
    (shard_path,) = list(sweep.root.rglob("step_000000.h5"))
    with ShardReader(shard_path) as shard:
        rows = shard.rollouts()
        kinds = list(rows["kind"])
        assert kinds.count("original") == kinds.count("regenerated") == 3 * 2
        for record in shard.iter_rollouts():
            tokens = record.tokens
            n = len(tokens["ids"])
            assert n > 0 and tokens["student_topk_ids"].shape == (n, 20)
            assert np.all(tokens["topk_kl"] >= -1e-5)  # a KL is non-negative
            assert np.all(tokens["student_lp"] <= 1e-6) and np.all(tokens["teacher_lp"] <= 1e-6)
            if record.row["kind"] == "original":
                # the student's recorded sampled-token logprob is its own top-k's when in it
                in_topk = tokens["student_topk_ids"] == tokens["ids"][:, None]
                hit = in_topk.any(1)
                np.testing.assert_allclose(tokens["student_topk_lp"][in_topk], tokens["student_lp"][hit], atol=1e-5)


@pytest.mark.slow
def test_window_ablation_arms_start_from_identical_weights_and_report_reward_deltas(tmp_path, capsys):
    sweep = run_config(tmp_path, "prefix_corruption/exp4_window_ablation_small.toml", "train.steps=1",
                       "task.num_problems=1")
    checksums = set()
    masks = {}
    for shard in iter_shards([sweep.root]):
        checksums.add(shard.attrs["initial_weights_sha256"])
        import tomllib

        kind = tomllib.loads(shard.attrs["spec_toml"])["mask"]["kind"]
        if shard.attrs["step"] == 0:
            masks[kind] = [r.tokens["mask"] for r in shard.iter_rollouts(columns=["mask"])
                           if r.row["kind"] == "original"]
    assert len(checksums) == 1  # every arm starts from the same initial weights
    for weights in masks["first_half"]:  # first half kept (and rescaled), second half zero
        n = len(weights)
        assert np.all(weights[(n + 1) // 2:] == 0) and (n < 2 or weights[0] > 0)
    for weights in masks["last_half"]:
        n = len(weights)
        assert np.all(weights[: n // 2] == 0) and weights[-1] > 0
    assert "Reward delta per arm" in capsys.readouterr().out


@pytest.mark.slow
def test_convergence_run_records_delta_kl_at_every_step(tmp_path, capsys):
    sweep = run_config(tmp_path, "prefix_corruption/exp3_convergence_small.toml", "train.steps=2",
                       "task.num_problems=1")
    out = capsys.readouterr().out
    assert "Experiment 3: delta-KL per decile over training steps" in out
    assert (sweep.analysis / "delta_kl_convergence.png").exists()
    run_dir = next(p for p in sweep.root.iterdir() if (p / "status.json").exists())
    steps = []
    for k in range(3):
        with ShardReader(run_dir / "shards" / f"step_{k:06d}.h5") as shard:
            metrics = shard.metrics()
            steps.append(k)
            if k < 2:
                assert "train/topk_kl" in metrics and np.isfinite(metrics["train/grad_norm"][1][0])
    assert steps == [0, 1, 2]


@pytest.mark.slow
def test_teachability_release_arms_run_and_report_release_diagnostics(tmp_path, capsys):
    sweep = run_config(tmp_path, "teachability/release_vs_baselines_small.toml", "train.steps=1",
                       "task.num_problems=2", "train.problems_per_step=1",
                       'sweep.zip = { "mask.kind" = ["full", "release", "random_release", "std_release"], '
                       '"mask.support_k" = [20, 4, 4, 4] }')
    out = capsys.readouterr().out
    assert "Teachability: sampled-token advantage over 20 position bins" in out
    assert "Release rule diagnostics" in out
    assert (sweep.analysis / "teachability_bins.png").exists()


@pytest.mark.slow
def test_replay_of_a_quickstart_run_reproduces_the_loss_it_logged_during_training(tmp_path, capsys):
    # The quickstart with one SDPO step (bundled SmolLM2, regen teacher): replay recomputes the
    # step's loss from its shard alone, and the variants on the same tokens.
    sweep = run_config(tmp_path, "quickstart.toml", "train.steps=1", "task.num_problems=2",
                       "rollout.max_new_tokens=48")
    capsys.readouterr()
    assert main(["replay", str(sweep.root), "--set", 'train.topk_normalization="tail_bucket"',
                 "--variant", 'train.support="full" train.divergence="jsd"',
                 "--variant", 'train.support="sampled" train.estimator="k3"']) == 0
    out = capsys.readouterr().out
    assert "agreement with the run's own loss" in out
    summary = read_json(sweep.analysis / "replay" / "replay.json")
    (trained,) = [s for s in summary["steps"] if s["logged"] is not None]
    assert trained["step"] == 0
    assert trained["as trained"] == pytest.approx(trained["logged"], rel=1e-5)
    assert trained["support=full divergence=jsd"] > 0  # re-scored with the initial weights
