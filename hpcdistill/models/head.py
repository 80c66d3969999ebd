"""The student's lm_head over a micro-batch's response positions, chunk by chunk, without [N, V].

A training loss needs, per response token, a few numbers of the student's logits row: log p(y_t),
the logits at a top-k support, a divergence against the teacher's row. `StudentHead.columns`
projects `chunk` positions at a time, hands each float32 [C, V] logits chunk to the objective's
function, keeps only what it returns ([C, m]) and frees the logits; in backward each chunk is
projected again (torch.utils.checkpoint, non-reentrant), so at most one chunk's [C, V] tensors
exist at a time, forward or backward. This is the recompute of the chunked losses of the anchors
(TRL's chunked lm_head, Liger's fused linear losses) in plain torch: every objective and every
trainer strategy can use it (DeepSpeed ZeRO-3 and FSDP2 gather the lm_head in its module hooks,
which fire again in the recompute).

Cost: one more lm_head matmul per position than an [N, V] graph (the recompute), the price of a
peak memory that does not grow with the tokens of a step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from hpcdistill.models.scoring import project

# fn(logits [C, V] float32 (float64 for a float64 model) of positions sl, sl) -> [C, m] (m >= 1), with grad through logits
ColumnsFn = Callable[[torch.Tensor, slice], torch.Tensor]


class StudentHead:
    """hidden [n, H]: the student's final hidden states at n response positions (with grad while
    training); `model`: the causal LM whose lm_head projects them."""

    def __init__(self, model, hidden: torch.Tensor, chunk: int):
        self.model, self.hidden, self.chunk = model, hidden, max(1, int(chunk))

    @property
    def num_positions(self) -> int:
        return self.hidden.shape[0]

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def columns(self, fn: ColumnsFn) -> torch.Tensor:
        """[n, m]: fn applied to each chunk's logits, concatenated; differentiable to the hidden
        states and the lm_head when grad is on (recomputed in backward), plain otherwise."""
        grad = torch.is_grad_enabled() and (self.hidden.requires_grad or _head_requires_grad(self.model))
        parts = []
        for c0 in range(0, self.num_positions, self.chunk):
            sl = slice(c0, min(c0 + self.chunk, self.num_positions))

            def chunk_fn(h: torch.Tensor, sl: slice = sl) -> torch.Tensor:
                return fn(upcast(project(self.model, h)), sl)

            h = self.hidden[sl]
            parts.append(checkpoint(chunk_fn, h, use_reentrant=False) if grad else chunk_fn(h))
        if not parts:  # no positions: fn's [0, m]
            return fn(upcast(project(self.model, self.hidden[:0])), slice(0, 0))
        return torch.cat(parts)


    def at(self, ids: torch.Tensor) -> torch.Tensor:
        """[n, S] the logits at ids [n, S] (a top-k support): h_t . W[id] for each id, with W the
        lm_head weight, in O(n S H) instead of the O(n V H) of a projection, recomputed per chunk in
        backward like `columns`; through `columns` when the head is not a plain readable Linear
        (ZeRO-3 partitions it outside its module's forward)."""
        weight, bias, cap = _plain_head(self.model)
        if weight is None:
            return self.columns(lambda logits, sl: logits.gather(-1, ids[sl]))
        grad = torch.is_grad_enabled() and (self.hidden.requires_grad or weight.requires_grad)
        parts = []
        for c0 in range(0, self.num_positions, self.chunk):
            sl = slice(c0, min(c0 + self.chunk, self.num_positions))

            def chunk_fn(h: torch.Tensor, sl: slice = sl) -> torch.Tensor:
                out = torch.einsum("ch,csh->cs", h, weight[ids[sl]])  # [C, S]
                if bias is not None:
                    out = out + bias[ids[sl]]
                if cap:  # Gemma-style soft-capping, elementwise like `project`
                    out = torch.tanh(out / cap) * cap
                return upcast(out)

            h = self.hidden[sl]
            parts.append(checkpoint(chunk_fn, h, use_reentrant=False) if grad else chunk_fn(h))
        return torch.cat(parts) if parts else upcast(self.hidden.new_zeros((0, ids.shape[-1])))


def _plain_head(model):
    """(weight [V, H], bias or None, soft-cap or None) of a causal LM's lm_head when it is an
    nn.Linear whose whole weight this process holds; (None, None, None) otherwise."""
    head = model.get_output_embeddings()
    vocab = getattr(model.config, "vocab_size", None)
    if type(head) is not torch.nn.Linear or head.weight.dim() != 2 or head.weight.shape[0] != vocab:
        return None, None, None
    return head.weight, head.bias, getattr(model.config, "final_logit_softcapping", None)


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """float32 logits for the losses (float64 stays float64: the equality checks run in it)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _head_requires_grad(model) -> bool:
    return any(p.requires_grad for p in model.get_output_embeddings().parameters())


__all__ = ["StudentHead", "ColumnsFn", "upcast"]
