"""Rollouts on vLLM: its OpenAI-compatible server (`models.vllm_server`) sampled over HTTP, one
completions request per (prompt, sample), each answer mapped to a `Generation` with the semantics
of `generation.generate`.

Log-probabilities: the server is started with `--logprobs-mode raw_logprobs` (vLLM 0.32's default,
set explicitly): the log-prob vLLM reports for a sampled token is log p under the raw model at
temperature 1 before top-k/top-p, the same quantity as `Generation.sampled_lp`. The mode is one per
server, so `sampler_lp` (log q under the distribution actually sampled from) is derived:
- temperature 0 (greedy): 0, as in `generation.generate`;
- temperature 1 without truncation: q = p, so sampler_lp = sampled_lp exactly;
- otherwise from the raw log-probs of the top `max_logprobs` tokens plus the sampled one,
  renormalised after temperature, top-k and top-p (`generation.sampling_logprobs`). That is exact
  when 1 <= top_k <= max_logprobs (every token that can be sampled is in the list) and an
  approximation otherwise (the tail beyond the list is dropped from the normaliser).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from hpcdistill.errors import ModelError
from hpcdistill.models.generation import Generation, sample_seed, sampling_logprobs
# resolve_vllm_python: imported from here by the loop, with the server
from hpcdistill.models.vllm_server import VLLMServer, resolve_vllm_python

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------------
# one request and its answer (plain functions: no server needed)


def sampler_is_raw(temperature: float, top_p: float, top_k: int) -> bool:
    """q = p: temperature 1 without truncation, so sampler_lp is the raw log-prob itself."""
    return temperature == 1 and top_p >= 1 and top_k == 0


def needs_candidates(temperature: float, top_p: float, top_k: int) -> bool:
    """Whether sampler_lp is derived from the top log-probs of each position (module docstring)."""
    return temperature > 0 and not sampler_is_raw(temperature, top_p, top_k)


def forced_prefix(prefix: Sequence[int], max_new_tokens: int, stop: tuple[int, ...]
                  ) -> tuple[list[int], int | None, int]:
    """A forced prefix cut where generate() would stop: at its first stop token or at
    max_new_tokens. Returns (prefix, index of its stop token or None, tokens left to sample)."""
    prefix = list(prefix[:max_new_tokens])
    prefix_stops = next((k for k, t in enumerate(prefix) if t in stop), None)
    if prefix_stops is not None:
        prefix = prefix[:prefix_stops + 1]
    remaining = max_new_tokens - len(prefix) if prefix_stops is None else 0
    return prefix, prefix_stops, remaining


def completion_request(model_name: str, prompt: list[int], prefix: list[int], seed: int, *,
                       remaining: int, temperature: float, top_p: float, top_k: int, num_top: int,
                       stop: tuple[int, ...]) -> dict[str, Any]:
    """The /v1/completions body: the prompt with the forced prefix appended, `num_top` top
    log-probs per sampled position (and per prefix position, as prompt log-probs)."""
    body: dict[str, Any] = {
        "model": model_name, "prompt": list(prompt) + prefix,
        "max_tokens": max(remaining, 1), "temperature": temperature, "top_p": top_p,
        "top_k": top_k, "seed": seed, "logprobs": num_top, "stop_token_ids": list(stop),
        "return_token_ids": True, "return_tokens_as_token_ids": True, "skip_special_tokens": False,
    }
    if prefix:
        body["prompt_logprobs"] = num_top
    return body


def token_id(key: str) -> int:
    """A token of a top-log-probs entry: "token_id:123" (return_tokens_as_token_ids) or "123"."""
    return int(key.split(":", 1)[1]) if key.startswith("token_id:") else int(key)


def derived_sampler_lp(candidates: dict[int, float], token: int, temperature: float,
                       top_p: float, top_k: int) -> float:
    """log q(token) from the raw log-probs of a candidate list (top-N plus the token itself)."""
    ids = list(candidates)
    raw = torch.tensor([[candidates[i] for i in ids]], dtype=torch.float32)  # [1, N]
    q = sampling_logprobs(raw, temperature, top_p, top_k if top_k < len(ids) else 0)
    return float(q[0, ids.index(token)])


def generation_from_choice(choice: dict[str, Any], prompt: list[int], prefix: list[int],
                           prefix_stops: int | None, remaining: int, *, temperature: float,
                           top_p: float, top_k: int) -> Generation:
    """The Generation of one answered request (`choice`: the answer's choices[0])."""
    tokens: list[int] = []
    raw_lp: list[float] = []
    candidates: list[dict[int, float]] = []
    if prefix:
        for entry, token in zip(choice["prompt_logprobs"][-len(prefix):], prefix):
            cands = {token_id(k): float(v["logprob"]) for k, v in entry.items()}
            tokens.append(token)
            raw_lp.append(cands[token])
            candidates.append(cands)
    if remaining > 0:
        out_ids = [int(t) for t in choice["token_ids"]]
        lps = choice["logprobs"]
        tokens += out_ids
        raw_lp += [float(x) for x in lps["token_logprobs"]]
        for token, lp, top in zip(out_ids, lps["token_logprobs"], lps["top_logprobs"] or []):
            cands = {token_id(k): float(v) for k, v in (top or {}).items()}
            cands[token] = float(lp)
            candidates.append(cands)
        finish = choice["finish_reason"]
        if finish not in ("stop", "length"):
            raise ModelError(f"vLLM finished a rollout with reason {finish!r}")
    else:
        finish = "stop" if prefix_stops is not None else "length"

    sampled_lp = np.asarray(raw_lp, dtype=np.float32)
    if temperature == 0:
        sampler_lp = np.zeros_like(sampled_lp)  # a point mass, as in generate()
    elif sampler_is_raw(temperature, top_p, top_k):
        sampler_lp = sampled_lp.copy()
    else:
        sampler_lp = np.asarray([derived_sampler_lp(c, t, temperature, top_p, top_k)
                                 for c, t in zip(candidates, tokens)], dtype=np.float32)
    return Generation(prompt_ids=list(prompt), response_ids=np.asarray(tokens, dtype=np.int64),
                      sampled_lp=sampled_lp, sampler_lp=sampler_lp, finish_reason=finish,
                      num_prefix_tokens=min(len(prefix), len(tokens)))


# -------------------------------------------------------------------------------------------------
# sampling


def _one(server: VLLMServer, prompt: list[int], prefix: list[int], seed: int, *,
         max_new_tokens: int, temperature: float, top_p: float, top_k: int,
         stop: tuple[int, ...]) -> Generation:
    prefix, prefix_stops, remaining = forced_prefix(prefix, max_new_tokens, stop)
    num_top = server.max_logprobs if needs_candidates(temperature, top_p, top_k) else 0
    body = completion_request(server.model_name, prompt, prefix, seed, remaining=remaining,
                              temperature=temperature, top_p=top_p, top_k=top_k, num_top=num_top, stop=stop)
    choice = server.request("/v1/completions", body)["choices"][0]
    return generation_from_choice(choice, prompt, prefix, prefix_stops, remaining,
                                  temperature=temperature, top_p=top_p, top_k=top_k)


def generate_vllm(server: VLLMServer, prompt_ids: list[list[int]], *, n: int, max_new_tokens: int,
                  temperature: float, top_p: float = 1.0, top_k: int = 0, seed: int,
                  prefix_ids: list[list[int]] | None = None,
                  stop_token_ids: Sequence[int] | None = None, concurrency: int = 32,
                  progress: bool = True) -> list[list[Generation]]:
    """Sample `n` responses per prompt on the server; returns [prompt][sample] Generations with
    the semantics of `generation.generate` (response ids include the stop token; prefixes are
    forced as the first response tokens). One request per (prompt, sample) with its own seed
    `sample_seed(seed, i, j)`, sent `concurrency` at a time so vLLM batches them; vLLM's per-request
    generators make a sample independent of what else is in the batch. `stop_token_ids` defaults
    to the model's eos and end-of-turn tokens."""
    if prefix_ids is not None and len(prefix_ids) != len(prompt_ids):
        raise ValueError(f"prefix_ids has {len(prefix_ids)} entries for {len(prompt_ids)} prompts")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or n < 1 or max_new_tokens < 1:
        raise ValueError(f"bad sampling settings: temperature={temperature}, top_p={top_p}, "
                         f"top_k={top_k}, n={n}, max_new_tokens={max_new_tokens}")
    stop = tuple(stop_token_ids) if stop_token_ids is not None else server.stop_token_ids
    if needs_candidates(temperature, top_p, top_k) and not 1 <= top_k <= server.max_logprobs:
        log.info("sampler_lp is derived from the top %d log-probs (approximate for temperature=%g "
                 "top_p=%g top_k=%d); see docs/vllm.md", server.max_logprobs, temperature, top_p, top_k)
    jobs = [(i, j) for i in range(len(prompt_ids)) for j in range(n)]
    results: list[list[Generation | None]] = [[None] * n for _ in prompt_ids]
    t0 = time.monotonic()

    def run(job: tuple[int, int]) -> tuple[tuple[int, int], Generation]:
        i, j = job
        prefix = list(prefix_ids[i]) if prefix_ids is not None else []
        return job, _one(server, list(prompt_ids[i]), prefix, sample_seed(seed, i, j),
                         max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         top_k=top_k, stop=stop)

    show = progress and sys.stderr.isatty()
    with tqdm(total=len(jobs), desc="rollout (vLLM)", unit="seq", disable=not show) as bar, \
            ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(jobs)))) as pool:
        for (i, j), gen in pool.map(run, jobs):
            results[i][j] = gen
            bar.update(1)
    log.debug("vLLM generated %d responses, %d tokens in %.1f s (weight version %d)", len(jobs),
              sum(len(g.response_ids) for row in results for g in row if g is not None),
              time.monotonic() - t0, server.weight_version)
    return results  # type: ignore[return-value]


__all__ = ["generate_vllm", "completion_request", "generation_from_choice", "forced_prefix", "needs_candidates",
           "sampler_is_raw", "derived_sampler_lp", "token_id", "VLLMServer", "resolve_vllm_python"]
