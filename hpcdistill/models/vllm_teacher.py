"""A teacher served by vLLM: `TeacherRequest`s scored through vLLM's prompt log-probs.

`VLLMTeacher` is a `split_scoring.TeacherService` over a `VLLMServer`. Each request is one
/v1/completions call whose `prompt` is a list of token-id prompts, one per sequence: the teacher's
prompt ids followed by its response ids[:T]. With `prompt_logprobs = k` vLLM returns, for every
prompt position j > 0, a dict token_id (str) -> {logprob, rank, decoded_token} holding the top-k
tokens of the distribution that predicts prompt token j, plus prompt token j itself (k entries when
it is in the top-k, k + 1 otherwise; position 0 is None). Response token t sits at prompt position
len(prompt) + t, so the T positions of a sequence are the last T entries. `max_tokens` is 1, the
least vLLM accepts (0 is refused unless `echo`, and then one token is sampled anyway).

What the log-probs are (vLLM 0.32, `gpu_model_runner._get_prompt_logprobs_dict`): the log-softmax
in float32 of the raw logits, whatever the request's temperature, top-k or top-p (prompt tokens
skip the sampling processors), under the server's `--logprobs-mode raw_logprobs`. The same quantity
as `teacher_columns`' `log_softmax_fp32`. Requests with prompt log-probs never read the prefix
cache (vLLM sets `skip_reading_prefix_cache` for them), so every position is computed.

What vLLM cannot give, and what the columns then hold (`teacher_columns` is the reference):
- `teacher_lp` (at the student's token): exact where the student's token is the teacher's own
  token or in its top-k; NaN elsewhere (vLLM's HTTP API has no way to ask for a given id at a
  prompt position).
- `teacher_at_student_topk_lp`: for the same reason filled only where a student top-k id is among
  the ids vLLM returned at that position (the teacher's top-k and its own token); NaN elsewhere,
  and all NaN when the request carries no student top-k ids.
- `entropy_t`: NaN (it needs the full row).
- token-set masses: not served; a request with `token_sets` is refused.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hpcdistill.models.generation import Generation
from hpcdistill.models.split_scoring import TeacherRequest, _empty_teacher
from hpcdistill.models.vllm_backend import generate_vllm, token_id
from hpcdistill.models.vllm_server import VLLMServer

# vLLM writes -inf log-probs as -9999.0 in its JSON (`clamp_prompt_logprobs`); read back as -inf.
_CLAMPED_LP = -9999.0
SCORING_SEED = 0  # the one token each scoring request samples is thrown away; a fixed seed anyway


def scoring_request(model_name: str, prompts: list[list[int]], k: int) -> dict[str, Any]:
    """The /v1/completions body that scores `prompts` (token ids: teacher prompt + response[:T]):
    top-`k` prompt log-probs at every position, one sampled token that nobody reads."""
    return {"model": model_name, "prompt": [list(map(int, p)) for p in prompts], "max_tokens": 1,
            "temperature": 1.0, "seed": SCORING_SEED, "prompt_logprobs": int(k),
            "skip_special_tokens": False}


def position_logprobs(entry: Mapping[str, Any] | None, where: str) -> dict[int, tuple[float, int]]:
    """One prompt position of vLLM's answer as token id -> (log-prob, rank)."""
    if entry is None:
        raise ValueError(f"{where}: vLLM returned no prompt log-probs there (the first prompt position)")
    out = {}
    for key, value in entry.items():
        lp = float(value["logprob"])
        out[token_id(key)] = (-math.inf if lp <= _CLAMPED_LP else lp, int(value["rank"]))
    return out


def columns_from_positions(positions: Sequence[dict[int, tuple[float, int]]], response: Sequence[int],
                           student_tokens: Sequence[int], student_topk_ids: np.ndarray | None,
                           k: int) -> dict[str, np.ndarray]:
    """TEACHER_FIELDS of one sequence from its T positions (`position_logprobs`), with the
    NaN rules of the module docstring."""
    T = len(positions)
    own = np.empty(T, np.float32)
    topk_ids = np.empty((T, k), np.int32)
    topk_lp = np.empty((T, k), np.float32)
    at_student = np.full(T, np.nan, np.float32)
    at_student_topk = np.full((T, k), np.nan, np.float32)
    for t, known in enumerate(positions):
        token = int(response[t])
        if token not in known:
            raise ValueError(f"position {t}: vLLM's prompt log-probs lack the prompt token {token}")
        own[t] = known[token][0]
        ids = _topk(known, token, k, t)
        topk_ids[t] = ids
        topk_lp[t] = [known[i][0] for i in ids]
        at_student[t] = known.get(int(student_tokens[t]), (np.nan, 0))[0]
        if student_topk_ids is not None:
            at_student_topk[t] = [known.get(int(i), (np.nan, 0))[0] for i in student_topk_ids[t]]
    return {"teacher_lp": at_student, "teacher_at_student_topk_lp": at_student_topk,
            "entropy_t": np.full(T, np.nan, np.float32), "teacher_own_lp": own,
            "teacher_topk_ids": topk_ids, "teacher_topk_lp": topk_lp}


