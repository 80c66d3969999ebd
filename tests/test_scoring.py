"""score_rollouts against a naive reference that materialises full logits per sequence in float64."""

import numpy as np
import pytest
import torch

from hpcdistill.models.loading import tiny_random_model
from hpcdistill.models.scoring import TokenScores, score_rollouts

VOCAB = 300
K = 8


@pytest.fixture(scope="module")
def student():
    return tiny_random_model(VOCAB, seed=0)


@pytest.fixture(scope="module")
def teacher():
    return tiny_random_model(VOCAB, seed=1)


def random_seqs(seed: int, n: int, resp_lens: list[int] | None = None):
    rng = np.random.default_rng(seed)
    seqs = []
    for i in range(n):
        p = rng.integers(0, VOCAB, size=int(rng.integers(1, 12))).tolist()
        T = resp_lens[i] if resp_lens is not None else int(rng.integers(1, 30))
        seqs.append((p, rng.integers(0, VOCAB, size=T).tolist()))
    return seqs


@torch.no_grad()
def naive_logprobs(handle, prompt, response, T) -> torch.Tensor:
    """[T, V] float64 log-probs predicting response[0..T-1], from one full unbatched forward."""
    ids = torch.tensor([list(prompt) + list(response)])
    logits = handle.model(input_ids=ids).logits[0].double()  # [L, V]
    return torch.log_softmax(logits[len(prompt) - 1:len(prompt) - 1 + T], dim=-1)


def naive_scores(student, teacher, s_seq, t_seq, k) -> dict[str, np.ndarray]:
    T = min(len(s_seq[1]), len(t_seq[1]))
    ls = naive_logprobs(student, *s_seq, T)
    lt = naive_logprobs(teacher, *t_seq, T)
    s_tok = torch.tensor(s_seq[1][:T])[:, None]
    t_tok = torch.tensor(t_seq[1][:T])[:, None]
    ids = torch.topk(ls, k, dim=-1).indices
    ss, tt = torch.log_softmax(ls.gather(-1, ids), -1), torch.log_softmax(lt.gather(-1, ids), -1)
    return {
        "student_lp": ls.gather(-1, s_tok)[:, 0].numpy(),
        "teacher_lp": lt.gather(-1, s_tok)[:, 0].numpy(),
        "teacher_own_lp": lt.gather(-1, t_tok)[:, 0].numpy(),
        "student_topk_ids": ids.numpy(),
        "student_topk_lp": ls.gather(-1, ids).numpy(),
        "teacher_at_student_topk_lp": lt.gather(-1, ids).numpy(),
        "topk_kl": (ss.exp() * (ss - tt)).sum(-1).numpy(),
        "full_kl": (ls.exp() * (ls - lt)).sum(-1).numpy(),
        "entropy_s": -(ls.exp() * ls).sum(-1).numpy(),
        "entropy_t": -(lt.exp() * lt).sum(-1).numpy(),
        "teacher_topk_lp": torch.topk(lt, k, dim=-1).values.numpy(),
        "student_at_teacher_topk_lp": ls.gather(-1, torch.topk(lt, k, dim=-1).indices).numpy(),
        "student_topk_mass": ls.gather(-1, ids).exp().sum(-1).numpy(),
        "teacher_topk_mass": torch.topk(lt, k, dim=-1).values.exp().sum(-1).numpy(),
        "teacher_mass_at_student_topk": lt.gather(-1, ids).exp().sum(-1).numpy(),
        "student_mass_at_teacher_topk": ls.gather(-1, torch.topk(lt, k, dim=-1).indices).exp().sum(-1).numpy(),
        "topk_overlap": np.array([len(set(a) & set(b)) / k for a, b in
                                  zip(ids.tolist(), torch.topk(lt, k, dim=-1).indices.tolist())]),
    }


def assert_scores_match(got: TokenScores, ref: dict[str, np.ndarray]):
    for name, expect in ref.items():
        value = getattr(got, name)
        assert value is not None, name
        assert value.shape == expect.shape, (name, value.shape, expect.shape)
        if name == "topk_overlap":  # a float32 tie at the k-th place may swap one id in or out
            assert np.abs(value - expect).max() <= 1 / K + 1e-6
            assert np.mean(np.abs(value - expect) < 1e-6) > 0.9
            continue
        if name == "student_topk_ids":
            # Ids may swap only where two log-probs are equal to float32 precision.
            mismatch = value != expect
            if mismatch.any():
                np.testing.assert_allclose(got.student_topk_lp[mismatch],
                                           ref["student_topk_lp"][mismatch], atol=1e-5)
            assert value.dtype == np.int32
        else:
            assert value.dtype == np.float32, name
            np.testing.assert_allclose(value, expect, rtol=1e-4, atol=2e-5, err_msg=name)


def test_score_rollouts_matches_naive_full_materialisation(student, teacher):
    s_seqs = random_seqs(10, 7)
    t_seqs = random_seqs(11, 7)
    got = score_rollouts(student, teacher, s_seqs, t_seqs, top_k=K, full_vocab=True,
                         chunk_size=5, batch_size=3, progress=False)
    assert len(got) == 7
    for g, s, t in zip(got, s_seqs, t_seqs):
        assert_scores_match(g, naive_scores(student, teacher, s, t, K))
        assert (g.topk_kl >= -1e-6).all() and (g.full_kl >= -1e-6).all()


def test_chunk_and_batch_size_do_not_change_results(student, teacher):
    s_seqs, t_seqs = random_seqs(20, 6), random_seqs(21, 6)
    runs = [score_rollouts(student, teacher, s_seqs, t_seqs, top_k=K, full_vocab=True,
                           chunk_size=c, batch_size=b, progress=False)
            for c, b in [(1, 1), (7, 2), (256, 6), (3, 4)]]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(a.student_topk_ids, b.student_topk_ids)
            for name in ("student_lp", "teacher_lp", "topk_kl", "full_kl", "entropy_s"):
                np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-5)


