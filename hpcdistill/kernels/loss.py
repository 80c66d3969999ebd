"""Fused linear + distillation loss for training (issue 10; design in docs/gpu-kernels.md).

hidden states h [N, H] and the student's lm_head weight W [V, H] in, a scalar loss out, without a
[N, V] logits tensor: positions are processed `chunk` at a time, and each chunk's gradient is
computed in the forward pass (the fused-linear idea of Liger-Kernel):

    logits_c = h_c @ W^T                     [C, V]   (input dtype, as the model's lm_head)
    l_c, dlogits_c = row loss and d l / d logits_c    (closed forms below; torch or Triton)
    dh_c = dlogits_c @ W ;  dW += dlogits_c^T @ h_c   (torch matmuls)

backward() only multiplies the saved dh, dW by the incoming scalar gradient. Peak extra memory:
dh [N, H] and dW [V, H] in the input dtypes plus about three [C, V] buffers (two in fp32 on the
torch path; the Triton path writes dlogits in place over the logits).

Losses (distill/objectives.py conventions, seed 000 / GKD; the teacher is a constant):
    reverse_kl  KL(p_S || p_T)        d/ds = p_S * (r - KL),  r = log p_S - log p_T
    forward_kl  KL(p_T || p_S)        d/ds = p_S - p_T
    jsd(beta)   beta KL(p_T||M) + (1-beta) KL(p_S||M), M = beta p_T + (1-beta) p_S
                d/ds = p_S * (u - E_S[u]),  u = (1-beta)(log p_S - log M);  beta = 0 / 1 are
                forward / reverse KL (TRL's convention, as distill.loss.bucket_divergence)
    topk_kl     seed 000: the student's top-k ids of each row, log_softmax over the k-slice on
                each side, KL(s || t); gradient only at those k ids (the selection is constant)
Reduction (distill.loss.weighted_mean): loss = sum_t w_t m_t l_t / max(sum_t m_t, 1).
"""

from __future__ import annotations

import math

import torch

from hpcdistill.kernels import scoring
from hpcdistill.kernels.common import tl, triton
from hpcdistill.kernels.reference import log_softmax_fp32

if triton is not None:
    from hpcdistill.kernels.common import online_update

KINDS = ("reverse_kl", "forward_kl", "jsd", "topk_kl")
_KIND_CODE = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2}


# --------------------------------------------------------------------------------------------
# per-chunk loss and d loss / d logits: torch (CPU path and reference for the kernel)
# --------------------------------------------------------------------------------------------

