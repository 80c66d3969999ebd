"""Distillation methods as schedules over the objectives (seed 003, "Cliff Mitigation Strategies").

A method is not a trainer: at each step it says how much of the on-policy objective
(`train.objective` on the student's own rollouts), how much off-policy SFT on teacher completions,
how many teacher-written prefix tokens seed the student's rollouts, and how strong a KL anchor to
the initial student to use. The training loop composes exactly what the plan says.

| method             | plan at step s (S = train.steps)                                           |
|--------------------|----------------------------------------------------------------------------|
| on_policy          | on-policy only (the default of the other studies)                           |
| on_policy_gkd      | on-policy only (seed 003's baseline)                                        |
| extended_on_policy | on-policy only; its configs give it more steps (seed: 200 instead of 100)   |
| hybrid             | off-policy for s < switch_step, then on-policy                              |
| teacher_seeded     | on-policy; the teacher writes the first n(s) tokens of each rollout,        |
|                    | n(s) = round(seed_tokens_start * (1 - s / seed_decay_steps)), >= 0          |
| mixture            | off_policy_weight * off-policy + (1 - off_policy_weight) * on-policy        |
| replay_buffer      | on-policy, plus every replay_every steps at most replay_size teacher        |
|                    | sequences on a seeded sample of the problems trained on so far              |
| kl_anchored        | off-policy + kl_anchor_beta * KL(current || initial student)                |
| reverse_curriculum | on-policy, then off-policy for the last reverse_steps steps                 |
"""

from __future__ import annotations

from dataclasses import dataclass

from hpcdistill.spec.schema import TrainSpec

METHODS = ("on_policy", "on_policy_gkd", "hybrid", "extended_on_policy", "teacher_seeded", "mixture",
           "replay_buffer", "kl_anchored", "reverse_curriculum")


@dataclass(frozen=True)
class StepPlan:
    on_policy_weight: float  # weight of train.objective on the student's rollouts
    off_policy_weight: float  # weight of SFT on teacher completions
    seed_tokens: int = 0  # teacher-written prefix tokens of each rollout (teacher seeding)
    kl_anchor_beta: float = 0.0  # weight of KL(current || initial student) on the off-policy tokens

    @property
    def needs_teacher_completions(self) -> bool:
        return self.off_policy_weight > 0


def plan(train: TrainSpec, step: int) -> StepPlan:
    """What step `step` (0-based) of `train.method` trains on."""
    method = train.method
    if method in ("on_policy", "on_policy_gkd", "extended_on_policy"):
        return StepPlan(1.0, 0.0)
    if method == "hybrid":
        return StepPlan(0.0, 1.0) if step < train.switch_step else StepPlan(1.0, 0.0)
    if method == "teacher_seeded":
        remaining = max(0.0, 1.0 - step / train.seed_decay_steps) if train.seed_decay_steps else 0.0
        return StepPlan(1.0, 0.0, seed_tokens=int(round(train.seed_tokens_start * remaining)))
    if method == "mixture":
        return StepPlan(1.0 - train.off_policy_weight, train.off_policy_weight)
    if method == "replay_buffer":
        inject = train.replay_every > 0 and step % train.replay_every == train.replay_every - 1
        return StepPlan(1.0, train.replay_weight if inject else 0.0)
    if method == "kl_anchored":
        return StepPlan(0.0, 1.0, kl_anchor_beta=train.kl_anchor_beta)
    if method == "reverse_curriculum":
        on = step < train.steps - train.reverse_steps
        return StepPlan(1.0, 0.0) if on else StepPlan(0.0, 1.0)
    raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