def _topk(known: dict[int, tuple[float, int]], token: int, k: int, t: int) -> list[int]:
    """The top-k ids of one position, best first. vLLM returns the top-k plus the prompt token:
    k + 1 entries when the prompt token is outside the top-k (then it is dropped), else k."""
    if len(known) == k + 1:
        ids = [i for i in known if i != token]
    elif len(known) == k:
        ids = list(known)
    else:
        raise ValueError(f"position {t}: vLLM returned {len(known)} prompt log-probs, expected {k} or {k + 1} "
                         "(is the server's max_logprobs >= top_k?)")
    return sorted(ids, key=lambda i: (known[i][1], -known[i][0]))  # rank 1..k, then log-prob


class VLLMTeacher:
    """A `TeacherService` (and a sampler) over a running vLLM server; see the module docstring for
    what each column holds. `scored_tokens` counts the positions scored so far."""

    every_rank = False  # the server is rank 0's (`train.collect.Scorer` scores there and broadcasts)

    def __init__(self, server: VLLMServer, vocab_size: int):
        self.server = server
        self.vocab_size = int(vocab_size)
        self.scored_tokens = 0

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return self.server.stop_token_ids

    def score(self, request: TeacherRequest) -> list[dict[str, np.ndarray]]:
        """Per sequence of `request`, TEACHER_FIELDS ([T] / [T, k]) as `teacher_columns` shapes
        and types them, from one /v1/completions request for the whole batch."""
        self._check(request)
        k = request.top_k
        out = [_empty_teacher(k, None) for _ in request.seqs]
        idx = [i for i, T in enumerate(request.lengths) if T > 0]
        if not idx:
            return out
        prompts = [list(request.seqs[i][0]) + list(request.seqs[i][1][:request.lengths[i]]) for i in idx]
        answer = self.server.request("/v1/completions", scoring_request(self.server.model_name, prompts, k))
        choices = sorted(answer["choices"], key=lambda c: int(c["index"]))
        if len(choices) != len(idx):
            raise ValueError(f"vLLM answered {len(choices)} choices for {len(idx)} prompts")
        for i, choice in zip(idx, choices):
            out[i] = self._sequence(request, i, choice, k)
        self.scored_tokens += request.num_tokens
        return out

    def _sequence(self, request: TeacherRequest, i: int, choice: Mapping[str, Any], k: int) -> dict[str, np.ndarray]:
        prompt, response = request.seqs[i]
        T = request.lengths[i]
        entries = choice.get("prompt_logprobs")
        if entries is None or len(entries) != len(prompt) + T:
            got = None if entries is None else len(entries)
            raise ValueError(f"sequence {i}: vLLM returned {got} prompt_logprobs entries, expected "
                             f"{len(prompt) + T} (prompt {len(prompt)} + response {T})")
        positions = [position_logprobs(entries[len(prompt) + t], f"sequence {i} position {t}") for t in range(T)]
        student_topk = None if request.student_topk_ids is None else np.asarray(request.student_topk_ids[i])
        return columns_from_positions(positions, response[:T], request.student_tokens[i][:T], student_topk, k)

    def _check(self, request: TeacherRequest) -> None:
        if request.token_sets:
            raise ValueError(f"token_sets {sorted(request.token_sets)}: token-set masses need the full teacher row, "
                             "which a vLLM teacher does not serve")
        if not 1 <= request.top_k <= self.server.max_logprobs:
            raise ValueError(f"top_k={request.top_k}: a vLLM teacher serves 1 <= top_k <= the server's "
                             f"max_logprobs ({self.server.max_logprobs})")
        for i, ((prompt, response), T) in enumerate(zip(request.seqs, request.lengths)):
            if T > 0 and not prompt:
                raise ValueError(f"sequence {i}: the teacher prompt is empty; scoring needs at least one prompt token")
            if T > len(response) or T > len(request.student_tokens[i]):
                raise ValueError(f"sequence {i}: lengths[{i}]={T} exceeds the response ({len(response)}) or the "
                                 f"student tokens ({len(request.student_tokens[i])})")
            if request.student_topk_ids is not None and T > 0 and \
                    np.shape(request.student_topk_ids[i]) != (T, request.top_k):
                raise ValueError(f"sequence {i}: student_topk_ids has shape {np.shape(request.student_topk_ids[i])}, "
                                 f"expected ({T}, {request.top_k})")

    def generate(self, prompts: list[list[int]], *, stop_token_ids: Sequence[int] | None = None,
                 **kwargs: Any) -> list[list[Generation]]:
        """Sample from the teacher (regen, completions): `generate_vllm` on this server, stopping
        at the teacher's stop tokens unless others are given. `batch_size` (the in-process
        sampler's) is not vLLM's: dropped."""
        kwargs.pop("batch_size", None)
        return generate_vllm(self.server, prompts, stop_token_ids=stop_token_ids or self.stop_token_ids, **kwargs)


def start_vllm_teacher(model_dir: str | os.PathLike, *, python: str, dtype: str = "float32", top_k: int,
                       log_path: str | os.PathLike | None = None, startup_timeout_s: float = 300,
                       env: Mapping[str, str] | None = None) -> VLLMServer:
    """A vLLM server for a teacher (served as "teacher", `max_logprobs` >= top_k and >= the
    rollout default 20), not started: use it as a context manager and wrap it in `VLLMTeacher`."""
    return VLLMServer(model_dir, python=python, dtype=dtype, max_logprobs=max(int(top_k), 20),
                      startup_timeout_s=startup_timeout_s, env=env, log_path=log_path,
                      served_model_name="teacher")


__all__ = ["VLLMTeacher", "start_vllm_teacher", "scoring_request", "position_logprobs", "columns_from_positions"]