def test_alignment_truncates_to_shorter_response_and_scores_student_tokens(student, teacher):
    # Regen alignment (seed 000): teacher context is its own prompt + its own response r_<t; the
    # scored token is the student's s_t; T = min(len(s), len(r)).
    s_seqs = random_seqs(30, 3, resp_lens=[20, 5, 12])
    t_seqs = random_seqs(31, 3, resp_lens=[9, 17, 12])
    got = score_rollouts(student, teacher, s_seqs, t_seqs, top_k=K, progress=False)
    assert [len(g) for g in got] == [9, 5, 12]
    for g, s, t in zip(got, s_seqs, t_seqs):
        ref = naive_scores(student, teacher, s, t, K)
        np.testing.assert_allclose(g.teacher_lp, ref["teacher_lp"], rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(g.teacher_own_lp, ref["teacher_own_lp"], rtol=1e-4, atol=2e-5)
    # The teacher's later response tokens (beyond T) cannot influence the scores.
    t_longer = [(p, r + [1, 2, 3]) for p, r in t_seqs]
    s_shorter = [(p, r[:len(g)]) for (p, r), g in zip(s_seqs, got)]
    again = score_rollouts(student, teacher, s_shorter, t_longer, top_k=K, progress=False)
    for a, b in zip(got, again):
        np.testing.assert_allclose(a.topk_kl, b.topk_kl, rtol=1e-5, atol=1e-6)


def test_same_handle_as_teacher_scores_each_context_separately(student):
    # Self-distillation: one set of weights, two contexts. Same context -> zero KL;
    # a different teacher prompt -> nonzero KL, equal to the naive reference.
    s_seqs = random_seqs(40, 3)
    same = score_rollouts(student, student, s_seqs, s_seqs, top_k=K, full_vocab=True, progress=False)
    for g in same:
        np.testing.assert_allclose(g.topk_kl, 0.0, atol=1e-5)
        np.testing.assert_allclose(g.student_lp, g.teacher_lp, atol=1e-5)
    t_seqs = [([7, 8, 9] + p, r) for p, r in s_seqs]
    diff = score_rollouts(student, student, s_seqs, t_seqs, top_k=K, progress=False)
    for g, s, t in zip(diff, s_seqs, t_seqs):
        assert g.topk_kl.max() > 1e-4
        np.testing.assert_allclose(g.topk_kl, naive_scores(student, student, s, t, K)["topk_kl"],
                                   rtol=1e-4, atol=2e-5)


def test_empty_responses_give_empty_scores(student, teacher):
    s_seqs = [([1, 2], []), ([3], [4, 5])]
    t_seqs = [([1, 2], [6]), ([3], [])]
    got = score_rollouts(student, teacher, s_seqs, t_seqs, top_k=K, full_vocab=True, progress=False)
    assert [len(g) for g in got] == [0, 0]
    assert got[0].student_topk_ids.shape == (0, K) and got[0].full_kl is not None


@pytest.mark.slow
def test_bundled_self_distillation_scores_match_naive_reference():
    # The real model as its own teacher with feedback in context (standard SDPO, seed 000).
    from hpcdistill.models.chat import multi_turn, render_prompt, single_turn
    from hpcdistill.models.generation import generate
    from hpcdistill.models.loading import load_model

    handle = load_model("bundled:smollm2-135m-instruct")
    tok = handle.tokenizer
    question = "Write a Python function that adds two numbers."
    prompt = render_prompt(tok, single_turn(question))
    response = generate(handle, [prompt], n=1, max_new_tokens=16, temperature=1.0, seed=0,
                        progress=False)[0][0].response_ids.tolist()
    teacher_prompt = render_prompt(tok, multi_turn([question + "\nFeedback: use type hints."]))
    got = score_rollouts(handle, handle, [(prompt, response)], [(teacher_prompt, response)], top_k=20,
                         full_vocab=True, chunk_size=5, progress=False)[0]
    assert_scores_match(got, naive_scores(handle, handle, (prompt, response), (teacher_prompt, response), 20))
    assert got.topk_kl.max() > 0


def test_trust_region_teacher_scores_with_the_lerp_of_initial_and_live_logits(student, teacher):
    from hpcdistill.models.teachers import LogitMix

    mix = 0.3
    mixed = type(student)(model=LogitMix([(lambda: teacher.model, 1 - mix), (lambda: student.model, mix)]),
                          tokenizer=None, model_id="tr", device=student.device, dtype=student.dtype)
    s_seqs, t_seqs = random_seqs(40, 3), random_seqs(41, 3)
    got = score_rollouts(student, mixed, s_seqs, t_seqs, top_k=K, chunk_size=4, progress=False)
    for g, (sp, sr), (tp, tr) in zip(got, s_seqs, t_seqs):
        T = min(len(sr), len(tr))
        ids = torch.tensor([list(tp) + list(tr)])
        with torch.no_grad():
            z = (1 - mix) * teacher.model(input_ids=ids).logits[0] + mix * student.model(input_ids=ids).logits[0]
        lt = torch.log_softmax(z[len(tp) - 1:len(tp) - 1 + T].double(), -1)
        np.testing.assert_allclose(g.teacher_lp, lt.gather(-1, torch.tensor(sr[:T])[:, None])[:, 0].numpy(),
                                   rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(g.teacher_topk_lp, torch.topk(lt, K, -1).values.numpy(), rtol=1e-4, atol=2e-5)
