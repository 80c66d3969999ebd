"""Divergences against float64 references written out term by term (seed 000 formulas)."""

import math

import numpy as np
import pytest
import torch

from hpcdistill.distill.divergence import entropy, full_kl, log_softmax_fp32, slice_kl, topk_kl


def ref_log_softmax(x: np.ndarray) -> np.ndarray:
    """float64 log_softmax of one row; -inf entries stay -inf."""
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return np.full_like(x, -np.inf)
    m = finite.max()
    lse = m + math.log(np.exp(finite - m).sum())
    return np.where(np.isneginf(x), -np.inf, x - lse)


def ref_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    lp, lq = ref_log_softmax(p_logits), ref_log_softmax(q_logits)
    total = 0.0
    for a, b in zip(lp, lq):
        if a == -np.inf:  # p = 0: contributes nothing
            continue
        total += math.exp(a) * (a - b)
    return total


def ref_topk_kl(s: torch.Tensor, t: torch.Tensor, k: int) -> np.ndarray:
    """Row by row in float64 on the ids torch.topk chooses (the definition on ties)."""
    ids = torch.topk(s, k, dim=-1).indices.reshape(-1, k).numpy()
    s64 = s.double().reshape(-1, s.shape[-1]).numpy()
    t64 = t.double().reshape(-1, t.shape[-1]).numpy()
    out = [ref_kl(s64[r, ids[r]], t64[r, ids[r]]) for r in range(s64.shape[0])]
    return np.array(out).reshape(s.shape[:-1])


@pytest.mark.parametrize("shape", [(7, 50), (2, 3, 64), (1000,), (4, 5, 2, 33)])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_topk_kl_matches_float64_reference_on_random_logits(shape, k):
    g = torch.Generator().manual_seed(hash((shape, k)) % 2**31)
    s = torch.randn(shape, generator=g) * 3
    t = s + torch.randn(shape, generator=g) * 2
    got = topk_kl(s, t, k)
    assert got.shape == shape[:-1] and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), ref_topk_kl(s, t, k), rtol=1e-4, atol=1e-5)
    if k > 1:
        assert (got > 0).all()  # different distributions on the slice


def test_topk_kl_with_k_equal_vocab_is_full_kl():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 40, generator=g) * 2, torch.randn(6, 40, generator=g) * 2
    np.testing.assert_allclose(topk_kl(s, t, 40).numpy(), full_kl(s, t).numpy(), rtol=1e-5, atol=1e-6)
    ref = [ref_kl(s[r].double().numpy(), t[r].double().numpy()) for r in range(6)]
    np.testing.assert_allclose(full_kl(s, t).numpy(), ref, rtol=1e-5, atol=1e-6)


def test_topk_kl_uses_one_id_set_for_both_sides_under_ties():
    # Student row with a 4-way tie straddling the k-th place: topk picks 2 of the 4 tied ids.
    s = torch.tensor([[5.0, 3.0, 3.0, 3.0, 3.0, 1.0, 0.0]])
    t = torch.tensor([[4.0, 0.0, 2.0, -1.0, 1.0, 3.0, 2.0]])
    k = 3
    got = topk_kl(s, t, k)
    np.testing.assert_allclose(got.numpy(), ref_topk_kl(s, t, k), rtol=1e-5, atol=1e-7)
    # When the teacher is also tied on the tied ids, which of them topk picks cannot matter.
    t_tied = torch.tensor([[4.0, 2.0, 2.0, 2.0, 2.0, 3.0, 2.0]])
    ids = [0, 1, 2]
    expect = ref_kl(s[0, ids].double().numpy(), t_tied[0, ids].double().numpy())
    np.testing.assert_allclose(topk_kl(s, t_tied, k).item(), expect, rtol=1e-5)


def test_minus_inf_entries_give_no_nan():
    s = torch.tensor([[2.0, 1.0, -math.inf, 0.5, -math.inf],
                      [1.0, -math.inf, -math.inf, -math.inf, -math.inf]])
    t = torch.tensor([[1.0, 2.0, -math.inf, -math.inf, 0.0],
                      [0.0, 1.0, 2.0, -math.inf, 3.0]])
    # Full KL: row 0 puts student mass on id 3 where the teacher has none -> +inf (the true KL).
    kl = full_kl(s, t)
    assert not torch.isnan(kl).any()
    assert math.isinf(kl[0].item()) and kl[0].item() > 0
    np.testing.assert_allclose(kl[1].item(), ref_kl(s[1].double().numpy(), t[1].double().numpy()), rtol=1e-5)
    # Top-k with k larger than the student's support: slice holds student -inf entries (p = 0).
    got = topk_kl(s, t, 4)
    assert not torch.isnan(got).any()
    np.testing.assert_allclose(got[1].item(), ref_topk_kl(s[1:], t[1:], 4)[0], rtol=1e-5)
    # A teacher masked exactly where the student is masked: finite.
    t2 = torch.where(torch.isinf(s), s, t.clamp(min=-5))
    assert torch.isfinite(full_kl(s, t2)).all()
    # Entropy ignores p = 0 entries; a fully masked row has -inf log-probs and zero entropy.
    h = entropy(s)
    assert torch.isfinite(h).all() and h[1].item() == 0.0
    all_masked = torch.full((1, 4), -math.inf)
    assert torch.isneginf(log_softmax_fp32(all_masked)).all()
    assert entropy(all_masked).item() == 0.0


def test_entropy_and_log_softmax_match_reference_and_return_fp32():
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 4, 30, generator=g) * 4).to(torch.bfloat16)
    lp = log_softmax_fp32(x)
    assert lp.dtype == torch.float32
    ref = np.stack([ref_log_softmax(r) for r in x.double().reshape(-1, 30).numpy()]).reshape(3, 4, 30)
    np.testing.assert_allclose(lp.numpy(), ref, rtol=1e-5, atol=1e-5)
    h_ref = -(np.exp(ref) * ref).sum(-1)
    np.testing.assert_allclose(entropy(x).numpy(), h_ref, rtol=1e-4, atol=1e-5)


def test_identical_distributions_have_zero_kl_and_slice_kl_is_shift_invariant():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(5, 100, generator=g)
    assert torch.allclose(topk_kl(s, s.clone(), 20), torch.zeros(5), atol=1e-6)
    assert torch.allclose(full_kl(s, s + 7.0), torch.zeros(5), atol=1e-5)
    t = torch.randn(5, 100, generator=g)
    ids = torch.topk(s, 20, dim=-1).indices
    a = slice_kl(s.gather(-1, ids), t.gather(-1, ids))
    b = slice_kl(log_softmax_fp32(s).gather(-1, ids), log_softmax_fp32(t).gather(-1, ids))
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)
