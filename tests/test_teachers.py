"""Self-teacher weights (live, initial, EMA, trust region), the demonstration context, and the
template parity check stopping a run, on real (tiny random) models and real runs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hpcdistill.distill.contexts import teacher_contexts
from hpcdistill.devices import RoleDevices
from hpcdistill.rundir import RunPaths, read_json
from hpcdistill.record import ShardReader
from hpcdistill.spec.load import validate
from hpcdistill.spec.schema import TeacherSpec
from hpcdistill.tasks import Problem, Verdict
from hpcdistill.train import loop
from hpcdistill.train.distributed import TrainerConfig, build_trainer
from hpcdistill.train.trainer_checkpoint import checkpoint_file
from hpcdistill.train.collect import load_problems
from hpcdistill.train.loop import load_eval_problems
from hpcdistill.train.roles import load_models


def _spec(**sections):
    data = {"experiment": {"name": "teachers"}, "model": {"student": "tiny-random:0", "device": "cpu"},
            "task": {"name": "math", "num_problems": 2}, "rollout": {"samples_per_problem": 2, "max_new_tokens": 6},
            "train": {"steps": 3, "lr": 1e-2}}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return validate(data, {}, "test")


def _run_steps(spec, run_dir, steps_to_run):
    """What loop.run_training does, step by step, keeping the student's weights after each update."""
    paths = RunPaths(run_dir)
    paths.shards.mkdir(parents=True)
    models = load_models(spec, RoleDevices((), (), ()))
    problems = load_problems(spec)
    trainer = build_trainer(TrainerConfig.from_spec(spec), models.student.model)
    models.student.model, models.trainer = trainer.model, trainer
    initial = {k: v.detach().clone() for k, v in models.teacher.model.named_parameters()}
    after = []
    for step in range(steps_to_run):
        loop.train_step(spec, paths, models, problems, load_eval_problems(spec, problems), None, "x", step)
        after.append({k: v.detach().clone() for k, v in models.student.model.named_parameters()})
    return models, paths, initial, after


