"""What every trainer strategy shares: its config, the split of a batch over ranks, and the
`Trainer` base class (the step's order, metrics over ranks, the checkpoint's save and load).

The strategies (`single`, `deepspeed`, `fsdp`) fill its hooks in `train.distributed`, which has the
overview; the checkpoint folder's format is `train.trainer_checkpoint`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hpcdistill.errors import LaunchError
from hpcdistill.train.trainer_checkpoint import publish, published, read_meta, staging

STRATEGIES = ("single", "deepspeed", "fsdp")
LossFn = Callable[[], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class TrainerConfig:
    """What a trainer needs from the spec (`[trainer]` and the optimizer keys of `[train]`)."""

    strategy: str = "single"  # single | deepspeed | fsdp
    zero_stage: int = 2  # deepspeed only: 1, 2 or 3
    nproc: int = 2  # ranks on the CPU (on GPUs: one rank per trainer device)
    lr: float = 1e-6
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise LaunchError(f"key 'trainer.strategy': {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.zero_stage not in (1, 2, 3):
            raise LaunchError(f"key 'trainer.zero_stage': {self.zero_stage!r}; allowed: 1, 2, 3")

    @classmethod
    def from_spec(cls, spec: Any) -> "TrainerConfig":
        trainer = spec.trainer  # [trainer]: where the student is trained; [train]: the optimizer
        return cls(strategy=trainer.strategy, zero_stage=trainer.zero_stage, nproc=trainer.nproc,
                   lr=spec.train.lr, weight_decay=spec.train.weight_decay, max_grad_norm=spec.train.max_grad_norm)


# ---------------------------------------------------------------------------- data parallel


def shard_indices(sizes: Sequence[int], rank: int, world_size: int,
                  groups: Sequence[Any] | None = None) -> tuple[list[int], float]:
    """This rank's item indices and its share of the batch's tokens (sum over ranks = 1).

    sizes[i] = tokens of item i (what the objective normalises by). Items of one group (e.g. one
    problem, whose samples share a baseline in `context_distill`) stay on one rank. Groups go,
    largest first, to the least loaded rank: the same answer on every rank. A rank left without
    items gets one item with share 0, so that every rank runs forward and backward (the
    collectives of ZeRO and FSDP need all ranks) and contributes nothing.
    """
    total = sum(sizes)
    if not sizes:
        return [], 0.0
    keys = list(groups) if groups is not None else list(range(len(sizes)))
    members: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    load = [0] * world_size
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for key in sorted(members, key=lambda k: (-sum(sizes[i] for i in members[k]), members[k][0])):
        target = min(range(world_size), key=lambda r: (load[r], r))
        owned[target] += members[key]
        load[target] += sum(sizes[i] for i in members[key])
    mine = sorted(owned[rank])
    if not mine:
        return [rank % len(sizes)], 0.0
    return mine, load[rank] / max(total, 1)


# ---------------------------------------------------------------------------- trainers


class Trainer:
    """The strategy-independent part: sharding, the step's order, metrics, checkpoint layout."""

    strategy = "single"

    def __init__(self, model: torch.nn.Module, config: TrainerConfig):
        self.config = config
        self.model = model  # the transformers model; forward it as usual (also while sharded)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shards_parameters(self) -> bool:
        """True when no rank holds the whole model (FSDP, ZeRO-3): read weights with
        `full_state_dict`, forward the decoder body inside `full_parameters`."""
        return False

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def shard(self, sizes: Sequence[int], groups: Sequence[Any] | None = None) -> tuple[list[int], float]:
        return shard_indices(sizes, self.rank, self.world_size, groups)

    def step(self, micro_batches: LossFn | Sequence[LossFn]) -> dict[str, float]:
        """zero_grad -> for each micro-batch: its loss -> backward -> then clip -> AdamW step.

        Each callable returns (this rank's part of the batch loss, metrics already reduced with
        `reduce_metrics`); the parts add up over micro-batches and ranks to the single-process
        loss of the whole batch, and the returned metrics are the sum of theirs. Every rank must
        pass as many micro-batches (`max_over_ranks`): ZeRO and FSDP communicate in each.
        """
        parts = [micro_batches] if callable(micro_batches) else list(micro_batches)
        self.model.train()
        self._zero_grad()
        total = torch.zeros((), dtype=torch.float64)
        metrics: dict[str, float] = {}
        for index, loss_fn in enumerate(parts):
            self._before_forward()
            self._before_micro_batch(last=index == len(parts) - 1)
            loss, named = loss_fn()
            # DeepSpeed and FSDP average gradients over ranks; the parts must be summed.
            self._backward(loss * self.world_size)
            total += loss.detach().double().cpu()
            for key, value in named.items():
                metrics[key] = metrics.get(key, 0.0) + float(value)
        grad_norm = self._clip_and_step()
        self.model.eval()
        total = self.all_reduce_sum(total.reshape(1))
        return {**metrics, "train/loss_total": float(total[0]), "train/grad_norm": float(grad_norm)}

    def max_over_ranks(self, value: int) -> int:
        """The largest `value` of any rank (every rank calls)."""
        if self.world_size == 1:
            return value
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        out = torch.tensor([value], dtype=torch.long, device=device)
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return int(out.item())

    @contextmanager
    def full_parameters(self):
        """Around forwards that call the decoder body and lm_head directly instead of the model
        (`models.scoring.score_rollouts`); enter it outside `torch.inference_mode`."""
        self._before_forward()
        try:
            yield self.model
        finally:
            self._after_forward()

    def reduce_metrics(self, named: dict[str, float], share: float) -> dict[str, float]:
        """Per-token means of each rank's shard -> the batch's mean (weighted by token share)."""
        if self.world_size == 1:
            return dict(named)
        keys = sorted(named)
        values = self.all_reduce_sum(torch.tensor([share * float(named[k]) for k in keys], dtype=torch.float64))
        return {k: float(v) for k, v in zip(keys, values)}

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return values
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        out = values.to(device)
        dist.all_reduce(out)
        return out.cpu()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    # checkpoint: the format record + the strategy's files, published whole (train.trainer_checkpoint)

    def save(self, directory: str | os.PathLike, step: int,
             extra: dict[str, Callable[[Path], None]] | None = None) -> None:
        """Trainer state after `step` (every rank calls; the folder appears complete or not at all).

        extra: file name -> writer(path), called on rank 0 for state the loop owns (the EMA
        teacher), published with the trainer's own files; read back with `checkpoint_file`."""
        final = Path(directory)
        tmp, _ = staging(final)
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        self._save_state(tmp)
        self.barrier()
        if self.is_main:
            for name, write in (extra or {}).items():
                write(tmp / name)
            publish(tmp, final, {"step": step, "strategy": self.strategy, "world_size": self.world_size,
                                 "zero_stage": getattr(self, "zero_stage", None)})
        self.barrier()

    def load(self, directory: str | os.PathLike) -> int:
        """Restore the state of `directory`; the last completed step, or -1 without a checkpoint."""
        final = published(Path(directory))
        if final is None:
            return -1
        meta = read_meta(final)
        if meta["strategy"] != self.strategy:
            raise LaunchError(f"checkpoint {final} was written by trainer.strategy = {meta.get('strategy')!r}; "
                              f"this run uses {self.strategy!r}: resume with the same strategy")
        self._check_meta(final, meta)
        self._load_state(final)
        self.barrier()
        return int(meta["step"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on the CPU, on rank 0 (other ranks get {}); every rank calls."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def gathered_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on EVERY rank, on the model's device (the EMA teacher of
        each rank averages them); every rank calls."""
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    # strategy hooks

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _before_forward(self) -> None:
        pass

    def _after_forward(self) -> None:
        pass

    def _before_micro_batch(self, last: bool) -> None:
        """Before each micro-batch's forward; `last`: its backward ends the step's accumulation."""

    def _backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _clip_and_step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        return float(norm)

    def _check_meta(self, path: Path, meta: dict) -> None:
        pass

    def _save_state(self, tmp: Path) -> None:
        raise NotImplementedError

    def _load_state(self, path: Path) -> None:
        raise NotImplementedError


__all__ = ["STRATEGIES", "LossFn", "TrainerConfig", "shard_indices", "Trainer"]
