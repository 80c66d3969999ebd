"""Off-policy lag (`rollout.policy_lag`): step s samples its rollouts with the weights of step
max(0, s - k), and trains on them at the weights of step s.

Why: prime-rl's asynchronous trainer lets inference run up to `async_level` (k) steps ahead of the
trainer ("inference [generates] rollouts from a stale policy up to k steps ahead", prime-rl docs,
Asynchronous Training; default k = 2), so the rollouts a step trains on were sampled by weights up
to k updates old (the last step of a run, which only measures, samples with the final weights).
Seed 004's importance-ratio masking (sec. 6.2.6) and its `is_masked` /
`geo_seq_ratio` metrics (sec. 6.1) measure exactly that staleness; a synchronous loop has ratio 1 up
to numerics, so those arms compare nothing. Here the lag is exact (always k, clamped at 0), which
makes the arms reproducible: the same run id samples with the same stale weights.

How: only the trainable parameters change between versions (LoRA: the adapters; full fine-tuning:
every parameter), so a version is a CPU copy of those. At the start of step s the loop records
version s and drops versions older than s - k (k + 1 copies held, none on the device); the lagged
weights are swapped into the student in place around sampling (the transformers backend) or
around writing the folder the rollout server loads (vLLM), then the current weights are copied
back bit-exactly. The history is saved with every checkpoint (`LAG_FILE`), so a resumed run
samples with the same stale weights; a checkpoint without it cannot resume a lagged run.
Sharded trainers (FSDP, ZeRO-3) are refused by the spec rules: no rank holds whole parameters.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from hpcdistill.errors import LaunchError
from hpcdistill.rundir import CHECKPOINT_POLICY_LAG

log = logging.getLogger(__name__)

LAG_FILE = CHECKPOINT_POLICY_LAG


def behaviour_version(step: int, lag: int, last_step: int | None = None) -> int:
    """The weight version (training step) whose weights step `step` samples with: max(0, step -
    lag); the last step (`last_step` = train.steps) only measures the final student, on-policy."""
    if last_step is not None and step >= last_step:
        return step
    return max(0, step - lag)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters an update changes (requires_grad), by name."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


class PolicyLag:
    """The last k + 1 weight versions of the student's trainable parameters (CPU), by step."""

    def __init__(self, lag: int, in_process: bool = True, last_step: int | None = None):
        if lag < 1:
            raise ValueError(f"policy lag must be >= 1 here (0 keeps no history), got {lag}")
        self.lag = lag
        self.last_step = last_step  # train.steps: the measurement-only step samples on-policy
        self.in_process = in_process  # True: the transformers backend samples in this process
        self.versions: dict[int, dict[str, torch.Tensor]] = {}
        self.sampled_version: int | None = None  # the version the last in-process sampling used

    def record(self, step: int, model: torch.nn.Module) -> None:
        """At the start of step `step`: keep its weights as version `step`; versions older than
        step - lag are no longer sampled from (steps only move forward) and are dropped."""
        self.versions[step] = trainable_state(model)
        for version in [v for v in self.versions if v < step - self.lag]:
            del self.versions[version]

    def held(self) -> list[int]:
        return sorted(self.versions)

    @contextlib.contextmanager
    def swapped(self, model: torch.nn.Module, version: int):
        """Inside: `model`'s trainable parameters hold version `version`; on exit, the weights it
        had before, copied back exactly (so the optimizer's parameters are untouched)."""
        if version not in self.versions:
            raise LaunchError(f"rollout.policy_lag = {self.lag}: weight version {version} is not held "
                              f"(held: {self.held()}); the lag history is incomplete")
        params = dict(model.named_parameters())
        state = self.versions[version]
        current = {name: params[name].detach().to("cpu", copy=True) for name in state}
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, tensor in current.items():
                    params[name].copy_(tensor)

    def sampling(self, model: torch.nn.Module, step: int):
        """Around step `step`'s rollout sampling on the in-process backend: the lagged weights."""
        version = behaviour_version(step, self.lag, self.last_step)
        self.sampled_version = version
        if version == step:
            return contextlib.nullcontext(model)
        return self.swapped(model, version)

    # checkpoint: the held versions, written with the trainer's files (Trainer.save(extra=...))

    def save(self, path: Path) -> None:
        torch.save({"lag": self.lag, "versions": self.versions}, path)

    def load(self, path: Path | None, checkpoint: Path, last_done: int) -> None:
        """Restore the history saved with the checkpoint after step `last_done`."""
        if path is None:
            raise LaunchError(f"{checkpoint}: the checkpoint has no {LAG_FILE}, so the lagged weights of "
                              f"rollout.policy_lag = {self.lag} cannot be rebuilt on resume; remove the "
                              "checkpoint folder to start the run again (or run it with policy_lag = 0)")
        data = torch.load(path, map_location="cpu", weights_only=True)
        if int(data["lag"]) != self.lag:
            raise LaunchError(f"{path}: saved with rollout.policy_lag = {data['lag']}, this run has {self.lag}")
        self.versions = {int(v): state for v, state in data["versions"].items()}
        needed = behaviour_version(last_done + 1, self.lag, self.last_step)
        if last_done + 1 > needed and needed not in self.versions:
            raise LaunchError(f"{path}: holds weight versions {self.held()}, but step {last_done + 1} samples "
                              f"with version {needed}; remove the checkpoint folder to start again")


def make_policy_lag(spec) -> PolicyLag | None:
    """The run's lag history, or None when the loop is synchronous (rollout.policy_lag = 0)."""
    lag = spec.rollout.policy_lag
    if lag == 0 or spec.train.steps == 0:
        return None
    log.info("rollout.policy_lag = %d: step s samples with the weights of step max(0, s - %d)", lag, lag)
    return PolicyLag(lag, in_process=spec.rollout.backend == "transformers", last_step=spec.train.steps)


__all__ = ["LAG_FILE", "PolicyLag", "behaviour_version", "make_policy_lag", "trainable_state"]
