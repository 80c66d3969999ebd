"""One-pass fused scoring of student and teacher logits (issue 10; design in docs/gpu-kernels.md).

Per row (position) of student logits s [T, V] and teacher logits t [T, V], one streaming pass over
the vocabulary gives:

    student_lse, teacher_lse      log-normalisers (logsumexp)
    reverse_kl = full_kl          KL(student || teacher) over the full vocabulary
    forward_kl                    KL(teacher || student)
    entropy_s, entropy_t          entropies in nats
    student_topk_ids [T, k]       the student's top-k ids, by descending logit
    student_topk_lp  [T, k]       student full-vocab log-probs at those ids
    teacher_at_student_topk_lp    teacher full-vocab log-probs at those ids
    topk_kl                       seed 000: log_softmax over the k-slice on each side, KL(s || t)

Three implementations of the same function:
- `fused_score`: the Triton kernel (CUDA; or CPU under TRITON_INTERPRET=1 for tests). Reads each
  logit once, keeps the running top-k on chip, writes O(T * k) outputs: no [T, V] temporary.
- `chunked_score_torch`: pure torch, `chunk` rows at a time, fp32 log-softmax of both sides. The
  CPU path and the reference the kernel is checked against.
- `score_logits`: picks the kernel on CUDA tensors when triton imports and k <= 64, else the torch path.

Conventions (as hpcdistill.kernels.reference): a -inf logit has probability 0 and contributes 0 to
KL(p||.) and to H(p); p > 0 where q = 0 gives +inf; an all -inf row has lse -inf, entropy 0 and
KL 0 as the p side. Ties at the k-th value: the kernel keeps the LOWEST vocabulary ids among tied
values (rank order: value descending, then id ascending); the torch path keeps whatever
`torch.topk` returns. Tied ids carry equal logits on the student side, so student_topk_lp agrees
whichever ids are picked; teacher_at_student_topk_lp and topk_kl may differ between tie choices
only through the teacher's values at the differing ids (tests use ties where both sides tie).
"""

from __future__ import annotations

import logging
import math

import torch

from hpcdistill.kernels.common import tl, triton
from hpcdistill.kernels.reference import entropy_from_logprobs, kl_from_logprobs, log_softmax_fp32, slice_kl

if triton is not None:
    from hpcdistill.kernels.common import online_update

log = logging.getLogger(__name__)

MAX_FUSED_K = 64  # the on-chip top-k buffer is next_pow2(k) <= 64 registers per row
STAT_NAMES = ("student_lse", "teacher_lse", "reverse_kl", "forward_kl", "entropy_s", "entropy_t", "topk_kl")
SCORE_NAMES = ("student_topk_ids", "student_topk_lp", "teacher_at_student_topk_lp", "topk_kl", "full_kl",
               "entropy_s", "entropy_t", "student_lse", "teacher_lse", "reverse_kl", "forward_kl")


def _check_inputs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int) -> None:
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"expected student and teacher logits of one shape [T, V], got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    V = student_logits.shape[1]
    if not 1 <= k <= V:
        raise ValueError(f"k must be in [1, V={V}], got {k}")


# --------------------------------------------------------------------------------------------
# torch path (CPU path, reference, baseline)
# --------------------------------------------------------------------------------------------

