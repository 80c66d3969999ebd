"""Token-budget micro-batches: a rank's items packed so that each forward holds at most
`trainer.micro_batch_tokens` tokens (docs/trainer.md, "Micro-batches").

A micro-batch's forward is right-padded to its longest row, so its size is rows x longest row.
Items go longest first into the current micro-batch while that size stays within the budget
(first-fit over sorted lengths: few micro-batches, little padding); an item longer than the budget
is a micro-batch of its own, marked over budget. The loss of each micro-batch is its objective
times its share of the batch's tokens (the same algebra as the ranks' shares, `Trainer.shard`),
so the parts add up to the whole batch's loss and their gradients to its gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MicroBatch:
    indices: tuple[int, ...]  # into the rank's items, ascending
    rows: int
    longest: int  # forward tokens of its longest row
    budget: int

    @property
    def padded_tokens(self) -> int:
        return self.rows * self.longest

    @property
    def over_budget(self) -> bool:
        return self.padded_tokens > self.budget


def plan_micro_batches(lengths: Sequence[int], budget: int) -> list[MicroBatch]:
    """lengths[i]: forward tokens of item i (prompt + response positions) -> the micro-batches,
    in the order of their first item; every item in exactly one."""
    if budget < 1:
        raise ValueError(f"trainer.micro_batch_tokens must be >= 1, got {budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    longest: list[int] = []
    for i in order:
        n = max(int(lengths[i]), 1)
        if groups and (len(groups[-1]) + 1) * max(longest[-1], n) <= budget:
            groups[-1].append(i)
            longest[-1] = max(longest[-1], n)
        else:
            groups.append([i])
            longest.append(n)
    batches = [MicroBatch(tuple(sorted(g)), len(g), m, budget) for g, m in zip(groups, longest)]
    return sorted(batches, key=lambda b: b.indices[0])


def forward_tokens(item, lengths: int) -> int:
    """Tokens of an item's student forward when `lengths` response positions are trained on:
    the prompt and the response up to the last position (`models.scoring.response_hidden`)."""
    return len(item.student_seq[0]) + max(lengths - 1, 0)


def describe(batches: Sequence[MicroBatch]) -> str:
    """One log line: "3 micro-batches (4 + 4 + 1 rows, largest 8,160 padded tokens, 1 over budget)"."""
    if not batches:
        return "no micro-batches"
    over = sum(b.over_budget for b in batches)
    rows = " + ".join(str(b.rows) for b in batches)
    text = (f"{len(batches)} micro-batch{'es' if len(batches) != 1 else ''} ({rows} rows, largest "
            f"{max(b.padded_tokens for b in batches):,} padded tokens of a {batches[0].budget:,}-token budget")
    return text + (f", {over} over budget: an item longer than the budget" if over else "") + ")"


@dataclass
class MicroBatchLoss:
    """One backward of a step: a micro-batch's objective times its share of its kind's tokens on
    this rank (`share`) and the plan's weight times the rank's share of the batch (`scale`).
    Called by `Trainer.step`; keeps the objective's metrics (`named`) for `combined_metrics`."""

    batch: MicroBatch
    share: float
    scale: float
    loss_of: Callable[[list[int]], tuple[torch.Tensor, dict[str, float]]]
    named: dict[str, float] | None = None

    def __call__(self) -> tuple[torch.Tensor, dict[str, float]]:
        loss, self.named = self.loss_of(list(self.batch.indices))
        return self.scale * self.share * loss, {}

    def padding(self) -> "MicroBatchLoss":
        """The same forward and backward contributing nothing: for a rank with fewer micro-batches
        than another (ZeRO and FSDP run collectives in every forward and backward)."""
        return MicroBatchLoss(self.batch, 0.0, 0.0, self.loss_of)


def micro_losses(budget: int, lengths: list[int], tokens: list[int], scale: float,
                 loss_of: Callable[[list[int]], tuple[torch.Tensor, dict[str, float]]]) -> list[MicroBatchLoss]:
    """The items (forward `lengths`, valid `tokens` each) in micro-batches under `budget`, each
    with its share of the tokens; `loss_of(indices)` -> (objective over those items, metrics)."""
    total = sum(tokens)
    return [MicroBatchLoss(b, sum(tokens[i] for i in b.indices) / total if total else 0.0, scale, loss_of)
            for b in plan_micro_batches(lengths, budget)]


def combined_metrics(parts: Sequence[MicroBatchLoss]) -> dict[str, float]:
    """Per-token means of each micro-batch -> their mean weighted by token share (exact for the
    linear ones; a ratio such as advantage_std is the weighted mean of the micro-batches')."""
    out: dict[str, float] = {}
    for part in parts:
        for key, value in (part.named or {}).items():
            out[key] = out.get(key, 0.0) + part.share * value
    return out


__all__ = ["MicroBatch", "MicroBatchLoss", "plan_micro_batches", "micro_losses", "combined_metrics",
           "forward_tokens", "describe"]
