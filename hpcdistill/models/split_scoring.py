"""Scoring with the teacher in another process: the student's half here, the teacher's half there.

`models.scoring.score_rollouts` projects both sides chunk by chunk in one process. When the
teacher is its own role (`models.teacher_server`, on its own GPUs; or a vLLM server,
`models.vllm_teacher`), the trainer holds only the student. Each of the student's batches of
`batch_size` rollouts is then scored in three moves:

1. student: one decoder forward, its lm_head chunk by chunk: log-probs at the sampled tokens, its
   top-k ids and log-probs, its entropy (and token-set masses);
2. teacher (`TeacherRequest` -> `teacher_columns`): the same batch on its own context: log-probs
   at the student's tokens and top-k ids, its own top-k and log-probs, its entropy (and masses);
3. student: its log-probs at the teacher's top-k ids, from its kept hidden states (the chunk is
   projected again: one more lm_head matmul, no [N, V] kept between the moves).

The fields are those of `TokenScores`, computed by the same operations on the same batches, so
they equal the in-process scores (bit for bit on the CPU). `scoring.full_vocab` (the full KL needs
both full rows in one place) is not served this way; `spec.rules` refuses it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from hpcdistill.distill.divergence import entropy_from_logprobs, log_softmax_fp32, slice_kl
from hpcdistill.models.loading import ModelHandle
from hpcdistill.models.scoring import (TeacherLogits, TokenScores, _empty, _topk_fields, aligned_lengths, project,
                                       response_hidden)

Seq = tuple[list[int], list[int]]  # (prompt_ids, response_ids)

TEACHER_FIELDS = ("teacher_lp", "teacher_at_student_topk_lp", "entropy_t", "teacher_own_lp", "teacher_topk_ids",
                  "teacher_topk_lp")  # + "teacher_mass_<set>" per token set


@dataclass
class TeacherRequest:
    """One batch for the teacher: its sequences and, per sequence, the T_i positions to score, the
    student's sampled token and top-k ids there (None: not asked, a vLLM teacher)."""

    seqs: list[Seq]  # the teacher's (prompt, response) of each rollout
    lengths: list[int]  # T_i <= len(response)
    student_tokens: list[list[int]]  # [T_i] the student's token at each position
    student_topk_ids: list[np.ndarray] | None  # [T_i, k] int, or None
    top_k: int
    chunk_size: int = 256
    token_sets: dict[str, list[int]] | None = None

    @property
    def num_tokens(self) -> int:
        return int(sum(self.lengths))


class TeacherService(Protocol):
    """What the split scorer asks of a teacher role (a `TeacherClient`, a `VLLMTeacher`)."""

    vocab_size: int

    def score(self, request: TeacherRequest) -> list[dict[str, np.ndarray]]: ...


@torch.inference_mode()
def teacher_columns(teacher: ModelHandle, request: TeacherRequest) -> list[dict[str, np.ndarray]]:
    """The teacher's half of a batch (run where the teacher is): per sequence, TEACHER_FIELDS
    ([T] / [T, k]) and the token-set masses. One decoder forward for the whole request (it is one
    scoring batch), the lm_head `chunk_size` positions at a time."""
    k = request.top_k
    idx = [i for i, T in enumerate(request.lengths) if T > 0]
    out: list[dict[str, np.ndarray]] = [_empty_teacher(k, request.token_sets) for _ in request.seqs]
    if not idx:
        return out
    Ts = [request.lengths[i] for i in idx]
    logits = TeacherLogits(teacher, [request.seqs[i] for i in idx], Ts)
    s_tok = torch.tensor([int(x) for i in idx for x in request.student_tokens[i][:request.lengths[i]]])
    t_tok = torch.tensor([int(x) for i in idx for x in request.seqs[i][1][:request.lengths[i]]])
    ids = None if request.student_topk_ids is None else torch.as_tensor(
        np.concatenate([np.asarray(request.student_topk_ids[i], np.int64) for i in idx]))
    parts = []
    for c0 in range(0, logits.num_positions, request.chunk_size):
        c1 = min(c0 + request.chunk_size, logits.num_positions)
        lt = log_softmax_fp32(logits.chunk(c0, c1))  # [C, V] float32
        top = torch.topk(lt, k, dim=-1)
        cols = {"teacher_lp": lt.gather(-1, s_tok[c0:c1, None].to(lt.device))[:, 0],
                "teacher_at_student_topk_lp": (lt.gather(-1, ids[c0:c1].to(lt.device)) if ids is not None else
                                               torch.full((c1 - c0, k), float("nan"), device=lt.device)),
                "entropy_t": entropy_from_logprobs(lt),
                "teacher_own_lp": lt.gather(-1, t_tok[c0:c1, None].to(lt.device))[:, 0],
                "teacher_topk_ids": top.indices.int(), "teacher_topk_lp": top.values}
        for name, token_ids in (request.token_sets or {}).items():
            cols[f"teacher_mass_{name}"] = lt.index_select(-1, torch.as_tensor(token_ids, device=lt.device)).exp().sum(-1)
        parts.append({name: t.cpu().numpy() for name, t in cols.items()})
    flat = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    offsets = np.cumsum([0, *Ts])
    for j, i in enumerate(idx):
        out[i] = {name: arr[offsets[j]:offsets[j + 1]] for name, arr in flat.items()}
    return out


def _empty_teacher(k: int, token_sets) -> dict[str, np.ndarray]:
    out = {name: np.zeros((0, k) if name.endswith(("_ids", "topk_lp")) else 0,
                          np.int32 if name.endswith("_ids") else np.float32) for name in TEACHER_FIELDS}
    return out | {f"teacher_mass_{name}": np.zeros(0, np.float32) for name in token_sets or {}}


