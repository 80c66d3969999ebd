"""Supervision masks and per-token weights for a batch of rollouts (DESIGN.md stage 6).

Every kind keeps one contiguous span [start_token, release_token) of each response and, with
`rescale=True`, multiplies it by scale = T / kept so that every rollout keeps its loss mass
(seed 002 sec. 3: "rescale the retained prefix to preserve the per-sample loss mass").

Kinds:
  full                  every token.
  first_fraction        t < round(f T)              (seed 000 exp. 4; alias first_half: f = 0.5)
  last_fraction         t >= round((1 - f) T)       (seed 000 exp. 4; alias last_half: f = 0.5)
                        first_fraction(f) and last_fraction(1 - f) partition the response.
  fixed_prefix          t < prefix_tokens           (seed 002 sec. 4.1, fixed-prefix OPD / FastOPD)
  release               the release rule of seed 002 (teacher top-2 margin in the student's top-k,
                        sentence segments, BIC downward change point), see `release.py`.
  random_release        seed 002 sec. 4.3: the release rule's batch of release points, permuted
                        across rollouts (seeded): rollout i keeps its first min(r_pi(i), T_i)
                        tokens (>= 1), r_j the release token of rollout j ("randomly permutes these
                        release points across samples"). `random_release_by = "fraction"` moves a
                        release point as a fraction of its rollout's length instead (round(f T_i)).

`rescale = None` (the spec's default) resolves per kind (`default_rescale`): on for seed 002's
fixed_prefix and release kinds, off for full and seed 000's windows.
  std_release           seed 002 sec. 4.4, the "sigma_A release" variant: the same BIC downward
                        change point, on chunk scores log1p(std of the sampled-token advantage
                        A_t in the chunk) instead of margins. Chunks are the sentence segments,
                        with segments shorter than `min_chunk_tokens` merged into the one before,
                        because the std of one or two tokens is mostly noise (a design choice: the
                        seed does not say how it chunks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from hpcdistill.distill.release import (
    aggregate_segment_scores,
    bic_downward_change_point,
    teacher_top2_margin_from_logprobs,
)

MASK_KINDS = (
    "full",
    "first_fraction",
    "last_fraction",
    "first_half",
    "last_half",
    "fixed_prefix",
    "release",
    "random_release",
    "std_release",
)


@dataclass(frozen=True)
class MaskResult:
    """Mask of one rollout of length T.

    weights: [T] float, 0 outside the kept span, `scale` inside; keep: [T] bool;
    the kept span is [start_token, release_token). accepted / bic_improvement / release_segment are
    the change-point diagnostics of the release kinds (for random_release: those of the rollout
    whose release fraction was borrowed; release_segment = -1 there and for non-release kinds).
    """

    weights: np.ndarray
    keep: np.ndarray
    start_token: int
    release_token: int
    scale: float
    accepted: bool = False
    bic_improvement: float = 0.0
    release_segment: int = -1


def build_masks(
    kind: str,
    lengths: Sequence[int],
    *,
    fraction: float = 0.5,
    prefix_tokens: int = 1024,
    rescale: bool = True,
    teacher_lp_at_student_topk: Sequence[np.ndarray] | None = None,
    segments: Sequence[Sequence[Sequence[int]]] | None = None,
    advantages: Sequence[np.ndarray] | None = None,
    support_k: int | None = None,
    min_chunk_tokens: int = 4,
    seed: int = 0,
    random_release_by: str = "position",
) -> list[MaskResult]:
    """Masks for a batch of rollouts with response lengths `lengths` ([B]).

    release / random_release need `teacher_lp_at_student_topk` ([T_i, k] per rollout; the first
    `support_k` columns are used, default all) and `segments`; std_release needs `advantages`
    ([T_i] sampled-token A_t = teacher_lp - student_lp) and `segments`. Segments must be contiguous
    spans covering 0..T_i-1 in order (as `segments.sentence_segments` returns).
    """
    if kind == "first_half":
        kind, fraction = "first_fraction", 0.5
    elif kind == "last_half":
        kind, fraction = "last_fraction", 0.5
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; allowed: {', '.join(MASK_KINDS)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    lengths = [int(t) for t in lengths]

    if kind == "full":
        return [_span_mask(t, 0, t, rescale) for t in lengths]
    if kind == "first_fraction":
        return [_span_mask(t, 0, _round(fraction * t), rescale) for t in lengths]
    if kind == "last_fraction":
        return [_span_mask(t, _round((1.0 - fraction) * t), t, rescale) for t in lengths]
    if kind == "fixed_prefix":
        return [_span_mask(t, 0, min(prefix_tokens, t), rescale) for t in lengths]

    segments = _require(segments, "segments", kind, len(lengths))
    if kind == "std_release":
        advantages = _require(advantages, "advantages", kind, len(lengths))
        return [
            _std_release(t, np.asarray(a, dtype=np.float64), segs, min_chunk_tokens, rescale)
            for t, a, segs in zip(lengths, advantages, segments, strict=True)
        ]

    teacher_lp_at_student_topk = _require(teacher_lp_at_student_topk, "teacher_lp_at_student_topk", kind, len(lengths))
    own = [
        _margin_release(t, lp, segs, support_k, rescale)
        for t, lp, segs in zip(lengths, teacher_lp_at_student_topk, segments, strict=True)
    ]
    if kind == "release":
        return own
    # random_release: rollout i takes the release point of rollout perm[i] (seed 002 sec. 4.3).
    perm = np.random.default_rng(seed).permutation(len(lengths))
    result = []
    for t, donor_index in zip(lengths, perm):
        donor, donor_length = own[donor_index], lengths[donor_index]
        if random_release_by == "position":
            stop = min(t, max(1, donor.release_token))
        else:
            kept_fraction = donor.release_token / donor_length if donor_length else 1.0
            stop = min(t, max(1, _round(kept_fraction * t)))
        mask = _span_mask(t, 0, stop, rescale)
        result.append(_with_diagnostics(mask, donor.accepted, donor.bic_improvement, -1))
    return result


def _round(x: float) -> int:
    """Round half up (Python's round() rounds half to even, which would make halves uneven)."""
    return int(math.floor(x + 0.5))


def _span_mask(length: int, start: int, stop: int, rescale: bool) -> MaskResult:
    keep = np.zeros(length, dtype=bool)
    keep[start:stop] = True
    kept = int(keep.sum())
    scale = length / kept if (rescale and kept) else 1.0
    return MaskResult(weights=keep * scale, keep=keep, start_token=start, release_token=max(start, stop), scale=scale)


def _with_diagnostics(mask: MaskResult, accepted: bool, bic_improvement: float, release_segment: int) -> MaskResult:
    return MaskResult(
        weights=mask.weights,
        keep=mask.keep,
        start_token=mask.start_token,
        release_token=mask.release_token,
        scale=mask.scale,
        accepted=accepted,
        bic_improvement=bic_improvement,
        release_segment=release_segment,
    )


def _require(value, name: str, kind: str, batch: int):
    if value is None:
        raise ValueError(f"mask kind {kind!r} needs {name}")
    if len(value) != batch:
        raise ValueError(f"{name} has {len(value)} rollouts, lengths has {batch}")
    return value


def _check_segments(segments: Sequence[Sequence[int]], length: int) -> list[int]:
    """Token count per segment; segments must be contiguous non-empty spans covering 0..length-1."""
    sizes, expected = [], 0
    for segment in segments:
        if not segment or list(segment) != list(range(expected, expected + len(segment))):
            raise ValueError(f"segments must be non-empty contiguous spans covering 0..{length - 1} in order")
        expected += len(segment)
        sizes.append(len(segment))
    if expected != length:
        raise ValueError(f"segments cover {expected} tokens, the response has {length}")
    return sizes


def _release_from_scores(length, sizes, scores, rescale) -> MaskResult:
    release_segment, accepted, bic_improvement = bic_downward_change_point(scores)
    stop = sum(sizes[:release_segment]) if accepted else length
    mask = _span_mask(length, 0, stop, rescale)
    return _with_diagnostics(mask, accepted, bic_improvement, release_segment)


def _margin_release(length, teacher_lp, segments, support_k, rescale) -> MaskResult:
    """Seed 002 release rule on one rollout; teacher_lp: [T, k] at the student's top-k ids."""
    sizes = _check_segments(segments, length)
    teacher_lp = np.asarray(teacher_lp, dtype=np.float64)
    if teacher_lp.shape[0] != length:
        raise ValueError(f"teacher_lp_at_student_topk has {teacher_lp.shape[0]} rows, the response has {length}")
    if length == 0:
        return _span_mask(0, 0, 0, rescale)
    margins = teacher_top2_margin_from_logprobs(teacher_lp, support_k).tolist()
    return _release_from_scores(length, sizes, aggregate_segment_scores(margins, segments), rescale)


def _std_release(length, advantages, segments, min_chunk_tokens, rescale) -> MaskResult:
    """Change point on log1p(chunk std of A_t); chunks = segments merged up to min_chunk_tokens."""
    sizes = _check_segments(segments, length)
    if advantages.shape != (length,):
        raise ValueError(f"advantages has shape {advantages.shape}, the response has {length} tokens")
    chunk_sizes: list[int] = []
    for size in sizes:
        if chunk_sizes and chunk_sizes[-1] < min_chunk_tokens:
            chunk_sizes[-1] += size  # a short chunk absorbs the next segment
        else:
            chunk_sizes.append(size)
    if len(chunk_sizes) > 1 and chunk_sizes[-1] < min_chunk_tokens:
        chunk_sizes[-2] += chunk_sizes.pop()  # a short tail joins the chunk before it
    bounds = np.cumsum([0, *chunk_sizes])
    scores = [math.log1p(float(np.std(advantages[a:b]))) for a, b in zip(bounds[:-1], bounds[1:])]
    return _release_from_scores(length, chunk_sizes, scores, rescale)


# the kinds that read segments, teacher margins and advantages
SCORED_KINDS = ("release", "random_release", "std_release")
# the kinds whose kept span is rescaled to the rollout's loss mass when `mask.rescale` is unset:
# seed 002's (sec. 3; its fixed-prefix baseline keeps "the standard OPD objective" on the prefix
# with the same per-sample mass); seed 000's windows and full are not rescaled (experiment 4)
RESCALED_KINDS = ("fixed_prefix", "release", "random_release", "std_release")


def default_rescale(kind: str, rescale: bool | None) -> bool:
    """`mask.rescale` resolved: the spec's value, or the kind's seed default when None."""
    return kind in RESCALED_KINDS if rescale is None else bool(rescale)


def spec_masks(mask, top_k: int, seed: int, step: int, lengths: Sequence[int], *, segments=None,
               teacher_lp_at_student_topk=None, advantages=None) -> list[np.ndarray]:
    """Each rollout's weights [T_i] under a spec's `[mask]` (`mask`: a MaskSpec) at step `step`
    of run seed `seed`: what training uses (`train.update.supervision_masks`) and replay rebuilds."""
    results = build_masks(mask.kind, lengths, fraction=mask.fraction, prefix_tokens=mask.prefix_tokens,
                          rescale=default_rescale(mask.kind, mask.rescale),
                          teacher_lp_at_student_topk=teacher_lp_at_student_topk,
                          segments=segments, advantages=advantages, support_k=mask.support_k or top_k,
                          seed=seed * 100_003 + step, random_release_by=mask.random_release_by)
    return [r.weights for r in results]
