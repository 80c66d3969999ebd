"""The fused Triton kernels compiled for a GPU (not the interpreter): what `scripts/gpu-check.sh`
runs natively. Skipped without CUDA; tests/test_fused_scoring.py, test_fused_loss.py and
test_fused_pipeline.py check the same kernels in Triton's CPU interpreter in CI.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hpcdistill.kernels.common import triton_available

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()),
                                reason="needs a CUDA device and triton (the interpreter tests run everywhere)")

V = 151_936  # Qwen3's vocabulary: many kernel blocks per row


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_score_on_cuda_matches_the_float64_torch_scores(dtype):
    from hpcdistill.kernels.scoring import chunked_score_torch, fused_score

    g = torch.Generator(device="cuda").manual_seed(0)
    s = (torch.randn(64, V, device="cuda", generator=g) * 3).to(dtype)
    t = (torch.randn(64, V, device="cuda", generator=g) * 3).to(dtype)
    got = fused_score(s, t, 20)
    want = chunked_score_torch(s.double(), t.double(), 20)
    for name in ("topk_kl", "full_kl", "entropy_s", "entropy_t", "student_lse", "teacher_lse"):
        torch.testing.assert_close(got[name].double(), want[name].double(), rtol=2e-3, atol=2e-3, msg=name)
    assert (got["student_topk_ids"] == want["student_topk_ids"]).float().mean() > 0.95


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd", "topk_kl"])
def test_fused_loss_on_cuda_matches_its_torch_backend(kind):
    from hpcdistill.kernels.loss import fused_linear_distill_loss

    g = torch.Generator(device="cuda").manual_seed(1)
    h = torch.randn(96, 256, device="cuda", generator=g, requires_grad=True)
    w = (torch.randn(V, 256, device="cuda", generator=g) * 0.05).requires_grad_()
    th = torch.randn(96, 256, device="cuda", generator=g)
    tw = torch.randn(V, 256, device="cuda", generator=g) * 0.05
    out = {}
    for backend in ("torch", "triton"):
        h.grad = w.grad = None
        loss = fused_linear_distill_loss(h, w, teacher_hidden=th, teacher_weight=tw, kind=kind, k=20,
                                         chunk=32, backend=backend)
        loss.backward()
        out[backend] = (loss.detach(), h.grad.clone(), w.grad.clone())
    for a, b in zip(out["triton"], out["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_a_training_step_through_the_fused_loss_on_cuda_equals_the_torch_path():
    from test_microbatch import _items, _models, _spec

    from hpcdistill.train import fused, update

    models, _ = _models()
    models.student.model.float().cuda()
    models.student = models.teacher = dataclasses.replace(models.student, dtype=torch.float32,
                                                          device=torch.device("cuda"))
    spec = _spec({"support": "full", "divergence": "jsd"})
    assert fused.applies(spec, models)
    items = _items(0)
    weights = [np.ones(len(it.scores.student_lp), np.float32) for it in items]
    grads = {}
    for path, torch_spec in (("fused", spec), ("torch", dataclasses.replace(
            spec, trainer=dataclasses.replace(spec.trainer, kernels="torch")))):
        models.student.model.zero_grad(set_to_none=True)
        loss, _ = update.objective_loss(torch_spec, models, items, weights)
        loss.backward()
        grads[path] = (float(loss.detach()), {n: p.grad.clone() for n, p in models.student.model.named_parameters()
                                               if p.grad is not None})
    assert grads["fused"][0] == pytest.approx(grads["torch"][0], rel=1e-4)
    for name, grad in grads["torch"][1].items():
        torch.testing.assert_close(grads["fused"][1][name], grad, rtol=1e-3, atol=1e-5, msg=name)
