"""The trainer over 2 CPU processes (gloo): DeepSpeed ZeRO-2 and FSDP2 against the single process.

Each test starts real ranks with `torch.distributed.run`; this file is also the ranks' script
(`python tests/test_distributed.py ...` under torchrun, see `rank_main`). The batch is 4 fixed
sequences of the bundled SmolLM2-135M with a synthetic teacher, trained with the loop's own
`update.update` (top-k KL) in micro-batches of 40 tokens, so the sharding of `update`, the
micro-batches of unequal count over the ranks (one padded) and each strategy's accumulation
(DeepSpeed's boundary, FSDP's deferred gradient sync) are what is tested.

Tolerances. Data-parallel gradients differ from the single process only in float reduction
order. Losses agree to 1e-5 relative. For weights, with lr = 1e-4 (AdamW moves a weight by at most
about lr per step): the gap to the single-process weights is below 1e-3 of the update's norm
(||w_dist - w_single|| / ||w_single - w_initial||; measured about 1e-5) and below 0.1 lr in every
element (measured 4e-6 = 0.04 lr, on embedding rows whose gradient is near AdamW's eps).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

MODEL = "bundled:smollm2-135m-instruct"
LR = 1e-4
LOSS_RTOL = 1e-5
UPDATE_RTOL = 1e-3  # ||w_dist - w_single|| / ||w_single - w_initial||
WEIGHT_ATOL = 0.1 * LR  # max |w_dist - w_single|
TOP_K = 8
MICRO_BATCH_TOKENS = 40


def synthetic_batch(tokenizer, step: int):
    """4 items shaped like the loop's `Item`s (what objective_loss reads), fixed by `step`."""
    rng = np.random.default_rng(1000 + step)
    texts = ["What is 2 + 3?", "Name a prime number.", "Sort the list [3, 1, 2].", "Say hello."]
    items, weights = [], []
    for text, length in zip(texts, (12, 9, 15, 6)):
        prompt = tokenizer(text)["input_ids"]
        response = rng.integers(100, 5000, size=length).tolist()
        scores = SimpleNamespace(  # what the top-k objective reads of an Item's TokenScores
            student_lp=np.zeros(length, np.float32), teacher_lp=np.zeros(length, np.float32),
            student_topk_ids=np.stack([rng.choice(5000, TOP_K, replace=False) for _ in range(length)]).astype(np.int32),
            teacher_at_student_topk_lp=rng.normal(-3.0, 1.0, size=(length, TOP_K)).astype(np.float32))
        items.append(SimpleNamespace(student_seq=(prompt, response), scores=scores, teacher_signal=True,
                                     problem=SimpleNamespace(problem_id=text), train_loss=None,
                                     generation=SimpleNamespace(sampler_lp=np.zeros(length, np.float32))))
        weights.append(np.ones(length, np.float32))
    return items, weights


def train_step(trainer, spec, models, items, weights, hold: Path | None = None):
    """The loop's `update.update`: shard -> micro-batches under `trainer.micro_batch_tokens` ->
    share-scaled losses -> trainer.step. `hold`: the test kills the ranks inside the first
    micro-batch's loss, after its forward, before the update."""
    from hpcdistill.distill.schedules import StepPlan
    from hpcdistill.train import update

    objective_loss = update.objective_loss
    if hold is not None:
        def held(*args, **kwargs):
            out = objective_loss(*args, **kwargs)
            hold.touch()
            time.sleep(120)
            return out

        update.objective_loss = held
    try:
        return update.update(spec, models, trainer, items, weights, StepPlan(1.0, 0.0), [], None)
    finally:
        update.objective_loss = objective_loss


def make_spec():
    from hpcdistill.spec.schema import ExperimentSpec, Spec, TrainerSpec, TrainSpec

    # 40 forward tokens: the single process packs the 4 items in 3 micro-batches; of 2 ranks, rank 0
    # needs 2 and rank 1 one, plus one padding micro-batch (ZeRO and FSDP run collectives in each)
    return Spec(experiment=ExperimentSpec(name="distributed"),
                trainer=TrainerSpec(micro_batch_tokens=MICRO_BATCH_TOKENS),
                train=TrainSpec(steps=3, objective="topk_kl", lr=LR, weight_decay=0.01, max_grad_norm=1.0))


