"""The fused linear + distillation loss against float64 autograd references.

The torch path (the CPU path) needs only torch; the Triton path runs on CPU through Triton's
interpreter (TRITON_INTERPRET=1 while this module's tests run), at tiny sizes.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys

import pytest
import torch

# See tests/test_fused_scoring.py: the interpreter must be chosen before triton is imported and
# while the kernels are decorated; the `triton_kernels` fixture sets it again while they run.
_OLD_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    try:
        import triton
        import triton.runtime.interpreter
    except ImportError:
        triton = None
    from hpcdistill.kernels import common
    from hpcdistill.kernels import loss as fused_loss
    from hpcdistill.kernels import scoring as fused_scoring
    common = importlib.reload(common)
    fused_scoring = importlib.reload(fused_scoring)
    fused_loss = importlib.reload(fused_loss)
finally:
    if _OLD_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _OLD_INTERPRET
INTERPRETED = triton is not None and isinstance(triton.language.min, triton.runtime.interpreter.InterpretedFunction)

NEG = float("-inf")
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]
CASES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.0), ("jsd", 1.0),
         ("topk_kl", 0.5)]


@pytest.fixture(scope="module")
def triton_kernels():
    if triton is None:
        pytest.skip("triton is not installed (pip install 'hpcdistill[gpu]'): the Triton path cannot "
                    "run, even in the interpreter")
    if not INTERPRETED:
        pytest.skip("triton was imported before this module without TRITON_INTERPRET=1; these tests "
                    "run in a subprocess instead (test_kernel_tests_pass_in_a_fresh_interpreter_process)")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield fused_loss
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def test_kernel_tests_pass_in_a_fresh_interpreter_process():
    """Only when another module imported triton in compiled mode first: rerun this file alone."""
    if triton is None or INTERPRETED:
        pytest.skip("not needed: the kernel tests ran in this process" if INTERPRETED
                    else "triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


# ----- float64 reference by autograd, from the definitions (objectives.py conventions)

def _kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)


def per_token_reference(s: torch.Tensor, t: torch.Tensor, kind: str, beta: float, k: int) -> torch.Tensor:
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl(ls, lt)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(lt, ls)
    if kind == "jsd":
        lm = torch.logaddexp(lt + math.log(beta), ls + math.log(1 - beta))
        return beta * _kl(lt, lm) + (1 - beta) * _kl(ls, lm)
    ids = torch.topk(s.detach(), k, -1).indices  # the selection is a constant
    return _kl(torch.log_softmax(s.gather(-1, ids), -1), torch.log_softmax(t.gather(-1, ids), -1))


def reference(h, W, t_logits, kind, beta, k, weights, mask):
    """float64 loss, d loss / d h, d loss / d W."""
    h64 = h.detach().double().requires_grad_()
    W64 = W.detach().double().requires_grad_()
    per_tok = per_token_reference(h64 @ W64.T, t_logits.double(), kind, beta, k)
    loss = (weights.double() * mask.double() * per_tok).sum() / mask.double().sum().clamp_min(1)
    loss.backward()
    return loss.detach(), h64.grad, W64.grad


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got = got.double()
    assert not torch.isnan(got).any()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def make_problem(N, H, V, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(dtype)
    W = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    t = (h.double() @ W.double().T + torch.randn(N, V, generator=g, dtype=torch.float64)).to(dtype)
    weights = torch.rand(N, generator=g) + 0.5
    mask = (torch.rand(N, generator=g) > 0.25).float()
    return h, W, t, weights, mask


def run_fused(h, W, t, kind, beta, k, weights, mask, backend, chunk):
    hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
    loss = fused_loss.fused_linear_distill_loss(hh, WW, teacher_logits=t, kind=kind, beta=beta, k=k,
                                                weights=weights, loss_mask=mask, chunk=chunk, backend=backend)
    loss.backward()
    return loss.detach(), hh.grad, WW.grad


def assert_matches_reference(got, want, tol):
    (loss, dh, dW), (rloss, rdh, rdW) = got, want
    assert abs(loss.double().item() - rloss.item()) <= tol * max(abs(rloss.item()), 1e-6)
    assert rel(dh, rdh) <= tol and rel(dW, rdW) <= tol


# ----- torch path

@pytest.mark.parametrize("kind,beta", CASES)
def test_torch_path_matches_float64_value_and_gradients(kind, beta):
    h, W, t, w, m = make_problem(N=13, H=16, V=301, seed=CASES.index((kind, beta)))
    want = reference(h, W, t, kind, beta, 7, w, m)
    assert_matches_reference(run_fused(h, W, t, kind, beta, 7, w, m, "torch", chunk=4), want, 2e-5)
    # float64 inputs: the torch path is exact to rounding
    got64 = run_fused(h.double(), W.double(), t.double(), kind, beta, 7, w, m, "torch", chunk=5)
    assert got64[0].dtype == torch.float64
    assert_matches_reference(got64, want, 1e-10)


def assert_rows_match_torch_rows(h, W, t, kind, beta, k, w, m, backend, tol):
    """return_rows: rows = rows_loss_grad_torch's per-row loss, detached, in the loss's dtype;
    the loss and its gradients are those of the call without rows."""
    hh = h.clone().requires_grad_()
    loss, rows = fused_loss.fused_linear_distill_loss(hh, W, teacher_logits=t, kind=kind, beta=beta, k=k,
                                                      weights=w, loss_mask=m, chunk=3, backend=backend,
                                                      return_rows=True)
    assert rows.shape == (h.shape[0],) and rows.dtype == loss.dtype and not rows.requires_grad
    want = fused_loss.rows_loss_grad_torch(h.double() @ W.double().T, t.double(), kind, beta, k)[0]
    assert rel(rows, want) <= tol
    loss.backward()
    plain = run_fused(h, W, t, kind, beta, k, w, m, backend, chunk=3)
    assert torch.equal(loss.detach(), plain[0]) and torch.equal(hh.grad, plain[1])
    expect = (rows.double() * w.double() * m.double()).sum() / m.double().sum()
    assert abs(loss.item() - expect.item()) <= tol * abs(expect.item())


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("jsd", 0.3), ("topk_kl", 0.5)])
def test_return_rows_gives_the_per_token_loss_on_the_torch_path(kind, beta):
    h, W, t, w, m = make_problem(N=10, H=8, V=50, seed=20)
    assert_rows_match_torch_rows(h, W, t, kind, beta, 5, w, m, "torch", 2e-5)
    assert_rows_match_torch_rows(h.double(), W.double(), t.double(), kind, beta, 5, w, m, "torch", 1e-10)


def test_teacher_hidden_and_weight_equal_teacher_logits():
    h, W, _, w, m = make_problem(N=9, H=8, V=64, seed=2)
    g = torch.Generator().manual_seed(3)
    th, tW = torch.randn(9, 12, generator=g), torch.randn(64, 12, generator=g)
    hh = h.clone().requires_grad_()
    loss = fused_loss.fused_linear_distill_loss(hh, W, teacher_hidden=th, teacher_weight=tW, kind="jsd",
                                                weights=w, loss_mask=m, chunk=4, backend="torch")
    loss.backward()
    want = reference(h, W, th @ tW.T, "jsd", 0.5, 1, w, m)
    assert abs(loss.item() - want[0].item()) <= 2e-5 * abs(want[0].item()) and rel(hh.grad, want[1]) <= 2e-5


def test_neg_inf_teacher_entries_give_finite_forward_kl_and_jsd():
    h, W, t, w, m = make_problem(N=8, H=8, V=100, seed=4)
    t[:, ::7] = NEG  # teacher probability 0: no term in KL(p_T||.), finite log M in the JSD
    for kind in ("forward_kl", "jsd"):
        want = reference(h, W, t, kind, 0.5, 1, w, m)
        assert torch.isfinite(want[0])
        assert_matches_reference(run_fused(h, W, t, kind, 0.5, 1, w, m, "torch", chunk=3), want, 2e-5)


def test_topk_kl_with_k_equal_to_V_is_the_reverse_kl():
    h, W, t, w, m = make_problem(N=6, H=8, V=32, seed=5)
    topk = run_fused(h, W, t, "topk_kl", 0.5, 32, w, m, "torch", chunk=4)
    rev = reference(h, W, t, "reverse_kl", 0.5, 1, w, m)
    assert_matches_reference(topk, rev, 2e-5)


def test_rejects_bad_arguments():
    h, W, t, _, _ = make_problem(N=4, H=4, V=16, seed=6)
    with pytest.raises(ValueError, match="kind"):
        fused_loss.fused_linear_distill_loss(h, W, teacher_logits=t, kind="kl")
    with pytest.raises(ValueError, match="beta"):
        fused_loss.fused_linear_distill_loss(h, W, teacher_logits=t, beta=1.5)
    with pytest.raises(ValueError, match="teacher"):
        fused_loss.fused_linear_distill_loss(h, W)
    with pytest.raises(ValueError, match="k must be"):
        fused_loss.fused_linear_distill_loss(h, W, teacher_logits=t, kind="topk_kl", k=17)


# ----- Triton path (interpreter)

@pytest.mark.parametrize("kind,beta", CASES)
def test_triton_path_matches_float64_value_and_gradients(triton_kernels, kind, beta):
    h, W, t, w, m = make_problem(N=7, H=16, V=300, seed=100 + CASES.index((kind, beta)))
    want = reference(h, W, t, kind, beta, 6, w, m)
    assert_matches_reference(run_fused(h, W, t, kind, beta, 6, w, m, "triton", chunk=3), want, 2e-5)


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)])
def test_triton_row_kernel_over_several_blocks_matches_torch_rows(triton_kernels, kind, beta):
    # block 64 over V = 300: four full blocks and a partial one; teacher -inf entries for the
    # losses where they are finite.
    g = torch.Generator().manual_seed(8)
    s = torch.randn(5, 300, generator=g) * 3
    t = torch.randn(5, 300, generator=g) * 3
    if kind != "reverse_kl":
        t[:, 5::11] = NEG
    scale = torch.rand(5, generator=g)
    want_loss, want_grad = fused_loss.rows_loss_grad_torch(s.double(), t.double(), kind, beta)
    grad = s.clone()
    loss = triton_kernels.rows_loss_grad_triton_(grad, t, scale, kind, beta, block_v=64)
    assert rel(loss, want_loss) <= 2e-6
    assert rel(grad, want_grad * scale.double()[:, None]) <= 2e-6
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("jsd", 0.3), ("topk_kl", 0.5)])
def test_return_rows_gives_the_per_token_loss_on_the_triton_path(triton_kernels, kind, beta):
    h, W, t, w, m = make_problem(N=7, H=8, V=60, seed=21)
    assert_rows_match_torch_rows(h, W, t, kind, beta, 5, w, m, "triton", 2e-5)
