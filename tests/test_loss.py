"""The distill objective's options against float64 references written out here, value and gradient.

The references start from full logits and use Python sets for the supports, so they share no code
with hpcdistill.distill.loss (whose buckets, masks and tail are what is being checked).
"""

from __future__ import annotations

import math

import pytest
import torch

from hpcdistill.distill.loss import (DistillInputs, LossConfig, bucket_divergence, discounted_returns,
                                     distill_loss, sampled_estimate, support_ids, topk_buckets)

N, V, K = 11, 29, 5
DIVERGENCES = [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.3), ("jsd", 0.8)]


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    student_logits = (torch.randn(N, V, generator=g) * 2).requires_grad_(True)
    teacher_logits = torch.randn(N, V, generator=g) * 2
    weights = torch.rand(N, generator=g) * 2
    weights[2] = 0.0
    loss_mask = torch.rand(N, generator=g) > 0.2
    sampler_lp = torch.log_softmax(student_logits.detach() + 0.3 * torch.randn(N, V, generator=g), -1)
    y = torch.randint(0, V, (N,), generator=g)
    return student_logits, teacher_logits, weights, loss_mask, sampler_lp.gather(-1, y[:, None])[:, 0], y


# ---------------------------------------------------------------------------- float64 references


def _ref_div(p, q, divergence, beta):
    """Divergence between probability vectors (float64, 1-d), written from the definitions."""
    def kl(a, b):
        return sum(float(a[i]) * math.log(float(a[i]) / float(b[i])) for i in range(len(a)) if a[i] > 0)
    if divergence == "reverse" or (divergence == "jsd" and beta == 1):
        return kl(p, q)
    if divergence == "forward" or (divergence == "jsd" and beta == 0):
        return kl(q, p)
    m = [beta * q[i] + (1 - beta) * p[i] for i in range(len(p))]
    return beta * kl(q, m) + (1 - beta) * kl(p, m)


def _ref_terms(x64, teacher_logits, support, which, normalization, divergence, beta):
    """Per-token divergence [N] from float64 logits x64 (with grad), supports as Python sets."""
    s_all = x64 - torch.logsumexp(x64, -1, keepdim=True)
    t_all = teacher_logits.double() - torch.logsumexp(teacher_logits.double(), -1, keepdim=True)
    out = []
    for n in range(N):
        if support == "full":
            entries = list(range(V))
        else:
            mine = set(torch.topk(x64[n].detach(), K).indices.tolist())
            theirs = set(torch.topk(t_all[n], K).indices.tolist())
            entries = sorted({"student": mine, "teacher": theirs, "union": mine | theirs}[which])
        s = torch.stack([s_all[n, i] for i in entries])
        t = torch.stack([t_all[n, i] for i in entries])
        if support == "full" or normalization == "renormalize":
            p, q = torch.softmax(s, 0), torch.softmax(t, 0)
        else:
            p = torch.cat([s.exp(), (1 - s.exp().sum()).reshape(1)])
            q = torch.cat([t.exp(), (1 - t.exp().sum()).reshape(1)])
        if divergence == "reverse" or (divergence == "jsd" and beta == 1):
            d = (p * (p.log() - q.log())).sum()
        elif divergence == "forward" or (divergence == "jsd" and beta == 0):
            d = (q * (q.log() - p.log())).sum()
        else:
            m = beta * q + (1 - beta) * p
            d = beta * (q * (q.log() - m.log())).sum() + (1 - beta) * (p * (p.log() - m.log())).sum()
        assert abs(float(d.detach()) - _ref_div(p.tolist(), q.tolist(), divergence, beta)) < 1e-9
        out.append(d)
    return torch.stack(out)


def _ref_loss(terms, weights, loss_mask):
    m = loss_mask.double()
    return (weights.double() * m * terms).sum() / m.sum()


# ---------------------------------------------------------------------------- what training builds


def _ours(x, teacher_logits, weights, loss_mask, config):
    """The loss as steps.py builds it: live student logits, recorded teacher log-probs."""
    student_lp = torch.log_softmax(x, -1)
    teacher_lp = torch.log_softmax(teacher_logits, -1)
    ids_s = x.detach().topk(K, -1).indices
    ids_t = teacher_lp.topk(K, -1).indices
    y = ids_s[:, 0]
    if config.support == "full":
        s_b, t_b, mask = x, teacher_logits, None
    else:
        ids, mask = support_ids(ids_s, ids_t, config.topk_support)
        source = student_lp if config.topk_normalization == "tail_bucket" else x
        s_b, t_b, mask = topk_buckets(source.gather(-1, ids), teacher_lp.gather(-1, ids), mask,
                                      config.topk_normalization)
    batch = DistillInputs(weights=weights, lengths=[N], student_lp=student_lp.gather(-1, y[:, None])[:, 0],
                          student_buckets=s_b, teacher_buckets=t_b, bucket_mask=mask, loss_mask=loss_mask)
    return distill_loss(config, batch)


