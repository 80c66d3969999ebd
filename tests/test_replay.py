"""Loss replay on recorded runs: it reproduces what training logged, its per-token gradient weights
are the true gradients' norms, and it refuses what it cannot recompute."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcdistill.analysis.replay import BASELINE, parse_variants, read_batches, replay_sweep
from hpcdistill.cli import main
from hpcdistill.rundir import read_json
from hpcdistill.launch.submit import submit
from hpcdistill.spec import load_spec
from tinyspec import tiny_spec

TRAINED_WITH = {  # extra spec sections of each trained configuration
    "sdpo": {},
    "union-tail-jsd": {"train": {"topk_support": "union", "topk_normalization": "tail_bucket", "divergence": "jsd",
                                 "beta": 0.3}},
    "teacher-forward-clip": {"train": {"topk_support": "teacher", "divergence": "forward", "is_clip": 1.05}},
    "sampled-k3-gamma": {"train": {"support": "sampled", "estimator": "k3", "gamma": 0.8}},
    "sampled-k2-loss": {"train": {"support": "sampled", "estimator": "k2", "sampled_use": "loss",
                                  "divergence": "forward"}},
    "full-jsd": {"train": {"support": "full", "divergence": "jsd", "beta": 0.6}},
    "release-mask": {"mask": {"kind": "first_fraction", "fraction": 0.4}},
}


def _run(tmp_path, name: str, sections: dict):
    spec = tiny_spec(tmp_path, name, **sections)
    result = submit(load_spec(spec), executor="debug")
    assert read_json(result.sweep.run(result.runs[0].run_id).status)["state"] == "completed"
    return result.sweep.root


@pytest.mark.parametrize("name", list(TRAINED_WITH))
def test_replaying_a_runs_own_loss_reproduces_the_loss_it_logged(tmp_path, name):
    sweep = _run(tmp_path, name, TRAINED_WITH[name])
    full = "full" in name  # the weights after step 0 are gone: only step 0 re-scores
    # the variant sets a mask key to the value it resolves to (no rescale for full and the window
    # kinds): the weights are rebuilt from the shard, and must come out as the ones training used
    result = replay_sweep(sweep, parse_variants(["mask.rescale=false"], None))
    logged = [e for e in result.steps if e["logged"] is not None]
    assert [e["step"] for e in logged] == ([0] if full else [0, 1])  # step 2 only measured
    assert [(step, "initial weights" in why) for _, step, why in result.unreplayed] == \
        ([(1, True), (2, True)] if full else [])
    for entry in logged:
        assert entry[BASELINE] == pytest.approx(entry["logged"], rel=1e-5, abs=1e-7), entry
        assert entry["mask.rescale=False"] == pytest.approx(entry[BASELINE], rel=1e-6)
    # and per token: the replayed terms are the train_loss column training wrote
    batches = [b for b in read_batches(sweep) if not full or b.step == 0]
    for batch, terms in zip(batches, result.terms[BASELINE]):
        if batch.trained:
            np.testing.assert_allclose(terms, batch.tokens["train_loss"], rtol=1e-4, atol=1e-6)


def _true_grad_l1(batch, config_overrides: dict) -> np.ndarray:
    """|| d(w_t l_t c_t)/d z_t ||_1 from a live forward of the initial weights (step 0), autograd
    through the loss inputs of the training path on the model's logits (`whole_batch.distill_inputs`)."""
    from types import SimpleNamespace

    from hpcdistill.distill.loss import LossConfig, distill_loss
    from hpcdistill.devices import RoleDevices
    from hpcdistill.models.scoring import project as _project, response_hidden
    from hpcdistill.spec.load import set_dotted, validate
    from hpcdistill.train.roles import load_models
    from hpcdistill.train.whole_batch import distill_inputs

    data = batch.spec_data
    for k, v in config_overrides.items():
        data = set_dotted(data, k, v)
    config = LossConfig.from_train(validate(data, {}, "test").train)
    models = load_models(validate({**data, "train": {**data["train"], "steps": 0}}, {}, "test"),
                         RoleDevices((), (), ()))
    offsets = np.cumsum([0, *batch.lengths])
    out = []
    for row, lo, hi in zip(batch.rows, offsets[:-1], offsets[1:]):
        tokens = {name: values[lo:hi] for name, values in batch.tokens.items()}
        seq = (models.student.tokenizer.encode(row["prompt_text"], add_special_tokens=False), tokens["ids"].tolist())
        logits = _project(models.student.model, response_hidden(models.student, [seq], [hi - lo])).float()
        logits = logits.detach().requires_grad_(True)
        item = SimpleNamespace(student_seq=seq, scores=SimpleNamespace(**tokens), teacher_signal=True,
                               generation=SimpleNamespace(sampler_lp=tokens["sampler_lp"]))
        loss = distill_loss(config, distill_inputs(config, models, [item], [tokens["mask"]], logits)).loss
        (grad,) = torch.autograd.grad(loss * (hi - lo), logits)
        out.append(grad.abs().sum(-1).numpy())
    return np.concatenate(out)