def chunked_score_torch(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int,
                        chunk: int = 512) -> dict[str, torch.Tensor]:
    """All scores, `chunk` positions at a time, with fp32 log-softmax of both sides.

    student_logits, teacher_logits: [T, V] any float dtype, same device -> dict of [T] float32 and
    [T, k] tensors (ids int64). Peak extra memory: about 4 [chunk, V] float32 tensors.
    """
    _check_inputs(student_logits, teacher_logits, k)
    parts = []
    for c in range(0, student_logits.shape[0], chunk):
        ls = log_softmax_fp32(student_logits[c:c + chunk])  # [C, V] float32
        lt = log_softmax_fp32(teacher_logits[c:c + chunk])  # [C, V] float32
        ids = torch.topk(ls, k, dim=-1).indices  # [C, k], descending
        s_at, t_at = ls.gather(-1, ids), lt.gather(-1, ids)  # [C, k]
        rev = kl_from_logprobs(ls, lt)
        parts.append({
            "student_topk_ids": ids,
            "student_topk_lp": s_at,
            "teacher_at_student_topk_lp": t_at,
            "topk_kl": slice_kl(s_at, t_at),
            "full_kl": rev,
            "entropy_s": entropy_from_logprobs(ls),
            "entropy_t": entropy_from_logprobs(lt),
            "student_lse": torch.logsumexp(student_logits[c:c + chunk].float(), -1),
            "teacher_lse": torch.logsumexp(teacher_logits[c:c + chunk].float(), -1),
            "reverse_kl": rev,
            "forward_kl": kl_from_logprobs(lt, ls),
        })
        del ls, lt
    if not parts:  # T = 0
        dev = student_logits.device
        empty1, emptyk = torch.zeros(0, device=dev), torch.zeros(0, k, device=dev)
        return {n: (torch.zeros(0, k, dtype=torch.long, device=dev) if n == "student_topk_ids"
                    else emptyk.clone() if n in ("student_topk_lp", "teacher_at_student_topk_lp")
                    else empty1.clone()) for n in SCORE_NAMES}
    return {n: torch.cat([p[n] for p in parts]) for n in SCORE_NAMES}


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _fused_score_kernel(
        S, T, stride_s, stride_t, V, k,
        IDS, SLP, TLP, STATS,  # [rows, k] int64, [rows, k] f32, [rows, k] f32, [rows, 7] f32
        K_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        NEG: tl.constexpr = float("-inf")
        LOWEST: tl.constexpr = -3.4028234663852886e38  # key of a -inf logit: above the empty slots
        row = tl.program_id(0).to(tl.int64)
        s_row = S + row * stride_s
        t_row = T + row * stride_t
        offs = tl.arange(0, BLOCK_V)
        kk = tl.arange(0, K_PAD)
        # Top-k buffer: slots >= k hold +inf so they are never the minimum and never evicted.
        buf_v = tl.where(kk < k, NEG, float("inf")).to(tl.float32)
        buf_i = tl.full([K_PAD], -1, tl.int32)
        theta = tl.min(buf_v, 0)  # current k-th largest key (-inf while slots are empty)
        zero = tl.sum(tl.zeros([1], tl.float32), 0)  # 0-d fp32 loop carries
        m_s = zero + NEG
        z_s = zero
        h_s = zero
        g_s = zero
        m_t = zero + NEG
        z_t = zero
        h_t = zero
        g_t = zero
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            inb = cols < V
            s = tl.load(s_row + cols, mask=inb, other=NEG).to(tl.float32)
            t = tl.load(t_row + cols, mask=inb, other=NEG).to(tl.float32)
            d = s - t  # NaN where both are -inf; only used where the side's e > 0
            bmax_s = tl.max(s, 0)
            m_s, z_s, h_s, g_s = online_update(s, d, m_s, z_s, h_s, g_s)
            m_t, z_t, h_t, g_t = online_update(t, d, m_t, z_t, h_t, g_t)
            # Running top-k merge: only blocks whose max beats the k-th kept value do any work.
            if (bmax_s > theta) | (theta == NEG):
                key = tl.where(inb, tl.where(s == NEG, LOWEST, s), NEG)
                cmax, carg = tl.max(key, 0, return_indices=True, return_indices_tie_break_left=True)
                while cmax > theta:  # strict: an equal value arriving later (higher id) loses the tie
                    # evict the lowest-ranked slot: minimum value, highest id among those
                    evict = tl.where(buf_v == theta, buf_i, -2)
                    evict_id = tl.max(evict, 0)
                    slot = tl.min(tl.where(evict == evict_id, kk, K_PAD), 0)
                    buf_v = tl.where(kk == slot, cmax, buf_v)
                    buf_i = tl.where(kk == slot, v0 + carg, buf_i)
                    key = tl.where(offs == carg, NEG, key)
                    theta = tl.min(buf_v, 0)
                    cmax, carg = tl.max(key, 0, return_indices=True, return_indices_tie_break_left=True)

        # Full-vocabulary statistics (see docs/gpu-kernels.md for the algebra).
        log_zs = tl.log(z_s)
        log_zt = tl.log(z_t)
        lse_s = m_s + log_zs
        lse_t = m_t + log_zt
        dlse = (m_s - m_t) + (log_zs - log_zt)  # lse_s - lse_t without forming either
        ent_s = tl.where(z_s > 0, log_zs - h_s / z_s, 0.0)
        ent_t = tl.where(z_t > 0, log_zt - h_t / z_t, 0.0)
        rev = tl.where(z_s > 0, tl.where(g_s == float("inf"), float("inf"), g_s / z_s - dlse), 0.0)
        fwd = tl.where(z_t > 0, tl.where(g_t == NEG, float("inf"), dlse - g_t / z_t), 0.0)

        # Top-k outputs, sorted by rank (value descending, id ascending).
        valid = kk < k
        s_at = tl.where(buf_v == LOWEST, NEG, buf_v)
        t_at = tl.load(t_row + buf_i, mask=valid & (buf_i >= 0), other=NEG).to(tl.float32)
        s_lp = tl.where(s_at == NEG, NEG, s_at - lse_s)
        t_lp = tl.where(t_at == NEG, NEG, t_at - lse_t)
        # seed 000 top-k KL: log_softmax over the k-slice on each side, KL(s || t)
        sm = tl.max(tl.where(valid, s_at, NEG), 0)
        sm = tl.where(sm == NEG, 0.0, sm)
        es = tl.where(valid, tl.exp(s_at - sm), 0.0)
        s_slse = sm + tl.log(tl.sum(es, 0))
        tm = tl.max(tl.where(valid, t_at, NEG), 0)
        tm = tl.where(tm == NEG, 0.0, tm)
        t_slse = tm + tl.log(tl.sum(tl.where(valid, tl.exp(t_at - tm), 0.0), 0))
        ps_lp = tl.where(s_at == NEG, NEG, s_at - s_slse)
        pt_lp = tl.where(t_at == NEG, NEG, t_at - t_slse)
        ps = tl.exp(ps_lp)
        topk_kl = tl.sum(tl.where(valid & (ps > 0), ps * (ps_lp - pt_lp), 0.0), 0)

        beats = (valid[None, :] & ((buf_v[None, :] > buf_v[:, None])
                                   | ((buf_v[None, :] == buf_v[:, None]) & (buf_i[None, :] < buf_i[:, None]))))
        rank = tl.sum(beats.to(tl.int32), 1)
        out = row * k + rank
        tl.store(IDS + out, buf_i.to(tl.int64), mask=valid)
        tl.store(SLP + out, s_lp, mask=valid)
        tl.store(TLP + out, t_lp, mask=valid)
        st = STATS + row * 7
        tl.store(st + 0, lse_s)
        tl.store(st + 1, lse_t)
        tl.store(st + 2, rev)
        tl.store(st + 3, fwd)
        tl.store(st + 4, ent_s)
        tl.store(st + 5, ent_t)
        tl.store(st + 6, topk_kl)


def fused_score(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, *,
                block_v: int = 4096, num_warps: int = 8) -> dict[str, torch.Tensor]:
    """All scores in one pass over the vocabulary per row (the Triton kernel).

    student_logits, teacher_logits: [T, V] bf16 / fp16 / fp32 on CUDA (or CPU under
    TRITON_INTERPRET=1), last dim contiguous; 1 <= k <= min(V, 64) -> dict of [T] float32 and
    [T, k] tensors (ids int64), keys SCORE_NAMES. Extra memory: the outputs only, O(T * k).
    """
    if triton is None:
        raise RuntimeError("fused_score needs triton (pip install 'hpcdistill[gpu]'); "
                           "use chunked_score_torch or score_logits instead")
    _check_inputs(student_logits, teacher_logits, k)
    if k > MAX_FUSED_K:
        raise ValueError(f"fused_score keeps the top-k on chip and supports k <= {MAX_FUSED_K}, got {k}")
    s = student_logits if student_logits.stride(-1) == 1 else student_logits.contiguous()
    t = teacher_logits if teacher_logits.stride(-1) == 1 else teacher_logits.contiguous()
    n_rows, V = s.shape
    dev = s.device
    ids = torch.empty(n_rows, k, dtype=torch.long, device=dev)
    s_lp = torch.empty(n_rows, k, dtype=torch.float32, device=dev)
    t_lp = torch.empty(n_rows, k, dtype=torch.float32, device=dev)
    stats = torch.empty(n_rows, len(STAT_NAMES), dtype=torch.float32, device=dev)
    if n_rows > 0:
        k_pad = max(16, 1 << math.ceil(math.log2(k)))
        block = min(block_v, max(16, triton.next_power_of_2(V)))
        _fused_score_kernel[(n_rows,)](s, t, s.stride(0), t.stride(0), V, k, ids, s_lp, t_lp, stats,
                                       K_PAD=k_pad, BLOCK_V=block, num_warps=num_warps)
    out = {"student_topk_ids": ids, "student_topk_lp": s_lp, "teacher_at_student_topk_lp": t_lp}
    out.update({name: stats[:, j] for j, name in enumerate(STAT_NAMES)})
    out["full_kl"] = out["reverse_kl"]
    return {n: out[n] for n in SCORE_NAMES}


def score_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int,
                 chunk: int = 512) -> dict[str, torch.Tensor]:
    """The fused Triton kernel for CUDA tensors when triton imports and k <= 64; else the chunked
    torch path. Same inputs and outputs as `fused_score`."""
    if (student_logits.is_cuda and teacher_logits.is_cuda and triton is not None and k <= MAX_FUSED_K
            and student_logits.device == teacher_logits.device):
        return fused_score(student_logits, teacher_logits, k)
    return chunked_score_torch(student_logits, teacher_logits, k, chunk=chunk)


__all__ = ["fused_score", "chunked_score_torch", "score_logits", "SCORE_NAMES",
           "MAX_FUSED_K"]
