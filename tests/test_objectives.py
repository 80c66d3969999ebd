"""Objectives against float64 references written out here, value and gradient."""

from __future__ import annotations

import math

import pytest
import torch

from hpcdistill.distill import objectives

N, V, K = 13, 37, 6


def _inputs(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    student_logits = (torch.randn(N, V, generator=g) * 2).to(dtype).requires_grad_(True)
    teacher_logits = (torch.randn(N, V, generator=g) * 2).to(dtype)
    weights = torch.rand(N, generator=g).to(dtype) * 2
    weights[3] = 0.0
    loss_mask = torch.rand(N, generator=g) > 0.2
    return student_logits, teacher_logits, weights, loss_mask


def _ref_log_softmax(x: torch.Tensor) -> torch.Tensor:
    """float64 log-softmax written out: x - log(sum exp x)."""
    x = x.double()
    return x - torch.log(torch.exp(x).sum(-1, keepdim=True))


def _ref_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return (torch.exp(log_p) * (log_p - log_q)).sum(-1)


def _ref_normalise(per_token, weights, loss_mask):
    m = loss_mask.double()
    return (weights.double() * m * per_token).sum() / m.sum()


def _check(ours_fn, ref_fn, student_logits, *, rtol=2e-5, atol=1e-6):
    """Compare loss value and d loss / d student_logits of ours (input dtype) to the float64 reference."""
    loss, metrics = ours_fn(student_logits)
    (grad,) = torch.autograd.grad(loss, student_logits)
    x64 = student_logits.detach().double().requires_grad_(True)
    ref_loss = ref_fn(x64)
    (ref_grad,) = torch.autograd.grad(ref_loss, x64)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=rtol, abs=atol)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol)
    assert all(not v.requires_grad for v in metrics.values())
    return loss, metrics


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_full_kl_matches_float64_reference(direction):
    student_logits, teacher_logits, weights, loss_mask = _inputs(2)

    def ref(x):
        s, t = _ref_log_softmax(x), _ref_log_softmax(teacher_logits)
        kl = _ref_kl(s, t) if direction == "reverse" else _ref_kl(t, s)
        return _ref_normalise(kl, weights, loss_mask)

    _check(lambda x: objectives.full_kl_loss(x, teacher_logits, weights, direction, loss_mask), ref, student_logits)
    with pytest.raises(ValueError):
        objectives.full_kl_loss(student_logits, teacher_logits, weights, "sideways")


def test_exopd_extrapolates_the_opd_advantage():
    g = torch.Generator().manual_seed(6)
    student_lp = (-torch.rand(N, generator=g) * 3).requires_grad_(True)
    teacher_lp = -torch.rand(N, generator=g) * 3
    reference_lp = -torch.rand(N, generator=g) * 3
    weights = torch.ones(N)
    alpha = 1.25

    def ref(lp):
        ref_lp, t = reference_lp.double(), teacher_lp.double()
        a = alpha * (t - ref_lp) - (lp.detach() - ref_lp)
        return -(a * lp).mean()

    _check(
        lambda lp: objectives.exopd_advantage_loss(lp, teacher_lp, weights, alpha=alpha, reference_lp=reference_lp),
        ref,
        student_lp,
    )
    # alpha = 1 is plain OPD (the distill objective's sampled-token preset) whatever the reference;
    # without a reference A = alpha (lp_T - lp_S).
    from hpcdistill.distill.loss import DistillInputs, LossConfig, distill_loss

    sampler = student_lp.detach()  # on-policy: ratio 1, both losses in their importance-sampled form
    opd = distill_loss(LossConfig(support="sampled"), DistillInputs(weights=weights, lengths=[N], student_lp=student_lp,
                                                                    teacher_lp=teacher_lp, sampler_lp=sampler)).loss
    ex1, _ = objectives.exopd_advantage_loss(student_lp, teacher_lp, weights, alpha=1.0, reference_lp=reference_lp,
                                             sampler_lp=sampler)
    assert ex1.item() == pytest.approx(opd.item(), rel=1e-6)
    ex2, _ = objectives.exopd_advantage_loss(student_lp, teacher_lp, weights, alpha=2.0, sampler_lp=sampler)
    assert ex2.item() == pytest.approx(2 * opd.item(), rel=1e-6)


def test_sft_loss_matches_float64_reference():
    student_logits, _, weights, loss_mask = _inputs(7)
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(0))
    targets[0] = student_logits[0].argmax()

    def ref(x):
        return _ref_normalise(-_ref_log_softmax(x).gather(-1, targets[:, None])[:, 0], weights, loss_mask)

    _, metrics = _check(lambda x: objectives.sft_loss(x, targets, weights, loss_mask), ref, student_logits)
    assert 0 < metrics["token_accuracy"] <= 1


def test_kl_to_reference_matches_float64_reference_and_vanishes_at_the_start():
    student_logits, reference_logits, weights, loss_mask = _inputs(8)

    def ref(x):
        return _ref_normalise(_ref_kl(_ref_log_softmax(x), _ref_log_softmax(reference_logits)), weights, loss_mask)

    _check(lambda x: objectives.kl_to_reference_loss(x, reference_logits, weights, loss_mask), ref, student_logits)
    at_start, _ = objectives.kl_to_reference_loss(student_logits, student_logits.detach(), weights)
    assert at_start.item() == pytest.approx(0.0, abs=1e-6)


