"""One SDPO step on the bundled model lowers the top-k KL on the batch it trained on (issue 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcdistill.distill.loss import DistillInputs, LossConfig, distill_loss
from hpcdistill.devices import RoleDevices
from hpcdistill.models.scoring import project as _project, response_hidden, score_rollouts
from hpcdistill.spec.load import validate
from hpcdistill.train.collect import collect_step, load_problems
from hpcdistill.train.roles import load_models

def topk_kl_loss(logits, ids, teacher_topk_lp, weights):
    """SDPO's top-k KL (the distill objective's default) on live logits and recorded teacher log-probs."""
    out = distill_loss(LossConfig(), DistillInputs(weights=weights, lengths=[len(weights)], student_lp=weights * 0,
                                                   student_buckets=logits.gather(-1, ids),
                                                   teacher_buckets=teacher_topk_lp))
    return out.loss, out.metrics


SPEC = {
    "experiment": {"name": "one-step"},
    "model": {"student": "bundled:smollm2-135m-instruct", "device": "cpu"},
    "task": {"name": "code", "num_problems": 2},
    "rollout": {"samples_per_problem": 2, "max_new_tokens": 24},
    "teacher": {"context": "feedback"},
    "train": {"steps": 1, "lr": 1e-6},
}


@pytest.mark.slow
def test_one_sdpo_step_lowers_the_topk_kl_on_its_batch():
    spec = validate(SPEC, {}, "test")
    models = load_models(spec, RoleDevices((), (), ()))
    problems = load_problems(spec)
    items, _ = collect_step(spec, models, problems, step=0)
    items = [it for it in items if len(it.scores.student_lp)]
    before = np.mean(np.concatenate([it.scores.topk_kl for it in items]))

    # The SDPO update of update.objective_loss, written out: student logits with grad at the
    # response positions, the teacher's recorded log-probs at the student's top-k, AdamW.
    model = models.student.model
    teacher_topk_lp = torch.as_tensor(np.concatenate([it.scores.teacher_at_student_topk_lp for it in items]))
    ids = torch.as_tensor(np.concatenate([it.scores.student_topk_ids for it in items]), dtype=torch.long)
    lengths = [len(it.scores.student_lp) for it in items]
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.train.lr, weight_decay=spec.train.weight_decay)
    model.train()
    logits = _project(model, response_hidden(models.student, [it.student_seq for it in items], lengths)).float()
    loss, _ = topk_kl_loss(logits, ids, teacher_topk_lp, torch.ones(sum(lengths)))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), spec.train.max_grad_norm)
    optimizer.step()
    model.eval()

    # Re-score the same rollouts against the same teacher log-probs (the teacher is the student
    # itself, so re-scoring it would move the target too: SDPO's step pulls the student toward
    # the recorded teacher distribution).
    with torch.no_grad():
        logits = _project(model, response_hidden(models.student, [it.student_seq for it in items], lengths)).float()
        after_loss, _ = topk_kl_loss(logits, ids, teacher_topk_lp, torch.ones(sum(lengths)))
    assert float(after_loss) < float(loss.detach()) - 1e-4, (float(loss), float(after_loss))
    # and the recorded KL was what the loss measured before the step
    assert float(loss.detach()) == pytest.approx(before, rel=1e-3, abs=1e-4)
    rescored = score_rollouts(models.student, models.teacher, [it.student_seq for it in items],
                              [it.teacher_seq for it in items], top_k=spec.scoring.top_k, progress=False)
    assert all(len(r.student_lp) == n for r, n in zip(rescored, lengths))


@pytest.mark.slow
def test_lora_run_trains_only_the_adapter_and_saves_a_merged_model(tmp_path):
    import torch as _torch

    from hpcdistill.launch.submit import submit
    from hpcdistill.spec import load_spec
    from hpcdistill.rundir import read_json

    spec = tmp_path / "lora.toml"
    spec.write_text(f"""
[experiment]
name = "lora"
output_dir = "{tmp_path / 'runs'}"
[model]
student = "tiny-random:0"
device = "cpu"
[task]
name = "math"
num_problems = 1
[rollout]
samples_per_problem = 2
max_new_tokens = 6
[teacher]
context = "system_prompt"
system_prompt = "Answer with a number."
[train]
steps = 2
lr = 1e-2
save_model = true
lora = {{ enabled = true, rank = 4, alpha = 8.0, target_modules = ["q_proj", "v_proj"] }}
""")
    result = submit(load_spec(spec), executor="debug")
    paths = result.sweep.run(result.runs[0].run_id)
    assert read_json(paths.status)["state"] == "completed"
    assert not paths.checkpoint.exists()  # a completed run keeps no resume state
    # The adapter, merged into the saved model, changed exactly the target modules.
    from transformers import AutoModelForCausalLM

    from hpcdistill.models.loading import load_model, tiny_random_model

    base = tiny_random_model(seed=0, tokenizer=load_model("bundled:smollm2-135m-instruct").tokenizer).model
    trained = AutoModelForCausalLM.from_pretrained(paths.model)
    changed = {name for name, value in trained.state_dict().items()
               if not _torch.equal(value, base.state_dict()[name])}
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed), changed
