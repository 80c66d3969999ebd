"""Seed 003's methods as schedules: what objective and data each step gets."""

from __future__ import annotations

import dataclasses

import pytest

from hpcdistill.distill.schedules import METHODS, plan
from hpcdistill.spec.schema import TrainSpec

BASE = TrainSpec(steps=100, switch_step=50, seed_tokens_start=20, seed_decay_steps=50, off_policy_weight=0.3,
                 replay_every=10, replay_weight=1.0, kl_anchor_beta=0.1, reverse_steps=30)


def plans(method: str, steps: int = 100) -> list:
    train = dataclasses.replace(BASE, method=method, steps=steps)
    return [plan(train, s) for s in range(steps)]


@pytest.mark.parametrize("method", ["on_policy", "on_policy_gkd", "extended_on_policy"])
def test_pure_on_policy_methods_never_train_off_policy(method):
    for p in plans(method):
        assert (p.on_policy_weight, p.off_policy_weight, p.seed_tokens, p.kl_anchor_beta) == (1.0, 0.0, 0, 0.0)


def test_hybrid_is_off_policy_before_the_switch_step_then_on_policy():
    p = plans("hybrid")
    assert all(x.off_policy_weight == 1.0 and x.on_policy_weight == 0.0 for x in p[:50])
    assert all(x.on_policy_weight == 1.0 and x.off_policy_weight == 0.0 for x in p[50:])


def test_teacher_seeded_prefix_decays_from_20_to_0_over_50_steps():
    seeds = [x.seed_tokens for x in plans("teacher_seeded")]
    assert seeds[0] == 20 and seeds[25] == 10 and seeds[50] == 0 and seeds[99] == 0
    assert all(a >= b for a, b in zip(seeds, seeds[1:]))
    assert all(x.on_policy_weight == 1.0 and x.off_policy_weight == 0.0 for x in plans("teacher_seeded"))


def test_mixture_weights_off_and_on_policy_every_step():
    assert {(x.off_policy_weight, x.on_policy_weight) for x in plans("mixture")} == {(0.3, 0.7)}


def test_replay_buffer_injects_the_stored_batch_every_k_steps():
    injected = [s for s, x in enumerate(plans("replay_buffer")) if x.off_policy_weight > 0]
    assert injected == list(range(9, 100, 10))
    assert all(x.on_policy_weight == 1.0 for x in plans("replay_buffer"))


def test_kl_anchored_is_off_policy_with_a_kl_penalty_to_the_initial_student():
    assert {(x.off_policy_weight, x.on_policy_weight, x.kl_anchor_beta) for x in plans("kl_anchored")} == {(1.0, 0.0, 0.1)}


def test_reverse_curriculum_switches_to_off_policy_for_the_last_steps():
    p = plans("reverse_curriculum")
    assert all(x.on_policy_weight == 1.0 for x in p[:70]) and all(x.off_policy_weight == 1.0 for x in p[70:])


def test_every_method_of_the_spec_has_a_schedule():
    from typing import get_args, get_type_hints

    assert set(get_args(get_type_hints(TrainSpec)["method"])) == set(METHODS)
