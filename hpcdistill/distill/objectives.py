"""Training objectives besides the distill loss: one function per formula, over flattened tokens.

The distill objective (top-k / full / sampled-token supports, every divergence) is
`hpcdistill.distill.loss`; this module holds ExOPD, seed 004's context distillation, off-policy
SFT and the KL anchor to the initial student.

Shapes: N = number of response tokens in the batch (rollouts flattened), V = vocabulary size,
k = top-k size, B = number of rollouts. Every objective returns (loss, metrics): a scalar loss
with gradient to the student, and a dict of detached 0-d tensors.

Normalisation, the same everywhere (`loss.weighted_mean`, shared with the distill loss):
loss = sum_t w_t * l_t / max(sum_t m_t, 1), where l_t is the per-token term, w_t the supervision
weight from `masks.build_masks` (0 outside the kept span, the loss-mass scale inside) and m_t the valid-token mask (`loss_mask`; None means all N tokens are
response tokens). Dividing by the valid-token count, not by sum(w), keeps the release rule's
mass-preserving rescale (seed 002 sec. 3) visible in the gradient. Teacher (and reference /
sampler) inputs are treated as constants: they are detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hpcdistill.distill.divergence import masked_kl
from hpcdistill.distill.loss import masked_mean, valid_tokens, weighted_mean

Metrics = dict[str, torch.Tensor]


def full_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weights: torch.Tensor,
    direction: str = "reverse",
    loss_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Full-vocabulary KL on the same positions (DESIGN.md sec. 3; seed 004 sec. 3.7).

    student_logits, teacher_logits: [N, V]; weights: [N].
    direction="reverse": KL(student || teacher) (mode-seeking, the on-policy default);
    direction="forward": KL(teacher || student) (mode-covering).
    """
    student_lp = F.log_softmax(student_logits, dim=-1)
    teacher_lp = F.log_softmax(teacher_logits.detach().to(student_lp.dtype), dim=-1)
    if direction == "reverse":
        kl = masked_kl(student_lp, teacher_lp)
    elif direction == "forward":
        kl = masked_kl(teacher_lp, student_lp)
    else:
        raise ValueError(f"direction must be 'reverse' or 'forward', got {direction!r}")
    valid = valid_tokens(weights, loss_mask)
    loss = weighted_mean(kl, weights, valid)
    return loss, {"loss": loss.detach(), f"{direction}_kl": masked_mean(kl, valid)}


def _policy_gradient(
    student_lp: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    sampler_lp: torch.Tensor | None,
    valid: torch.Tensor,
) -> torch.Tensor:
    """-sum w A ratio / n_valid with ratio = exp(lp - sampler_lp) (or -A lp when on-policy)."""
    if sampler_lp is None:
        surrogate = advantages * student_lp  # gradient A * grad log p
    else:
        surrogate = advantages * torch.exp(student_lp - sampler_lp.detach())  # importance sampling
    return -weighted_mean(surrogate, weights, valid)


