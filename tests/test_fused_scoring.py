"""The one-pass fused scoring kernel and the chunked torch path against a float64 reference.

The Triton kernel runs on CPU through Triton's interpreter (TRITON_INTERPRET=1, set only while
this module's tests run; see the `kernels` fixture). Sizes are tiny because the interpreter is
slow; block sizes are small so that every row spans several blocks and a partial last block.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

# Triton's interpreter is chosen when triton is imported and when a kernel is decorated, so the
# variable is set before either happens, then restored; the `kernels` fixture sets it again while
# the kernels run (the interpreter reads it at run time too).
_OLD_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    try:
        import triton
        import triton.runtime.interpreter
    except ImportError:  # the kernel tests skip; the torch-path tests still run
        triton = None
    from hpcdistill.kernels import common
    from hpcdistill.kernels import scoring as fused_scoring
    common = importlib.reload(common)  # decorate the kernels for the interpreter: the shared part first
    fused_scoring = importlib.reload(fused_scoring)
finally:
    if _OLD_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _OLD_INTERPRET
INTERPRETED = triton is not None and isinstance(triton.language.min, triton.runtime.interpreter.InterpretedFunction)

NEG = float("-inf")
# numpy warnings from the interpreter's arithmetic on -inf (the kernel masks those lanes)
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]


@pytest.fixture(scope="module")
def kernels():
    """fused_scoring with its kernels running in Triton's CPU interpreter."""
    if fused_scoring.triton is None:
        pytest.skip("triton is not installed (pip install 'hpcdistill[gpu]'): the Triton kernel cannot "
                    "run, even in the interpreter")
    if not INTERPRETED:
        pytest.skip("triton was imported before this module without TRITON_INTERPRET=1; these tests "
                    "run in a subprocess instead (test_kernel_tests_pass_in_a_fresh_interpreter_process)")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield fused_scoring
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def test_kernel_tests_pass_in_a_fresh_interpreter_process():
    """Only when another module imported triton in compiled mode first: rerun this file alone."""
    if fused_scoring.triton is None or INTERPRETED:
        pytest.skip("not needed: the kernel tests ran in this process" if INTERPRETED
                    else "triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


# ----- float64 reference, written here from the definitions (seed 000; divergence.py conventions)

def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    out = x - torch.logsumexp(x, -1, keepdim=True)
    return out.masked_fill(torch.isneginf(x), NEG)  # all -inf rows: -inf, not NaN


def _kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)


def reference(s: torch.Tensor, t: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """float64 scores; top-k ids by (value descending, id ascending) - the kernel's tie rule."""
    s, t = s.double(), t.double()
    ls, lt = _log_softmax(s), _log_softmax(t)
    ids = torch.sort(s, dim=-1, descending=True, stable=True).indices[:, :k]
    s_at, t_at = ls.gather(-1, ids), lt.gather(-1, ids)
    return {
        "student_topk_ids": ids,
        "student_topk_lp": s_at,
        "teacher_at_student_topk_lp": t_at,
        "topk_kl": _kl(_log_softmax(s.gather(-1, ids)), _log_softmax(t.gather(-1, ids))),
        "full_kl": _kl(ls, lt),
        "reverse_kl": _kl(ls, lt),
        "forward_kl": _kl(lt, ls),
        "entropy_s": -torch.where(ls.exp() > 0, ls.exp() * ls, torch.zeros_like(ls)).sum(-1),
        "entropy_t": -torch.where(lt.exp() > 0, lt.exp() * lt, torch.zeros_like(lt)).sum(-1),
        "student_lse": torch.logsumexp(s, -1),
        "teacher_lse": torch.logsumexp(t, -1),
    }


def assert_close_inf(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = 2e-5) -> None:
    """Same infinities in the same places, NaN nowhere, finite values within tol * (1 + |want|)."""
    got, want = got.double().cpu(), want.double().cpu()
    assert got.shape == want.shape, name
    assert not torch.isnan(got).any(), f"{name}: NaN in {got}"
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(got), inf) and torch.equal(got[inf], want[inf]), f"{name}: {got} vs {want}"
    err = (got[~inf] - want[~inf]).abs() / (1 + want[~inf].abs())
    assert err.numel() == 0 or err.max() <= tol, f"{name}: max rel err {err.max():.3g}"


def assert_scores_equal_reference(out: dict, s: torch.Tensor, t: torch.Tensor, k: int, *,
                                  exact_ids: bool = True) -> None:
    ref = reference(s, t, k)
    assert set(out) == set(fused_scoring.SCORE_NAMES)
    if exact_ids:
        assert torch.equal(out["student_topk_ids"].cpu(), ref["student_topk_ids"])
    for name in fused_scoring.SCORE_NAMES:
        # Without exact ids (torch.topk's tie choice), only tie-invariant values are compared.
        tie_invariant = name == "student_topk_lp" or (out[name].dim() == 1 and name != "topk_kl")
        if name != "student_topk_ids" and (exact_ids or tie_invariant):
            assert_close_inf(name, out[name], ref[name])