def _where_pos(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """p * x where p > 0, else 0 (0 * log 0 = 0, never NaN)."""
    return torch.where(p > 0, p * x, torch.zeros_like(x))


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log_softmax in x's dtype with -inf kept as -inf (all -inf rows too: -inf, not NaN)."""
    return (x - torch.logsumexp(x, -1, keepdim=True)).masked_fill(torch.isneginf(x), float("-inf"))


def rows_loss_grad_torch(s: torch.Tensor, t: torch.Tensor, kind: str, beta: float = 0.5,
                         k: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss [C] and d loss / d s [C, V], both float32 (float64 for float64 inputs).

    s: student logits [C, V] (finite); t: teacher logits [C, V] (may hold -inf).
    """
    dt = torch.float64 if s.dtype == torch.float64 else torch.float32
    s, t = s.to(dt), t.to(dt)
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "topk_kl":
        ids = torch.topk(s, k, dim=-1).indices  # [C, k]
        ls = torch.log_softmax(s.gather(-1, ids), -1)
        lt = _log_softmax(t.gather(-1, ids))
        ps = ls.exp()
        loss = _where_pos(ps, ls - lt).sum(-1)
        g = ps * (ls - lt - loss[:, None])
        return loss, torch.zeros_like(s).scatter_(-1, ids, g)
    ls = torch.log_softmax(s, -1)
    lt = _log_softmax(t)
    ps = ls.exp()
    if kind == "reverse_kl":
        loss = _where_pos(ps, ls - lt).sum(-1)
        return loss, ps * (ls - lt - loss[:, None])
    pt = lt.exp()
    if kind == "forward_kl":
        return _where_pos(pt, lt - ls).sum(-1), ps - pt
    if kind == "jsd":
        lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))  # log M
        b_term = (1 - beta) * _where_pos(ps, ls - lm).sum(-1)  # = E_S[u]
        loss = beta * _where_pos(pt, lt - lm).sum(-1) + b_term
        return loss, ps * ((1 - beta) * (ls - lm) - b_term[:, None])
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


# --------------------------------------------------------------------------------------------
# Triton: per-row loss and gradient, written in place over the student logits
# --------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _loss_grad_kernel(S, T, LOSS, SCALE, stride_s, stride_t, V, beta,
                          KIND: tl.constexpr, BLOCK_V: tl.constexpr):
        """Row r: LOSS[r] = l_r; S[r, :] <- SCALE[r] * d l_r / d s (in S's dtype).
        KIND 0 reverse KL, 1 forward KL (2 passes: stats, grad); 2 JSD (3 passes: lse, E_S[u], grad)."""
        NEG: tl.constexpr = float("-inf")
        row = tl.program_id(0).to(tl.int64)
        s_row = S + row * stride_s
        t_row = T + row * stride_t
        offs = tl.arange(0, BLOCK_V)
        zero = tl.sum(tl.zeros([1], tl.float32), 0)
        m_s = zero + NEG
        z_s = zero
        h_s = zero
        g_s = zero
        m_t = zero + NEG
        z_t = zero
        h_t = zero
        g_t = zero
        for v0 in range(0, V, BLOCK_V):  # pass 1: online log-normalisers and both KLs
            cols = v0 + offs
            inb = cols < V
            s = tl.load(s_row + cols, mask=inb, other=NEG).to(tl.float32)
            t = tl.load(t_row + cols, mask=inb, other=NEG).to(tl.float32)
            d = s - t
            m_s, z_s, h_s, g_s = online_update(s, d, m_s, z_s, h_s, g_s)
            m_t, z_t, h_t, g_t = online_update(t, d, m_t, z_t, h_t, g_t)
        lse_s = m_s + tl.log(z_s)
        lse_t = m_t + tl.log(z_t)
        dlse = lse_s - lse_t
        rev = tl.where(g_s == float("inf"), float("inf"), g_s / z_s - dlse)
        fwd = tl.where(z_t > 0, tl.where(g_t == NEG, float("inf"), dlse - g_t / z_t), 0.0)
        scale = tl.load(SCALE + row)
        log_b = tl.log(beta)
        log_1mb = tl.log(1.0 - beta)
        b_term = zero
        loss = zero
        if KIND == 0:
            loss = rev
        elif KIND == 1:
            loss = fwd
        else:
            a_term = zero
            for v0 in range(0, V, BLOCK_V):  # pass 2 (JSD): both KL(.||M) sums
                cols = v0 + offs
                inb = cols < V
                ls = tl.load(s_row + cols, mask=inb, other=NEG).to(tl.float32) - lse_s
                lt = tl.load(t_row + cols, mask=inb, other=NEG).to(tl.float32) - lse_t
                a = lt + log_b
                b = ls + log_1mb
                mx = tl.maximum(a, b)
                mxs = tl.where(mx == NEG, 0.0, mx)
                lm = mxs + tl.log(tl.exp(a - mxs) + tl.exp(b - mxs))
                ps = tl.exp(ls)
                pt = tl.exp(lt)
                a_term += tl.sum(tl.where(pt > 0, pt * (lt - lm), 0.0), 0)
                b_term += tl.sum(tl.where(ps > 0, ps * (ls - lm), 0.0), 0)
            b_term = (1.0 - beta) * b_term
            loss = beta * a_term + b_term
        for v0 in range(0, V, BLOCK_V):  # last pass: the gradient, in place over S
            cols = v0 + offs
            inb = cols < V
            ls = tl.load(s_row + cols, mask=inb, other=NEG).to(tl.float32) - lse_s
            lt = tl.load(t_row + cols, mask=inb, other=NEG).to(tl.float32) - lse_t
            ps = tl.exp(ls)
            if KIND == 0:
                grad = ps * (ls - lt - rev)
            elif KIND == 1:
                grad = ps - tl.exp(lt)
            else:
                a = lt + log_b
                b = ls + log_1mb
                mx = tl.maximum(a, b)
                mxs = tl.where(mx == NEG, 0.0, mx)
                lm = mxs + tl.log(tl.exp(a - mxs) + tl.exp(b - mxs))
                grad = ps * ((1.0 - beta) * (ls - lm) - b_term)
            if KIND != 1:
                grad = tl.where(ps > 0, grad, 0.0)  # no NaN from 0 * (-inf - ...) where p_S = 0
            tl.store(s_row + cols, (grad * scale).to(S.dtype.element_ty), mask=inb)
        tl.store(LOSS + row, loss)


def rows_loss_grad_triton_(s: torch.Tensor, t: torch.Tensor, scale: torch.Tensor, kind: str,
                           beta: float = 0.5, k: int = 20, block_v: int = 4096,
                           num_warps: int = 8) -> torch.Tensor:
    """Per-row loss [C] float32; OVERWRITES s [C, V] with scale[:, None] * d loss / d s.

    reverse / forward KL and JSD run the Triton kernel; topk_kl takes its ids and values from
    scoring.fused_score and scatters the k-slice gradient (a [C, k] computation).
    """
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    if kind == "topk_kl":
        res = scoring.fused_score(s, t, k, block_v=block_v, num_warps=num_warps)
        ids = res["student_topk_ids"]
        ls = torch.log_softmax(res["student_topk_lp"], -1)
        lt = log_softmax_fp32(res["teacher_at_student_topk_lp"])
        ps = ls.exp()
        loss = _where_pos(ps, ls - lt).sum(-1)
        g = ps * (ls - lt - loss[:, None]) * scale[:, None]
        s.zero_().scatter_(-1, ids, g.to(s.dtype))
        return loss
    if kind not in _KIND_CODE:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if s.stride(-1) != 1 or t.stride(-1) != 1:
        raise ValueError("logits must be contiguous along the vocabulary")
    C, V = s.shape
    loss = torch.empty(C, dtype=torch.float32, device=s.device)
    if C:
        block = min(block_v, max(16, triton.next_power_of_2(V)))
        _loss_grad_kernel[(C,)](s, t, loss, scale.float().contiguous(), s.stride(0), t.stride(0), V,
                                float(beta) if kind == "jsd" else 0.5, KIND=_KIND_CODE[kind],
                                BLOCK_V=block, num_warps=num_warps)
    return loss


# --------------------------------------------------------------------------------------------
# the autograd.Function
# --------------------------------------------------------------------------------------------

class _FusedLinearDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, scale, teacher_logits, teacher_hidden, teacher_weight,
                kind, beta, k, chunk, use_triton, return_rows):
        N = hidden.shape[0]
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(hidden) if need_dh else None
        dw = torch.zeros_like(weight) if need_dw else None
        total = torch.zeros((), dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32,
                            device=hidden.device)
        row_losses = torch.empty(N, dtype=total.dtype, device=hidden.device) if return_rows else None  # [N]
        for c in range(0, N, chunk):
            h_c = hidden[c:c + chunk]
            logits = h_c @ weight.T  # [C, V], input dtype
            if teacher_logits is not None:
                t_c = teacher_logits[c:c + chunk]
            else:
                t_c = teacher_hidden[c:c + chunk] @ teacher_weight.T
            sc = scale[c:c + chunk]
            if use_triton:
                rows = rows_loss_grad_triton_(logits, t_c.contiguous(), sc, kind, beta, k)
                dlogits = logits  # overwritten in place with the scaled gradient
            else:
                rows, g = rows_loss_grad_torch(logits, t_c, kind, beta, k)
                dlogits = (g * sc.to(g.dtype)[:, None]).to(hidden.dtype)
                del g
            total += (rows.to(total.dtype) * sc.to(total.dtype)).sum()
            if return_rows:
                row_losses[c:c + chunk] = rows
            if need_dh:
                torch.matmul(dlogits, weight, out=dh[c:c + chunk])
            if need_dw:
                dw.addmm_(dlogits.T, h_c)
            del logits, dlogits
        ctx.save_for_backward(dh, dw)
        if not return_rows:
            return total
        ctx.mark_non_differentiable(row_losses)
        return total, row_losses

    @staticmethod
    def backward(ctx, grad_out, *_grad_rows):  # the rows are non-differentiable: no gradient there
        dh, dw = ctx.saved_tensors
        g = grad_out.to(dh.dtype if dh is not None else dw.dtype)
        return (dh * g if dh is not None else None, dw * g if dw is not None else None,
                None, None, None, None, None, None, None, None, None, None)


def default_chunk(n_rows: int, vocab: int, budget_bytes: int = 1 << 28) -> int:
    """Rows per chunk: a power of two with one fp32 [chunk, V] buffer within `budget_bytes`
    (256 MiB: 256 rows at V = 151,936), between 16 and 4096."""
    rows = max(16, budget_bytes // (4 * max(vocab, 1)))
    return min(1 << int(math.log2(rows)), 4096)


def fused_linear_distill_loss(hidden: torch.Tensor, weight: torch.Tensor, *,
                              teacher_logits: torch.Tensor | None = None,
                              teacher_hidden: torch.Tensor | None = None,
                              teacher_weight: torch.Tensor | None = None,
                              kind: str = "jsd", beta: float = 0.5, k: int = 20,
                              weights: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
                              chunk: int | None = None, backend: str = "auto",
                              return_rows: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Distillation loss of the student logits h @ W^T against a teacher, never forming [N, V].

    hidden: [N, H] student final hidden states (requires_grad for dh); weight: [V, H] the student
    lm_head (requires_grad for dW). Teacher: either teacher_logits [N, V], or teacher_hidden
    [N, H_t] with teacher_weight [V, H_t] (projected chunk by chunk, no gradient). weights,
    loss_mask: [N] as distill/objectives.py (default all ones). kind: one of KINDS. backend: "torch",
    "triton", or "auto" (Triton on CUDA when it imports). Returns a 0-d float32 loss
    (float64 for float64 inputs) whose backward fills hidden.grad and weight.grad; with
    `return_rows`, (loss, rows): rows [N] the per-token loss l_t before weights, mask and
    normalisation, in the loss's dtype, detached.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if (teacher_logits is None) == (teacher_hidden is None or teacher_weight is None):
        raise ValueError("give either teacher_logits, or teacher_hidden and teacher_weight")
    N, V = hidden.shape[0], weight.shape[0]
    if kind == "topk_kl" and not 1 <= k <= V:
        raise ValueError(f"k must be in [1, V={V}], got {k}")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and hidden.is_cuda and triton is not None)
    if use_triton and triton is None:
        raise RuntimeError("backend='triton' needs triton (pip install 'hpcdistill[gpu]')")
    if use_triton and kind == "topk_kl" and k > scoring.MAX_FUSED_K:
        use_triton = False
    w = torch.ones(N, device=hidden.device) if weights is None else weights.to(hidden.device)
    m = torch.ones(N, device=hidden.device) if loss_mask is None else loss_mask.to(hidden.device)
    w, m = w.to(torch.float64 if hidden.dtype == torch.float64 else torch.float32), m.to(w.dtype)
    scale = (w * m / m.sum().clamp_min(1.0)).detach()  # [N]: d loss / d l_t
    tw = teacher_weight.detach() if teacher_weight is not None else None
    th = teacher_hidden.detach() if teacher_hidden is not None else None
    tl_ = teacher_logits.detach() if teacher_logits is not None else None
    return _FusedLinearDistill.apply(hidden, weight, scale, tl_, th, tw, kind, float(beta), int(k),
                                     int(chunk or default_chunk(N, V)), use_triton, bool(return_rows))


__all__ = ["fused_linear_distill_loss", "rows_loss_grad_torch", "rows_loss_grad_triton_", "default_chunk",
           "KINDS"]
