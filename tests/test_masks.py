"""Supervision masks (hpcdistill.distill.masks) and sentence segments (hpcdistill.distill.segments)."""

from __future__ import annotations

import numpy as np
import pytest

from hpcdistill.distill import masks, release, segments

# --- segments ---


def _assert_partition(segs, length):
    assert [t for seg in segs for t in seg] == list(range(length))
    assert all(seg for seg in segs)


def test_sentence_segments_split_at_sentence_ends_and_newlines():
    tokens = ["The", " answer", " is", " 4", ".", " Next", " we", " check", "!", "\n\n", "x", " =", " 2", "\n", "done"]
    segs = segments.sentence_segments(tokens)
    assert segs == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13], [14]]


def test_sentence_segments_keep_whitespace_tokens_with_the_sentence_before():
    tokens = ["Hi", ".", " ", " ", "Yes", "."]
    assert segments.sentence_segments(tokens) == [[0, 1, 2, 3], [4, 5]]


def test_sentence_segments_cover_every_token_once_on_random_text():
    rng = np.random.default_rng(0)
    pieces = ["a", " b", ".", " C", "?", "\n", " ", "", "3.14", " Dr.", " e.g.", "!!", "é", "\t"]
    for _ in range(200):
        tokens = [pieces[i] for i in rng.integers(0, len(pieces), size=int(rng.integers(0, 60)))]
        segs = segments.sentence_segments(tokens)
        _assert_partition(segs, len(tokens))


def test_sentence_segments_of_empty_response_is_empty():
    assert segments.sentence_segments([]) == []


def test_segments_from_offsets_match_token_texts():
    tokens = ["One", " two", ".", " Three", " four", "."]
    text = "".join(tokens)
    starts = [0, 3, 7, 8, 14, 19]
    assert segments.segments_from_offsets(text, starts) == segments.sentence_segments(tokens)
    with pytest.raises(ValueError):
        segments.segments_from_offsets(text, [0, 5, 3])


NEWLINE_TOKENS = ["Step", " one", "\n", "x", " =", " 2", "\n\n", "Step", " two", ".", " Done", "."]


def test_segment_newlines_false_is_nltk_punkt_alone_and_lowers_the_bic_n():
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    with_newlines = segments.sentence_segments(NEWLINE_TOKENS)
    punkt_only = segments.sentence_segments(NEWLINE_TOKENS, newlines=False)
    assert with_newlines == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9], [10, 11]]
    assert punkt_only == [list(range(10)), [10, 11]]
    text = "".join(NEWLINE_TOKENS)  # pure Punkt never splits at a bare newline
    assert [s for s, _ in PunktSentenceTokenizer().span_tokenize(text)] == [0, text.index(" Done") + 1]
    # the BIC test runs on one score per segment: n = 4 with the newline breaks, 2 without
    margins = list(np.linspace(2.0, 0.1, len(NEWLINE_TOKENS)))
    assert len(release.aggregate_segment_scores(margins, with_newlines)) == 4
    assert len(release.aggregate_segment_scores(margins, punkt_only)) == 2


class _PieceTokenizer:
    """decode([id]) -> the id-th piece of NEWLINE_TOKENS (what segment_ids and the masks call)."""

    def decode(self, ids):
        return "".join(NEWLINE_TOKENS[int(i)] for i in ids)


def test_mask_segment_newlines_reaches_the_recorded_segments_and_the_release_masks(monkeypatch):
    from types import SimpleNamespace

    from hpcdistill.spec.load import validate
    from hpcdistill.train import recording, update

    ids = np.arange(len(NEWLINE_TOKENS))
    assert recording.segment_ids(_PieceTokenizer(), ids).tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3]
    assert recording.segment_ids(_PieceTokenizer(), ids, newlines=False).tolist() == [0] * 10 + [1, 1]
    seen = []

    def recording(pieces, newlines=True):
        seen.append(newlines)
        return segments.sentence_segments(pieces, newlines)

    monkeypatch.setattr(update, "sentence_segments", recording)
    n, k = len(ids), 4
    scores = SimpleNamespace(student_lp=np.zeros(n, np.float32), teacher_lp=np.zeros(n, np.float32),
                             teacher_at_student_topk_lp=np.log(np.full((n, k), 0.25, np.float32)))
    item = SimpleNamespace(scores=scores, student_seq=([], list(ids)))
    for value in (True, False):
        spec = validate({"experiment": {"name": "x"}, "scoring": {"top_k": k},
                         "mask": {"kind": "release", "segment_newlines": value}}, {}, "test")
        update.supervision_masks(spec, [item], _PieceTokenizer(), 0)
    assert seen == [True, False]