def _check(config, seed=0, rtol=2e-5, atol=1e-6):
    x, teacher_logits, weights, loss_mask, _, _ = _inputs(seed)
    out = _ours(x, teacher_logits, weights, loss_mask, config)
    (grad,) = torch.autograd.grad(out.loss, x)
    x64 = x.detach().double().requires_grad_(True)
    ref = _ref_loss(_ref_terms(x64, teacher_logits, config.support, config.topk_support,
                               config.topk_normalization, config.divergence, config.beta), weights, loss_mask)
    (ref_grad,) = torch.autograd.grad(ref, x64)
    assert out.loss.item() == pytest.approx(ref.item(), rel=rtol, abs=atol)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol)
    assert torch.isfinite(grad).all() and not out.terms.requires_grad
    return out


@pytest.mark.parametrize("which", ["student", "teacher", "union"])
@pytest.mark.parametrize("normalization", ["renormalize", "tail_bucket"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_topk_support_matches_float64_reference_value_and_gradient(which, normalization, divergence, beta):
    _check(LossConfig(support="topk", topk_support=which, topk_normalization=normalization,
                      divergence=divergence, beta=beta))


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_full_vocabulary_matches_float64_reference_value_and_gradient(divergence, beta):
    _check(LossConfig(support="full", divergence=divergence, beta=beta))


def test_default_config_is_seed_000s_top_k_kl_and_ignores_a_constant_shift_of_the_teacher():
    x, teacher_logits, weights, loss_mask, _, _ = _inputs(1)
    ours = _ours(x, teacher_logits, weights, loss_mask, LossConfig())
    # seed 000, "KL Divergence Computation": the student's top-20 (here K) ids, log_softmax over the
    # k-slice on each side, KL(student || teacher), written out in float64
    ids = x.detach().topk(K, -1).indices
    s = torch.log_softmax(x.detach().double().gather(-1, ids), -1)
    t = torch.log_softmax(teacher_logits.double().gather(-1, ids), -1)
    kl = (s.exp() * (s - t)).sum(-1)
    assert ours.loss.item() == pytest.approx(_ref_loss(kl, weights, loss_mask).item(), rel=1e-5)
    assert ours.metrics["topk_kl"].item() == pytest.approx(float((kl * loss_mask).sum() / loss_mask.sum()), rel=1e-5)
    same = distill_loss(LossConfig(), DistillInputs(weights=weights, lengths=[N], student_lp=torch.zeros(N),
                                                    student_buckets=x.gather(-1, ids),
                                                    teacher_buckets=x.detach().gather(-1, ids) - 3.0))
    assert same.loss.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("support,normalization", [("topk", "renormalize"), ("topk", "tail_bucket"),
                                                   ("full", "renormalize")])
def test_jsd_coefficient_0_and_1_equal_forward_and_reverse_kl_and_the_interior_tends_to_them(support, normalization):
    x, teacher_logits, weights, loss_mask, _, _ = _inputs(2)

    def run(divergence, beta):
        config = LossConfig(support=support, topk_normalization=normalization, divergence=divergence, beta=beta)
        out = _ours(x, teacher_logits, weights, loss_mask, config)
        return out.loss, torch.autograd.grad(out.loss, x)[0]

    for beta, kl in ((0.0, "forward"), (1.0, "reverse")):
        (a, ga), (b, gb) = run("jsd", beta), run(kl, 0.5)
        assert a.item() == pytest.approx(b.item(), rel=1e-6)
        torch.testing.assert_close(ga, gb)
    # GKD: JSD(beta) = beta KL(T||S) + O(beta^2) near 0, and (1 - beta) KL(S||T) + O((1-beta)^2) near 1.
    forward, reverse = run("forward", 0.5)[0].item(), run("reverse", 0.5)[0].item()
    for eps in (1e-2, 1e-3):
        assert run("jsd", eps)[0].item() / eps == pytest.approx(forward, rel=3 * eps ** 0.5 + 1e-3)
        assert run("jsd", 1 - eps)[0].item() / eps == pytest.approx(reverse, rel=3 * eps ** 0.5 + 1e-3)


@pytest.mark.parametrize("normalization", ["renormalize", "tail_bucket"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_topk_with_k_equal_to_the_vocabulary_equals_the_full_vocabulary_value(normalization, divergence, beta):
    x, teacher_logits, weights, loss_mask, _, _ = _inputs(3)
    full = _ours(x, teacher_logits, weights, loss_mask, LossConfig(support="full", divergence=divergence, beta=beta))
    ids = x.detach().topk(V, -1).indices
    s_b, t_b, mask = topk_buckets(torch.log_softmax(x, -1).gather(-1, ids),
                                  torch.log_softmax(teacher_logits, -1).gather(-1, ids), None, normalization)
    batch = DistillInputs(weights=weights, lengths=[N], student_lp=torch.zeros(N), student_buckets=s_b,
                          teacher_buckets=t_b, bucket_mask=mask, loss_mask=loss_mask)
    topk = distill_loss(LossConfig(topk_normalization=normalization, divergence=divergence, beta=beta), batch)
    # the tail bucket of k = V holds the clamp's 1e-7 on both sides: equal to ~1e-7
    assert topk.loss.item() == pytest.approx(full.loss.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(torch.autograd.grad(topk.loss, x)[0], torch.autograd.grad(full.loss, x)[0],
                               rtol=1e-4, atol=1e-6)


def test_union_support_lists_each_id_once_and_keeps_the_student_ids_first():
    g = torch.Generator().manual_seed(4)
    ids_s = torch.stack([torch.randperm(12, generator=g)[:4] for _ in range(50)])
    ids_t = torch.stack([torch.randperm(12, generator=g)[:4] for _ in range(50)])
    ids, mask = support_ids(ids_s, ids_t, "union")
    assert torch.equal(ids[:, :4], ids_s) and mask[:, :4].all()
    for row_ids, row_mask, a, b in zip(ids, mask, ids_s, ids_t):
        kept = row_ids[row_mask].tolist()
        assert sorted(kept) == sorted(set(a.tolist()) | set(b.tolist())) and len(kept) == len(set(kept))


# ---------------------------------------------------------------------------- sampled token


def _exact_divergence(p, q, divergence, beta):
    """D(p, q) over the vocabulary rows (float64): what an unbiased estimator averages to."""
    return torch.tensor([_ref_div(p[n].tolist(), q[n].tolist(), divergence, beta) for n in range(len(p))],
                        dtype=torch.float64)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES + [("jsd", 0.0), ("jsd", 1.0)])
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_k1_and_k3_are_unbiased_estimates_of_the_divergence_under_the_student(divergence, beta, estimator):
    g = torch.Generator().manual_seed(5)
    s = torch.log_softmax(torch.randn(7, 13, generator=g, dtype=torch.float64), -1)
    t = torch.log_softmax(torch.randn(7, 13, generator=g, dtype=torch.float64), -1)
    estimate = sampled_estimate(s - t, divergence, beta, estimator)  # [7, 13]: every possible y
    expected = (s.exp() * estimate).sum(-1)  # E_{y ~ S}[estimate(y)], exactly
    torch.testing.assert_close(expected, _exact_divergence(s.exp(), t.exp(), divergence, beta), rtol=1e-9, atol=1e-12)
    if estimator == "k3":
        assert (estimate >= -1e-12).all()  # k3 never goes negative


@pytest.mark.parametrize("divergence,beta,f2", [("reverse", 0.5, 1.0), ("forward", 0.5, 1.0), ("jsd", 0.3, 0.21)])
def test_k2_is_half_the_second_order_coefficient_times_the_squared_log_ratio(divergence, beta, f2):
    r = torch.linspace(-3, 3, 13, dtype=torch.float64)
    torch.testing.assert_close(sampled_estimate(r, divergence, beta, "k2"), 0.5 * f2 * r ** 2)
    # reverse-KL estimators are Schulman's (verl's kl, mse, low_var_kl)
    if divergence == "reverse":
        torch.testing.assert_close(sampled_estimate(r, divergence, beta, "k1"), r)
        torch.testing.assert_close(sampled_estimate(r, divergence, beta, "k3"), torch.exp(-r) - 1 + r)


def test_discounted_returns_are_the_future_sums_within_each_rollout():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    out = discounted_returns(rewards, [3, 2], 0.5)
    torch.testing.assert_close(out, torch.tensor([1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0, 4 + 0.5 * 5, 5.0]))
    assert discounted_returns(rewards, [5], 0.0) is rewards


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("gamma,is_clip", [(0.0, None), (0.7, 1.2)])
def test_reward_use_gradient_is_advantage_times_clipped_ratio_times_grad_log_p(estimator, divergence, beta, gamma,
                                                                               is_clip):
    x, teacher_logits, weights, loss_mask, sampler_lp, y = _inputs(6)
    lengths = [4, 7]
    student_lp = torch.log_softmax(x, -1).gather(-1, y[:, None])[:, 0]
    teacher_lp = torch.log_softmax(teacher_logits, -1).gather(-1, y[:, None])[:, 0]
    config = LossConfig(support="sampled", divergence=divergence, beta=beta, estimator=estimator, gamma=gamma,
                        is_clip=is_clip)
    out = distill_loss(config, DistillInputs(weights=weights, lengths=lengths, student_lp=student_lp,
                                             teacher_lp=teacher_lp, sampler_lp=sampler_lp, loss_mask=loss_mask))
    (grad,) = torch.autograd.grad(out.loss, x)

    # reference, float64, by hand: rewards -estimate, discounted within each rollout, ratio p_S / q
    x64 = x.detach().double().requires_grad_(True)
    s64 = torch.log_softmax(x64, -1).gather(-1, y[:, None])[:, 0]
    r = (s64 - teacher_lp.double()).detach()
    rho_t = torch.exp(-r)
    if divergence == "reverse":
        f, f1, f2 = r, -1.0, 1.0
    elif divergence == "forward":
        f, f1, f2 = rho_t * torch.log(rho_t), 1.0, 1.0
    else:
        m = beta * rho_t + 1 - beta
        f, f1, f2 = beta * rho_t * torch.log(rho_t / m) - (1 - beta) * torch.log(m), 0.0, beta * (1 - beta)
    est = {"k1": f, "k2": 0.5 * f2 * r ** 2, "k3": f - f1 * (rho_t - 1)}[estimator]
    c = (-est).tolist()
    adv, start = [], 0
    for n in lengths:
        seg = c[start:start + n]
        adv += [sum(gamma ** (j - i) * seg[j] for j in range(i, n)) for i in range(n)]
        start += n
    adv = torch.tensor(adv, dtype=torch.float64)
    ratio = torch.exp(s64 - sampler_lp.double())
    coeff = ratio.detach().clamp(max=is_clip) if is_clip else ratio.detach()
    m = loss_mask.double()
    ref = -(weights.double() * m * adv * coeff * s64).sum() / m.sum()  # same gradient as the IS surrogate
    (ref_grad,) = torch.autograd.grad(ref, x64)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-5, atol=1e-7)
    assert out.metrics["advantage_mean"].item() == pytest.approx(float((adv * m).sum() / m.sum()), rel=1e-5, abs=1e-7)
    # the value is -mean(w A min(rho, c)): at rho = 1 it is the mean weighted estimate
    value = -(weights.double() * m * adv * coeff).sum() / m.sum()
    assert out.loss.item() == pytest.approx(value.item(), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_loss_use_differentiates_the_estimator_itself(estimator, divergence, beta):
    x, teacher_logits, weights, loss_mask, sampler_lp, y = _inputs(7)
    student_lp = torch.log_softmax(x, -1).gather(-1, y[:, None])[:, 0]
    teacher_lp = torch.log_softmax(teacher_logits, -1).gather(-1, y[:, None])[:, 0]
    config = LossConfig(support="sampled", divergence=divergence, beta=beta, estimator=estimator,
                        sampled_use="loss", is_clip=1.5)
    out = distill_loss(config, DistillInputs(weights=weights, lengths=[N], student_lp=student_lp,
                                             teacher_lp=teacher_lp, sampler_lp=sampler_lp, loss_mask=loss_mask))
    x64 = x.detach().double().requires_grad_(True)
    s64 = torch.log_softmax(x64, -1).gather(-1, y[:, None])[:, 0]
    est = sampled_estimate(s64 - teacher_lp.double(), divergence, beta, estimator)
    clip = torch.exp(s64.detach() - sampler_lp.double()).clamp(max=1.5)
    ref = _ref_loss(clip * est, weights, loss_mask)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(torch.autograd.grad(out.loss, x)[0].double(), torch.autograd.grad(ref, x64)[0],
                               rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("support", ["topk", "full"])
def test_is_clip_scales_each_distribution_term_by_the_clipped_sampler_ratio(support):
    x, teacher_logits, weights, loss_mask, sampler_lp, y = _inputs(9)
    ids = x.detach().topk(K, -1).indices
    s_b = x if support == "full" else x.gather(-1, ids)
    t_b = teacher_logits if support == "full" else torch.log_softmax(teacher_logits, -1).gather(-1, ids)
    student_lp = torch.log_softmax(x, -1).gather(-1, y[:, None])[:, 0]

    def run(is_clip):
        return distill_loss(LossConfig(support=support, is_clip=is_clip), DistillInputs(
            weights=weights, lengths=[N], student_lp=student_lp, sampler_lp=sampler_lp, student_buckets=s_b,
            teacher_buckets=t_b, loss_mask=loss_mask))

    clip = torch.exp(student_lp.detach() - sampler_lp).clamp(max=1.1)
    assert (clip < 1.1).any() and (clip == 1.1).any()
    torch.testing.assert_close(run(1.1).terms, clip * run(None).terms)


def test_bucket_divergence_of_a_distribution_with_itself_is_zero_for_every_divergence():
    lp = torch.log_softmax(torch.randn(5, 9), -1)
    for divergence, beta in DIVERGENCES:
        torch.testing.assert_close(bucket_divergence(lp, lp, divergence, beta), torch.zeros(5), atol=1e-6, rtol=0)