def exopd_advantage_loss(
    student_lp: torch.Tensor,
    teacher_lp: torch.Tensor,
    weights: torch.Tensor,
    *,
    alpha: float,
    reference_lp: torch.Tensor | None = None,
    sampler_lp: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """ExOPD, the reward-extrapolation baseline of seed 002 (Table 1; Yang et al. 2026, G-OPD).

    Seed 002 only names it ("ExOPD uses reward extrapolation ... modifies the OPD objective").
    G-OPD maximises E[alpha log(pi_T / pi_ref) - KL(pi_theta || pi_ref)]; per sampled token
        A_t = alpha (log p_T - log p_ref) - (log p_S - log p_ref),
    alpha = 1 is plain OPD, alpha > 1 extrapolates (ExOPD). reference_lp: [N] log-probs of the
    reference model (e.g. the initial student); None takes the current student, which gives
    A_t = alpha (log p_T - log p_S). Loss: -sum_t w_t A_t rho_t / n_valid, rho_t = exp(lp_t - sampler_lp_t)
    (or -sum w A lp without a sampler); shapes: [N].
    """
    current = student_lp.detach()
    reference = current if reference_lp is None else reference_lp.detach().to(current.dtype)
    advantages = alpha * (teacher_lp.detach().to(current.dtype) - reference) - (current - reference)
    valid = valid_tokens(weights, loss_mask)
    loss = _policy_gradient(student_lp, advantages, weights, sampler_lp, valid)
    return loss, {"loss": loss.detach(), "advantage_mean": masked_mean(advantages, valid)}


def sequence_full_reward_advantages(
    task_reward: torch.Tensor,
    teacher_lp: torch.Tensor,
    inference_lp: torch.Tensor,
    seq_index: torch.Tensor,
    group_index: torch.Tensor,
    *,
    adv_tau: float,
    teacher_tau: float,
    student_tau: float,
    loss_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seed 004 sec. 4.2: full reward per sequence, centred within its problem group.

    task_reward: [B]; teacher_lp, inference_lp: [N]; seq_index: [N] rollout of each token;
    group_index: [B] problem group of each rollout. Returns (full_reward [B], advantage [B]) with
    full_reward_i = adv_tau r_i + teacher_tau sum_t lp_T - student_tau sum_t lp_inference
    (sums over valid tokens) and advantage_i = full_reward_i - mean of its group.
    """
    valid = valid_tokens(teacher_lp, loss_mask)
    num_seqs = task_reward.shape[0]
    per_token = (teacher_tau * teacher_lp - student_tau * inference_lp) * valid
    full_reward = adv_tau * task_reward + torch.zeros(num_seqs, dtype=per_token.dtype).index_add(
        0, seq_index, per_token
    )
    return full_reward, full_reward - _group_mean(full_reward, group_index)


def sequence_advantages(
    task_reward: torch.Tensor,
    teacher_lp: torch.Tensor,
    inference_lp: torch.Tensor,
    seq_index: torch.Tensor,
    group_index: torch.Tensor,
    *,
    adv_tau: float,
    teacher_tau: float,
    student_tau: float,
    use_full_reward_baseline: bool,
    loss_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B] the group-centred part of `context_distill_loss`'s advantage, from recorded values only:
    full_reward - its group mean (sec. 4.2), or, per token (sec. 4.5), task_reward - its group mean."""
    if use_full_reward_baseline:
        return sequence_full_reward_advantages(
            task_reward, teacher_lp, inference_lp, seq_index, group_index, adv_tau=adv_tau,
            teacher_tau=teacher_tau, student_tau=student_tau, loss_mask=loss_mask)[1]
    return task_reward - _group_mean(task_reward, group_index)


def _group_mean(values: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """[B] -> [B]: the mean of each entry's group."""
    _, inverse = torch.unique(group_index, return_inverse=True)
    sums = torch.zeros(int(inverse.max()) + 1, dtype=values.dtype).index_add(0, inverse, values)
    counts = torch.zeros_like(sums).index_add(0, inverse, torch.ones_like(values))
    return (sums / counts)[inverse]


def logprobs_at_temperature(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi_theta(y_t | T) = log_softmax(logits_t / T)[y_t]: the trainer's log-probs under the
    distribution the sampler draws from at temperature T (before top-k / top-p truncation; seed
    004 samples with top_p = 1). logits: [N, V], ids: [N] -> [N], with grad through `logits`.
    T = 0 (greedy) has no such distribution: the raw (T = 1) log-probs are returned."""
    scaled = logits if temperature in (0.0, 1.0) else logits / temperature
    scaled = scaled if scaled.dtype == torch.float64 else scaled.float()
    return torch.log_softmax(scaled, -1).gather(-1, ids[:, None])[:, 0]


def context_distill_loss(
    student_lp: torch.Tensor,
    inference_lp: torch.Tensor,
    teacher_lp: torch.Tensor,
    task_reward: torch.Tensor,
    seq_index: torch.Tensor,
    group_index: torch.Tensor,
    *,
    adv_tau: float = 0.0,
    teacher_tau: float = 1.0,
    student_tau: float = 1.0,
    use_full_reward_baseline: bool = True,
    token_mask_low: float = 0.125,
    token_mask_high: float = 8.0,
    weights: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    sequence_advantage: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Sequence-reward context distillation, as reviewed in seed 004 sec. 4 (prime-rl's loss).

    student_lp: [N] trainer log-probs of the sampled tokens (with grad) AT THE SAMPLING TEMPERATURE T
    (`logprobs_at_temperature`, prime-rl's trainer divides its logits by T); inference_lp: [N] the
    sampler's (the behaviour policy's: weights rollout.policy_lag steps old, at T); teacher_lp: [N]
    the teacher's (same model, enhanced context, T = 1); task_reward: [B];
    seq_index: [N] rollout of each token; group_index: [B] problem of each rollout; weights: [N]
    optional supervision weights (default 1).

    use_full_reward_baseline=True (sec. 4.2): one advantage per sequence,
        A_i = full_reward_i - mean_group(full_reward), full_reward as in
        `sequence_full_reward_advantages`;
    False (sec. 4.5): per token, A_t = adv_tau (r_i - mean_group r) + teacher_tau lp_T,t
        - student_tau lp_S,t (trainer log-prob, detached).
    ratio_t = exp(lp_S,t - lp_inference,t); tokens with ratio outside [token_mask_low,
    token_mask_high] are masked (sec. 6.2.6); loss = -sum_{kept t} w_t (ratio_t A_t) lp_S,t / n_valid
    with ratio_t A_t detached (sec. 4.2: "coeff.detach() * trainer_logprobs").
    sequence_advantage: [B] the group-centred part computed beforehand over the whole batch
    (`sequence_advantages`), for a micro-batch that holds only part of a problem's group; None
    computes it here from this call's rollouts.
    Metrics: is_masked (fraction of valid tokens masked), geo_seq_ratio (per sequence
    exp(mean_t log ratio_t), averaged over sequences), teacher_kl (mean over valid tokens of
    lp_S - lp_T, the sampled KL(student || teacher) estimate; prime-rl logs the opposite sign).
    """
    valid = valid_tokens(student_lp, loss_mask)
    weights = torch.ones_like(student_lp) if weights is None else weights.to(student_lp.dtype)
    current = student_lp.detach()
    teacher_lp = teacher_lp.detach().to(current.dtype)
    inference_lp = inference_lp.detach().to(current.dtype)
    task_reward = task_reward.detach().to(current.dtype)

    if sequence_advantage is None:
        sequence_advantage = sequence_advantages(
            task_reward, teacher_lp, inference_lp, seq_index, group_index, adv_tau=adv_tau,
            teacher_tau=teacher_tau, student_tau=student_tau, use_full_reward_baseline=use_full_reward_baseline,
            loss_mask=loss_mask)
    sequence_advantage = sequence_advantage.detach().to(current.dtype)
    if use_full_reward_baseline:
        advantages = sequence_advantage[seq_index]  # [N], constant within a sequence
    else:
        advantages = adv_tau * sequence_advantage[seq_index] + teacher_tau * teacher_lp - student_tau * current

    log_ratio = current - inference_lp
    ratio = log_ratio.exp()
    is_masked = (ratio < token_mask_low) | (ratio > token_mask_high)
    keep = valid * (~is_masked).to(valid.dtype)
    coeff = (ratio * advantages).detach()
    loss = -(weights * keep * coeff * student_lp).sum() / valid.sum().clamp_min(1.0)

    num_seqs = task_reward.shape[0]
    seq_tokens = torch.zeros(num_seqs, dtype=valid.dtype).index_add(0, seq_index, valid)
    seq_log_ratio = torch.zeros(num_seqs, dtype=valid.dtype).index_add(0, seq_index, log_ratio * valid)
    geo_seq_ratio = (seq_log_ratio / seq_tokens.clamp_min(1.0)).exp()
    return loss, {
        "loss": loss.detach(),
        "is_masked": masked_mean(is_masked.to(valid.dtype), valid),
        "geo_seq_ratio": geo_seq_ratio.mean().detach(),
        "teacher_kl": masked_mean(current - teacher_lp, valid),
        "advantage_mean": masked_mean(advantages, valid),
    }


def sft_loss(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor,
    weights: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Off-policy distillation / SFT on teacher completions: weighted token NLL (DESIGN.md sec. 3).

    student_logits: [N, V] at the positions predicting target_ids: [N] (the teacher's tokens).
    """
    log_probs = F.log_softmax(student_logits, dim=-1)
    target_lp = log_probs.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)  # [N]
    return sft_loss_from_logprobs(target_lp, student_logits.argmax(-1) == target_ids, weights, loss_mask)


def sft_loss_from_logprobs(
    target_lp: torch.Tensor,
    correct: torch.Tensor,
    weights: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """`sft_loss` from what it reads of the logits: target_lp [N] log p_S(target) (with grad) and
    correct [N] (argmax == target), as training computes them chunk by chunk (`train.update`)."""
    nll = -target_lp
    valid = valid_tokens(weights, loss_mask)
    loss = weighted_mean(nll, weights, valid)
    accuracy = correct.to(valid.dtype)
    return loss, {
        "loss": loss.detach(),
        "nll": masked_mean(nll, valid),
        "token_accuracy": masked_mean(accuracy, valid),
    }


def kl_to_reference_loss(
    student_logits: torch.Tensor,
    reference_logits: torch.Tensor,
    weights: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """KL(current student || initial student) on the same tokens: the anchor of kl_anchored (seed 003).

    student_logits: [N, V] of the model being trained; reference_logits: [N, V] of the frozen
    initial student on the same prefixes; weights: [N]. Full-vocabulary reverse KL.
    """
    loss, metrics = full_kl_loss(student_logits, reference_logits, weights, "reverse", loss_mask)
    return loss, {"loss": metrics["loss"], "reference_kl": metrics["reverse_kl"]}