# --- simple kinds ---


@pytest.mark.parametrize("length", [0, 1, 7, 10])
def test_first_and_last_half_partition_the_response(length):
    first = masks.build_masks("first_half", [length])[0]
    last = masks.build_masks("last_half", [length])[0]
    assert not np.any(first.keep & last.keep)
    assert np.all(first.keep | last.keep)
    if length:
        assert first.weights.sum() == pytest.approx(length if first.keep.any() else 0)


def test_first_fraction_keeps_a_rescaled_prefix():
    result = masks.build_masks("first_fraction", [10], fraction=0.3)[0]
    assert result.keep.tolist() == [True] * 3 + [False] * 7
    assert (result.start_token, result.release_token) == (0, 3)
    np.testing.assert_allclose(result.weights, [10 / 3] * 3 + [0.0] * 7)
    plain = masks.build_masks("first_fraction", [10], fraction=0.3, rescale=False)[0]
    np.testing.assert_array_equal(plain.weights, [1.0] * 3 + [0.0] * 7)


def test_last_fraction_keeps_the_suffix():
    result = masks.build_masks("last_fraction", [10], fraction=0.3)[0]
    assert result.keep.tolist() == [False] * 7 + [True] * 3
    assert (result.start_token, result.release_token) == (7, 10)


def test_fixed_prefix_and_full():
    fixed = masks.build_masks("fixed_prefix", [5, 2000], prefix_tokens=1024)
    assert [m.release_token for m in fixed] == [5, 1024]
    assert fixed[0].scale == 1.0 and fixed[1].scale == pytest.approx(2000 / 1024)
    full = masks.build_masks("full", [4])[0]
    np.testing.assert_array_equal(full.weights, np.ones(4))


def test_unknown_kind_and_missing_inputs_are_rejected():
    with pytest.raises(ValueError, match="allowed"):
        masks.build_masks("middle", [3])
    with pytest.raises(ValueError, match="segments"):
        masks.build_masks("release", [3])


# --- release kinds ---


def _decaying_rollout(rng, length, drop_at, k=8):
    """Teacher log-probs at the student's top-k: sharp until drop_at, flat after."""
    sharp = np.where(np.arange(length) < drop_at, 4.0, 0.05)
    logits = rng.normal(size=(length, k)) * sharp[:, None]
    lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    segs = [list(range(i, min(i + 5, length))) for i in range(0, length, 5)]
    return lp, segs


def test_release_mask_matches_dynamic_prefix_reweight():
    rng = np.random.default_rng(1)
    lps, segss, lengths = [], [], []
    for length, drop in ((60, 25), (40, 40), (33, 10)):
        lp, segs = _decaying_rollout(rng, length, drop)
        lps.append(lp), segss.append(segs), lengths.append(length)
    results = masks.build_masks("release", lengths, teacher_lp_at_student_topk=lps, segments=segss, support_k=5)
    for result, lp, segs, length in zip(results, lps, segss, lengths):
        expected = release.dynamic_prefix_reweight([1.0] * length, [1.0] * length, np.exp(lp), segs, student_topk=5)
        assert result.accepted == expected.accepted
        assert result.release_segment == expected.release_segment
        assert result.bic_improvement == pytest.approx(expected.bic_improvement, rel=1e-9)
        np.testing.assert_allclose(result.weights, expected.reweighted_advantages)
        assert result.weights.sum() == pytest.approx(length)
    assert results[0].accepted and 20 <= results[0].release_token <= 30
    assert results[2].accepted and results[2].release_token <= 15


