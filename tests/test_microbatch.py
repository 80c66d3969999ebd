"""The memory-bounded step (issue 17) equals today's whole-batch step.

`train.update.update` (token-budget micro-batches, the lm_head projected chunk by chunk with
recompute in backward) against `train.whole_batch.update` (one [N, V] graph), in float64 on a tiny
random Llama: the loss and every parameter's gradient, for every objective and support, at
budgets that put the batch in one micro-batch, in several, and every item alone (a budget smaller
than any item). The trainer is the real single-process one, stopped before its optimizer step.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from hpcdistill.distill.schedules import StepPlan
from hpcdistill.models.generation import Generation
from hpcdistill.models.loading import tiny_random_model
from hpcdistill.models.scoring import TokenScores
from hpcdistill.spec.load import validate
from hpcdistill.tasks import Problem, Verdict
from hpcdistill.train import update as micro
from hpcdistill.train import whole_batch
from hpcdistill.train.collect import ScoredRollout
from hpcdistill.train.distributed import SingleTrainer
from hpcdistill.train.microbatch import plan_micro_batches
from hpcdistill.train.roles import Models
from hpcdistill.train.trainer_base import TrainerConfig

V, K = 48, 4
BUDGETS = (10**6, 24, 1)  # one micro-batch; several; every item alone (smaller than any item)


class GradientTrainer(SingleTrainer):
    """The single trainer's step up to the optimizer: keeps the gradients, changes no weight."""

    def _clip_and_step(self):
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}
        return 0.0


def _scores(rng, n: int) -> TokenScores:
    def ids():
        return np.stack([rng.choice(V, K, replace=False) for _ in range(n)]).astype(np.int32)

    def lp(*shape):
        return (-rng.random(shape) * 4).astype(np.float32)

    zeros = np.zeros(n, np.float32)
    return TokenScores(student_lp=lp(n), teacher_lp=lp(n), student_topk_ids=ids(), student_topk_lp=lp(n, K),
                       teacher_at_student_topk_lp=lp(n, K), topk_kl=zeros, entropy_s=zeros, entropy_t=zeros,
                       teacher_own_lp=lp(n), teacher_topk_ids=ids(), teacher_topk_lp=lp(n, K),
                       student_at_teacher_topk_lp=lp(n, K), student_topk_mass=zeros, teacher_topk_mass=zeros,
                       teacher_mass_at_student_topk=zeros, student_mass_at_teacher_topk=zeros, topk_overlap=zeros)


