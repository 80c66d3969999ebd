"""The distill objective through the fused Triton loss (`kernels.loss.fused_linear_distill_loss`),
where it computes what the spec asks: selected by `trainer.kernels = "auto"` on CUDA.

The kernel takes the student's hidden states and lm_head weight and the teacher's, and computes
each chunk's loss and its gradient in one pass (no [N, V] tensor, no float32 [C, V] copies, no
recompute). It covers:

    support = "full"   divergence reverse, forward or jsd(beta), without is_clip
    support = "topk"   the student's top-k renormalised, reverse KL (SDPO's default; k <= 64),
                       without is_clip; the kernel takes the top-k of the live logits, which at the
                       step's weights are the ids scoring recorded (ties aside)

with the whole lm_head weight on the rank (trainer single, or DeepSpeed ZeRO 1/2), a plain
teacher (not a trust-region mix), no logit soft-capping and no lm_head bias. Everything else, and
the CPU, takes the chunked torch path of `train.update` (the reference these are checked against:
tests/test_fused_pipeline.py, in Triton's interpreter).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from hpcdistill.distill.loss import LossConfig, masked_mean
from hpcdistill.kernels.common import triton_available
from hpcdistill.models.scoring import response_hidden
from hpcdistill.models.teachers import teacher_members
from hpcdistill.spec.schema import Spec

log = logging.getLogger(__name__)
_KINDS = {"reverse": "reverse_kl", "forward": "forward_kl", "jsd": "jsd"}
_announced: set[str] = set()


def kernel_kind(config: LossConfig, top_k: int) -> str | None:
    """The fused loss's `kind` for this loss config, or None when the kernel does not compute it."""
    from hpcdistill.kernels.scoring import MAX_FUSED_K

    if config.is_clip is not None:
        return None
    if config.support == "full":
        return _KINDS[config.divergence]
    if (config.support == "topk" and config.topk_support == "student" and config.divergence == "reverse"
            and config.topk_normalization == "renormalize" and top_k <= MAX_FUSED_K):
        return "topk_kl"
    return None


def _plain_head(model) -> bool:
    head = model.get_output_embeddings()
    return getattr(head, "bias", None) is None and not getattr(model.config, "final_logit_softcapping", None)


def applies(spec: Spec, models, *, device_type: str = "cuda") -> bool:
    """True when `trainer.kernels = "auto"`, the student is on CUDA, triton imports and the kernel
    computes this run's distill loss (module docstring)."""
    if spec.trainer.kernels != "auto" or models.student.device.type != device_type or not triton_available():
        return False
    if not LossConfig.applies_to(spec.train.objective):
        return False
    trainer = models.trainer
    if (trainer is not None and trainer.shards_parameters) or models.teacher_service is not None:
        return False  # the fused loss recomputes the teacher's logits: not with the teacher apart
    config = LossConfig.from_train(spec.train)
    members = teacher_members(models.teacher)
    return (kernel_kind(config, spec.scoring.top_k) is not None and _plain_head(models.student.model)
            and len(members) == 1 and members[0][1] == 1.0 and _plain_head(members[0][0]))


def distill_objective(spec: Spec, models, items, weights: list[np.ndarray], *, backend: str = "triton"):
    """(loss, metrics) of the distill objective over `items` through the fused loss; leaves each
    rollout's per-token loss terms in `rollout.train_loss`, as the torch path does."""
    from hpcdistill.kernels.loss import fused_linear_distill_loss

    config = LossConfig.from_train(spec.train)
    kind = kernel_kind(config, spec.scoring.top_k)
    if kind not in _announced:  # once per process: which path a run's update takes, in its log
        _announced.add(kind)
        log.info("the distill loss (%s) goes through the fused Triton loss (trainer.kernels = %r)", kind,
                 spec.trainer.kernels)
    lengths = [len(it.scores.student_lp) for it in items]
    student = models.student
    hidden = response_hidden(student, [it.student_seq for it in items], lengths)  # [N, H], with grad
    (teacher_model, _), = teacher_members(models.teacher)
    with torch.no_grad():
        teacher_hidden = response_hidden(models.teacher, [it.teacher_seq for it in items], lengths,
                                         model=teacher_model)
    device = hidden.device
    valid = torch.as_tensor(np.concatenate([np.full(n, float(it.teacher_signal), np.float32)
                                            for it, n in zip(items, lengths)]), device=device)
    loss, rows = fused_linear_distill_loss(
        hidden, student.model.get_output_embeddings().weight, teacher_hidden=teacher_hidden,
        teacher_weight=teacher_model.get_output_embeddings().weight.detach(), kind=kind, beta=config.beta,
        k=spec.scoring.top_k, weights=torch.as_tensor(np.concatenate(weights), device=device),
        loss_mask=valid, chunk=spec.scoring.chunk_size, backend=backend, return_rows=True)
    for item, terms in zip(items, torch.split(rows, lengths)):
        item.train_loss = terms.float().cpu().numpy()
    metrics = {"loss": loss.detach(), "divergence": masked_mean(rows, valid.to(rows.dtype))}
    if config.support == "topk":
        metrics["topk_kl"] = metrics["divergence"]
    return loss, metrics


__all__ = ["applies", "distill_objective", "kernel_kind"]
