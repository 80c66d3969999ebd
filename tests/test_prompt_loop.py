"""Seed 004: the sequence-reward arithmetic, the seed-sized configs, and the prompt-optimization loop.

(a) `use_full_reward_baseline`: one scalar advantage per sequence, centred per problem group, equal to
    the seed's formula (sec. 4.2) on a hand-computed example, also through the training loop's code.
(b) a small loop end to end on the embedded default (slow).
(c) the seed-sized configs expand to the seed's run counts with the seed's values.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcdistill.distill import objectives
from hpcdistill.errors import LaunchError, SpecError
from hpcdistill.spec.load import load_spec
from hpcdistill.spec.sweep import expand

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "context_distill"

# ---------------------------------------------------------------------------- (a) arithmetic
# Two problems (A: rollouts 0, 1; B: rollouts 2, 3), adv_tau = 0.5, teacher_tau = 1, student_tau = 0.5.
# full_reward_i = adv_tau r_i + teacher_tau sum_t lp_T - student_tau sum_t lp_inference   (sec. 4.2)
#   seq 0 (A, r=1): 0.5 + (-1.0 - 2.0) - 0.5 (-0.5 - 1.5)        = 0.5 - 3.0 + 1.0 = -1.5
#   seq 1 (A, r=0): 0   + (-0.2)       - 0.5 (-0.4)              = -0.2 + 0.2      =  0.0
#   seq 2 (B, r=0): 0   + (-3.0 - 1.0 - 0.5) - 0.5 (-3.0)        = -4.5 + 1.5      = -3.0
#   seq 3 (B, r=1): 0.5 + (-0.1 - 0.1) - 0.5 (-0.3 - 0.3)        = 0.5 - 0.2 + 0.3 =  0.6
# advantage_i = full_reward_i - mean of its problem group: A mean -0.75, B mean -1.2
#   -> [-0.75, +0.75, -1.8, +1.8]
TAUS = dict(adv_tau=0.5, teacher_tau=1.0, student_tau=0.5)
REWARD = [1.0, 0.0, 0.0, 1.0]
TEACHER_LP = [[-1.0, -2.0], [-0.2], [-3.0, -1.0, -0.5], [-0.1, -0.1]]
INFERENCE_LP = [[-0.5, -1.5], [-0.4], [-1.0, -1.0, -1.0], [-0.3, -0.3]]
PROBLEM = ["A", "A", "B", "B"]
FULL_REWARD = [-1.5, 0.0, -3.0, 0.6]
ADVANTAGE = [-0.75, 0.75, -1.8, 1.8]


def _flat(rows):
    return torch.tensor([x for row in rows for x in row], dtype=torch.float64)


def _seq_index():
    return torch.tensor([i for i, row in enumerate(TEACHER_LP) for _ in row])


def test_full_reward_and_group_advantage_match_the_seed_formula_by_hand():
    full, adv = objectives.sequence_full_reward_advantages(
        torch.tensor(REWARD, dtype=torch.float64), _flat(TEACHER_LP), _flat(INFERENCE_LP), _seq_index(),
        torch.tensor([0, 0, 1, 1]), **TAUS)
    assert full.tolist() == pytest.approx(FULL_REWARD, abs=1e-12)
    assert adv.tolist() == pytest.approx(ADVANTAGE, abs=1e-12)
    for group in ([0, 1], [2, 3]):  # centred per problem group
        assert float(adv[group].sum()) == pytest.approx(0.0, abs=1e-12)


def test_full_reward_baseline_gives_one_scalar_per_sequence_in_the_loss_gradient():
    # At ratio 1 (trainer lp = sampler lp) the loss is -sum_t A_t lp_t / N, so d loss / d lp_t = -A_t / N:
    # with use_full_reward_baseline every token of sequence i carries the same A_i (sec. 4.5).
    seq_index = _seq_index()
    n = len(seq_index)
    student_lp = _flat(INFERENCE_LP).clone().requires_grad_(True)
    loss, metrics = objectives.context_distill_loss(
        student_lp, _flat(INFERENCE_LP), _flat(TEACHER_LP), torch.tensor(REWARD, dtype=torch.float64),
        seq_index, torch.tensor([0, 0, 1, 1]), use_full_reward_baseline=True,
        token_mask_low=0.125, token_mask_high=8.0, **TAUS)
    loss.backward()
    per_token = (-student_lp.grad * n).tolist()
    assert per_token == pytest.approx([ADVANTAGE[i] for i in seq_index.tolist()], abs=1e-12)
    assert float(metrics["is_masked"]) == 0.0 and float(metrics["geo_seq_ratio"]) == pytest.approx(1.0)
    # teacher_kl = mean over tokens of lp_S - lp_T (the sampled KL(student || teacher) estimate)
    assert float(metrics["teacher_kl"]) == pytest.approx(float((_flat(INFERENCE_LP) - _flat(TEACHER_LP)).mean()))

    # The per-token path (sec. 4.5, use_full_reward_baseline = false) differs within a sequence.
    student_lp = _flat(INFERENCE_LP).clone().requires_grad_(True)
    loss, _ = objectives.context_distill_loss(
        student_lp, _flat(INFERENCE_LP), _flat(TEACHER_LP), torch.tensor(REWARD, dtype=torch.float64),
        seq_index, torch.tensor([0, 0, 1, 1]), use_full_reward_baseline=False, **TAUS)
    loss.backward()
    coeff = (-student_lp.grad * n).tolist()
    # A_t = adv_tau (r - mean_group r) + teacher_tau lp_T,t - student_tau lp_S,t
    task_adv = [0.5, -0.5, -0.5, 0.5]
    expected = [0.5 * task_adv[i] + t - 0.5 * s for i, t, s in
                zip(seq_index.tolist(), _flat(TEACHER_LP).tolist(), _flat(INFERENCE_LP).tolist())]
    assert coeff == pytest.approx(expected, abs=1e-12)
    assert coeff[3] != pytest.approx(coeff[4])  # seq 2's tokens differ


def test_importance_ratio_masking_drops_tokens_outside_the_bounds():
    seq_index = _seq_index()
    inference = _flat(INFERENCE_LP)
    student_lp = inference.clone()
    student_lp[0] += np.log(10.0)  # ratio 10 > 8: masked
    student_lp[3] -= np.log(10.0)  # ratio 0.1 < 0.125: masked
    student_lp.requires_grad_(True)
    loss, metrics = objectives.context_distill_loss(
        student_lp, inference, _flat(TEACHER_LP), torch.tensor(REWARD, dtype=torch.float64), seq_index,
        torch.tensor([0, 0, 1, 1]), token_mask_low=0.125, token_mask_high=8.0, **TAUS)
    loss.backward()
    assert float(metrics["is_masked"]) == pytest.approx(2 / len(seq_index))
    assert student_lp.grad[0] == 0 and student_lp.grad[3] == 0 and student_lp.grad[1] != 0


def test_training_loop_groups_rollouts_by_problem_and_feeds_the_seed_formula(monkeypatch):
    """The real `update.objective_loss` path: its sequence/group indices, rewards, teacher and sampler
    log-probs reproduce the hand-computed advantages above."""
    from hpcdistill.distill import objectives as objectives_module
    from hpcdistill.models.generation import Generation
    from hpcdistill.models.loading import tiny_random_model
    from hpcdistill.models.scoring import TokenScores
    from hpcdistill.spec.schema import ExperimentSpec, Spec, TrainSpec
    from hpcdistill.tasks import Problem, Verdict
    from hpcdistill.train import update
    from hpcdistill.train.collect import ScoredRollout as Item
    from hpcdistill.train.roles import Models

    handle = tiny_random_model(vocab_size=64, seed=0)
    spec = Spec(experiment=ExperimentSpec(name="t"),
                train=TrainSpec(steps=1, objective="context_distill", use_full_reward_baseline=True,
                                token_mask_low=0.0, token_mask_high=1e9, **TAUS))
    items = []
    rng = np.random.default_rng(0)
    problems = {"A": Problem("A", "a", {}), "B": Problem("B", "b", {})}
    for i, (t_lp, i_lp) in enumerate(zip(TEACHER_LP, INFERENCE_LP)):
        n = len(t_lp)
        prompt, response = [1, 2, 3], [int(x) for x in rng.integers(4, 60, size=n)]
        zeros = np.zeros(n, dtype=np.float32)
        scores = TokenScores(student_lp=np.asarray(i_lp, np.float32), teacher_lp=np.asarray(t_lp, np.float32),
                             student_topk_ids=np.zeros((n, 2), np.int32), student_topk_lp=np.zeros((n, 2), np.float32),
                             teacher_at_student_topk_lp=np.zeros((n, 2), np.float32), topk_kl=zeros,
                             entropy_s=zeros, entropy_t=zeros, teacher_own_lp=np.asarray(t_lp, np.float32),
                             teacher_topk_ids=np.zeros((n, 2), np.int32), teacher_topk_lp=np.zeros((n, 2), np.float32),
                             student_at_teacher_topk_lp=np.zeros((n, 2), np.float32), student_topk_mass=zeros,
                             teacher_topk_mass=zeros, teacher_mass_at_student_topk=zeros,
                             student_mass_at_teacher_topk=zeros, topk_overlap=zeros)
        gen = Generation(prompt, np.asarray(response), np.asarray(i_lp, np.float32), np.asarray(i_lp, np.float32), "stop")
        items.append(Item(problems[PROBLEM[i]], i % 2, "original", (prompt, response), (prompt, response), gen, "",
                          Verdict(REWARD[i], bool(REWARD[i]), "", {}), scores))
    captured = {}
    real = objectives_module.context_distill_loss

    def spy(student_lp, inference_lp, teacher_lp, task_reward, seq_index, group_index, **kwargs):
        captured.update(inference_lp=inference_lp, teacher_lp=teacher_lp, task_reward=task_reward,
                        seq_index=seq_index, group_index=group_index, kwargs=kwargs)
        return real(student_lp, inference_lp, teacher_lp, task_reward, seq_index, group_index, **kwargs)

    monkeypatch.setattr(objectives_module, "context_distill_loss", spy)
    weights = [np.ones(len(t), dtype=np.float32) for t in TEACHER_LP]
    loss, metrics = update.objective_loss(spec, Models(handle, handle), items, weights)
    assert torch.isfinite(loss) and "train/teacher_kl" in metrics and "train/is_masked" in metrics
    assert captured["kwargs"]["use_full_reward_baseline"] is True
    assert captured["group_index"].tolist() == [0, 0, 1, 1]
    assert captured["seq_index"].tolist() == _seq_index().tolist()
    full, adv = objectives.sequence_full_reward_advantages(
        captured["task_reward"].double(), captured["teacher_lp"].double(), captured["inference_lp"].double(),
        captured["seq_index"], captured["group_index"], **TAUS)
    assert full.tolist() == pytest.approx(FULL_REWARD, abs=1e-5)
    assert adv.tolist() == pytest.approx(ADVANTAGE, abs=1e-5)


# ---------------------------------------------------------------------------- (c) configs


def _arms(runs):
    return {json.dumps(r.overrides, sort_keys=True) for r in runs}


def test_ablations_expand_to_the_seeds_15_arms_times_3_seeds():
    runs = expand(load_spec(CONFIGS / "ablations.toml"))
    assert len(runs) == 45 and len(_arms(runs)) == 15
    assert sorted({r.seed for r in runs}) == [0, 1, 2]
    by_values = {(r.spec.train.lr, r.spec.train.adv_tau, r.spec.train.teacher_tau, r.spec.train.student_tau,
                  r.spec.rollout.temperature, r.spec.rollout.max_new_tokens, r.spec.train.token_mask_low,
                  r.spec.train.token_mask_high, r.spec.rollout.samples_per_problem,
                  r.spec.train.problems_per_step) for r in runs if r.seed == 0}
    base = (1e-5, 0.0, 1.0, 1.0, 1.0, 8192, 0.125, 8.0, 16, 16)

    def arm(**changes):
        keys = ["lr", "adv", "t", "s", "temp", "budget", "low", "high", "group", "problems"]
        values = dict(zip(keys, base)) | changes
        return tuple(values[k] for k in keys)

    expected = {base, arm(lr=1e-6), arm(lr=5e-5), arm(t=1.0, s=0.0), arm(t=0.5, s=0.5), arm(t=0.01, s=0.01),
                arm(adv=0.5, t=0.5, s=0.5), arm(adv=1.0, t=0.1, s=0.1), arm(adv=0.1, t=0.8, s=0.8), arm(temp=0.6),
                arm(budget=16384), arm(low=0.2, high=1.28), arm(low=0.05, high=20.0),
                arm(group=8, problems=32), arm(group=32, problems=8)}
    assert by_values == expected
    # every arm trains on 256 rollouts per step, as the seed's batch_size
    assert all(r.spec.rollout.samples_per_problem * r.spec.train.problems_per_step == 256 for r in runs)


def test_baseline_and_recommended_configs_carry_the_seeds_values():
    base = expand(load_spec(CONFIGS / "baseline.toml"))
    assert len(base) == 1
    s = base[0].spec
    assert (s.model.student, s.model.teacher, s.task.name, s.train.objective) == (
        "Qwen/Qwen3-4B-Instruct-2507", "same", "sokoban", "context_distill")
    assert (s.train.lr, s.train.weight_decay, s.train.max_grad_norm, s.train.steps) == (1e-5, 0.0, 1.0, 400)
    assert (s.train.adv_tau, s.train.teacher_tau, s.train.student_tau) == (0.0, 1.0, 1.0)
    assert s.train.use_full_reward_baseline and (s.train.token_mask_low, s.train.token_mask_high) == (0.125, 8.0)
    assert (s.rollout.samples_per_problem, s.train.problems_per_step, s.rollout.max_new_tokens,
            s.rollout.temperature) == (16, 16, 8192, 1.0)
    assert (s.train.lora.enabled, s.train.lora.rank, s.train.lora.alpha) == (True, 16, 64.0)
    assert (s.launch.gpus.rollout, s.launch.gpus.teacher, s.launch.gpus.trainer) == (1, 1, 2)
    assert s.teacher.context == "system_prompt" and "<answer>" in s.teacher.system_prompt
    r72 = expand(load_spec(CONFIGS / "recommended_7_2.toml"))[0].spec
    assert (r72.train.adv_tau, r72.train.teacher_tau, r72.train.student_tau, r72.train.lr) == (0.5, 0.5, 0.5, 1e-5)
    r73 = expand(load_spec(CONFIGS / "recommended_7_3.toml"))[0].spec
    assert r73.rollout.max_new_tokens == 16384 and r73.train.adv_tau == 0.0
    r74 = expand(load_spec(CONFIGS / "recommended_7_4.toml"))[0].spec
    assert r74.model.teacher == "Qwen/Qwen3-30B-A3B-Instruct-2507" and r74.model.student == s.model.student
    loop = load_spec(CONFIGS / "gepa_loop.toml").spec
    assert (loop.loop.rounds, loop.loop.distill_selection, loop.loop.max_distill_prompts, loop.train.steps) == (
        3, "pareto", None, 200)
    assert (loop.loop.heldout_split, loop.loop.heldout_num_problems) == ("test", 500)  # sec. 6.3.3
    assert (loop.loop.train_num_problems, loop.loop.val_num_problems, loop.loop.reflection_minibatch_size,
            loop.loop.max_metric_calls) == (500, 200, 10, 20000)
    assert loop.loop.reflection_api_key_env == "ANTHROPIC_API_KEY"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_every_context_distill_config_expands(path):
    runs = expand(load_spec(path))
    assert runs
    if path.name.endswith("_small.toml") or path.name == "small.part.toml":
        assert all(r.spec.model.student == "bundled:smollm2-135m-instruct" and r.spec.model.device == "cpu"
                   for r in runs)
        assert load_spec(path).spec.launch.executor == "local"


# ---------------------------------------------------------------------------- loop units


def test_loop_spec_errors_are_reported_together(tmp_path):
    from hpcdistill.spec.command_rules import check_loop_spec

    path = tmp_path / "bad.toml"
    path.write_text('[experiment]\nname = "x"\n[train]\nobjective = "topk_kl"\n'
                    '[loop]\nreflection_model = "gpt-x"\nreflection_api_key_env = "sk-abc123-secret"\n')
    with pytest.raises(SpecError) as err:
        check_loop_spec(load_spec(path))
    text = str(err.value)
    for key in ("train.objective", "train.steps", "loop.seed_prompt", "loop.reflection_base_url",
                "loop.reflection_api_key_env"):
        assert key in text


def test_top_k_prompts_skips_empty_and_duplicate_prompts():
    from hpcdistill.launch.prompt_search import top_k_prompts

    cands = [{"index": 0, "prompt": "seed", "direct_score": 0.2}, {"index": 1, "prompt": " ", "direct_score": 0.9},
             {"index": 2, "prompt": "seed", "direct_score": 0.5}, {"index": 3, "prompt": "b", "direct_score": 0.5}]
    assert [c["index"] for c in top_k_prompts(cands, 2)] == [2, 3]
    assert [c["index"] for c in top_k_prompts(cands, 5)] == [2, 3]


def test_gepa_run_dir_with_state_is_refused_not_resumed(tmp_path):
    """Seed 004 sec. 5.3: a stale cache corrupted cross-run evaluations. GEPA resumes from any
    gepa_state.bin in its run_dir; the loop refuses a run_dir with content instead."""
    from hpcdistill.spec.schema import ExperimentSpec, LoopSpec, Spec
    from hpcdistill.launch.prompt_search import optimize_prompts

    run_dir = tmp_path / "gepa"
    run_dir.mkdir()
    (run_dir / "gepa_state.bin").write_bytes(b"stale")
    spec = Spec(experiment=ExperimentSpec(name="t"), loop=LoopSpec())
    with pytest.raises(LaunchError, match="not fresh"):
        optimize_prompts(spec, scorer=None, lm=None, train_problems=[], val_problems=[], run_dir=run_dir,
                         seed_prompt="p", seed=0)


def test_round_keys_differ_by_spec_round_student_and_weights():
    from hpcdistill.launch.prompt_loop import round_key

    base = round_key("h", 1, "bundled:x", None, "p")
    assert base == round_key("h", 1, "bundled:x", None, "p")
    others = {round_key("h2", 1, "bundled:x", None, "p"), round_key("h", 2, "bundled:x", None, "p"),
              round_key("h", 1, "/m", None, "p"), round_key("h", 1, "bundled:x", "abc", "p"),
              round_key("h", 1, "bundled:x", None, "q")}
    assert base not in others and len(others) == 5


def test_loop_record_refuses_a_directory_of_another_spec(tmp_path):
    from hpcdistill.launch.prompt_loop import LoopRecord

    spec_a = tmp_path / "a.toml"
    spec_a.write_text('[experiment]\nname = "x"\n')
    spec_b = tmp_path / "b.toml"
    spec_b.write_text('[experiment]\nname = "x"\n[loop]\nrounds = 3\n')
    record = LoopRecord.open(tmp_path / "loop.json", load_spec(spec_a))
    record.save()
    with pytest.raises(LaunchError, match="another spec"):
        LoopRecord.open(tmp_path / "loop.json", load_spec(spec_b))


def test_openai_reflection_model_posts_chat_completions_with_the_named_key(monkeypatch):
    from hpcdistill.launch.prompt_search import OpenAIReflectionLM

    seen = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            seen["path"] = self.path
            seen["auth"] = self.headers.get("Authorization")
            seen["body"] = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            out = json.dumps({"choices": [{"message": {"content": "```\nnew prompt\n```"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HPCD_TEST_KEY", "k-123")
        lm = OpenAIReflectionLM(f"http://127.0.0.1:{server.server_port}/v1/", "m", "HPCD_TEST_KEY", 64, 0.5)
        assert lm("improve this") == "```\nnew prompt\n```"
        assert seen["path"] == "/v1/chat/completions" and seen["auth"] == "Bearer k-123"
        assert seen["body"]["messages"] == [{"role": "user", "content": "improve this"}]
        assert (seen["body"]["model"], seen["body"]["max_tokens"]) == ("m", 64)
        monkeypatch.delenv("HPCD_TEST_KEY")
        with pytest.raises(LaunchError, match="HPCD_TEST_KEY"):
            lm("again")
    finally:
        server.shutdown()


# ---------------------------------------------------------------------------- (b) the loop, end to end


@pytest.mark.slow
def test_small_loop_runs_two_rounds_end_to_end(tmp_path):
    from hpcdistill.analysis.context_distill import context_distill_report, loop_report
    from hpcdistill.rundir import RunPaths
    from hpcdistill.record import iter_shards
    from hpcdistill.launch.prompt_loop import model_checksum, run_loop

    # one distilled prompt per round keeps CI short; the rounds still chain student to student
    loaded = load_spec(CONFIGS / "gepa_loop_small.toml", [f'experiment.output_dir="{tmp_path}"',
                                                          "loop.max_distill_prompts=1"])
    t0 = time.monotonic()
    loop_dir = run_loop(loaded, executor="local")
    seconds = time.monotonic() - t0
    record = json.loads((loop_dir / "loop.json").read_text())
    assert record["spec_hash"] == loaded.spec_hash
    rounds = record["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["state"] == "completed" for r in rounds)
    for r in rounds:
        assert 1 <= len(r["candidates"]) <= 3
        assert all(isinstance(c["prompt"], str) and 0.0 <= c["direct_score"] <= 1.0 for c in r["candidates"])
        assert r["chosen_prompt"] == r["candidates"][r["chosen"]["candidate"]]["prompt"]
        assert 1 <= len(r["distilled"]) <= 2 and len(r["distilled"]) == len(r["top_k"])
        assert r["gepa"]["metric_calls"] <= 12 + 2  # budget (+ one minibatch GEPA may finish)
        for d in r["distilled"]:
            run = RunPaths(Path(d["model_dir"]).parent)
            assert json.loads(run.status.read_text())["state"] == "completed"
            shards = sorted(run.shards.glob("step_*.h5"))
            assert [p.name for p in shards] == ["step_000000.h5", "step_000001.h5"]
            names = set()
            for reader in iter_shards(run.shards):
                names |= set(reader.metrics())
            assert {"train/teacher_kl", "train/is_masked", "reward_mean", "truncation_rate"} <= names
            assert any(n.startswith("eval/reward@") for n in names)
            spec_text = run.spec.read_text()
            assert 'context = "system_prompt"' in spec_text and "save_model = true" in spec_text
            assert 0.0 <= d["distilled_score"] <= 1.0 and d["model_sha256"] == model_checksum(Path(d["model_dir"]))
        assert Path(loop_dir / r["dir"] / "gepa").is_dir()
    # round 1 starts from the bundled model; round 2's student is round 1's saved, chosen model
    assert rounds[0]["student"] == "bundled:smollm2-135m-instruct"
    assert rounds[1]["student"] == rounds[0]["next_student"]
    assert rounds[1]["student_sha256"] == model_checksum(Path(rounds[0]["next_student"]))
    assert Path(rounds[0]["next_student"]).is_relative_to(loop_dir / rounds[0]["dir"])
    assert rounds[1]["seed_prompt"] == rounds[0]["chosen_prompt"]
    assert rounds[0]["dir"] != rounds[1]["dir"]
    # the round's distillation spec names the student it was given
    round2_spec = load_spec(loop_dir / rounds[1]["dir"] / "distill.toml").spec
    assert round2_spec.model.student == rounds[0]["next_student"]

    sections = loop_report(loop_dir, tmp_path / "analysis", print_tables=False)
    text = "\n".join(sections)
    assert "Round 1: candidate prompts" in text and "Round 2: chosen prompt vs round 1 chosen" in text
    assert "```diff" in text and (tmp_path / "analysis" / "loop_scores.png").stat().st_size > 0
    sweep_sections = context_distill_report(loop_dir / rounds[0]["dir"] / "distill", tmp_path / "analysis",
                                            print_tables=False)
    assert any("final eval accuracy" in s for s in sweep_sections)
    assert (tmp_path / "analysis" / "context_distill_curves.png").stat().st_size > 0

    # Running the finished loop again reuses its completed rounds (same spec, same keys) ...
    t1 = time.monotonic()
    assert run_loop(loaded, executor="local") == loop_dir
    assert time.monotonic() - t1 < seconds / 2
    assert json.loads((loop_dir / "loop.json").read_text())["rounds"] == rounds
