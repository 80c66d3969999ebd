"""Seed 001, lock/fork probing: statistics of a next-token distribution, the lock/fork classifier
and the sub-categories. Pure functions of log-probabilities, shared by the probe run (which
records them per position) and the probe's analysis (hpcdistill.analysis.probing, which reads them).

Seed 001 ("The probing mechanism") compares the next-token distributions of a base model and a
trained model at chosen positions of prompt+response "carriers", before and after top-k/top-p
truncation.
Statistics of one distribution p over the vocabulary (`distribution_stats`), at a temperature the
caller already applied (`apply_temperature`: log_softmax(logits / T)):
- top-1 probability; top-5 mass;
- nucleus size: the smallest number of tokens whose mass reaches `top_p` (at least 1);
- tail mass: the mass OUTSIDE the `top_k` most likely tokens (the seed's "moving tail mass into
  the top-20": with top_k = 20 this is exactly that tail);
- entropy (nats);
- after truncation (top-k, then top-p on the renormalised top-k, the sampler's own rule,
  `hpcdistill.models.generation.sampling_logprobs`): kept size, kept mass (before renormalising),
  top-1 probability and entropy of the renormalised truncated distribution.

Classifier (`classify`, thresholds from `[probe]`; seed 001 "heuristics"):
- lock-like:  top-1 >= lock_min_top1, nucleus <= lock_max_nucleus, tail <= lock_max_tail;
- fork-like:  not a lock, at least fork_min_candidates tokens in the top fork_top_n with
  p >= fork_min_prob and p >= fork_min_ratio * top-1 ("similar probability"), and a LOW tail
  (tail <= fork_max_tail) -- the tail separates true forks from diffuse uncertainty;
- mixed/diffuse: everything else.

A position's category is the BASE model's class. Lock sub-categories (seed 001 "Lock sharpening"):
self-correction context (a marker such as "Wait" in the preceding text, or as either model's top
token) takes precedence; else strict lock (both lock-like, same top token), swap (both lock-like,
different top token), loosened (the trained model is no longer lock-like). Fork sub-categories
(seed 001 "Fork diversity preservation"): preserved, collapsed (trained lock-like), diffused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hpcdistill.distill.divergence import entropy_from_logprobs, log_softmax_fp32
from hpcdistill.models.generation import sampling_logprobs

LOCK, FORK, DIFFUSE = 0, 1, 2
CLASSES = ("lock", "fork", "diffuse")
STRICT_LOCK, SWAP, SELF_CORRECTION, LOOSENED = 0, 1, 2, 3
LOCK_SUBCATEGORIES = ("strict lock", "swap", "self-correction", "loosened")
PRESERVED, COLLAPSED, DIFFUSED = 0, 1, 2
FORK_SUBCATEGORIES = ("preserved", "collapsed", "diffused")
NONE = -1  # not in the sub-category's parent class
RANK_TABLE_SIZE = 5  # the seed's rank tables show the top-5 of each model


# --------------------------------------------------------------------------------------------------
# statistics of one distribution


@dataclass(frozen=True)
class Thresholds:
    """Classifier thresholds (the `[probe]` keys of the same names)."""

    lock_min_top1: float = 0.5
    lock_max_nucleus: int = 8
    lock_max_tail: float = 0.1
    fork_top_n: int = 10
    fork_min_candidates: int = 2
    fork_min_prob: float = 0.05
    fork_min_ratio: float = 0.25
    fork_max_tail: float = 0.25

    @classmethod
    def from_spec(cls, probe: Any) -> Thresholds:
        return cls(**{name: getattr(probe, name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class DistributionStats:
    """Statistics of P distributions. k = min(top_k, V)."""

    topk_ids: np.ndarray  # [P, k] int64, descending probability
    topk_probs: np.ndarray  # [P, k] float32
    top5_mass: np.ndarray  # [P]
    nucleus_size: np.ndarray  # [P] int64, smallest set with mass >= top_p
    tail_mass: np.ndarray  # [P], mass outside the top-k
    entropy: np.ndarray  # [P] nats
    trunc_size: np.ndarray  # [P] int64, tokens kept by top-k then top-p
    trunc_mass: np.ndarray  # [P], their mass before renormalising
    trunc_top1: np.ndarray  # [P], top-1 of the renormalised truncated distribution
    trunc_entropy: np.ndarray  # [P] nats, entropy of the renormalised truncated distribution

    @property
    def top1_prob(self) -> np.ndarray:
        return self.topk_probs[:, 0]

    @property
    def top1_id(self) -> np.ndarray:
        return self.topk_ids[:, 0]


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T): [..., V] -> [..., V] float32 (seed 001 compares T_eval 0.7 and 1.5)."""
    if temperature <= 0:
        raise ValueError(f"probe temperature must be > 0, got {temperature}")
    return log_softmax_fp32(logits.float() / temperature)


