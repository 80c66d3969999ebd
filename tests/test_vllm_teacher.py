"""The vLLM teacher (`models.vllm_teacher`) against the reference `teacher_columns` on the bundled
SmolLM2 model: one real vLLM server (CPU here) for the whole module, started once.

The vLLM interpreter is `$HPCDISTILL_VLLM_PYTHON` (CI: .venv-vllm/bin/python), else `python3`; the
module is skipped when neither can import vllm.
"""

from __future__ import annotations

import numpy as np
import pytest

from hpcdistill.models.chat import render_prompt
from hpcdistill.models.split_scoring import TEACHER_FIELDS, TeacherRequest, teacher_columns
from hpcdistill.models.vllm_teacher import VLLMTeacher, columns_from_positions, position_logprobs, \
    start_vllm_teacher
from vllmfixtures import QUESTIONS, handle, model_dir, vllm_python  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

LP_TOL = 1e-3  # float32 on both sides, different kernels (test_vllm_backend measured ~4e-5)
K = 8


@pytest.fixture(scope="module")
def teacher(vllm_python, model_dir, handle, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("vllm") / "teacher.log"
    with start_vllm_teacher(model_dir, python=vllm_python, dtype="float32", top_k=K, log_path=log_path,
                            startup_timeout_s=300) as server:
        yield VLLMTeacher(server, handle.vocab_size)


@pytest.fixture(scope="module")
def seqs(teacher, handle) -> list[tuple[list[int], list[int]]]:
    """Three chat prompts and a response sampled from the vLLM teacher for each (`generate`)."""
    prompts = [render_prompt(handle.tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    gens = teacher.generate(prompts, stop_token_ids=None, n=1, max_new_tokens=24, temperature=1.0, seed=3,
                            progress=False)
    assert [len(row) for row in gens] == [1, 1, 1]
    for row in gens:
        assert row[0].finish_reason in ("stop", "length") and 0 < len(row[0].response_ids) <= 24
    return [(p, row[0].response_ids.tolist()) for p, row in zip(prompts, gens)]


def _request(seqs, lengths, student_tokens, student_topk_ids, k=K, token_sets=None) -> TeacherRequest:
    return TeacherRequest(seqs, lengths, student_tokens, student_topk_ids, k, token_sets=token_sets)


@pytest.fixture(scope="module")
def case(seqs, handle):
    """The request: student tokens equal to the response for sequences 0 and 1; for sequence 2 a
    mix of the teacher's token, its second-best token and a token outside its top-k. Student top-k
    ids: half the teacher's top-k, half ids outside it. Sequence 2 is scored one token short."""
    lengths = [len(seqs[0][1]), len(seqs[1][1]), len(seqs[2][1]) - 1]
    plain = _request(seqs, lengths, [r[:T] for (_, r), T in zip(seqs, lengths)], None)
    ref_ids = [c["teacher_topk_ids"] for c in teacher_columns(handle, plain)]
    r2 = seqs[2][1]
    student2 = []
    for t in range(lengths[2]):
        outside = next(i for i in range(handle.vocab_size) if i not in set(ref_ids[2][t].tolist()) | {r2[t]})
        student2.append([r2[t], int(ref_ids[2][t][1]), outside][t % 3])
    student_tokens = [seqs[0][1][:lengths[0]], seqs[1][1][:lengths[1]], student2]
    tail = handle.vocab_size - 1 - np.arange(K - K // 2)  # [K - K//2] ids far outside any top-k here
    topk_ids = [np.concatenate([ids[:, :K // 2], np.tile(tail, (len(ids), 1))], axis=1).astype(np.int64)
                for ids in ref_ids]
    request = _request(seqs, lengths, student_tokens, topk_ids)
    wider = teacher_columns(handle, _request(seqs, lengths, student_tokens, None, k=K + 1))
    return request, teacher_columns(handle, request), wider


def test_scores_match_teacher_columns(teacher, case):
    request, ref, wider = case
    before = teacher.scored_tokens
    got = teacher.score(request)
    assert teacher.scored_tokens - before == request.num_tokens
    assert len(got) == len(ref) == 3
    worst = 0.0
    for i, (g, r, w) in enumerate(zip(got, ref, wider)):
        assert set(g) == set(r) == set(TEACHER_FIELDS), i
        for name in TEACHER_FIELDS:
            assert g[name].dtype == r[name].dtype and g[name].shape == r[name].shape, (i, name)
        for name in ("teacher_own_lp", "teacher_topk_lp"):
            worst = max(worst, float(np.abs(g[name] - r[name]).max()))
        # Ids are comparable where their log-prob stands apart from both neighbours (ties may swap).
        lp = w["teacher_topk_lp"]  # [T, K + 1]
        gaps = lp[:, :-1] - lp[:, 1:]  # [T, K]
        apart = (gaps[:, :K] > LP_TOL) & np.concatenate([np.ones((len(lp), 1), bool), gaps[:, :K - 1] > LP_TOL], 1)
        assert apart.mean() > 0.5, i
        np.testing.assert_array_equal(g["teacher_topk_ids"][apart], r["teacher_topk_ids"][apart])
        assert np.all(np.diff(g["teacher_topk_lp"], axis=1) <= 0)  # descending
        assert np.all(np.isnan(g["entropy_t"]))
        _check_lookups(request, i, g, r)
    assert worst < LP_TOL, worst


def _check_lookups(request, i, g, r):
    """teacher_lp and teacher_at_student_topk_lp: the reference value where vLLM returned the id
    (the teacher's top-k or its own token), NaN elsewhere."""
    response = np.asarray(request.seqs[i][1][:request.lengths[i]])
    student = np.asarray(request.student_tokens[i])
    own = student == response
    np.testing.assert_array_equal(g["teacher_lp"][own], g["teacher_own_lp"][own])
    known_tok = own | (g["teacher_topk_ids"] == student[:, None]).any(1)  # [T]
    assert np.all(np.isnan(g["teacher_lp"][~known_tok]))
    assert np.abs(g["teacher_lp"][known_tok] - r["teacher_lp"][known_tok]).max() < LP_TOL
    ids = request.student_topk_ids[i]  # [T, K]
    known = (ids[:, :, None] == g["teacher_topk_ids"][:, None, :]).any(-1) | (ids == response[:, None])
    assert np.all(np.isnan(g["teacher_at_student_topk_lp"][~known]))
    assert np.abs(g["teacher_at_student_topk_lp"][known] - r["teacher_at_student_topk_lp"][known]).max() < LP_TOL
    if i == 2:  # the mixed sequence exercises every rule
        assert own.any() and (known_tok & ~own).any() and (~known_tok).any()
    else:
        assert own.all()
    assert known.any() and (~known).any()


def test_empty_lengths_token_sets_and_top_k_beyond_max_logprobs(teacher, seqs, handle):
    empty = _request(seqs, [0, 0, 0], [[], [], []], None)
    got, ref = teacher.score(empty), teacher_columns(handle, empty)
    for g, r in zip(got, ref):
        assert {n: (a.dtype, a.shape) for n, a in g.items()} == {n: (a.dtype, a.shape) for n, a in r.items()}
    lengths = [1, 1, 1]
    one = [r[:1] for _, r in seqs]
    with pytest.raises(ValueError, match="token_sets"):
        teacher.score(_request(seqs, lengths, one, None, token_sets={"digits": [1, 2]}))
    with pytest.raises(ValueError, match="max_logprobs"):
        teacher.score(_request(seqs, lengths, one, None, k=teacher.server.max_logprobs + 1))
    # Without student top-k ids that column is all NaN, the rest unchanged.
    got = teacher.score(_request(seqs, lengths, one, None))
    assert all(np.isnan(g["teacher_at_student_topk_lp"]).all() and g["teacher_at_student_topk_lp"].shape == (1, K)
               for g in got)


def test_positions_from_the_answer_format():
    """vLLM's entry format: the prompt token first (any rank), then the top-k with ranks 1..k;
    -9999.0 is its JSON spelling of -inf."""
    outside = position_logprobs({"7": {"logprob": -9999.0, "rank": 900, "decoded_token": "x"},
                                 "3": {"logprob": -0.5, "rank": 1, "decoded_token": "a"},
                                 "4": {"logprob": -1.5, "rank": 2, "decoded_token": "b"}}, "here")
    inside = position_logprobs({"4": {"logprob": -1.5, "rank": 2}, "3": {"logprob": -0.5, "rank": 1}}, "here")
    cols = columns_from_positions([outside, inside], [7, 4], [3, 5], np.array([[7, 8], [4, 9]]), 2)
    np.testing.assert_array_equal(cols["teacher_topk_ids"], [[3, 4], [3, 4]])
    np.testing.assert_array_equal(cols["teacher_topk_lp"], np.float32([[-0.5, -1.5], [-0.5, -1.5]]))
    np.testing.assert_array_equal(cols["teacher_own_lp"], np.float32([-np.inf, -1.5]))
    np.testing.assert_array_equal(cols["teacher_lp"], np.float32([-0.5, np.nan]))
    np.testing.assert_array_equal(cols["teacher_at_student_topk_lp"], np.float32([[-np.inf, np.nan], [-1.5, np.nan]]))
    assert np.isnan(cols["entropy_t"]).all() and cols["teacher_topk_ids"].dtype == np.int32
    with pytest.raises(ValueError, match="first prompt position"):
        position_logprobs(None, "here")
