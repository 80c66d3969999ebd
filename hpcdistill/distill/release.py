"""The release rule of seed 002 ("Prefix Teach, Suffix Fade"), section 3 and appendix A.11.

Per rollout: the teacher's top-1/top-2 log-margin inside the student's top-K candidates
(`teacher_top2_margin`), averaged over sentence segments and log1p-ed (`aggregate_segment_scores`),
then one downward change point chosen by profiled RSS-BIC (`bic_downward_change_point`); the kept
prefix is rescaled to preserve the per-sample loss mass (`dynamic_prefix_reweight`).

Every public function returns what the appendix A.11 reference returns, on every input. The only
difference is speed: the reference scans all change points with two-pass means and RSS, O(n^2) in
the number of segments n; `bic_downward_change_point` here is O(n) (see its docstring for how it
stays decision-for-decision identical to the reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

EPS = 1e-12  # seed 002 A.11: floor of teacher probabilities and RSS offset inside the log
_U = 2.0**-53  # unit roundoff of float64
# Up to this many segments the reference scan itself (at most ~n^2/2 = 128 additions) is faster
# than setting up the bounds below; it is a constant, so the change point stays linear time.
_DIRECT_SCAN_MAX = 16


@dataclass(frozen=True)
class DynamicPrefixResult:
    """Output of `dynamic_prefix_reweight`; the fields of seed 002 A.11 `DynamicPrefixResult`."""

    release_segment: int
    bic_improvement: float
    accepted: bool
    prefix_mask: list[float]
    scale: float
    reweighted_advantages: list[float]


def teacher_top2_margin(teacher_probs_on_student_topk, student_topk: int) -> list[float]:
    """M_t = log p_T(a(1)) - log p_T(a(2)) inside the student's top-K support (seed 002 sec. 3).

    teacher_probs_on_student_topk: [T, >=K] teacher probabilities at the student's top-K ids
    (nested sequences or a numpy array); only the first `student_topk` columns are used. The top
    two are ranked by the teacher, not by the sampled token. Returns [T] margins, as A.11 does.
    """
    margins: list[float] = []
    for probs_t in teacher_probs_on_student_topk:
        probs = [max(float(p), EPS) for p in probs_t[:student_topk]]
        if len(probs) < 2:
            raise ValueError("student_topk must expose at least two teacher probabilities.")
        log_probs = sorted((math.log(p) for p in probs), reverse=True)
        margins.append(log_probs[0] - log_probs[1])
    return margins


def teacher_top2_margin_from_logprobs(
    teacher_lp_at_student_topk: np.ndarray, student_topk: int | None = None
) -> np.ndarray:
    """Vectorised `teacher_top2_margin` from teacher log-probabilities (what scoring records).

    teacher_lp_at_student_topk: [T, k] teacher log-probs at the student's top-k ids.
    Returns [T] margins; equals `teacher_top2_margin(np.exp(lp), student_topk)` up to the rounding
    of exp/log (the probability floor EPS becomes a log-prob floor log(EPS)).
    """
    lp = np.asarray(teacher_lp_at_student_topk, dtype=np.float64)
    if lp.ndim != 2:
        raise ValueError(f"expected [T, k] teacher log-probs, got shape {lp.shape}")
    if student_topk is not None:
        lp = lp[:, :student_topk]
    if lp.shape[1] < 2:
        raise ValueError("student_topk must expose at least two teacher probabilities.")
    lp = np.maximum(lp, math.log(EPS))
    top2 = -np.partition(-lp, 1, axis=1)[:, :2]  # [T, 2]: largest, second largest
    return top2[:, 0] - top2[:, 1]


def aggregate_segment_scores(margins: Sequence[float], segments: Sequence[Sequence[int]]) -> list[float]:
    """S_i = log1p(mean_{t in G_i} M_t) per non-empty sentence segment G_i (seed 002 sec. 3).

    Empty segments are skipped, as in A.11 (so scores may be shorter than segments).
    """
    scores: list[float] = []
    for segment in segments:
        idx = list(segment)
        if not idx:
            continue
        mean_margin = sum(margins[t] for t in idx) / len(idx)
        scores.append(math.log1p(mean_margin))
    return scores


def profiled_bic(values: Sequence[float], num_params: int) -> float:
    """Profiled RSS-BIC n log((RSS + eps) / n) + k log n (seed 002 sec. 3; k0 = 1, k1 = 3)."""
    n = len(values)
    if n == 0:
        raise ValueError("BIC requires at least one value.")
    mean = sum(values) / n
    rss = sum((v - mean) ** 2 for v in values)
    return n * math.log((rss + EPS) / n) + num_params * math.log(n)


def _reference_candidate(scores: Sequence[float], tau: int) -> tuple[bool, float]:
    """The reference's arithmetic for one change point tau, operation for operation (A.11).

    Returns (is a downward candidate, its BIC). O(n); only called for the few undecided taus.
    """
    n = len(scores)
    left = scores[:tau]
    right = scores[tau:]
    mean_left = sum(left) / len(left)
    mean_right = sum(right) / len(right)
    if mean_right >= mean_left:
        return False, math.inf
    rss_left = sum((v - mean_left) ** 2 for v in left)
    rss_right = sum((v - mean_right) ** 2 for v in right)
    rss = rss_left + rss_right
    return True, n * math.log((rss + EPS) / n) + 3 * math.log(n)


def _exact_integers(values: Sequence[float]) -> tuple[list[int], int]:
    """Finite floats -> integers a_i and one exponent e with values[i] == a_i * 2**-e exactly."""
    ratios = [float(v).as_integer_ratio() for v in values]  # denominators are powers of two
    e = max(q.bit_length() - 1 for _, q in ratios)
    return [p << (e - (q.bit_length() - 1)) for p, q in ratios], e


def _div_to_float(num: int, den: int, shift: int) -> float:
    """num / (den * 2**shift) correctly rounded, for big integers and any sign of shift."""
    if shift >= 0:
        return num / (den << shift)
    return (num << -shift) / den


def bic_downward_change_point(scores: Sequence[float]) -> tuple[int, bool, float]:
    """Best downward one-drop change point by profiled RSS-BIC (seed 002 sec. 3, A.11).

    scores: [n] segment scores S_i. Returns (release_segment, accepted, bic_improvement) exactly as
    the A.11 reference: release_segment is the number of leading segments kept (n when nothing is
    accepted), accepted iff some downward split has BIC strictly below the no-change BIC, and
    bic_improvement = max(0, BIC0 - BIC1(best)).

    Linear time, same answers. The reference computes each split's means and RSS in floating point,
    so its decisions (`mean_right >= mean_left`, `bic1 < best`) are those of rounded numbers. Here:
      1. The scores are turned into exact integers (a float is an integer times a power of two) and
         prefix sums of values and squares are kept as Python ints: every split's true mean
         difference and true RSS follow exactly in O(1) each, with no cancellation.
      2. For each split a rigorous bound on how far the reference's rounded mean difference and
         rounded BIC can be from the true ones (Higham's summation bounds, times a safety factor)
         sorts it into "surely downward", "surely not", or "undecided", and gives an interval for
         its reference BIC.
      3. Only splits whose interval can reach the best value are recomputed with the reference's
         own arithmetic (`_reference_candidate`), and the reference's rule (first strict minimum,
         strictly below BIC0) is applied to them in order. These are the exact and near ties, a
         handful in practice; all-equal inputs have none, because no split can beat BIC0 there.
    Up to 16 segments, and for non-finite or huge (|S| > 1e100) scores, the reference scan runs
    as is. Near-constant inputs whose rounding noise exceeds EPS (|S| in the thousands and up)
    stay exact but may recompute many splits.
    """
    n = len(scores)
    if n < 2:
        return n, False, 0.0
    scores = [float(v) for v in scores]
    bic0 = profiled_bic(scores, num_params=1)
    biggest = max(abs(v) for v in scores)
    if n <= _DIRECT_SCAN_MAX or not math.isfinite(biggest) or biggest > 1e100 or not math.isfinite(bic0):
        return _reference_scan(scores, bic0)

    a, e = _exact_integers(scores)
    s1 = s2 = 0
    prefix1, prefix2 = [0], [0]
    for ai in a:
        s1 += ai
        s2 += ai * ai
        prefix1.append(s1)
        prefix2.append(s2)

    # Error bounds of the reference's arithmetic (gamma_k = k u / (1 - k u), Higham 2002 ch. 3-4).
    # A sequential sum of k terms is off by <= gamma_{k-1} sum|v|, so each reference mean is within
    # `mean_err` of the true mean; a factor 2 covers the bounds' own rounding.
    gamma = (n + 4) * _U / (1 - (n + 4) * _U)
    mean_err = 2.0 * (gamma + 2 * _U) * biggest
    log_n = math.log(n)
    penalty = 3 * log_n

    surely: list[tuple[int, float, float]] = []  # (tau, lower, upper) bounds of the reference BIC
    undecided: list[tuple[int, float, float]] = []
    shift = n * mean_err * mean_err  # >= k * (reference mean - true mean)^2 on either side
    relax_low, relax_high = (1 - 8 * _U) / n, (1 + 8 * _U) / n
    for tau in range(1, n):
        k_left, k_right = tau, n - tau
        left1, left2 = prefix1[tau], prefix2[tau]
        right1, right2 = s1 - left1, s2 - left2
        # True mean_left - mean_right (exact sign; float value correctly rounded).
        den = k_left * k_right
        diff = _div_to_float(left1 * k_right - right1 * k_left, den, e)
        if diff < -2 * mean_err:  # surely mean_right > mean_left in the reference too: skipped
            continue
        # True RSS of the one-drop model: k_r * (k_l * RSS_l) + k_l * (k_r * RSS_r), over k_l k_r 4^e.
        rss = _div_to_float(
            k_right * (k_left * left2 - left1 * left1) + k_left * (k_right * right2 - right1 * right1), den, 2 * e
        )
        # Reference RSS of a side = (true RSS + k * dmean^2) * (1 +- gamma_{k+3}) (two-pass formula);
        # 4 u rss covers our own rounding.
        rss_err = gamma * (rss + shift) + shift + 4 * _U * rss
        # Interval of the reference's BIC: monotone in RSS, plus the rounding of /, log, *, +.
        log_low = math.log((max(rss - rss_err, 0.0) + EPS) * relax_low)
        log_high = math.log((rss + rss_err + EPS) * relax_high)
        slop = 32 * _U * (n * max(-log_low, log_high, log_low) + penalty)
        entry = (tau, n * log_low + penalty - slop, n * log_high + penalty + slop)
        if diff > 2 * mean_err:
            surely.append(entry)
        else:
            undecided.append(entry)

    # Any split whose reference BIC surely exceeds `ceiling` cannot be the reference's choice.
    ceiling = min([bic0] + [upper for _, _, upper in surely])
    contenders = sorted(tau for tau, lower, _ in surely + undecided if lower <= ceiling)
    best_release_segment = n
    best_bic = bic0
    for tau in contenders:
        is_downward, bic1 = _reference_candidate(scores, tau)
        if is_downward and bic1 < best_bic:
            best_bic = bic1
            best_release_segment = tau
    accepted = best_release_segment < n
    return best_release_segment, accepted, max(0.0, bic0 - best_bic)


def _reference_scan(scores: list[float], bic0: float) -> tuple[int, bool, float]:
    """The A.11 scan itself (quadratic): for short inputs and degenerate (non-finite, huge) scores."""
    n = len(scores)
    best_release_segment, best_bic = n, bic0
    for tau in range(1, n):
        is_downward, bic1 = _reference_candidate(scores, tau)
        if is_downward and bic1 < best_bic:
            best_bic, best_release_segment = bic1, tau
    return best_release_segment, best_release_segment < n, max(0.0, bic0 - best_bic)


def dynamic_prefix_reweight(
    advantages: Sequence[float],
    loss_mask: Sequence[float],
    teacher_probs_on_student_topk,
    segments: Sequence[Sequence[int]],
    *,
    student_topk: int,
    eps: float = 1e-8,
) -> DynamicPrefixResult:
    """Release rule + mass-preserving reweighting of one rollout (seed 002 sec. 3, A.11).

    advantages, loss_mask: [T]; teacher_probs_on_student_topk: [T, >=K]; segments: token positions
    per sentence segment, in response order. Keeps the tokens of the first `release_segment`
    segments when a change point is accepted (else all), and scales them by
    scale = sum(loss_mask) / max(kept mass, eps).

    Note (kept from A.11): `release_segment` counts non-empty segments (empty ones get no score),
    but the kept tokens are taken from `segments[:release_segment]`; pass segments without empty
    entries (as `segments.sentence_segments` produces) so the two agree.
    """
    if len(advantages) != len(loss_mask):
        raise ValueError("advantages and loss_mask must have the same response length.")
    margins = teacher_top2_margin(teacher_probs_on_student_topk, student_topk)
    segment_scores = aggregate_segment_scores(margins, segments)
    release_segment, accepted, bic_improvement = bic_downward_change_point(segment_scores)

    response_len = len(advantages)
    prefix_mask = [0.0] * response_len
    kept_token_ids = _flatten(segments[:release_segment]) if accepted else range(response_len)
    for t in kept_token_ids:
        if 0 <= t < response_len:
            prefix_mask[t] = 1.0
    total_mass = sum(float(x) for x in loss_mask)
    kept_mass = sum(float(m) * q for m, q in zip(loss_mask, prefix_mask, strict=True))
    scale = total_mass / max(kept_mass, eps)
    reweighted_advantages = [float(a) * q * scale for a, q in zip(advantages, prefix_mask, strict=True)]
    return DynamicPrefixResult(
        release_segment=release_segment,
        bic_improvement=bic_improvement,
        accepted=accepted,
        prefix_mask=prefix_mask,
        scale=scale,
        reweighted_advantages=reweighted_advantages,
    )


def _flatten(segments: Iterable[Iterable[int]]) -> list[int]:
    return [t for segment in segments for t in segment]