def truncated_logprobs(logprobs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The renormalised top-k-then-top-p distribution, -inf outside the kept set: [P, V] -> [P, V]."""
    return sampling_logprobs(logprobs, 1.0, top_p, top_k)


def distribution_stats(logprobs: torch.Tensor | np.ndarray, *, top_k: int, top_p: float
                       ) -> tuple[DistributionStats, torch.Tensor]:
    """Statistics of each row of `logprobs` [P, V] (or one [V] vector, as P = 1).

    Rows are renormalised first, so logits work too. Returns (stats, truncated log-probs [P, V]).
    """
    lp = torch.as_tensor(logprobs)
    lp = log_softmax_fp32(lp.reshape(-1, lp.shape[-1]))  # [P, V]
    p = lp.exp()
    k = min(top_k, lp.shape[-1])
    sorted_p, order = torch.sort(p, dim=-1, descending=True)  # [P, V]
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly before each token
    nucleus = (before < top_p).sum(-1).clamp(min=1)  # the sampler's nucleus rule
    q = truncated_logprobs(lp, k, top_p)  # [P, V]
    kept = torch.isfinite(q)
    stats = DistributionStats(
        topk_ids=order[:, :k].cpu().numpy().astype(np.int64),
        topk_probs=sorted_p[:, :k].cpu().numpy(),
        top5_mass=sorted_p[:, :5].sum(-1).cpu().numpy(),
        nucleus_size=nucleus.cpu().numpy().astype(np.int64),
        tail_mass=sorted_p[:, k:].sum(-1).cpu().numpy(),  # summed, not 1 - cum: exact for small tails
        entropy=entropy_from_logprobs(lp, p=p).cpu().numpy(),
        trunc_size=kept.sum(-1).cpu().numpy().astype(np.int64),
        trunc_mass=torch.where(kept, p, torch.zeros_like(p)).sum(-1).cpu().numpy(),
        trunc_top1=q.max(-1).values.exp().cpu().numpy(),
        trunc_entropy=entropy_from_logprobs(q).cpu().numpy(),
    )
    return stats, q


# --------------------------------------------------------------------------------------------------
# classification


def classify(top_probs: np.ndarray, nucleus_size: np.ndarray, tail_mass: np.ndarray,
             th: Thresholds) -> np.ndarray:
    """LOCK / FORK / DIFFUSE per position (see the module docstring).

    top_probs: [P, n] descending probabilities (n >= 1; the first fork_top_n are used);
    nucleus_size, tail_mass: [P] -> int8 [P].
    """
    top_probs = np.atleast_2d(np.asarray(top_probs, dtype=np.float64))
    nucleus_size, tail_mass = np.asarray(nucleus_size), np.asarray(tail_mass)
    top1 = top_probs[:, 0]
    lock = (top1 >= th.lock_min_top1) & (nucleus_size <= th.lock_max_nucleus) & (tail_mass <= th.lock_max_tail)
    candidates = top_probs[:, :th.fork_top_n]
    similar = (candidates >= th.fork_min_prob) & (candidates >= th.fork_min_ratio * top1[:, None])
    fork = ~lock & (similar.sum(-1) >= th.fork_min_candidates) & (tail_mass <= th.fork_max_tail)
    return np.where(lock, LOCK, np.where(fork, FORK, DIFFUSE)).astype(np.int8)


def classify_stats(stats: DistributionStats, th: Thresholds) -> np.ndarray:
    return classify(stats.topk_probs, stats.nucleus_size, stats.tail_mass, th)


def _marker_regex(markers: list[str]) -> re.Pattern | None:
    """One case-sensitive regex; word-like ends get word boundaries ("Wait" not in "Waiting")."""
    parts = [(r"(?<!\w)" if m[:1].isalnum() else "") + re.escape(m) + (r"(?!\w)" if m[-1:].isalnum() else "")
             for m in markers if m]
    return re.compile("|".join(parts)) if parts else None


def self_correction_context(preceding_text: str, top_tokens: list[str], markers: list[str],
                            window: int) -> bool:
    """Seed 001: a self-correction context has a marker ("Wait", "Let me check", ...) in the last
    `window` characters before the position, or a marker as either model's top token there."""
    regex = _marker_regex(markers)
    if regex is None:
        return False
    if window > 0 and regex.search(preceding_text[-window:]):
        return True
    return any(regex.fullmatch(t.strip()) for t in top_tokens if t.strip())


def lock_subcategory(base_class: np.ndarray, trained_class: np.ndarray, same_top: np.ndarray,
                     self_correction: np.ndarray) -> np.ndarray:
    """STRICT_LOCK / SWAP / SELF_CORRECTION / LOOSENED for base locks, NONE elsewhere: [P] -> int8 [P]."""
    base_lock = np.asarray(base_class) == LOCK
    trained_lock = np.asarray(trained_class) == LOCK
    same_top, sc = np.asarray(same_top, bool), np.asarray(self_correction, bool)
    out = np.full(base_lock.shape, NONE, dtype=np.int8)
    out[base_lock & ~trained_lock] = LOOSENED
    out[base_lock & trained_lock & same_top] = STRICT_LOCK
    out[base_lock & trained_lock & ~same_top] = SWAP
    out[base_lock & sc] = SELF_CORRECTION  # precedence: the seed's "Wait" lock is no true lock
    return out


def fork_subcategory(base_class: np.ndarray, trained_class: np.ndarray) -> np.ndarray:
    """PRESERVED / COLLAPSED / DIFFUSED for base forks by the trained class, NONE elsewhere."""
    base_class, trained_class = np.asarray(base_class), np.asarray(trained_class)
    code = np.array([COLLAPSED, PRESERVED, DIFFUSED], dtype=np.int8)[trained_class.astype(np.int64)]
    return np.where(base_class == FORK, code, NONE).astype(np.int8)


__all__ = ["Thresholds", "DistributionStats", "apply_temperature", "truncated_logprobs", "distribution_stats",
           "classify", "classify_stats", "self_correction_context", "lock_subcategory", "fork_subcategory",
           "LOCK", "FORK", "DIFFUSE", "CLASSES", "STRICT_LOCK", "SWAP", "SELF_CORRECTION", "LOOSENED",
           "LOCK_SUBCATEGORIES", "PRESERVED", "COLLAPSED", "DIFFUSED", "FORK_SUBCATEGORIES", "NONE",
           "RANK_TABLE_SIZE"]