@torch.inference_mode()
def score_rollouts_split(student: ModelHandle, teacher: TeacherService, student_seqs: list[Seq],
                         teacher_seqs: list[Seq], *, top_k: int = 20, chunk_size: int = 256, batch_size: int = 4,
                         token_sets: dict[str, list[int]] | None = None, ask_student_topk: bool = True
                         ) -> list[TokenScores]:
    """`score_rollouts`' fields with the teacher behind `teacher` (module docstring).
    `ask_student_topk=False`: the teacher is not asked at the student's top-k ids (a vLLM teacher
    cannot be): those columns and the top-k KL are NaN."""
    lengths = aligned_lengths(student_seqs, teacher_seqs, student.vocab_size, teacher.vocab_size)
    k = min(top_k, student.vocab_size)
    results: list[TokenScores] = []
    for start in range(0, len(student_seqs), batch_size):
        batch = range(start, min(start + batch_size, len(student_seqs)))
        results += _score_batch(student, teacher, [student_seqs[i] for i in batch], [teacher_seqs[i] for i in batch],
                                [lengths[i] for i in batch], k, chunk_size, token_sets, ask_student_topk)
    return results


def _score_batch(student: ModelHandle, teacher: TeacherService, student_seqs: list[Seq], teacher_seqs: list[Seq],
                 lengths: list[int], k: int, chunk_size: int, token_sets, ask_student_topk: bool) -> list[TokenScores]:
    idx = [i for i, T in enumerate(lengths) if T > 0]
    out = [_empty(k, False, token_sets) for _ in lengths]
    if not idx:
        return out
    Ts = [lengths[i] for i in idx]
    hs = response_hidden(student, [student_seqs[i] for i in idx], Ts)  # [N, H]
    s_tok = torch.tensor([x for i in idx for x in student_seqs[i][1][:lengths[i]]], device=hs.device)
    mine = [_student_chunk(student, hs[c:c + chunk_size], s_tok[c:c + chunk_size], k, token_sets)
            for c in range(0, hs.shape[0], chunk_size)]
    own = {name: np.concatenate([p[name] for p in mine]) for name in mine[0]}
    offsets = np.cumsum([0, *Ts])
    split = [slice(offsets[j], offsets[j + 1]) for j in range(len(idx))]
    request = TeacherRequest([teacher_seqs[i] for i in idx], Ts, [student_seqs[i][1][:lengths[i]] for i in idx],
                             [own["student_topk_ids"][sl] for sl in split] if ask_student_topk else None,
                             k, chunk_size, token_sets)
    theirs = teacher.score(request)
    teacher_ids = torch.as_tensor(np.concatenate([t["teacher_topk_ids"] for t in theirs]), dtype=torch.long)
    student_at = torch.cat([log_softmax_fp32(project(student.model, hs[c:c + chunk_size]))
                            .gather(-1, teacher_ids[c:c + chunk_size].to(hs.device))
                            for c in range(0, hs.shape[0], chunk_size)]).cpu()
    for j, i in enumerate(idx):
        fields = {name: arr[split[j]] for name, arr in own.items()} | theirs[j]
        fields |= {name: t.cpu().numpy() for name, t in _topk_fields(
            torch.as_tensor(fields["student_topk_ids"], dtype=torch.long), torch.as_tensor(fields["student_topk_lp"]),
            torch.as_tensor(fields["teacher_at_student_topk_lp"]), torch.as_tensor(fields["teacher_topk_ids"],
                                                                                   dtype=torch.long),
            torch.as_tensor(fields["teacher_topk_lp"]), student_at[split[j]]).items()}
        fields["topk_kl"] = slice_kl(torch.as_tensor(fields["student_topk_lp"]),
                                     torch.as_tensor(fields["teacher_at_student_topk_lp"])).numpy()
        mass = {name: fields.pop(name) for name in list(fields) if "_mass_" in name and name not in _FIELDS}
        out[i] = TokenScores(**fields, token_mass=mass or None)
    return out


def _student_chunk(student: ModelHandle, hs: torch.Tensor, s_tok: torch.Tensor, k: int,
                   token_sets) -> dict[str, np.ndarray]:
    ls = log_softmax_fp32(project(student.model, hs))  # [C, V] float32
    ps = ls.exp()
    ids = torch.topk(ls, k, dim=-1).indices
    out = {"student_lp": ls.gather(-1, s_tok[:, None])[:, 0], "student_topk_ids": ids.int(),
           "student_topk_lp": ls.gather(-1, ids), "entropy_s": entropy_from_logprobs(ls, p=ps)}
    for name, token_ids in (token_sets or {}).items():
        out[f"student_mass_{name}"] = ps.index_select(-1, torch.as_tensor(token_ids, device=ls.device)).sum(-1)
    return {name: t.cpu().numpy() for name, t in out.items()}


_FIELDS = {f.name for f in dataclasses.fields(TokenScores)}


class LocalTeacher:
    """A `TeacherService` over a handle in this process: what the teacher process runs, callable
    directly (tests, and the reference the split path is checked against)."""

    def __init__(self, handle: ModelHandle):
        self.handle = handle
        self.vocab_size = handle.vocab_size
        self.scored_tokens = 0

    def score(self, request: TeacherRequest) -> list[dict[str, np.ndarray]]:
        self.scored_tokens += request.num_tokens
        return teacher_columns(self.handle, request)


__all__ = ["TeacherRequest", "TeacherService", "LocalTeacher", "teacher_columns", "score_rollouts_split",
           "TEACHER_FIELDS"]
