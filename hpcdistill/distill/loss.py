"""The distillation loss (`train.objective = "distill"`): every option on one spec.

Per response token t the student and the teacher are compared on a **support** with a
**divergence** (docs/objectives.md has each formula and the anchor that has it):

    support = "topk"     the student's top-k ids (SDPO), the teacher's, or their union; each side
                         renormalised over those entries, or kept with a tail bucket holding the
                         rest of its mass, log(1 - sum_i p_i) (SDPO's default)
    support = "full"     the whole vocabulary
    support = "sampled"  the sampled token y_t only: a single-sample estimate (k1, k2, k3) of the
                         divergence, used as a policy-gradient reward (OPD) or as a loss

    divergence = "reverse"  KL(S || T);  "forward"  KL(T || S);
    divergence = "jsd"      beta KL(T || M) + (1 - beta) KL(S || M), M = beta T + (1 - beta) S,
                            with beta = 0 and 1 defined as forward and reverse KL (GKD, SDPO)

    loss = sum_t w_t c_t l_t / max(sum_t m_t, 1)

w_t the supervision weight (`masks.build_masks`), m_t the valid-token mask, c_t the clipped
importance ratio against the sampler's log-probs (`is_clip`; 1 when off), l_t the per-token term.

One code path serves training and `hpcdistill replay`: a support is given as **bucket logits**
[N, B] for each side (B = k or 2k entries, +1 with a tail bucket, or V), with an optional entry
mask; `bucket_log_probs` normalises them. Training builds them from live student logits, replay
from the log-probs a shard recorded (as leaf tensors, to get each token's gradient), so the two
compute the same numbers from the same inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from hpcdistill.distill.divergence import masked_kl
from hpcdistill.spec.rules import canonical_objective, resolve_train

Metrics = dict[str, torch.Tensor]

LOG_RATIO_CLAMP = 20.0  # |log p_S - log p_T| (or vs the sampler) before exp: no overflow from one token
TAIL_LSE_MAX = -1e-7  # SDPO: the top-k mass is clamped below 1 so the tail bucket stays finite


@dataclass(frozen=True)
class LossConfig:
    """The keys of `[train]` the distill objective reads (defaults: SDPO's top-k KL of seed 000)."""

    support: str = "topk"  # topk | full | sampled
    divergence: str = "reverse"  # forward | reverse | jsd
    beta: float = 0.5
    topk_support: str = "student"  # student | teacher | union
    topk_normalization: str = "renormalize"  # renormalize | tail_bucket
    estimator: str = "k1"  # k1 | k2 | k3
    sampled_use: str = "reward"  # reward | loss
    gamma: float = 0.0
    is_clip: float | None = None

    @classmethod
    def from_train(cls, train) -> "LossConfig":
        """From a `TrainSpec`, read as `spec.rules` resolves it (a legacy objective name in a Spec
        built without the loader is its preset there too)."""
        resolved = resolve_train(train)
        return cls(**{name: getattr(resolved, name) for name in cls.__dataclass_fields__})

    @staticmethod
    def applies_to(objective: str) -> bool:
        """Whether `train.objective` is this loss (`distill`, or a preset of it)."""
        return canonical_objective(objective) == "distill"

    @property
    def tail(self) -> bool:
        return self.support == "topk" and self.topk_normalization == "tail_bucket"

    @property
    def name(self) -> str:
        """A short label, e.g. `topk[student,renormalize] reverse` or `sampled k3 reward`."""
        div = f"jsd({self.beta:g})" if self.divergence == "jsd" else self.divergence
        if self.support == "topk":
            label = f"topk[{self.topk_support},{self.topk_normalization}] {div}"
        elif self.support == "full":
            label = f"full {div}"
        else:
            label = f"sampled {div} {self.estimator} {self.sampled_use}"
            label += f" gamma={self.gamma:g}" if self.gamma else ""
        return label + (f" is_clip={self.is_clip:g}" if self.is_clip is not None else "")


@dataclass
class DistillInputs:
    """One batch, flattened over rollouts: N tokens, rollouts back to back (`lengths`).

    student_lp: [N] log p_S(y_t) of the sampled token, with grad in training (sampled support and
        the importance ratio); teacher_lp: [N] log p_T(y_t); sampler_lp: [N] the sampling engine's
        log q(y_t), or None when unknown; student_buckets / teacher_buckets: [N, B] bucket logits
        of the top-k or full support; bucket_mask: [N, B] bool, False for entries that are not
        part of the support (duplicates of the union), or None.
    """

    weights: torch.Tensor
    lengths: list[int]
    student_lp: torch.Tensor
    teacher_lp: torch.Tensor | None = None
    sampler_lp: torch.Tensor | None = None
    student_buckets: torch.Tensor | None = None
    teacher_buckets: torch.Tensor | None = None
    bucket_mask: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None
    # [N] the per-token divergence of the support, already computed (training's full support
    # computes it chunk by chunk from the logits, `train.update`, never holding [N, V] buckets)
    divergence: torch.Tensor | None = None


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, with grad to the student
    terms: torch.Tensor  # [N] l_t c_t, detached: what each token contributes before w_t and 1/N
    metrics: Metrics  # detached 0-d tensors


# ---------------------------------------------------------------------------- supports


def in_rows(ids: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
    """[N, a] bool: is ids[n, i] among sets[n, :] (sort + binary search, O(k log k) per row)."""
    ordered = sets.sort(dim=-1).values.contiguous()
    pos = torch.searchsorted(ordered, ids.contiguous()).clamp(max=ordered.shape[-1] - 1)
    return ordered.gather(-1, pos) == ids


def support_ids(student_topk_ids: torch.Tensor, teacher_topk_ids: torch.Tensor | None, which: str
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The vocabulary ids of a top-k support and its entry mask. ids: [N, k] -> ([N, S], [N, S] | None).

    union: the student's k ids, then the teacher's k ids with those already in the student's set
    masked out (S = 2k, at least k entries valid per row).
    """
    if which == "student":
        return student_topk_ids, None
    if teacher_topk_ids is None:
        raise ValueError(f"topk_support = {which!r} needs the teacher's top-k ids")
    if which == "teacher":
        return teacher_topk_ids, None
    if which != "union":
        raise ValueError(f"topk_support must be student, teacher or union, got {which!r}")
    duplicate = in_rows(teacher_topk_ids, student_topk_ids)
    ids = torch.cat([student_topk_ids, teacher_topk_ids], dim=-1)
    mask = torch.cat([torch.ones_like(duplicate), ~duplicate], dim=-1)
    return ids, mask


# The recorded log-probs of (student, teacher) at each top-k set's ids: TokenScores fields and shard
# token columns share these names. A support's columns, in support_ids' order of its entries:
TOPK_COLUMNS = {"student": ("student_topk_lp", "teacher_at_student_topk_lp"),
                "teacher": ("student_at_teacher_topk_lp", "teacher_topk_lp")}


def support_columns(which: str) -> list[tuple[str, str]]:
    return [TOPK_COLUMNS["student"], TOPK_COLUMNS["teacher"]] if which == "union" else [TOPK_COLUMNS[which]]


def with_tail(lp_at: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Append the tail bucket log(1 - sum_i p_i) to full-vocabulary log-probs at support entries.

    lp_at: [N, S] normalised log-probs (not logits) -> ([N, S + 1], mask [N, S + 1] | None).
    The top-k mass is clamped to exp(TAIL_LSE_MAX) < 1 (SDPO), so the tail is finite.
    """
    kept = lp_at if mask is None else lp_at.masked_fill(~mask, float("-inf"))
    log_mass = torch.logsumexp(kept, dim=-1, keepdim=True).clamp(max=TAIL_LSE_MAX)
    tail = torch.log(-torch.expm1(log_mass))
    out = torch.cat([lp_at, tail], dim=-1)
    if mask is None:
        return out, None
    return out, torch.cat([mask, torch.ones_like(mask[..., :1])], dim=-1)


def bucket_log_probs(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """log_softmax over the valid entries of [..., B].

    Masked entries come back as 0, not -inf: every consumer masks them, and a -inf there would
    turn into NaN gradients (logaddexp(-inf, -inf)) that the softmax backward spreads over the row.
    """
    if mask is None:
        return torch.log_softmax(logits, dim=-1)
    return torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).masked_fill(~mask, 0.0)


def topk_buckets(student_lp_at: torch.Tensor, teacher_lp_at: torch.Tensor, mask: torch.Tensor | None,
                 normalization: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Bucket logits of a top-k support for both sides: ([N, B], [N, B], mask | None).

    student_lp_at / teacher_lp_at: [N, S] full-vocabulary log-probs at the support ids (for
    `renormalize` logits serve as well: the renormalisation is shift invariant).
    renormalize: the S entries, renormalised by `bucket_log_probs`; tail_bucket: the S entries plus
    the tail log(1 - sum p) on each side (B = S + 1), already normalised.
    """
    if normalization == "renormalize":
        return student_lp_at, teacher_lp_at, mask
    if normalization != "tail_bucket":
        raise ValueError(f"topk_normalization must be renormalize or tail_bucket, got {normalization!r}")
    student, out_mask = with_tail(student_lp_at, mask)
    teacher, _ = with_tail(teacher_lp_at, mask)
    return student, teacher, out_mask


# ---------------------------------------------------------------------------- divergences


def bucket_divergence(student_lp: torch.Tensor, teacher_lp: torch.Tensor, divergence: str, beta: float,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """The divergence between two normalised distributions over the last axis. [..., B] -> [...].

    jsd: beta KL(T || M) + (1 - beta) KL(S || M) with M = beta T + (1 - beta) S; beta = 0 is KL(T || S)
    (forward) and beta = 1 is KL(S || T) (reverse), as in GKD/TRL and SDPO: the interior formula
    itself tends to 0 at both ends (as beta KL(T || S) near 0), so the ends are the two KLs.
    """
    if divergence == "reverse" or (divergence == "jsd" and beta == 1.0):
        return masked_kl(student_lp, teacher_lp, mask)
    if divergence == "forward" or (divergence == "jsd" and beta == 0.0):
        return masked_kl(teacher_lp, student_lp, mask)
    if divergence != "jsd":
        raise ValueError(f"divergence must be forward, reverse or jsd, got {divergence!r}")
    mixture = torch.logaddexp(teacher_lp + math.log(beta), student_lp + math.log1p(-beta))
    return beta * masked_kl(teacher_lp, mixture, mask) + (1 - beta) * masked_kl(student_lp, mixture, mask)


def support_divergence(config: LossConfig, student_buckets: torch.Tensor, teacher_buckets: torch.Tensor,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """The divergence of `config` between two sides' bucket logits [N, B] (the teacher a constant) -> [N]."""
    s = bucket_log_probs(student_buckets, mask)
    t = bucket_log_probs(teacher_buckets.detach().to(s.dtype), mask)
    return bucket_divergence(s, t, config.divergence, config.beta, mask)


def sampled_estimate(log_ratio: torch.Tensor, divergence: str, beta: float, estimator: str) -> torch.Tensor:
    """Single-sample estimate of D(S, T) at y ~ S from r = log p_S(y) - log p_T(y). [N] -> [N].

    Each divergence is an f-divergence E_{y~S}[f(rho)], rho = p_T(y) / p_S(y):
        reverse: f = -log rho;  forward: f = rho log rho;
        jsd:     f = beta rho log(rho / m) - (1 - beta) log m,  m = beta rho + 1 - beta.
    k1 = f(rho) (unbiased); k2 = f''(1)/2 (log rho)^2 (f''(1) = 1 for both KLs, beta(1 - beta) for
    jsd); k3 = f(rho) - f'(1)(rho - 1), unbiased and >= 0 because E_S[rho] = 1 and f is convex.
    For reverse KL these are Schulman's k1 = r, k2 = r^2 / 2, k3 = (rho - 1) - log rho (verl's
    kl / mse / low_var_kl). rho is computed from r clamped to +-LOG_RATIO_CLAMP.
    """
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward" if beta == 0.0 else "reverse"
    r = log_ratio
    if divergence == "reverse":
        f, f1, f2 = r, -1.0, 1.0
    else:
        log_rho = -r.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        rho = log_rho.exp()
        if divergence == "forward":
            f, f1, f2 = rho * log_rho, 1.0, 1.0
        elif divergence == "jsd":
            log_m = torch.logaddexp(log_rho + math.log(beta), torch.full_like(log_rho, math.log1p(-beta)))
            f, f1, f2 = beta * rho * (log_rho - log_m) - (1 - beta) * log_m, 0.0, beta * (1 - beta)
        else:
            raise ValueError(f"divergence must be forward, reverse or jsd, got {divergence!r}")
    if estimator == "k1":
        return f
    if estimator == "k2":
        return 0.5 * f2 * r.square()
    if estimator == "k3":
        rho = (-r.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).exp()
        return f - f1 * (rho - 1.0)
    raise ValueError(f"estimator must be k1, k2 or k3, got {estimator!r}")


def discounted_returns(rewards: torch.Tensor, lengths: list[int], gamma: float) -> torch.Tensor:
    """A_t = sum_{t' >= t} gamma^(t' - t) c_t' within each rollout (tinker-cookbook's KL discount).

    rewards: [N] (detached), rollouts back to back with `lengths` -> [N]. gamma = 0 returns c.
    """
    if gamma == 0.0:
        return rewards
    values = rewards.detach().to("cpu", torch.float64).numpy()
    out = np.empty_like(values)
    start = 0
    for n in lengths:
        running = 0.0
        for t in range(start + n - 1, start - 1, -1):
            running = values[t] + gamma * running
            out[t] = running
        start += n
    return torch.as_tensor(out, dtype=rewards.dtype, device=rewards.device)


# ---------------------------------------------------------------------------- the loss


# ---------------------------------------------------------------------------- token reductions
# (objectives.py uses them too: one normalisation for every objective)


def valid_tokens(weights: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """[N] float valid-token mask m_t in the weights' dtype (loss_mask, or all ones)."""
    return torch.ones_like(weights) if loss_mask is None else loss_mask.to(weights.dtype)


def weighted_mean(per_token: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """sum_t w_t m_t l_t / max(sum_t m_t, 1): the loss of every objective. [N] x3 -> 0-d, with grad."""
    return (weights * valid * per_token).sum() / valid.sum().clamp_min(1.0)


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The mean over valid tokens, detached: a metric. [N], [N] -> 0-d."""
    return ((values * valid).sum() / valid.sum().clamp_min(1.0)).detach()


def _ratio_clip(student_lp: torch.Tensor, sampler_lp: torch.Tensor | None, is_clip: float | None) -> torch.Tensor:
    """min(p_S(y) / q(y), is_clip), detached (SDPO's is_clip); 1 when off or without a sampler."""
    if is_clip is None or sampler_lp is None:
        return torch.ones_like(student_lp).detach()
    log_ratio = (student_lp.detach() - sampler_lp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return log_ratio.exp().clamp(max=is_clip)


def distill_loss(config: LossConfig, batch: DistillInputs) -> LossOutput:
    """The loss of `config` on `batch` (module docstring); metrics: loss, divergence, and for the
    sampled support advantage_mean / advantage_std / teacher_kl (seed 002's dispersion diagnostic)."""
    weights = batch.weights
    valid = valid_tokens(weights, batch.loss_mask)
    metrics: Metrics = {}
    if config.support in ("topk", "full"):
        if batch.divergence is not None:
            divergence = batch.divergence
        elif batch.student_buckets is None or batch.teacher_buckets is None:
            raise ValueError(f"support = {config.support!r} needs student_buckets and teacher_buckets")
        else:
            divergence = support_divergence(config, batch.student_buckets, batch.teacher_buckets,
                                            batch.bucket_mask)  # [N]
        terms = _ratio_clip(batch.student_lp, batch.sampler_lp, config.is_clip) * divergence
        metrics["divergence"] = masked_mean(divergence, valid)
    elif config.support == "sampled":
        if batch.teacher_lp is None:
            raise ValueError("support = 'sampled' needs teacher_lp")
        teacher_lp = batch.teacher_lp.detach().to(batch.student_lp.dtype)
        if config.sampled_use == "loss":  # the estimator itself, differentiated (verl's supervised mode)
            estimate = sampled_estimate(batch.student_lp - teacher_lp, config.divergence, config.beta,
                                        config.estimator)
            terms = _ratio_clip(batch.student_lp, batch.sampler_lp, config.is_clip) * estimate
        elif config.sampled_use == "reward":  # -estimate as a per-token reward (OPD, tinker-cookbook)
            estimate = sampled_estimate((batch.student_lp - teacher_lp).detach(), config.divergence,
                                        config.beta, config.estimator)
            advantages = discounted_returns(-estimate, batch.lengths, config.gamma)
            sampler = batch.student_lp if batch.sampler_lp is None else batch.sampler_lp
            ratio = (batch.student_lp - sampler.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
            clip = 1.0 if config.is_clip is None else (ratio.detach().clamp(max=config.is_clip) / ratio.detach())
            terms = -advantages * clip * ratio  # gradient: A min(rho, c) grad log p_S
            mean = masked_mean(advantages, valid)
            metrics["advantage_mean"] = mean
            metrics["advantage_std"] = masked_mean((advantages - mean) ** 2, valid).sqrt()
        else:
            raise ValueError(f"sampled_use must be reward or loss, got {config.sampled_use!r}")
        metrics["divergence"] = masked_mean(estimate.detach(), valid)
        metrics["teacher_kl"] = masked_mean((batch.student_lp - teacher_lp).detach(), valid)
    else:
        raise ValueError(f"support must be topk, full or sampled, got {config.support!r}")
    loss = weighted_mean(terms, weights, valid)
    metrics = {"loss": loss.detach(), **metrics}
    if config.support == "topk" and config.divergence == "reverse":
        metrics["topk_kl"] = metrics["divergence"]  # the name seed 000's tables and tests use
    return LossOutput(loss, terms.detach(), metrics)


__all__ = ["LossConfig", "DistillInputs", "LossOutput", "in_rows", "support_ids", "support_columns", "TOPK_COLUMNS",
           "with_tail", "topk_buckets", "bucket_log_probs", "bucket_divergence", "support_divergence", "sampled_estimate",
           "discounted_returns", "valid_tokens", "weighted_mean", "masked_mean", "distill_loss"]