def _items(seed: int, kind: str = "original") -> list[ScoredRollout]:
    """6 rollouts of 3 problems (groups of 2), responses of 3..11 tokens, own teacher prompts."""
    rng = np.random.default_rng(seed)
    items = []
    for i, n in enumerate((5, 11, 3, 8, 6, 9)):
        prompt = [int(x) for x in rng.integers(1, V, size=2 + i % 3)]
        response = [int(x) for x in rng.integers(1, V, size=n)]
        teacher_prompt = prompt + [int(x) for x in rng.integers(1, V, size=3)]
        sampler = (-rng.random(n) * 3).astype(np.float32)
        gen = Generation(prompt, np.asarray(response), sampler, sampler, "stop")
        items.append(ScoredRollout(Problem("PQR"[i // 2], "x", {}), i % 2, kind, (prompt, response),
                                   (teacher_prompt, response), gen, "", Verdict(float(np.float32(rng.random())), True, "", {}),
                                   _scores(rng, n)))
    return items


def _models() -> tuple[Models, torch.nn.Module]:
    handle = tiny_random_model(vocab_size=V, seed=3, hidden_size=32)
    handle.model.double()
    handle = dataclasses.replace(handle, dtype=torch.float64)
    reference = copy.deepcopy(handle.model)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return Models(handle, handle), reference


def _spec(train: dict, rollout: dict | None = None, budget: int = 10**6):
    return validate({"experiment": {"name": "mb"}, "scoring": {"top_k": K, "chunk_size": 3},
                     "rollout": rollout or {}, "trainer": {"micro_batch_tokens": budget},
                     "train": {"steps": 1, "lr": 1e-3, **train}}, {}, "test")


def _run(module, spec, plan: StepPlan, on: bool = True, off: bool = False, reference=None):
    models, ref = _models()
    trainer = GradientTrainer(models.student.model, TrainerConfig(lr=1e-3))
    models.trainer = trainer
    items = _items(0) if on else []
    off_items = _items(1, "teacher") if off else []
    weights = [np.random.default_rng(i).random(len(it.scores.student_lp)).astype(np.float32)
               for i, it in enumerate(items)]
    metrics = module.update(spec, models, trainer, items, weights, plan, off_items,
                            ref if reference == "reference" else None)
    return metrics, trainer.grads, items


def _assert_equal(spec_args: dict, plan: StepPlan, **kw):
    base_metrics, base_grads, base_items = _run(whole_batch, _spec(**spec_args), plan, **kw)
    assert base_grads, "the step computed no gradient"
    for budget in BUDGETS:
        metrics, grads, items = _run(micro, _spec(**spec_args, budget=budget), plan, **kw)
        assert metrics["train/loss_total"] == pytest.approx(base_metrics["train/loss_total"], rel=1e-10, abs=1e-12)
        assert grads.keys() == base_grads.keys()
        for name, grad in base_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-9, atol=1e-12, msg=f"{name} at budget {budget}")
        for item, base in zip(items, base_items):  # the per-token loss terms the shard records
            if base.train_loss is not None:
                np.testing.assert_allclose(item.train_loss, base.train_loss, rtol=1e-6, atol=1e-7)


ON_POLICY = [
    {"train": {}},  # SDPO's top-k KL: student top-k, renormalised, reverse
    {"train": {"topk_support": "union", "topk_normalization": "tail_bucket", "divergence": "jsd", "is_clip": 2.0}},
    {"train": {"topk_support": "teacher", "topk_normalization": "tail_bucket", "divergence": "forward"}},
    {"train": {"support": "full"}},
    {"train": {"support": "full", "divergence": "jsd", "beta": 0.3, "is_clip": 1.5}},
    {"train": {"support": "full", "divergence": "forward"}},
    {"train": {"support": "sampled", "estimator": "k3", "gamma": 0.5}},
    {"train": {"support": "sampled", "sampled_use": "loss", "estimator": "k2", "divergence": "jsd"}},
    {"train": {"objective": "context_distill", "token_mask_high": 8.0}, "rollout": {"temperature": 0.6}},
    {"train": {"objective": "context_distill", "use_full_reward_baseline": False, "adv_tau": 0.5}},
]


@pytest.mark.parametrize("spec_args", ON_POLICY, ids=lambda a: ",".join(f"{k}={v}" for k, v in
                                                                         {**a["train"], **a.get("rollout", {})}.items()) or "default")
def test_micro_batched_chunked_step_equals_the_whole_batch_step(spec_args):
    _assert_equal(spec_args, StepPlan(1.0, 0.0))


def test_exopd_against_its_reference_equals_the_whole_batch_step():
    _assert_equal({"train": {"objective": "exopd", "exopd_alpha": 1.5}}, StepPlan(1.0, 0.0), reference="reference")


@pytest.mark.parametrize("off_policy_loss", ["sft", "divergence"])
def test_off_policy_sft_gkd_and_the_kl_anchor_equal_the_whole_batch_step(off_policy_loss):
    _assert_equal({"train": {"off_policy_loss": off_policy_loss}}, StepPlan(0.7, 0.3, kl_anchor_beta=0.2),
                  off=True, reference="reference")


def test_plan_packs_whole_items_under_the_budget_and_isolates_longer_ones():
    lengths = [10, 3, 30, 7, 7, 2]
    batches = plan_micro_batches(lengths, 21)
    assert sorted(i for b in batches for i in b.indices) == list(range(6))
    assert all(b.padded_tokens <= 21 for b in batches if b.rows > 1)
    (over,) = [b for b in batches if b.over_budget]
    assert over.indices == (2,) and over.rows == 1
    assert [len(b.indices) for b in plan_micro_batches(lengths, 10**6)] == [6]
    assert all(b.rows == 1 for b in plan_micro_batches(lengths, 1))
