"""score_rollouts through the fused Triton kernel (kernels="triton") equals the chunked torch path.

The kernel runs on CPU through Triton's interpreter (TRITON_INTERPRET=1; see
tests/test_fused_scoring.py for why it is set around the imports and again while the tests run).
The interpreter is slow, so the rollouts are short and k is small.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

_OLD_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    try:
        import triton
        import triton.runtime.interpreter
    except ImportError:
        triton = None
    from hpcdistill.kernels import common
    from hpcdistill.kernels import scoring as fused_scoring
    common = importlib.reload(common)
    fused_scoring = importlib.reload(fused_scoring)  # models.scoring reads the kernel from this module
finally:
    if _OLD_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _OLD_INTERPRET
INTERPRETED = triton is not None and isinstance(triton.language.min, triton.runtime.interpreter.InterpretedFunction)

from hpcdistill.models.loading import load_model_id, tiny_random_model  # noqa: E402
from hpcdistill.models.scoring import TokenScores, score_rollouts  # noqa: E402

K = 4
# numpy warnings from the interpreter's arithmetic on masked lanes (the kernel discards them)
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]
TOKEN_SETS = {"few": [0, 5, 17, 400, 1234], "one": [3]}


@pytest.fixture(scope="module")
def interpreter():
    if triton is None:
        pytest.skip("triton is not installed (pip install 'hpcdistill[gpu]')")
    if not INTERPRETED:
        pytest.skip("triton was imported before this module without TRITON_INTERPRET=1; these tests "
                    "run in a subprocess instead (test_fused_tests_pass_in_a_fresh_interpreter_process)")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


@pytest.fixture(scope="module")
def models():
    """(student, teacher): the tiny random Llama "tiny-random:0" (bundled tokenizer's vocabulary,
    V = 49,152: many kernel blocks per row) and another random one of the same shape."""
    student = load_model_id("tiny-random:0")
    return student, tiny_random_model(seed=1, tokenizer=student.tokenizer)


def test_fused_tests_pass_in_a_fresh_interpreter_process():
    """Only when another module imported triton in compiled mode first: rerun this file alone."""
    if triton is None or INTERPRETED:
        pytest.skip("not needed: the tests ran in this process" if INTERPRETED else "triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def rollouts(vocab: int, seed: int, resp_lens: list[int]) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, vocab, size=3).tolist(), rng.integers(0, vocab, size=T).tolist())
            for T in resp_lens]


def assert_same_scores(got: TokenScores, want: TokenScores) -> None:
    """Every field: ids equal (or swapped only between equal log-probs), floats within 1e-4."""
    for f in dataclasses.fields(TokenScores):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if f.name == "token_mass":
            assert a.keys() == b.keys() == {f"{side}_mass_{n}" for n in TOKEN_SETS for side in ("student", "teacher")}
            for name in a:
                assert a[name].dtype == np.float32
                np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-6, err_msg=name)
            continue
        assert a is not None and a.shape == b.shape and a.dtype == b.dtype, f.name
        if f.name.endswith("_ids"):
            assert a.dtype == np.int32
            values = getattr(got, f.name[:-len("_ids")] + "_lp")
            swapped = a != b
            np.testing.assert_allclose(values[swapped], getattr(want, f.name[:-len("_ids")] + "_lp")[swapped],
                                       atol=1e-5, err_msg=f.name)
            assert swapped.mean() < 0.1, f.name
        else:
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=f.name)


def test_fused_scoring_matches_the_torch_path_field_by_field(interpreter, models):
    student, teacher = models
    V = student.vocab_size
    s_seqs = rollouts(V, 0, [4, 1, 3])
    t_seqs = [([7, 8] + p, r) for p, r in rollouts(V, 1, [5, 1, 2])]  # own context and responses
    runs = {kernels: score_rollouts(student, teacher, s_seqs, t_seqs, top_k=K, full_vocab=True, chunk_size=3,
                                    batch_size=2, progress=False, token_sets=TOKEN_SETS, kernels=kernels)
            for kernels in ("torch", "triton")}
    assert [len(s) for s in runs["triton"]] == [4, 1, 2]
    for got, want in zip(runs["triton"], runs["torch"]):
        assert_same_scores(got, want)
        assert got.full_kl.min() > 0 and got.topk_kl.min() > 0  # two different models: a real signal


def test_fused_scoring_of_one_model_against_itself_gives_zero_kl(interpreter, models):
    student, _ = models
    seqs = rollouts(student.vocab_size, 2, [3])
    got = score_rollouts(student, student, seqs, seqs, top_k=K, full_vocab=True, progress=False,
                         kernels="triton")[0]
    np.testing.assert_allclose(got.full_kl, 0.0, atol=1e-5)
    np.testing.assert_allclose(got.topk_kl, 0.0, atol=1e-5)
    np.testing.assert_array_equal(got.student_topk_ids, got.teacher_topk_ids)
    np.testing.assert_allclose(got.topk_overlap, 1.0)


def test_auto_on_cpu_is_the_torch_path_and_unknown_kernels_are_rejected(models):
    student, teacher = models
    seqs = rollouts(student.vocab_size, 3, [2])
    auto, torch_path = (score_rollouts(student, teacher, seqs, seqs, top_k=K, progress=False, kernels=kernels)[0]
                        for kernels in ("auto", "torch"))
    for f in dataclasses.fields(TokenScores):
        if getattr(auto, f.name) is not None:
            np.testing.assert_array_equal(getattr(auto, f.name), getattr(torch_path, f.name), err_msg=f.name)
    with pytest.raises(ValueError, match="kernels must be"):
        score_rollouts(student, teacher, seqs, seqs, kernels="cuda")


@pytest.mark.parametrize("train", [{"support": "full"}, {"support": "full", "divergence": "jsd", "beta": 0.3},
                                   {"support": "full", "divergence": "forward"}, {}])
def test_fused_distill_loss_in_training_matches_the_chunked_torch_step(interpreter, train):
    """train.fused (the Triton loss, kernels="auto" on CUDA) against train.update's torch path on
    the same items: loss, per-token terms and every gradient (float32, the kernel in the interpreter)."""
    import torch
    from test_microbatch import _items, _models, _spec

    from hpcdistill.models.scoring import response_hidden
    from hpcdistill.train import fused, update

    spec = _spec({**train, "lr": 1e-3})
    models, _ = _models()
    models.student.model.float()
    models.student = models.teacher = dataclasses.replace(models.student, dtype=torch.float32)
    items = _items(0)
    if train.get("support", "topk") == "topk":  # the kernel reads both models live: record what they give
        lengths = [len(it.scores.student_lp) for it in items]
        head = models.student.model.get_output_embeddings()
        with torch.no_grad():
            ids = torch.topk(head(response_hidden(models.student, [it.student_seq for it in items], lengths)), K, -1).indices
            teacher_lp = torch.log_softmax(head(response_hidden(models.teacher, [it.teacher_seq for it in items],
                                                                lengths)), -1).gather(-1, ids)
        split = np.cumsum(lengths)[:-1]
        for it, part, lp in zip(items, np.split(ids.int().numpy(), split), np.split(teacher_lp.numpy(), split)):
            it.scores.student_topk_ids, it.scores.teacher_at_student_topk_lp = part, lp
    weights = [np.random.default_rng(i).random(len(it.scores.student_lp)).astype(np.float32)
               for i, it in enumerate(items)]
    results = {}
    for path in ("torch", "triton"):
        models.student.model.zero_grad(set_to_none=True)
        if path == "torch":
            loss, _ = update.objective_loss(spec, models, items, weights)
        else:
            loss, _ = fused.distill_objective(spec, models, items, weights, backend="triton")
        loss.backward()
        results[path] = (float(loss.detach()), [it.train_loss.copy() for it in items],
                         {n: p.grad.clone() for n, p in models.student.model.named_parameters() if p.grad is not None})
    (loss_t, terms_t, grads_t), (loss_f, terms_f, grads_f) = results["torch"], results["triton"]
    assert loss_f == pytest.approx(loss_t, rel=1e-4)
    for a, b in zip(terms_f, terms_t):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    assert grads_f.keys() == grads_t.keys()
    for name, grad in grads_t.items():
        torch.testing.assert_close(grads_f[name], grad, rtol=1e-3, atol=1e-5, msg=name)