def test_ema_teacher_after_n_steps_equals_the_hand_computed_average(tmp_path):
    rate = 0.3
    spec = _spec(teacher={"weights": "ema", "ema_rate": rate})
    models, paths, initial, after = _run_steps(spec, tmp_path / "run", 3)
    assert models.teacher is not models.student
    # T_0 = W_0; T_{k+1} = (1 - r) T_k + r W_{k+1}, i.e. T_3 = (1-r)^3 W_0 + sum_j r (1-r)^(3-j) W_j
    for name, param in models.teacher.model.named_parameters():
        expected = (1 - rate) ** 3 * initial[name].double()
        for j, weights in enumerate(after, start=1):
            expected = expected + rate * (1 - rate) ** (3 - j) * weights[name].double()
        torch.testing.assert_close(param.double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(after[-1]["lm_head.weight"], initial["lm_head.weight"])  # the student moved
    # the checkpoint carries the EMA weights, so a requeued task resumes the same average
    saved = checkpoint_file(paths.checkpoint, "teacher_ema.safetensors")
    from safetensors.torch import load_file

    state = load_file(str(saved))
    for name, param in models.teacher.model.named_parameters():
        torch.testing.assert_close(state[name], param.detach())


def test_initial_teacher_stays_frozen_while_the_student_trains(tmp_path):
    models, _, initial, after = _run_steps(_spec(teacher={"weights": "initial"}), tmp_path / "run", 2)
    for name, param in models.teacher.model.named_parameters():
        assert torch.equal(param, initial[name])
        assert not param.requires_grad
    assert not torch.equal(after[-1]["lm_head.weight"], initial["lm_head.weight"])


def test_measurement_runs_and_the_live_teacher_share_the_students_weights():
    for spec in (_spec(train={"steps": 0}, teacher={"weights": "ema"}), _spec()):
        models = load_models(spec, RoleDevices((), (), ()))
        assert models.teacher is models.student


# ---------------------------------------------------------------------------- demonstration context


P, Q = Problem("p", "Add two numbers.", {}), Problem("q", "Say hi.", {})


def _verdict(reward, feedback=""):
    return Verdict(reward, reward >= 1, feedback, {})


@pytest.mark.parametrize("feedback_mode,expect", [
    # (demonstration shown, feedback shown, has signal) for rollouts 0..3
    ("fallback", [(1, False, True), (-1, False, False), (1, False, True), (-1, True, True)]),
    ("always", [(1, True, True), (-1, False, False), (1, False, True), (-1, True, True)]),
    ("never", [(1, False, True), (-1, False, False), (1, False, True), (-1, False, False)]),
])
def test_demonstration_context_shows_the_first_successful_sibling_and_feedback_as_configured(feedback_mode, expect):
    teacher = TeacherSpec(context="demonstration", demonstration_feedback=feedback_mode,
                          demonstration_template="[{problem}|{demonstration}|{feedback}]",
                          demonstration_section="DEMO<{demonstration}>", feedback_section="FB<{feedback}>")
    texts = ["wrong", "<think>scratch</think>def add(a, b): return a + b", "also wrong", "hi?"]
    verdicts = [_verdict(0, "failed test 1"), _verdict(1), _verdict(0.5), _verdict(0, "say hi")]
    contexts = teacher_contexts([P, P, P, Q], texts, verdicts, teacher, "student system")
    for ctx, (shown, feedback, signal), verdict in zip(contexts, expect, verdicts):
        text = ctx.messages[-1]["content"]
        assert ctx.demonstration == shown and ctx.has_signal == signal
        assert ("DEMO<def add(a, b): return a + b>" in text) == (shown >= 0)  # thinking removed
        assert (f"FB<{verdict.feedback}>" in text) == feedback
        if not signal:  # nothing to teach from: the student's own prompt, left out of the loss
            assert ctx.messages[0] == {"role": "system", "content": "student system"}
            assert "DEMO" not in text and "FB" not in text


def test_a_successful_rollout_may_be_its_own_demonstration_only_when_asked():
    verdicts = [_verdict(1), _verdict(0, "x")]
    own = teacher_contexts([P, P], ["a", "b"], verdicts, TeacherSpec(context="demonstration"))
    assert [c.demonstration for c in own] == [-1, 0]
    allowed = teacher_contexts([P, P], ["a", "b"], verdicts,
                               TeacherSpec(context="demonstration", demonstration_exclude_self=False))
    assert [c.demonstration for c in allowed] == [0, 0]


def test_demonstration_run_records_the_teachers_prompt_and_trains_only_on_rollouts_with_a_signal(tmp_path):
    # threshold 0: every sibling is a demonstration; feedback never: a lone sample has no signal
    spec = _spec(teacher={"context": "demonstration", "demonstration_threshold": 0.0,
                          "demonstration_feedback": "never"},
                 rollout={"samples_per_problem": 2}, train={"steps": 1})
    _run_steps(spec, tmp_path / "run", 1)
    with ShardReader(tmp_path / "run" / "shards" / "step_000000.h5") as shard:
        rows = shard.rollouts()
        assert sorted(rows["demonstration"].tolist()) == [0, 0, 1, 1]  # each sample shows its sibling
        assert set(rows["teacher_signal"].tolist()) == {1}
        for record in shard.iter_rollouts(columns=["train_loss", "mask"]):
            assert "A correct solution from another attempt" in record.row["teacher_prompt_text"]
            assert np.isfinite(record.tokens["train_loss"]).all()
    lone = _spec(teacher={"context": "demonstration", "demonstration_threshold": 0.0,
                          "demonstration_feedback": "never"}, rollout={"samples_per_problem": 1}, train={"steps": 1})
    _run_steps(lone, tmp_path / "lone", 1)
    with ShardReader(tmp_path / "lone" / "shards" / "step_000000.h5") as shard:
        assert set(shard.rollouts()["teacher_signal"].tolist()) == {0}
        for record in shard.iter_rollouts(columns=["mask"]):
            assert not record.tokens["mask"].any()
        metrics = shard.metrics()
        assert metrics["train/loss"][1][0] == 0.0 and metrics["diag/teacher_signal_rate"][1][0] == 0.0


# ---------------------------------------------------------------------------- template parity


def test_a_teacher_whose_chat_template_would_misalign_positions_stops_the_run_naming_both(tmp_path):
    from hpcdistill.launch.submit import submit
    from hpcdistill.models.loading import BUNDLED_MODELS, load_model, tiny_random_model
    from hpcdistill.spec import load_spec

    tokenizer = copy.deepcopy(load_model("bundled:" + next(iter(BUNDLED_MODELS))).tokenizer)
    teacher_dir = tmp_path / "qwen-style-teacher"
    tiny_random_model(seed=1, tokenizer=tokenizer).model.save_pretrained(teacher_dir)
    # The same tokenizer, but a template that opens every written assistant turn with an empty think
    # block (as Qwen3's does): the teacher would read the student's reply several tokens late.
    turn = "message['role'] + '\n' + message['content']"
    assert turn in tokenizer.chat_template
    tokenizer.chat_template = tokenizer.chat_template.replace(
        turn, "message['role'] + '\n' + ('<think>\n\n</think>\n\n' if message['role'] == 'assistant' "
              "else '') + message['content']")
    tokenizer.save_pretrained(teacher_dir)
    spec = tmp_path / "s.toml"
    spec.write_text(f'[experiment]\nname = "parity"\noutput_dir = "{tmp_path / "runs"}"\n'
                    f'[model]\nstudent = "tiny-random:0"\nteacher = "{teacher_dir}"\ndevice = "cpu"\n'
                    '[task]\nname = "math"\nnum_problems = 1\n[rollout]\nmax_new_tokens = 4\n')
    result = submit(load_spec(spec), executor="debug")
    status = read_json(result.sweep.run(result.runs[0].run_id).status)
    assert status["state"] == "failed"
    assert "template parity" in status["error"] and "tiny-random:0" in status["error"]
    assert str(teacher_dir) in status["error"]
    assert not list((tmp_path / "runs").rglob("*.h5"))  # stopped before anything was recorded
