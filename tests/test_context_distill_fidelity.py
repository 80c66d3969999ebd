"""Issue 15, seed 004 (looped context distillation), helper B's items:

- item 4: the context-distillation configs (and the GEPA loop's generated distill specs) score with
  a frozen teacher (teacher.weights = "initial"), as the reviewed setup's frozen teacher server;
- item 8: `rollout.policy_lag` samples step s with the weights of step max(0, s - k) (prime-rl's
  async_level), on the transformers backend and in the vLLM weight-sync bookkeeping, resumable
  from a checkpoint; the context_distill ratio is pi_theta(y | T) / pi_behaviour(y | T);
- item 9: the GEPA loop distils GEPA's Pareto-front programs and scores them on a held-out set
  disjoint from GEPA's validation set.

Tiny random models (tests/tinyspec.py) for every run here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hpcdistill.errors import LaunchError, SpecError
from hpcdistill.devices import RoleDevices
from hpcdistill.rundir import RunPaths
from hpcdistill.record import ShardReader
from hpcdistill.spec import expand, load_spec
from hpcdistill.spec.load import validate
from tinyspec import tiny_spec

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "context_distill"
ROLES = RoleDevices((), (), ())


# ---------------------------------------------------------------------------- item 4: frozen teacher


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_context_distill_configs_score_with_a_frozen_teacher(path):
    for run in expand(load_spec(path)):
        s = run.spec
        if s.model.teacher in ("same", s.model.student):  # a self-teacher: the frozen initial copy
            assert s.teacher.weights == "initial", (path.name, run.run_id)
        else:  # sec. 7.4's separate teacher model is frozen by construction (never trained)
            assert path.name.startswith("recommended_7_4") and s.teacher.weights == "live"


def test_gepa_loop_distill_specs_keep_the_frozen_teacher(tmp_path):
    from hpcdistill.launch.prompt_loop import distill_spec_data
    from hpcdistill.spec.load import dump_toml

    for name in ("gepa_loop.toml", "gepa_loop_small.toml"):
        loaded = load_spec(CONFIGS / name)
        data = distill_spec_data(loaded, tmp_path / name, "bundled:smollm2-135m-instruct", ["p one", "p two"], 1)
        path = tmp_path / f"{name}.distill.toml"
        path.write_text(dump_toml(data))
        runs = expand(load_spec(path))
        assert len(runs) == 2
        assert all(r.spec.teacher.weights == "initial" and r.spec.model.teacher == "same" for r in runs)
    # a loop spec that names no teacher.weights distils with the frozen teacher too; "live" stays live
    for extra, expected in (("", "initial"), ('[teacher]\nweights = "live"\n', "live")):
        bare = tmp_path / f"bare{expected}.toml"
        bare.write_text('[experiment]\nname = "bare"\n[train]\nsteps = 1\nobjective = "context_distill"\n'
                        '[loop]\nseed_prompt = "Be careful."\n' + extra)
        data = distill_spec_data(load_spec(bare), tmp_path / "bare", "tiny-random:0", ["a"], 1)
        path = tmp_path / f"bare{expected}.distill.toml"
        path.write_text(dump_toml(data))
        assert expand(load_spec(path))[0].spec.teacher.weights == expected


# ---------------------------------------------------------------------------- item 8: policy lag


def _metric(reader: ShardReader, name: str) -> float:
    steps, values = reader.metrics()[name]
    return float(values[-1])


def _run(tmp_path: Path, name: str, lag: int, temperature: float = 1.0, steps: int = 3) -> tuple[object, RunPaths]:
    from hpcdistill.train.loop import run_training as run_pipeline

    path = tiny_spec(tmp_path, name, rollout={"policy_lag": lag, "temperature": temperature, "max_new_tokens": 6},
                     train={"steps": steps, "lr": 1e-2, "objective": "context_distill", "adv_tau": 0.0,
                            "token_mask_low": 0.0, "token_mask_high": 1e9})
    spec = load_spec(path).spec
    paths = RunPaths(tmp_path / name / "run")
    run_pipeline(spec, paths, ROLES)
    return spec, paths


def _step_rows(paths: RunPaths, step: int) -> dict:
    with ShardReader(paths.shard(step)) as reader:
        rows = reader.rollouts()
        out = {}
        for i in np.flatnonzero(rows["kind"] == "original"):
            tokens = reader.tokens(int(i))
            out[(rows["problem_id"][i], int(rows["sample_idx"][i]))] = (
                int(rows["weight_version"][i]), tokens["ids"].copy(), tokens["sampler_lp"].copy())
        return out


def test_policy_lag_makes_importance_ratios_informative_on_a_real_run(tmp_path):
    """lag 1, lr 1e-2: from step 1 the rollouts come from w_{s-1} and the trainer is at w_s, so the
    geometric sequence ratio moves off 1; lag 0: it stays ~1 (a synchronous loop)."""
    _, lagged = _run(tmp_path, "lag1", lag=1)
    _, synced = _run(tmp_path, "lag0", lag=0)
    for step in range(4):
        with ShardReader(lagged.shard(step)) as reader:
            behaviour = step if step == 3 else max(0, step - 1)  # the last step measures w_3 itself
            assert _metric(reader, "train/policy_lag") == step - behaviour
            assert _metric(reader, "train/behaviour_version") == behaviour
            ratio = _metric(reader, "train/geo_seq_ratio") if step < 3 else None
        assert {v for v, _, _ in _step_rows(lagged, step).values()} == {behaviour}
        if ratio is not None:  # the last step only measures (no update, no ratio)
            assert (abs(ratio - 1.0) < 1e-4) if step == 0 else (abs(ratio - 1.0) > 1e-3), (step, ratio)
        with ShardReader(synced.shard(step)) as reader:
            assert "train/policy_lag" not in reader.metrics()
            if step < 3:
                assert abs(_metric(reader, "train/geo_seq_ratio") - 1.0) < 1e-4
                assert _metric(reader, "train/is_masked") == 0.0
    # step 1 of the lagged run samples with w_0: step 0's weights, i.e. the synchronous run's
    # step-0 policy; its rollouts differ from the synchronous run's step 1 (sampled with w_1)
    lag_rows, sync_rows = _step_rows(lagged, 1), _step_rows(synced, 1)
    assert any(not np.array_equal(lag_rows[k][2], sync_rows[k][2]) for k in lag_rows)


def test_temperature_arm_ratio_is_one_when_on_policy_at_the_sampling_temperature(tmp_path):
    """The seed's temp_06 arm, synchronous: the trainer's log-probs at T = 0.6 match the sampler's
    at T = 0.6, so ratio ~1 and nothing is masked; T = 1 log-probs against them would not."""
    _, paths = _run(tmp_path, "temp06", lag=0, temperature=0.6, steps=1)
    with ShardReader(paths.shard(0)) as reader:
        assert abs(_metric(reader, "train/geo_seq_ratio") - 1.0) < 1e-4
        assert _metric(reader, "train/is_masked") == 0.0


def _synthetic_items(handle, temperature: float):
    """Four rollouts of two problems whose sampler log-probs are the model's own at `temperature`."""
    from hpcdistill.models.generation import Generation
    from hpcdistill.models.scoring import TokenScores
    from hpcdistill.tasks import Problem, Verdict
    from hpcdistill.train import whole_batch
    from hpcdistill.train.collect import ScoredRollout as Item
    from hpcdistill.train.roles import Models

    rng = np.random.default_rng(0)
    items = []
    for i in range(4):
        n = 3 + i
        prompt, response = [1, 2, 3], [int(x) for x in rng.integers(4, 60, size=n)]
        zeros = np.zeros(n, np.float32)
        z2 = np.zeros((n, 2), np.float32)
        scores = TokenScores(student_lp=zeros, teacher_lp=zeros - 1.0, student_topk_ids=z2.astype(np.int32),
                             student_topk_lp=z2, teacher_at_student_topk_lp=z2, topk_kl=zeros, entropy_s=zeros,
                             entropy_t=zeros, teacher_own_lp=zeros, teacher_topk_ids=z2.astype(np.int32),
                             teacher_topk_lp=z2, student_at_teacher_topk_lp=z2, student_topk_mass=zeros,
                             teacher_topk_mass=zeros, teacher_mass_at_student_topk=zeros,
                             student_mass_at_teacher_topk=zeros, topk_overlap=zeros)
        gen = Generation(prompt, np.asarray(response), zeros, zeros, "stop")
        items.append(Item(Problem("AB"[i // 2], "x", {}), i % 2, "original", (prompt, response),
                          (prompt, response), gen, "", Verdict(float(i % 2), bool(i % 2), "", {}), scores))
    models = Models(handle, handle)
    logits = whole_batch._student_logits(models, items, grad=False)
    for item, lg in zip(items, logits):
        y = torch.as_tensor(item.student_seq[1])
        lp = torch.log_softmax(lg / temperature, -1).gather(-1, y[:, None])[:, 0]
        item.generation.sampler_lp = lp.numpy().astype(np.float32)
        item.generation.sampled_lp = torch.log_softmax(lg, -1).gather(-1, y[:, None])[:, 0].numpy()
        item.scores.student_lp = item.generation.sampled_lp.copy()
    return models, items


def test_context_distill_ratio_uses_the_sampling_temperature_in_objective_loss():
    from hpcdistill.distill import objectives
    from hpcdistill.models.loading import tiny_random_model
    from hpcdistill.train import update

    handle = tiny_random_model(vocab_size=64, seed=0)
    spec = validate({"experiment": {"name": "t"}, "rollout": {"temperature": 0.6},
                     "train": {"steps": 1, "objective": "context_distill", "token_mask_low": 0.125,
                               "token_mask_high": 8.0}}, {}, "test")
    models, items = _synthetic_items(handle, 0.6)
    weights = [np.ones(len(it.student_seq[1]), np.float32) for it in items]
    _, metrics = update.objective_loss(spec, models, items, weights)
    assert metrics["train/geo_seq_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["train/is_masked"] == 0.0
    # what the T = 1 log-probs would give against the same sampler log-probs: a ratio far from 1
    raw = torch.cat([torch.as_tensor(it.generation.sampled_lp) for it in items])
    inference = torch.cat([torch.as_tensor(it.generation.sampler_lp) for it in items])
    seq_index = torch.as_tensor([i for i, it in enumerate(items) for _ in it.student_seq[1]])
    _, wrong = objectives.context_distill_loss(raw, inference, raw * 0 - 1.0, torch.zeros(4), seq_index,
                                               torch.as_tensor([0, 0, 1, 1]))
    assert abs(float(wrong["geo_seq_ratio"]) - 1.0) > 0.05
    # and the helper itself: log_softmax(logits / T)
    logits = torch.randn(5, 7)
    ids = torch.tensor([0, 3, 6, 2, 1])
    expected = torch.log_softmax(logits / 0.6, -1)[torch.arange(5), ids]
    assert torch.allclose(objectives.logprobs_at_temperature(logits, ids, 0.6), expected)


def test_lagged_run_resumes_from_its_checkpoint_with_the_same_stale_weights(tmp_path, monkeypatch):
    from hpcdistill.train import loop
    from hpcdistill.train.loop import run_training as run_pipeline
    from hpcdistill.train.policy_lag import LAG_FILE

    spec, whole = _run(tmp_path, "whole", lag=1)
    paths = RunPaths(tmp_path / "killed" / "run")
    real = loop.train_step

    def killed_after_step_1(*args, **kwargs):
        metrics = real(*args, **kwargs)
        if args[7] == 1:  # step: the checkpoint after step 1 holds w_2 and the lag history {0, 1}
            raise KeyboardInterrupt("preempted")
        return metrics

    monkeypatch.setattr(loop, "train_step", killed_after_step_1)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(spec, paths, ROLES)
    monkeypatch.setattr(loop, "train_step", real)
    assert (paths.checkpoint / LAG_FILE).exists() and not paths.shard(2).exists()
    saved = torch.load(paths.checkpoint / LAG_FILE, weights_only=True)
    assert sorted(saved["versions"]) == [0, 1] and saved["lag"] == 1

    broken = RunPaths(tmp_path / "broken" / "run")  # the same checkpoint without the history
    import shutil
    shutil.copytree(paths.root, broken.root)
    (broken.checkpoint / LAG_FILE).unlink()
    with pytest.raises(LaunchError, match="policy_lag"):
        run_pipeline(spec, broken, ROLES)

    run_pipeline(spec, paths, ROLES)  # resumes at step 2, which samples with w_1 from the history
    for step in (2, 3):
        resumed, reference = _step_rows(paths, step), _step_rows(whole, step)
        assert resumed.keys() == reference.keys()
        for key in reference:
            assert resumed[key][0] == reference[key][0] == (1 if step == 2 else 3)
            np.testing.assert_array_equal(resumed[key][1], reference[key][1])
            np.testing.assert_allclose(resumed[key][2], reference[key][2], atol=1e-5)


def test_policy_lag_history_and_vllm_served_versions():
    """The bookkeeping both backends share: which version each step samples with, which versions
    are held, and what the vLLM weight sync serves (a fake server records the loads)."""
    from hpcdistill.models.loading import tiny_random_model
    from hpcdistill.train import roles
    from hpcdistill.train.roles import Models
    from hpcdistill.train.policy_lag import PolicyLag, behaviour_version

    assert [behaviour_version(s, 2) for s in range(5)] == [0, 0, 0, 1, 2]
    assert [behaviour_version(s, 2, last_step=4) for s in range(5)] == [0, 0, 0, 1, 4]
    assert [behaviour_version(s, 0) for s in range(3)] == [0, 1, 2]
    handle = tiny_random_model(vocab_size=64, seed=0)
    model = handle.model
    lag = PolicyLag(2, in_process=False)
    first = next(model.parameters())
    values = []
    for step in range(4):
        lag.record(step, model)
        values.append(first.detach().clone())
        assert lag.held() == list(range(max(0, step - 2), step + 1))
        with torch.no_grad():
            first.add_(1.0)  # "the update" of this step
    current = first.detach().clone()
    with lag.swapped(model, 1):
        assert torch.equal(first, values[1])
    assert torch.equal(first, current)  # swapped back exactly
    with pytest.raises(LaunchError, match="not held"):
        with lag.swapped(model, 0):
            pass

    class FakeServer:
        weight_version = 0

        def __init__(self):
            self.loads = []

        def load_weights(self, directory, version):
            self.loads.append((version, float(torch.load(directory, weights_only=True))))
            self.weight_version = version
            return 0.0

    spec = validate({"experiment": {"name": "t"}, "rollout": {"backend": "vllm", "policy_lag": 2},
                     "train": {"steps": 5}}, {}, "test")
    models = Models(handle, handle, rollout_server=FakeServer())
    models.policy_lag = lag
    served = iter(range(100))

    def fake_serve(models, paths):  # what the served folder would hold: the first parameter's mean
        path = Path(paths) / f"w{next(served)}.pt"
        torch.save(torch.tensor(float(next(models.student.model.parameters()).detach().mean())), path)
        return path

    import tempfile
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setattr(roles, "serve_student_weights", fake_serve)
        roles.sync_rollout_weights(spec, Path(tmp), models, 4)  # after step 3's update: step 4 samples w_2
        with roles.current_weights_served(spec, Path(tmp), models, 4):  # eval at step 4 sees w_4
            assert models.weight_version == 4
        assert models.weight_version == 2
    loads = models.rollout_server.loads
    assert [v for v, _ in loads] == [2, 4, 2]
    assert loads[0][1] == pytest.approx(float(values[2].mean()))
    assert loads[1][1] == pytest.approx(float(current.mean()))
    assert torch.equal(first, current)


def test_policy_lag_rejects_sharded_trainers():
    with pytest.raises(SpecError, match="rollout.policy_lag"):
        validate({"experiment": {"name": "t"}, "rollout": {"policy_lag": 1}, "train": {"steps": 2},
                  "trainer": {"strategy": "fsdp"}}, {}, "test")


def test_seed004_masking_and_temperature_arms_run_with_a_lag():
    """Every arm of the sec. 6.2 sweep (so each stays a one-factor change against the sweep's own
    baseline arm) samples one step behind: the masking and temperature arms then compare ratios."""
    for name in ("ablations.toml", "ablations_small.toml"):
        runs = expand(load_spec(CONFIGS / name))
        assert {r.spec.rollout.policy_lag for r in runs} == {1}, name
    assert expand(load_spec(CONFIGS / "baseline.toml"))[0].spec.rollout.policy_lag == 0


# ---------------------------------------------------------------------------- item 9: the GEPA loop


# Four programs on three validation instances a, b, c (scores per instance). Program 1 is best on
# a, program 2 on b; 1, 2 and 3 tie on c, so 3 is dominated; program 0 is best nowhere. By direct
# (aggregate) score the order is 3 > 1 = 2 > 0: top-2 by score distils 3 and 1.
VAL_SCORES = [[0.6, 0.6, 0.3], [1.0, 0.0, 0.9], [0.0, 1.0, 0.9], [0.8, 0.8, 0.9]]
AGGREGATE = [float(np.mean(s)) for s in VAL_SCORES]


def _candidates(front, empty=()):
    return [{"index": i, "prompt": "" if i in empty else f"prompt {i}", "direct_score": s, "pareto_front": i in front}
            for i, s in enumerate(AGGREGATE)]


def test_pareto_front_is_gepas_non_dominated_per_instance_best_programs():
    from gepa.gepa_utils import find_dominator_programs

    from hpcdistill.launch.prompt_search import distillable, pareto_front

    assert pareto_front(VAL_SCORES, AGGREGATE) == [1, 2]
    # GEPA's own reduction of its per-instance best sets gives the same programs
    gepa_fronts = {"a": {1}, "b": {2}, "c": {1, 2, 3}}
    assert sorted(find_dominator_programs(gepa_fronts, AGGREGATE)) == [1, 2]
    # GEPA's val_subscores dicts (by instance id) read the same as lists
    assert pareto_front([dict(zip("abc", s)) for s in VAL_SCORES], AGGREGATE) == [1, 2]
    # an empty prompt is not distillable: the front is taken over the others (b: program 3 is best)
    candidates = _candidates(set(), empty={2})
    assert distillable(candidates) == {0, 1, 3}
    assert pareto_front(VAL_SCORES, AGGREGATE, distillable(candidates)) == [1, 3]
    assert pareto_front([[0.0, 0.0]] * 3, [0.0] * 3) and pareto_front([], [], set()) == []


def test_distill_selection_picks_the_pareto_front_by_default_and_top_k_on_request():
    from hpcdistill.launch.prompt_search import distill_prompts, pareto_front

    candidates = _candidates(set(pareto_front(VAL_SCORES, AGGREGATE)))
    base = {"experiment": {"name": "t"}, "train": {"steps": 1, "objective": "context_distill"}}
    pareto = validate(base, {}, "test")
    assert pareto.loop.distill_selection == "pareto"
    assert [c["index"] for c in distill_prompts(candidates, pareto.loop)] == [1, 2]
    capped = validate({**base, "loop": {"max_distill_prompts": 1}}, {}, "test")
    assert [c["index"] for c in distill_prompts(candidates, capped.loop)] == [1]  # ties: earlier first
    top_k = validate({**base, "loop": {"distill_selection": "top_k", "top_k_prompts": 2}}, {}, "test")
    assert [c["index"] for c in distill_prompts(candidates, top_k.loop)] == [3, 1]
    with pytest.raises(SpecError, match="loop.top_k_prompts"):  # read only under top_k
        validate({**base, "loop": {"top_k_prompts": 3}}, {}, "test")


def test_heldout_problems_are_disjoint_from_the_validation_problems():
    from hpcdistill.tasks import get_task
    from hpcdistill.launch.prompt_loop import heldout_problems

    task = get_task("math")
    spec = validate({"experiment": {"name": "t"}, "task": {"name": "math"},
                     "loop": {"val_split": "test", "val_num_problems": 3, "val_seed": 1, "heldout_split": "test",
                              "heldout_num_problems": 5, "heldout_seed": 0}}, {}, "test")
    val = task.load_problems(source="bundled", split="test", num_problems=3, seed=1)
    plain = task.load_problems(source="bundled", split="test", num_problems=5, seed=0)
    assert {p.problem_id for p in plain} & {p.problem_id for p in val}  # the two seeds do overlap here
    heldout = heldout_problems(task, spec, val)
    assert len(heldout) == 5
    assert not {p.problem_id for p in heldout} & {p.problem_id for p in val}
    assert not {p.prompt for p in heldout} & {p.prompt for p in val}
    # the seed config: 500 held-out puzzles, 200 validation puzzles, different generation seeds
    loop = load_spec(CONFIGS / "gepa_loop.toml").spec.loop
    assert (loop.heldout_num_problems, loop.val_num_problems) == (500, 200) and loop.heldout_seed != loop.val_seed
    small = load_spec(CONFIGS / "gepa_loop_small.toml").spec.loop
    assert small.heldout_num_problems == 2 and small.max_distill_prompts == 2