def test_random_release_by_fraction_permutes_release_fractions_across_the_batch():
    rng = np.random.default_rng(2)
    lengths = [50, 80, 100, 40]
    drops = [10, 40, 90, 40]
    data = [_decaying_rollout(rng, t, d) for t, d in zip(lengths, drops)]
    kwargs = dict(teacher_lp_at_student_topk=[d[0] for d in data], segments=[d[1] for d in data])
    own = masks.build_masks("release", lengths, **kwargs)
    shuffled = masks.build_masks("random_release", lengths, seed=3, random_release_by="fraction", **kwargs)
    again = masks.build_masks("random_release", lengths, seed=3, random_release_by="fraction", **kwargs)
    assert [m.release_token for m in shuffled] == [m.release_token for m in again]  # seeded
    own_fractions = sorted(m.release_token / t for m, t in zip(own, lengths))
    got_fractions = sorted(m.release_token / t for m, t in zip(shuffled, lengths))
    np.testing.assert_allclose(got_fractions, own_fractions, atol=1 / min(lengths))
    for m, t in zip(shuffled, lengths):
        assert m.weights.sum() == pytest.approx(t)
        assert m.release_segment == -1


def test_std_release_cuts_where_advantage_dispersion_collapses():
    rng = np.random.default_rng(4)
    length = 120
    advantages = np.concatenate([rng.normal(0, 2.0, 60), rng.normal(-0.3, 0.05, 60)])
    segs = [[i] for i in range(3)] + [list(range(i, min(i + 6, length))) for i in range(3, length, 6)]
    result = masks.build_masks("std_release", [length], advantages=[advantages], segments=[segs])[0]
    assert result.accepted
    assert 50 <= result.release_token <= 70
    assert result.weights.sum() == pytest.approx(length)
    flat = masks.build_masks("std_release", [length], advantages=[rng.normal(0, 1.0, length)], segments=[segs])[0]
    assert not flat.accepted and flat.release_token == length


def test_release_rejects_segments_that_do_not_cover_the_response():
    lp = np.log(np.full((4, 3), 1 / 3))
    with pytest.raises(ValueError, match="cover"):
        masks.build_masks("release", [4], teacher_lp_at_student_topk=[lp], segments=[[[0, 1], [2]]])
    with pytest.raises(ValueError, match="contiguous"):
        masks.build_masks("release", [4], teacher_lp_at_student_topk=[lp], segments=[[[0, 2], [1, 3]]])


def test_release_mask_on_sentence_segments_end_to_end():
    rng = np.random.default_rng(5)
    tokens = (["We", " compute", " it", "."] + [" Then", " it", " works", "."]) * 5 + [" So", " ok", "."] * 10
    length = len(tokens)
    segs = segments.sentence_segments(tokens)
    lp, _ = _decaying_rollout(rng, length, 40)
    result = masks.build_masks("release", [length], teacher_lp_at_student_topk=[lp], segments=[segs])[0]
    assert result.accepted and result.release_token in {sum(map(len, segs[:i])) for i in range(len(segs) + 1)}
    assert 30 <= result.release_token <= 48


def test_random_release_permutes_release_positions_across_the_batch():
    # seed 002 sec. 4.3: "randomly permutes these release points across samples". Equal lengths:
    # the batch's release tokens are a permutation of the release rule's; unequal: rollout i stops
    # at its donor's release token, capped by its own length.
    rng = np.random.default_rng(2)
    for lengths, drops in (([80, 80, 80, 80], [10, 40, 60, 25]), ([50, 80, 100, 40], [10, 40, 90, 40])):
        data = [_decaying_rollout(rng, t, d) for t, d in zip(lengths, drops)]
        kwargs = dict(teacher_lp_at_student_topk=[d[0] for d in data], segments=[d[1] for d in data])
        own = [m.release_token for m in masks.build_masks("release", lengths, **kwargs)]
        shuffled = masks.build_masks("random_release", lengths, seed=3, **kwargs)
        perm = np.random.default_rng(3).permutation(len(lengths))
        assert [m.release_token for m in shuffled] == [min(t, max(1, own[j])) for t, j in zip(lengths, perm)]
        assert list(perm) != list(range(len(lengths)))  # the draw really moved release points
        if len(set(lengths)) == 1:
            assert sorted(m.release_token for m in shuffled) == sorted(own)
        for m, t in zip(shuffled, lengths):
            assert m.weights.sum() == pytest.approx(t)  # rescaled to the rollout's mass
