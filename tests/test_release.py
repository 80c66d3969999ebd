"""The release rule against a verbatim copy of seed 002 appendix A.11 (the reference).

The reference below is the appendix code, re-indented (the seed text lost its indentation) and
with its names prefixed `ref_`; nothing else changed.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pytest

from hpcdistill.distill import release

# ----------------------------------------------------------------------------------------------
# Reference: seed 002, appendix A.11 (verbatim apart from indentation and the `ref_` prefix).
# ----------------------------------------------------------------------------------------------
EPS = 1e-12


@dataclass(frozen=True)
class RefDynamicPrefixResult:
    """Output of the reference dynamic-prefix rule."""

    release_segment: int
    bic_improvement: float
    accepted: bool
    prefix_mask: list[float]
    scale: float
    reweighted_advantages: list[float]


def ref_teacher_top2_margin(teacher_probs_on_student_topk: Sequence[Sequence[float]], student_topk: int) -> list[float]:
    margins: list[float] = []
    for probs_t in teacher_probs_on_student_topk:
        probs = [max(float(p), EPS) for p in probs_t[:student_topk]]
        if len(probs) < 2:
            raise ValueError("student_topk must expose at least two teacher probabilities.")
        log_probs = sorted((math.log(p) for p in probs), reverse=True)
        margins.append(log_probs[0] - log_probs[1])
    return margins


def ref_aggregate_segment_scores(margins: Sequence[float], segments: Sequence[Sequence[int]]) -> list[float]:
    scores: list[float] = []
    for segment in segments:
        idx = list(segment)
        if not idx:
            continue
        mean_margin = sum(margins[t] for t in idx) / len(idx)
        scores.append(math.log1p(mean_margin))
    return scores


def ref_profiled_bic(values: Sequence[float], num_params: int) -> float:
    n = len(values)
    if n == 0:
        raise ValueError("BIC requires at least one value.")
    mean = sum(values) / n
    rss = sum((v - mean) ** 2 for v in values)
    return n * math.log((rss + EPS) / n) + num_params * math.log(n)


def ref_bic_downward_change_point(scores: Sequence[float]) -> tuple[int, bool, float]:
    n = len(scores)
    if n < 2:
        return n, False, 0.0
    bic0 = ref_profiled_bic(scores, num_params=1)
    best_release_segment = n
    best_bic = bic0
    for tau in range(1, n):
        left = scores[:tau]
        right = scores[tau:]
        mean_left = sum(left) / len(left)
        mean_right = sum(right) / len(right)
        if mean_right >= mean_left:
            continue
        rss_left = sum((v - mean_left) ** 2 for v in left)
        rss_right = sum((v - mean_right) ** 2 for v in right)
        rss = rss_left + rss_right
        bic1 = n * math.log((rss + EPS) / n) + 3 * math.log(n)
        if bic1 < best_bic:
            best_bic = bic1
            best_release_segment = tau
    accepted = best_release_segment < n
    return best_release_segment, accepted, max(0.0, bic0 - best_bic)


def ref_dynamic_prefix_reweight(
    advantages: Sequence[float],
    loss_mask: Sequence[float],
    teacher_probs_on_student_topk: Sequence[Sequence[float]],
    segments: Sequence[Sequence[int]],
    *,
    student_topk: int,
    eps: float = 1e-8,
) -> RefDynamicPrefixResult:
    if len(advantages) != len(loss_mask):
        raise ValueError("advantages and loss_mask must have the same response length.")
    margins = ref_teacher_top2_margin(teacher_probs_on_student_topk, student_topk)
    segment_scores = ref_aggregate_segment_scores(margins, segments)
    release_segment, accepted, bic_improvement = ref_bic_downward_change_point(segment_scores)
    response_len = len(advantages)
    prefix_mask = [0.0] * response_len
    if accepted:
        kept_token_ids = ref_flatten(segments[:release_segment])
    else:
        kept_token_ids = range(response_len)
    for t in kept_token_ids:
        if 0 <= t < response_len:
            prefix_mask[t] = 1.0
    total_mass = sum(float(x) for x in loss_mask)
    kept_mass = sum(float(l) * q for l, q in zip(loss_mask, prefix_mask, strict=True))  # noqa: E741
    scale = total_mass / max(kept_mass, eps)
    reweighted_advantages = [float(a) * q * scale for a, q in zip(advantages, prefix_mask, strict=True)]
    return RefDynamicPrefixResult(
        release_segment=release_segment,
        bic_improvement=bic_improvement,
        accepted=accepted,
        prefix_mask=prefix_mask,
        scale=scale,
        reweighted_advantages=reweighted_advantages,
    )


def ref_flatten(segments: Iterable[Iterable[int]]) -> list[int]:
    return [t for segment in segments for t in segment]


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def _random_scores(rng: random.Random) -> list[float]:
    """One random score sequence from a family chosen to stress the reference's decisions."""
    n = rng.choice([0, 1, 2, 2, 3, 4, 5, 8, 13, 20, 40, 80, 150])
    kind = rng.choice(
        ["gauss", "step", "ints", "binary", "constant", "near_constant", "tiny", "periodic", "margins", "mixed"]
    )
    if kind == "gauss":
        return [rng.gauss(0.0, rng.choice([1e-9, 1e-3, 1.0, 100.0])) for _ in range(n)]
    if kind == "step":
        tau = rng.randint(0, n)
        hi, lo = rng.uniform(0, 3), rng.uniform(0, 3)
        noise = rng.choice([0.0, 1e-12, 1e-3, 0.3])
        return [(hi if i < tau else lo) + rng.gauss(0, noise) for i in range(n)]
    if kind == "ints":  # integer-valued with many ties
        return [float(rng.randint(0, rng.choice([1, 2, 3, 5]))) for _ in range(n)]
    if kind == "binary":
        return [rng.choice([0.1, 0.7]) for _ in range(n)]
    if kind == "constant":
        return [rng.choice([0.0, 0.1, 1.0 / 3.0, 2.5, 1e6])] * n
    if kind == "near_constant":
        c = rng.choice([0.1, 1.0 / 3.0, 2.5])
        return [c + rng.choice([0.0, 1e-16, -1e-16, 1e-13]) for _ in range(n)]
    if kind == "tiny":
        return [rng.choice([0.0, 5e-324, 1e-300, 1e-200]) for _ in range(n)]
    if kind == "periodic":
        pattern = [rng.randint(0, 3) / 2.0 for _ in range(rng.randint(1, 4))]
        return [pattern[i % len(pattern)] for i in range(n)]
    if kind == "margins":  # what the rule sees: log1p of segment-mean top-2 margins
        return [math.log1p(rng.expovariate(1.0) * (2.0 if i < n // 2 else 0.5)) for i in range(n)]
    values = [rng.uniform(-2, 2) for _ in range(n)]  # mixed: shuffled copies and repeats
    if n:
        for _ in range(n // 2):
            values[rng.randrange(n)] = values[rng.randrange(n)]
    return values


def _assert_same_change_point(scores: list[float]) -> None:
    expected = ref_bic_downward_change_point(scores)
    got = release.bic_downward_change_point(scores)
    assert got[0] == expected[0], (scores, got, expected)
    assert got[1] == expected[1], (scores, got, expected)
    assert got[2] == pytest.approx(expected[2], rel=1e-9, abs=0.0), (scores, got, expected)


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


def test_release_rule_matches_reference_on_random_inputs():
    rng = random.Random(20260501)
    for _ in range(3000):
        _assert_same_change_point(_random_scores(rng))


def test_linear_scan_matches_reference_on_short_inputs(monkeypatch):
    # Short inputs normally take the direct scan; force the bounded linear scan down to n = 2.
    monkeypatch.setattr(release, "_DIRECT_SCAN_MAX", 1)
    rng = random.Random(99)
    for _ in range(2000):
        _assert_same_change_point(_random_scores(rng))


@pytest.mark.parametrize(
    "scores",
    [
        [],
        [1.0],
        [1.0, 0.0],
        [0.0, 1.0],
        [0.5, 0.5],
        [0.1] * 7,
        [1.0 / 3.0] * 50,
        [2.0, 2.0, 2.0, 1.0, 1.0, 1.0],
        [3.0, 1.0, 3.0, 1.0, 3.0, 1.0, 3.0, 1.0],
        [2.0, 0.0, 0.0, 2.0, 0.0, 0.0],  # ties between change points
        [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0],
        [5e-324, 0.0, 5e-324, 0.0],
        [1e6 + 0.1] * 30 + [1e6] * 30,
    ],
)
def test_release_rule_matches_reference_on_edge_cases(scores):
    _assert_same_change_point(scores)


def test_release_rule_matches_reference_on_integer_scores_with_many_ties():
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(2, 60)
        levels = rng.choice([[0.0, 1.0], [0.0, 1.0, 2.0], [1.0, 2.0, 4.0, 8.0]])
        _assert_same_change_point([rng.choice(levels) for _ in range(n)])


def test_release_rule_matches_reference_on_long_sequences():
    rng = random.Random(11)
    for n in (1000, 2500):
        drop = [math.log1p(rng.expovariate(1.0) * (3.0 if i < n // 3 else 1.0)) for i in range(n)]
        _assert_same_change_point(drop)
        _assert_same_change_point([float(rng.randint(0, 2)) for _ in range(n)])
        _assert_same_change_point([0.1] * n)


def test_release_rule_is_linear_time_on_long_sequences():
    # 20,000 segments: the reference would need minutes; the linear scan takes well under a second.
    rng = random.Random(3)
    scores = [math.log1p(rng.expovariate(1.0) * (2.0 if i < 5000 else 1.0)) for i in range(20_000)]
    start = time.perf_counter()
    release_segment, accepted, _ = release.bic_downward_change_point(scores)
    assert time.perf_counter() - start < 3.0
    assert accepted and 3000 < release_segment < 7000


def test_change_point_is_found_at_a_clear_drop():
    scores = [2.0, 2.1, 1.9, 2.0, 0.3, 0.2, 0.4, 0.3]
    release_segment, accepted, bic_improvement = release.bic_downward_change_point(scores)
    assert (release_segment, accepted) == (4, True)
    assert bic_improvement > 10.0


def test_upward_change_is_never_released():
    assert release.bic_downward_change_point([0.2, 0.3, 0.2, 2.0, 2.1, 2.0]) == (6, False, 0.0)


def test_teacher_top2_margin_matches_reference_and_logprob_version():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 8)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probs[0, :] = 0.0  # both floored at EPS: margin 0
    probs[1, 2] = probs[1, 5] = 0.4  # a tie at the top: margin 0
    for k in (2, 5, 8):
        expected = ref_teacher_top2_margin(probs.tolist(), k)
        assert release.teacher_top2_margin(probs, k) == expected
        from_lp = release.teacher_top2_margin_from_logprobs(np.log(np.maximum(probs, 1e-300)), k)
        np.testing.assert_allclose(from_lp, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        release.teacher_top2_margin(probs, 1)


def test_aggregate_segment_scores_skips_empty_segments():
    margins = [1.0, 3.0, 0.0, 2.0]
    got = release.aggregate_segment_scores(margins, [[0, 1], [], [2], [3]])
    assert got == [math.log1p(2.0), math.log1p(0.0), math.log1p(2.0)]
    assert got == ref_aggregate_segment_scores(margins, [[0, 1], [], [2], [3]])


def test_profiled_bic_matches_reference():
    values = [0.3, 1.2, 0.7, 0.7, 2.0]
    assert release.profiled_bic(values, 1) == ref_profiled_bic(values, 1)
    assert release.profiled_bic(values, 3) == ref_profiled_bic(values, 3)


def _random_rollout(rng: np.random.Generator):
    length = int(rng.integers(1, 120))
    k = int(rng.choice([2, 4, 8]))
    decay = np.where(np.arange(length) < rng.integers(0, length + 1), 3.0, rng.choice([0.2, 1.0, 3.0]))
    logits = rng.normal(size=(length, k)) * decay[:, None]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    cuts = sorted(set(rng.integers(1, length, size=int(rng.integers(0, 12))).tolist())) if length > 1 else []
    bounds = [0, *cuts, length]
    segments = [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
    advantages = rng.normal(size=length).tolist()
    loss_mask = (rng.random(length) < 0.9).astype(float).tolist()
    return advantages, loss_mask, probs.tolist(), segments, k


def test_dynamic_prefix_reweight_matches_reference_end_to_end():
    rng = np.random.default_rng(1234)
    accepted = 0
    for _ in range(400):
        advantages, loss_mask, probs, segments, k = _random_rollout(rng)
        student_topk = int(rng.integers(2, k + 1))
        expected = ref_dynamic_prefix_reweight(advantages, loss_mask, probs, segments, student_topk=student_topk)
        got = release.dynamic_prefix_reweight(advantages, loss_mask, probs, segments, student_topk=student_topk)
        assert got.release_segment == expected.release_segment
        assert got.accepted == expected.accepted
        assert got.bic_improvement == pytest.approx(expected.bic_improvement, rel=1e-9, abs=0.0)
        assert got.prefix_mask == expected.prefix_mask
        assert got.scale == expected.scale
        assert got.reweighted_advantages == expected.reweighted_advantages
        accepted += got.accepted
    assert 20 < accepted < 380  # both outcomes are exercised


def test_dynamic_prefix_reweight_preserves_loss_mass():
    probs = [[0.9, 0.05, 0.05]] * 4 + [[0.34, 0.33, 0.33]] * 4
    segments = [[0, 1], [2, 3], [4, 5], [6, 7]]
    result = release.dynamic_prefix_reweight([1.0] * 8, [1.0] * 8, probs, segments, student_topk=3)
    assert result.accepted and result.release_segment == 2
    assert result.prefix_mask == [1.0] * 4 + [0.0] * 4
    assert result.scale == 2.0
    assert sum(result.reweighted_advantages) == pytest.approx(8.0)