@pytest.mark.parametrize("overrides", [
    {},
    {"train.topk_support": "union", "train.topk_normalization": "tail_bucket", "train.divergence": "jsd"},
    {"train.topk_support": "teacher", "train.topk_normalization": "tail_bucket", "train.divergence": "forward"},
    {"train.support": "sampled", "train.estimator": "k3", "train.gamma": 0.5},
    {"train.support": "sampled", "train.sampled_use": "loss", "train.estimator": "k2"},
])
def test_replayed_gradient_weights_are_the_l1_norms_of_the_true_logit_gradients(tmp_path, overrides):
    sweep = _run(tmp_path, "grads", {})
    variant = " ".join(f"{k}={v!r}".replace("'", '"') for k, v in overrides.items())
    result = replay_sweep(sweep, parse_variants(None, [variant or "mask.rescale=true"]))
    batch = next(b for b in read_batches(sweep) if b.step == 0)  # the initial weights are reloadable
    replayed = result.grads[result.variants[1]][0]
    np.testing.assert_allclose(replayed, _true_grad_l1(batch, overrides), rtol=2e-3, atol=1e-6)


def test_full_vocabulary_replay_rescores_step_zero_and_refuses_later_weights(tmp_path):
    from hpcdistill.analysis import replay as replay_module
    from hpcdistill.record import ShardReader

    sweep = _run(tmp_path, "full", {"scoring": {"full_vocab": True}})
    variant = parse_variants(['train.support="full"'], None)
    result = replay_sweep(sweep, variant)
    assert [e["step"] for e in result.steps] == [0]
    (run, step, why), _ = result.unreplayed
    assert step == 1 and "only the initial weights can be reloaded" in why and "version(s) [1]" in why
    # step 0: re-scored with the initial weights, the full reverse KL of each token is the
    # full_kl that scoring recorded
    batch = next(b for b in read_batches(sweep) if b.step == 0)
    full = replay_module.replay_batch(batch, replay_module.variant_spec(batch, variant[0]),
                                      np.ones(batch.num_tokens))
    with ShardReader(batch.path) as shard:
        recorded = np.concatenate([r.tokens["full_kl"] for r in shard.iter_rollouts(columns=["full_kl"])
                                   if r.row["kind"] == "original"])
    np.testing.assert_allclose(full.terms, recorded, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("args,needle", [
    (["--set", "rollout.temperature=0.5"], "would change the tokens or the teacher's log-probs"),
    (["--set", "teacher.weights=\"ema\""], "replayable: train.support"),
    (["--set", "train.divergence=\"sideways\""], "allowed: 'forward', 'reverse', 'jsd'"),
    ([], "nothing to compare"),
])
def test_replay_cli_refuses_what_it_cannot_recompute_with_one_message(tmp_path, capsys, args, needle):
    sweep = _run(tmp_path, "refuse", {})
    assert main(["replay", str(sweep), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") <= 2
    assert not (sweep / "analysis" / "replay").exists()


def test_replay_cli_prints_the_variants_side_by_side_and_writes_the_report(tmp_path, capsys):
    sweep = _run(tmp_path, "cli", {})
    assert main(["replay", str(sweep), "--set", 'train.divergence="forward"',
                 "--variant", 'train.topk_normalization="tail_bucket" train.divergence="jsd"', "--top", "3"]) == 0
    out = capsys.readouterr().out
    for title in ("loss per step", "by decile of position", "agreement with the run's own loss",
                  "disagree most"):
        assert title in out
    report = (sweep / "analysis" / "replay" / "report.md").read_text()
    assert "divergence=forward" in report and "topk_normalization=tail_bucket divergence=jsd" in report
    assert (sweep / "analysis" / "replay" / "replay_deciles.png").stat().st_size > 5_000
    summary = read_json(sweep / "analysis" / "replay" / "replay.json")
    assert summary["variants"][0] == BASELINE and summary["tokens"] > 0
    same = summary["correlation_with_own"]["divergence=forward"]["grad_pearson"]
    assert -1.0 <= same <= 1.0