def test_loss_normalises_by_valid_tokens_so_rescaled_weights_keep_the_mass():
    # A release mask with rescale (weights 2,2,0,0) gives the same loss as full weights when the
    # per-token terms are equal: sum(w l) / n_valid, not / sum(w).
    student_logits = torch.zeros(4, 3, requires_grad=True)
    teacher_logits = torch.tensor([[1.0, 0.0, 0.0]] * 4)
    full, _ = objectives.full_kl_loss(student_logits, teacher_logits, torch.ones(4))
    released, _ = objectives.full_kl_loss(student_logits, teacher_logits, torch.tensor([2.0, 2.0, 0.0, 0.0]))
    assert released.item() == pytest.approx(full.item())


# --- Context distillation (seed 004 section 4) ---


def _context_example():
    """Two problems, three sequences: seq 0 (3 tokens) and seq 1 (2 tokens) in problem 7, seq 2 (2 tokens) in 9."""
    seq_index = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    group_index = torch.tensor([7, 7, 9])
    inference_lp = torch.tensor([-1.0, -2.0, -0.5, -1.0, -1.0, -0.2, -0.3], dtype=torch.float64)
    # Token 2 has ratio e^3 > 8 (masked high), token 6 has ratio e^-3 < 0.125 (masked low).
    student_lp = inference_lp + torch.tensor([0.0, 0.1, 3.0, -0.1, 0.0, 0.0, -3.0], dtype=torch.float64)
    student_lp = student_lp.requires_grad_(True)
    teacher_lp = torch.tensor([-0.5, -1.0, -1.5, -2.0, -0.5, -0.1, -0.4], dtype=torch.float64)
    task_reward = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    return student_lp, inference_lp, teacher_lp, task_reward, seq_index, group_index


def test_full_reward_baseline_gives_one_scalar_per_sequence_centred_per_group():
    student_lp, inference_lp, teacher_lp, task_reward, seq_index, group_index = _context_example()
    full_reward, advantage = objectives.sequence_full_reward_advantages(
        task_reward, teacher_lp, inference_lp, seq_index, group_index, adv_tau=0.5, teacher_tau=1.0, student_tau=1.0
    )
    # By hand: seq 0: 0.5*1 + (-3.0) - (-3.5) = 1.0; seq 1: 0 + (-2.5) - (-2.0) = -0.5;
    # seq 2: 0.5 + (-0.5) - (-0.5) = 0.5. Group 7 mean 0.25, group 9 mean 0.5.
    torch.testing.assert_close(full_reward, torch.tensor([1.0, -0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(advantage, torch.tensor([0.75, -0.75, 0.0], dtype=torch.float64))
    assert advantage.shape == task_reward.shape


def test_context_distill_loss_matches_hand_computed_example():
    student_lp, inference_lp, teacher_lp, task_reward, seq_index, group_index = _context_example()
    loss, metrics = objectives.context_distill_loss(
        student_lp, inference_lp, teacher_lp, task_reward, seq_index, group_index,
        adv_tau=0.5, teacher_tau=1.0, student_tau=1.0, use_full_reward_baseline=True,
        token_mask_low=0.125, token_mask_high=8.0,
    )  # fmt: skip
    # Advantages per token: [0.75]*3 + [-0.75]*2 + [0.0]*2; tokens 2 and 6 masked.
    ratio = torch.exp(student_lp.detach() - inference_lp)
    adv = torch.tensor([0.75, 0.75, 0.75, -0.75, -0.75, 0.0, 0.0], dtype=torch.float64)
    keep = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.float64)
    lp = student_lp.detach()
    expected = -(keep * ratio * adv * lp).sum() / 7
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, student_lp)
    torch.testing.assert_close(grad, -(keep * ratio * adv) / 7)  # coefficient is detached
    assert metrics["is_masked"].item() == pytest.approx(2 / 7)
    log_ratio = (lp - inference_lp).tolist()
    geo = [math.exp(sum(log_ratio[0:3]) / 3), math.exp(sum(log_ratio[3:5]) / 2), math.exp(sum(log_ratio[5:7]) / 2)]
    assert metrics["geo_seq_ratio"].item() == pytest.approx(sum(geo) / 3, rel=1e-12)
    assert metrics["teacher_kl"].item() == pytest.approx((lp - teacher_lp).mean().item(), rel=1e-12)


def test_context_distill_per_token_advantage_without_full_reward_baseline():
    student_lp, inference_lp, teacher_lp, task_reward, seq_index, group_index = _context_example()
    loss, _ = objectives.context_distill_loss(
        student_lp, inference_lp, teacher_lp, task_reward, seq_index, group_index,
        adv_tau=0.5, teacher_tau=1.0, student_tau=1.0, use_full_reward_baseline=False,
        token_mask_low=0.0, token_mask_high=1e9,
    )  # fmt: skip
    lp = student_lp.detach()
    task_adv = torch.tensor([0.5, 0.5, 0.5, -0.5, -0.5, 0.0, 0.0], dtype=torch.float64)  # r - group mean
    adv = 0.5 * task_adv + teacher_lp - lp
    ratio = torch.exp(lp - inference_lp)
    assert loss.item() == pytest.approx((-(ratio * adv * lp).sum() / 7).item(), rel=1e-12)
