"""Sampling rollouts with transformers: our own decode loop over a KV cache.

Why not `model.generate`: we want (1) the raw, temperature-1 log-probability of every sampled token
and the log-probability under the actual sampling distribution, and (2) randomness that belongs to
one (prompt, sample) pair, not to the batch, so a rollout does not change when the batch size or
the other prompts change. Each (prompt i, sample j) gets its own `torch.Generator` seeded from
(seed, i, j) and draws one Gumbel vector per decode step.

(Logits themselves can differ in the last float bits between batch compositions because padding
changes matmul shapes; with the same call the output is bit-identical.)
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from hpcdistill.distill.divergence import log_softmax_fp32
from hpcdistill.models.loading import ModelHandle

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """One sampled response. `response_ids` include the stop token when finish_reason == "stop"
    and start with the `num_prefix_tokens` forced prefix tokens (teacher seeding)."""

    prompt_ids: list[int]
    response_ids: np.ndarray  # [T] int64
    sampled_lp: np.ndarray  # [T] float32, log p(token) under the raw model (temperature 1, no truncation)
    sampler_lp: np.ndarray  # [T] float32, log q(token) under the distribution actually sampled from
    finish_reason: str  # "stop" | "length"
    num_prefix_tokens: int = 0


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for one (prompt, sample) pair, independent of batching."""
    return int(np.random.SeedSequence([seed, prompt_index, sample_index]).generate_state(2, np.uint64)[0] >> 1)


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """log q over the vocabulary of the sampling distribution: temperature, then top-k, then top-p
    (nucleus, keeping the smallest set with mass >= top_p, at least one token).

    logits: [B, V] float32 -> [B, V] float32 with -inf outside the kept set. temperature > 0.
    """
    x = logits / temperature
    if top_k and top_k > 0 and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]  # [B, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # Mass strictly before each token; a token is kept while that mass is < top_p.
        before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return log_softmax_fp32(x)


def _gumbel(generators: list[torch.Generator], vocab: int, device: torch.device) -> torch.Tensor:
    """[B, V] standard Gumbel noise, row b from generators[b] (drawn on the CPU for determinism)."""
    u = torch.stack([torch.rand(vocab, generator=g, dtype=torch.float64) for g in generators])
    u = u.clamp_(min=1e-300)  # avoid log(0)
    return (-torch.log(-torch.log(u))).float().to(device)