def run_steps(strategy: str, steps: int, out: Path, checkpoint: Path | None = None,
              hold_at: int | None = None, zero_stage: int = 2, snapshots: bool = False) -> None:
    """Train `steps` steps (resuming from `checkpoint`); rank 0 writes losses and weights to `out`
    (`<out>.json`, `<out>.pt`; with `snapshots` also the weights after each step, `<out>.<step>.pt`)."""
    from hpcdistill.models.loading import load_model
    from hpcdistill.train.distributed import TrainerConfig, build_trainer
    from hpcdistill.train.roles import Models
    from hpcdistill.train.trainer_processes import in_trainer_process, init_process_group

    device = init_process_group() if in_trainer_process() else torch.device("cpu")
    spec = make_spec()
    handle = load_model(MODEL, dtype="float32", device=str(device))
    config = TrainerConfig(strategy=strategy, zero_stage=zero_stage, lr=spec.train.lr,
                           weight_decay=spec.train.weight_decay, max_grad_norm=spec.train.max_grad_norm)
    trainer = build_trainer(config, handle.model)
    handle.model = trainer.model
    models = Models(handle, handle)
    start = trainer.load(checkpoint) + 1 if checkpoint else 0
    record = {"losses": {}, "seconds": {}, "start": start}
    for step in range(start, steps):
        items, weights = synthetic_batch(handle.tokenizer, step)
        hold = out.with_name(f"holding_{step}") if step == hold_at and trainer.is_main else None
        t0 = time.monotonic()
        metrics = train_step(trainer, spec, models, items, weights, hold=hold)
        record["seconds"][step] = time.monotonic() - t0
        record["losses"][step] = metrics["train/loss_total"]
        record.setdefault("metrics", {})[step] = metrics
        if checkpoint:
            trainer.save(checkpoint, step)
        if snapshots and trainer.is_main:
            torch.save(trainer.full_state_dict(), out.with_suffix(f".{step}.pt"))
    state = trainer.full_state_dict()
    if trainer.is_main:
        torch.save(state, out.with_suffix(".pt"))
        out.write_text(json.dumps(record))


def rank_main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", required=True)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--hold-at", type=int)
    parser.add_argument("--zero-stage", type=int, default=2)
    args = parser.parse_args()
    run_steps(args.strategy, args.steps, args.out, args.checkpoint, args.hold_at, args.zero_stage)


# ---------------------------------------------------------------------------- the tests


