"""Divergences between next-token distributions, as plain functions.

On logits `[..., V]` (scoring, analysis): `topk_kl`, `full_kl`, `entropy`, built from the float32
log-probability functions of `hpcdistill.kernels.reference` (also the torch path of the fused
scoring kernel, and re-exported here: `log_softmax_fp32`, `kl_from_logprobs`,
`entropy_from_logprobs`, `slice_kl`). They return `[...]` in float32, whatever the input dtype,
with `-inf` logits as probability 0 (kernels/reference.py has the conventions).

On normalised log-probabilities of a loss (`distill.loss`, `distill.objectives`): `masked_kl`,
differentiable, with an optional entry mask.
"""

from __future__ import annotations

import torch

from hpcdistill.kernels.reference import entropy_from_logprobs, kl_from_logprobs, log_softmax_fp32, slice_kl


def masked_kl(p_lp: torch.Tensor, q_lp: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) over the last axis of a loss. [..., B] -> [...].

    p_lp, q_lp: normalised log-probs in the loss's dtype, with grad; mask: [..., B] bool, False for
    entries outside the support, which contribute exactly 0 (and no NaN gradient). Unlike
    `kl_from_logprobs` (float32, in place, -inf fix-ups for scoring) it keeps the input dtype and
    autograd's plain graph: the losses never see -inf (`loss.bucket_log_probs` fills masked
    entries with 0).
    """
    if mask is None:
        return (p_lp.exp() * (p_lp - q_lp)).sum(-1)
    p = p_lp.exp().masked_fill(~mask, 0.0)
    diff = (p_lp - q_lp).masked_fill(~mask, 0.0)
    return (p * diff).sum(-1)


def topk_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k KL(student||teacher) of SDPO (seed 000, "KL Divergence Computation").

    The k ids are the student's top-k (whatever set `torch.topk` returns on ties: the same set is
    gathered from both sides); each side is renormalised over those k ids independently.
    With k = V this equals `full_kl(student_logits, teacher_logits)`.

    student_logits, teacher_logits: [..., V] -> [...] float32.
    """
    ids = torch.topk(student_logits, k, dim=-1).indices  # [..., k]
    return slice_kl(student_logits.gather(-1, ids), teacher_logits.gather(-1, ids))


def full_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p||q) over the full vocabulary. p_logits, q_logits: [..., V] -> [...] float32."""
    return kl_from_logprobs(log_softmax_fp32(p_logits), log_softmax_fp32(q_logits))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) in nats. logits: [..., V] -> [...] float32."""
    return entropy_from_logprobs(log_softmax_fp32(logits))


__all__ = [
    "masked_kl",
    "log_softmax_fp32",
    "kl_from_logprobs",
    "entropy_from_logprobs",
    "slice_kl",
    "topk_kl",
    "full_kl",
    "entropy",
]