@torch.inference_mode()
def _generate_batch(handle: ModelHandle, prompts: list[list[int]], prefixes: list[list[int]],
                    seeds: list[int], *, max_new_tokens: int, temperature: float, top_p: float,
                    top_k: int) -> list[Generation]:
    model, device = handle.model, handle.device
    B = len(prompts)
    pad_id = 0
    stop = torch.tensor(sorted(handle.stop_token_ids) or [-1], device=device)
    generators = [torch.Generator().manual_seed(s) for s in seeds]

    # Left padding so every row's next token sits in the last column: [B, L].
    L = max(len(p) for p in prompts)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    for b, p in enumerate(prompts):
        input_ids[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
        attention_mask[b, L - len(p):] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    # Positions count real tokens only, so a padded prompt sees the same positions as unpadded.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)

    tokens = torch.zeros((B, max_new_tokens), dtype=torch.long)
    raw_lp = torch.zeros((B, max_new_tokens), dtype=torch.float32)
    samp_lp = torch.zeros((B, max_new_tokens), dtype=torch.float32)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long)
    finished = torch.zeros(B, dtype=torch.bool)
    prefix_len = torch.tensor([len(p) for p in prefixes], dtype=torch.long)
    max_prefix = int(prefix_len.max()) if B else 0
    forced = torch.zeros((B, max(max_prefix, 1)), dtype=torch.long)
    for b, p in enumerate(prefixes):
        if p:
            forced[b, :len(p)] = torch.tensor(p, dtype=torch.long)

    past = None
    step_input, step_pos = input_ids, position_ids
    for t in range(max_new_tokens):
        out = model(input_ids=step_input, attention_mask=attention_mask, position_ids=step_pos,
                    past_key_values=past, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        logits = out.logits[:, -1, :].float()  # [B, V]
        lp = log_softmax_fp32(logits)  # raw distribution, temperature 1
        if temperature == 0:
            choice = logits.argmax(-1)
            q = None
        else:
            q = sampling_logprobs(logits, temperature, top_p, top_k)
            choice = (q + _gumbel(generators, q.shape[-1], device)).argmax(-1)  # Gumbel-max = sample from q
        choice = choice.cpu()
        if t < max_prefix:
            is_forced = t < prefix_len
            choice = torch.where(is_forced, forced[:, t], choice)
        tokens[:, t] = choice
        raw_lp[:, t] = lp.gather(-1, choice.to(device)[:, None])[:, 0].cpu()
        if q is not None:
            samp_lp[:, t] = q.gather(-1, choice.to(device)[:, None])[:, 0].cpu()
        # Greedy samples from a point mass: log q = 0 (already zero). A forced prefix token was
        # not sampled; its sampler_lp is log q all the same so ratios stay defined where finite.
        newly = ~finished & torch.isin(choice.to(device), stop).cpu()
        lengths = torch.where(newly, torch.tensor(t + 1), lengths)
        finished |= newly
        if bool(finished.all()):
            break
        step_input = choice.to(device)[:, None]
        attention_mask = torch.cat([attention_mask, torch.ones((B, 1), dtype=attention_mask.dtype,
                                                               device=device)], dim=1)
        step_pos = step_pos[:, -1:] + 1

    results = []
    for b in range(B):
        n = int(lengths[b])
        results.append(Generation(prompt_ids=list(prompts[b]), response_ids=tokens[b, :n].numpy().copy(),
                                  sampled_lp=raw_lp[b, :n].numpy().copy(),
                                  sampler_lp=samp_lp[b, :n].numpy().copy(),
                                  finish_reason="stop" if bool(finished[b]) else "length",
                                  num_prefix_tokens=min(len(prefixes[b]), n)))
    return results


def generate(handle: ModelHandle, prompt_ids: list[list[int]], *, n: int, max_new_tokens: int,
             temperature: float, top_p: float = 1.0, top_k: int = 0, seed: int, batch_size: int = 8,
             prefix_ids: list[list[int]] | None = None, progress: bool = True) -> list[list[Generation]]:
    """Sample `n` responses per prompt; returns [prompt][sample] Generations.

    temperature 0 is greedy decoding. `prefix_ids[i]` (teacher seeding) is forced as the first
    response tokens of every sample of prompt i; they are recorded as response tokens with their
    log-probs under this model. Decoding stops at any of `handle.stop_token_ids` (eos and the chat
    end-of-turn token) or after `max_new_tokens`.
    """
    if prefix_ids is not None and len(prefix_ids) != len(prompt_ids):
        raise ValueError(f"prefix_ids has {len(prefix_ids)} entries for {len(prompt_ids)} prompts")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or n < 1 or max_new_tokens < 1:
        raise ValueError(f"bad sampling settings: temperature={temperature}, top_p={top_p}, "
                         f"top_k={top_k}, n={n}, max_new_tokens={max_new_tokens}")
    # Flatten (prompt, sample) pairs; samples of one prompt sit together, so batches mostly share a
    # prompt length and pad little.
    jobs = [(i, j) for i in range(len(prompt_ids)) for j in range(n)]
    results: list[list[Generation | None]] = [[None] * n for _ in prompt_ids]
    show = progress and sys.stderr.isatty()
    with tqdm(total=len(jobs), desc="rollout", unit="seq", disable=not show) as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            gens = _generate_batch(
                handle, [prompt_ids[i] for i, _ in batch],
                [list(prefix_ids[i]) if prefix_ids is not None else [] for i, _ in batch],
                [sample_seed(seed, i, j) for i, j in batch],
                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
            for (i, j), g in zip(batch, gens):
                results[i][j] = g
            bar.update(len(batch))
    log.debug("generated %d responses, %d tokens", len(jobs),
              sum(len(g.response_ids) for row in results for g in row))
    return results  # type: ignore[return-value]


__all__ = ["Generation", "generate", "sample_seed", "sampling_logprobs"]