def _torchrun(tmp: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max_restarts=0", __file__, *args]
    return subprocess.Popen(cmd, env=env, stdout=(tmp / "ranks.log").open("a"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _ranks(tmp: Path, *args: str, timeout: float = 240) -> None:
    proc = _torchrun(tmp, *args)
    try:
        code = proc.wait(timeout=timeout)
    finally:
        _kill_tree(proc)
    assert code == 0, (tmp / "ranks.log").read_text()[-4000:]


def _kill_tree(proc: subprocess.Popen) -> None:
    from hpcdistill.train.trainer_processes import process_tree

    for pid in [*process_tree(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _result(out: Path, step: int | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    weights = out.with_suffix(".pt" if step is None else f".{step}.pt")
    return json.loads(out.read_text()), torch.load(weights, weights_only=True)


def _assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                         initial: dict[str, torch.Tensor]) -> None:
    names = [k for k in want if k != "lm_head.weight"]  # tied to the embedding
    assert len(names) > 100 and set(names) <= set(got)
    gap = sum(float(((got[k] - want[k]) ** 2).sum()) for k in names) ** 0.5
    update = sum(float(((want[k] - initial[k]) ** 2).sum()) for k in names) ** 0.5
    worst = max(float((got[k] - want[k]).abs().max()) for k in names)
    assert update > 0.1, "the step did not move the weights; the comparison could not fail"
    assert gap / update < UPDATE_RTOL and worst < WEIGHT_ATOL, (gap / update, worst)


@pytest.fixture(scope="module")
def initial():
    from hpcdistill.models.loading import load_model

    return load_model(MODEL, dtype="float32", device="cpu").model.state_dict()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process reference: 2 steps, the weights after each."""
    out = tmp_path_factory.mktemp("single") / "single.json"
    run_steps("single", 2, out, snapshots=True)
    return out


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory):
    """An uninterrupted 2-step DeepSpeed ZeRO-2 run over 2 ranks."""
    tmp = tmp_path_factory.mktemp("deepspeed")
    _ranks(tmp, "--strategy", "deepspeed", "--zero-stage", "2", "--steps", "2", "--out", str(tmp / "ds.json"))
    return tmp / "ds.json"


@pytest.mark.slow
def test_deepspeed_zero2_over_two_ranks_matches_single_process(single, deepspeed_run, initial):
    record, got = json.loads(single.read_text()), json.loads(deepspeed_run.read_text())
    for step in (0, 1):
        assert got["losses"][str(step)] == pytest.approx(record["losses"][str(step)], rel=LOSS_RTOL)
        assert got["metrics"][str(step)]["train/topk_kl"] == pytest.approx(
            record["metrics"][str(step)]["train/topk_kl"], rel=LOSS_RTOL)
        assert got["metrics"][str(step)]["train/grad_norm"] == pytest.approx(
            record["metrics"][str(step)]["train/grad_norm"], rel=1e-4)
    _assert_same_weights(_result(deepspeed_run)[1], _result(single, 1)[1], initial)


@pytest.mark.slow
def test_fsdp2_step_over_two_ranks_matches_single_process(single, initial, tmp_path):
    record, weights = json.loads(single.read_text()), _result(single, 0)[1]
    _ranks(tmp_path, "--strategy", "fsdp", "--steps", "1", "--out", str(tmp_path / "fsdp.json"))
    got, got_weights = _result(tmp_path / "fsdp.json")
    assert got["losses"]["0"] == pytest.approx(record["losses"]["0"], rel=LOSS_RTOL)
    assert got["metrics"]["0"]["train/grad_norm"] == pytest.approx(record["metrics"]["0"]["train/grad_norm"],
                                                                    rel=1e-4)
    _assert_same_weights(got_weights, weights, initial)


@pytest.mark.slow
def test_deepspeed_run_killed_mid_step_resumes_to_the_uninterrupted_weights(deepspeed_run, initial, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    hold = tmp_path / "holding_1"
    proc = _torchrun(tmp_path, "--strategy", "deepspeed", "--steps", "2", "--out", str(tmp_path / "killed.json"),
                     "--checkpoint", str(checkpoint), "--hold-at", "1")
    deadline = time.monotonic() + 240
    while not hold.exists():  # step 0 saved, step 1's forward done: kill -9 every process
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "ranks.log").read_text()[-4000:]
        time.sleep(0.2)
    _kill_tree(proc)
    assert json.loads((checkpoint / "meta.json").read_text())["step"] == 0
    assert not (tmp_path / "killed.json").exists()

    _ranks(tmp_path, "--strategy", "deepspeed", "--steps", "2", "--out", str(tmp_path / "resumed.json"),
           "--checkpoint", str(checkpoint))
    resumed, resumed_weights = _result(tmp_path / "resumed.json")
    uninterrupted, weights = _result(deepspeed_run)
    assert resumed["start"] == 1 and list(resumed["losses"]) == ["1"]
    assert resumed["losses"]["1"] == pytest.approx(uninterrupted["losses"]["1"], rel=LOSS_RTOL)
    _assert_same_weights(resumed_weights, weights, initial)
    assert json.loads((checkpoint / "meta.json").read_text()) == {
        "format": 1, "step": 1, "strategy": "deepspeed", "world_size": 2, "zero_stage": 2}


def test_shards_cover_the_batch_once_and_shares_sum_to_one():
    from hpcdistill.train.trainer_base import shard_indices

    sizes = [12, 9, 15, 6, 3]
    parts = [shard_indices(sizes, r, 2) for r in range(2)]
    assert sorted(i for idx, _ in parts for i in idx) == list(range(5))
    assert sum(share for _, share in parts) == pytest.approx(1.0)
    assert parts[0][1] == pytest.approx(sum(sizes[i] for i in parts[0][0]) / sum(sizes))
    grouped = [shard_indices(sizes, r, 2, groups=["a", "a", "b", "b", "c"]) for r in range(2)]
    assert {tuple(idx) for idx, _ in grouped} == {(0, 1, 4), (2, 3)}
    # fewer items than ranks: the idle rank still runs one item, with share 0
    assert shard_indices([5], 1, 2) == ([0], 0.0) and shard_indices([5], 0, 2) == ([0], 1.0)


def test_single_trainer_resumed_from_its_checkpoint_continues_bit_for_bit(tmp_path):
    from hpcdistill.models.loading import tiny_random_model
    from hpcdistill.train.distributed import TrainerConfig, build_trainer

    config = TrainerConfig(strategy="single", lr=1e-3)
    ids = torch.arange(12).reshape(2, 6)

    def step(trainer):
        return trainer.step(lambda: (trainer.model(input_ids=ids, labels=ids).loss, {}))

    first = build_trainer(config, tiny_random_model(seed=1).model)
    step(first)
    first.save(tmp_path / "checkpoint", 0)
    step(first)
    resumed = build_trainer(config, tiny_random_model(seed=2).model)  # other weights until loaded
    assert resumed.load(tmp_path / "checkpoint") == 0
    step(resumed)
    for (name, a), (_, b) in zip(first.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert build_trainer(config, tiny_random_model().model).load(tmp_path / "missing") == -1


def test_a_checkpoint_of_another_strategy_is_refused(tmp_path):
    from hpcdistill.errors import LaunchError
    from hpcdistill.models.loading import tiny_random_model
    from hpcdistill.train.distributed import TrainerConfig, build_trainer

    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "meta.json").write_text(json.dumps({"format": 1, "step": 3, "strategy": "fsdp",
                                                                   "world_size": 2, "zero_stage": None}))
    trainer = build_trainer(TrainerConfig(strategy="single"), tiny_random_model().model)
    with pytest.raises(LaunchError, match="trainer.strategy = 'fsdp'"):
        trainer.load(tmp_path / "checkpoint")


if __name__ == "__main__":
    rank_main()
