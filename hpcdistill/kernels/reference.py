"""log_softmax, KL and entropy of next-token distributions on log-probabilities `[..., V]`, in
float32: the torch path of the fused scoring kernel and the reference it is checked against; the
divergences of `hpcdistill.distill.divergence` and the scorers are built from them.

Every function reduces the last (vocabulary) axis and returns `[...]` in float32, whatever the
input dtype: bf16 log-probabilities are too coarse for per-token KL.

Conventions for masked vocabulary (`-inf` logits):
- a token with p = 0 contributes 0 to KL(p||q) and to H(p) (0 * log 0 = 0, never NaN);
- a token with p > 0 and q = 0 contributes +inf, which is the true KL;
- a row that is entirely `-inf` gets log-probabilities `-inf` (not NaN), so its KL is 0 when it is
  the `p` side and +inf where p puts mass on it as the `q` side.
"""

from __future__ import annotations

import torch


def _has_neginf(x: torch.Tensor) -> bool:
    # One reduction without a [..., V] temporary; most inputs have no -inf and skip the fix-ups.
    return x.numel() > 0 and bool(torch.isneginf(x.amin()))


def log_softmax_fp32(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last axis in float32; `-inf` stays `-inf`, all-`-inf` rows stay `-inf`.

    logits: [..., V] any float dtype -> [..., V] float32.
    """
    out = torch.log_softmax(logits.float(), dim=-1)  # fused; -inf in, -inf out
    if _has_neginf(logits):
        # An all -inf row gives NaN (-inf - -inf); its tokens have probability 0 either way.
        dead = torch.isneginf(logits.amax(dim=-1, keepdim=True))  # [..., 1]
        out = out.masked_fill(dead, float("-inf"))
    return out


def kl_from_logprobs(p_lp: torch.Tensor, q_lp: torch.Tensor, *, p: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p||q) = sum_v p_v (log p_v - log q_v) from normalised log-probabilities [..., V] -> [...].

    p: optionally `p_lp.exp()` already computed by the caller (saves one pass over [..., V]).
    """
    p = p_lp.exp() if p is None else p
    terms = (p_lp - q_lp).mul_(p)  # in place: one [..., V] temporary, not three
    if _has_neginf(p_lp) or _has_neginf(q_lp):
        # p = 0 where log p or log q is -inf gives 0 * inf = NaN; the convention is 0.
        terms = torch.where(p > 0, terms, torch.zeros((), dtype=terms.dtype, device=terms.device))
    return terms.sum(dim=-1)


def entropy_from_logprobs(lp: torch.Tensor, *, p: torch.Tensor | None = None) -> torch.Tensor:
    """H(p) = -sum_v p_v log p_v from log-probabilities [..., V] -> [...]; p as in kl_from_logprobs."""
    p = lp.exp() if p is None else p
    terms = p * lp
    if _has_neginf(lp):
        terms = torch.where(p > 0, terms, torch.zeros((), dtype=terms.dtype, device=terms.device))
    return -terms.sum(dim=-1)


def slice_kl(student_slice: torch.Tensor, teacher_slice: torch.Tensor) -> torch.Tensor:
    """KL over a k-slice (seed 000): log_softmax each side over its k entries, then KL(s||t).

    student_slice, teacher_slice: [..., k] logits or full-vocab log-probs gathered at the same k ids
    (log_softmax is shift invariant, so both give the same result) -> [...].
    """
    return kl_from_logprobs(log_softmax_fp32(student_slice), log_softmax_fp32(teacher_slice))


__all__ = ["log_softmax_fp32", "kl_from_logprobs", "entropy_from_logprobs", "slice_kl"]