def random_logits(T: int, V: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(T, V, generator=g) * 3).to(dtype)
    t = (s.float() + torch.randn(T, V, generator=g) * 1.5).to(dtype)  # a teacher near the student
    return s, t


# ----- the Triton kernel (interpreter)

@pytest.mark.parametrize("T,V,k,dtype,block", [
    (6, 300, 16, torch.float32, 128),   # V not a multiple of the block: partial last block
    (5, 257, 5, torch.bfloat16, 64),    # odd V, bf16
    (4, 96, 20, torch.float16, 32),     # fp16, k not a power of two
])
def test_fused_score_matches_float64_reference_on_random_inputs(kernels, T, V, k, dtype, block):
    s, t = random_logits(T, V, dtype, seed=T * V + k)
    out = kernels.fused_score(s, t, k, block_v=block)
    assert out["student_topk_ids"].dtype == torch.long and out["topk_kl"].dtype == torch.float32
    # descending order within each row
    assert (out["student_topk_lp"][:, :-1] >= out["student_topk_lp"][:, 1:]).all()
    assert_scores_equal_reference(out, s, t, k)


def test_fused_score_keeps_lowest_ids_among_ties_at_the_kth_value(kernels):
    # Integer logits in a small range: many ties at the k-th value, across blocks. The teacher is
    # a function of the student's value (plus a per-row shift), so tied ids tie on both sides and
    # every KL value is the same whichever tied ids a top-k picks.
    g = torch.Generator().manual_seed(7)
    s = torch.randint(0, 5, (6, 200), generator=g).float()
    t = 0.7 * s - 0.3 * s ** 2 + torch.randn(6, 1, generator=g)
    out = kernels.fused_score(s, t, 12, block_v=32)
    assert_scores_equal_reference(out, s, t, 12)  # exact ids: the lowest among ties
    # and the torch path (torch.topk's own tie choice) gives the same values
    torch_out = fused_scoring.chunked_score_torch(s, t, 12, chunk=4)
    for name in ("student_topk_lp", "teacher_at_student_topk_lp", "topk_kl", "full_kl", "forward_kl"):
        assert_close_inf(name, out[name], torch_out[name])


def test_fused_score_handles_neg_inf_entries_and_all_neg_inf_rows(kernels):
    s, t = random_logits(5, 150, torch.float32, seed=3)
    s[0, ::3] = NEG                      # masked student entries (p_S = 0): finite KLs
    t[0, ::3] = NEG                      # ... masked on the teacher where p_S = 0 too
    t[1, 10] = NEG                       # teacher 0 where the student has mass: reverse KL = +inf
    s[2, 40:] = NEG                      # student mass on 40 ids only; forward KL = +inf
    s[3, :] = NEG                        # whole student row masked: lse -inf, H 0, reverse KL 0
    t[4, :140] = NEG                     # teacher mass on 10 ids
    out = kernels.fused_score(s, t, 16, block_v=64)
    assert_scores_equal_reference(out, s, t, 16)
    assert out["reverse_kl"][1] == float("inf") and out["forward_kl"][2] == float("inf")
    assert out["student_lse"][3] == NEG and out["entropy_s"][3] == 0 and out["reverse_kl"][3] == 0


def test_fused_score_with_k_equal_to_V(kernels):
    s, t = random_logits(4, 40, torch.float32, seed=11)
    s[1, 5:30] = NEG  # k = V with masked ids: they fill the tail of the top-k, lowest ids first
    out = kernels.fused_score(s, t, 40, block_v=16)
    assert_scores_equal_reference(out, s, t, 40)
    # with k = V the slice is the whole vocabulary: top-k KL is the full reverse KL
    assert_close_inf("topk_kl=full_kl", out["topk_kl"], out["full_kl"], tol=1e-5)


def test_fused_score_rejects_bad_k(kernels):
    s, t = random_logits(2, 100, torch.float32, seed=0)
    with pytest.raises(ValueError, match="k <= 64"):
        kernels.fused_score(s, t, 65)
    with pytest.raises(ValueError, match="k must be in"):
        kernels.fused_score(s, t, 0)


# ----- the torch path (no triton needed)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_score_torch_matches_float64_reference(dtype):
    s, t = random_logits(37, 333, dtype, seed=5)
    s[0, 3] = NEG
    t[1, 4] = NEG
    out = fused_scoring.chunked_score_torch(s, t, 20, chunk=8)  # 37 rows: a partial last chunk
    assert_scores_equal_reference(out, s, t, 20, exact_ids=dtype == torch.float32)


def test_score_logits_uses_the_torch_path_on_cpu():
    s, t = random_logits(3, 50, torch.float32, seed=1)
    out = fused_scoring.score_logits(s, t, 50)  # k = V
    assert_scores_equal_reference(out, s, t, 50)
