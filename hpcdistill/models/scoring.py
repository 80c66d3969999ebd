"""Per-token scores of student rollouts under the student and a teacher (DESIGN.md section 2, stage 4).

Alignment (seed 000, "Position alignment"): sequence i gives the student (prompt_s, s) and the
teacher (prompt_t, r), where r = s for the standard teacher and r = s' for the regen teacher. At
ordinal position t the student distribution is conditioned on (prompt_s, s_<t), the teacher's on
(prompt_t, r_<t); both are truncated to T = min(len(s), len(r)). Everything is scored at the
student's token s_t and the student's top-k ids.

Memory: the forward pass returns hidden states only ([B, L, H]); the lm_head is applied to
`chunk_size` response positions at a time, so at most two [chunk, V] float32 log-prob tensors exist
at once, never [B, T, V] for both models (at V = 151,936 and T = 8k that would be ~10 GB).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from hpcdistill.distill.divergence import (
    entropy_from_logprobs,
    kl_from_logprobs,
    log_softmax_fp32,
    slice_kl,
)
from hpcdistill.models.loading import ModelHandle

log = logging.getLogger(__name__)

Seq = tuple[list[int], list[int]]  # (prompt_ids, response_ids)


@dataclass
class TokenScores:
    """Scores at the T aligned positions of one rollout. k = top_k."""

    student_lp: np.ndarray  # [T] float32, log p_S(s_t | p_s, s_<t)
    teacher_lp: np.ndarray  # [T] float32, log p_T(s_t | p_t, r_<t): teacher at the STUDENT's token
    student_topk_ids: np.ndarray  # [T, k] int32, the student's top-k ids (descending)
    student_topk_lp: np.ndarray  # [T, k] float32, student full-vocab log-probs at those ids
    teacher_at_student_topk_lp: np.ndarray  # [T, k] float32, teacher full-vocab log-probs there
    topk_kl: np.ndarray  # [T] float32, KL(student||teacher) renormalised over the top-k slice
    entropy_s: np.ndarray  # [T] float32, student entropy (nats, full vocab)
    entropy_t: np.ndarray  # [T] float32, teacher entropy
    teacher_own_lp: np.ndarray  # [T] float32, log p_T(r_t | p_t, r_<t); = teacher_lp when r = s
    full_kl: np.ndarray | None = None  # [T] float32, KL(student||teacher) over the full vocab
    teacher_topk_ids: np.ndarray | None = None  # [T, k] int32, the teacher's own top-k
    teacher_topk_lp: np.ndarray | None = None  # [T, k] float32
    # name -> [T] float32 probability mass a side puts on a token set (`token_sets`), under the
    # keys "student_mass_<set>" and "teacher_mass_<set>" (seed 000 exp. 5: backtracking tokens)
    token_mass: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.student_lp)


def _decoder(model):
    """The transformer body (everything but the lm_head) of a causal LM."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return decoder if decoder is not None else model.model


def _project(model, hidden: torch.Tensor) -> torch.Tensor:
    """lm_head on hidden states [C, H] -> logits [C, V], as the model's own forward would."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma-style soft-capping lives in the CausalLM forward, not in the lm_head
        logits = torch.tanh(logits / cap) * cap
    return logits


def response_hidden(handle: ModelHandle, seqs: list[Seq], lengths: list[int]) -> torch.Tensor:
    """Final hidden states that predict response tokens 0..T_i-1 of each sequence, concatenated.

    seqs[i] = (prompt, response), lengths[i] = T_i <= len(response) -> [sum(T_i), H] on the model's
    device. Hidden state at position len(prompt)+t-1 predicts response token t, so the input is
    prompt + response[:T_i-1]. Right padding keeps default positions correct; causal attention
    keeps the padding out of every real position.
    """
    inputs = [list(p) + list(r[:max(T - 1, 0)]) for (p, r), T in zip(seqs, lengths)]
    L = max(len(x) for x in inputs)
    ids = torch.zeros((len(inputs), L), dtype=torch.long)
    mask = torch.zeros((len(inputs), L), dtype=torch.long)
    for b, x in enumerate(inputs):
        ids[b, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[b, :len(x)] = 1
    hidden = _decoder(handle.model)(input_ids=ids.to(handle.device),
                                    attention_mask=mask.to(handle.device)).last_hidden_state  # [B, L, H]
    rows = [hidden[b, len(p) - 1:len(p) - 1 + T] for b, ((p, _), T) in enumerate(zip(seqs, lengths))]
    return torch.cat(rows, dim=0)


@torch.inference_mode()
def score_rollouts(student: ModelHandle, teacher: ModelHandle, student_seqs: list[Seq],
                   teacher_seqs: list[Seq], *, top_k: int = 20, full_vocab: bool = False,
                   teacher_topk: bool = False, chunk_size: int = 256, batch_size: int = 4,
                   progress: bool = True, token_sets: dict[str, list[int]] | None = None) -> list[TokenScores]:
    """Score each student rollout against its teacher context (see the module docstring).

    student_seqs[i], teacher_seqs[i]: (prompt_ids, response_ids). The same handle may be passed as
    student and teacher (self-distillation); the teacher still gets its own forward pass on its
    own context.
    """
    if len(student_seqs) != len(teacher_seqs):
        raise ValueError(f"{len(student_seqs)} student sequences but {len(teacher_seqs)} teacher sequences")
    for side, seqs in (("student", student_seqs), ("teacher", teacher_seqs)):
        if any(len(p) == 0 for p, _ in seqs):
            raise ValueError(f"a {side} prompt is empty; scoring needs at least one prompt token")
    if student.vocab_size != teacher.vocab_size:
        raise ValueError(f"student vocab {student.vocab_size} != teacher vocab {teacher.vocab_size}: "
                         "top-k ids are only comparable within one vocabulary")
    k = min(top_k, student.vocab_size)
    lengths = [min(len(s[1]), len(t[1])) for s, t in zip(student_seqs, teacher_seqs)]
    results: list[TokenScores | None] = [None] * len(student_seqs)
    show = progress and sys.stderr.isatty()
    with tqdm(total=sum(lengths), desc="scoring", unit="tok", disable=not show) as bar:
        for start in range(0, len(student_seqs), batch_size):
            idx = [i for i in range(start, min(start + batch_size, len(student_seqs))) if lengths[i] > 0]
            for i in range(start, min(start + batch_size, len(student_seqs))):
                if lengths[i] == 0:
                    results[i] = _empty(k, full_vocab, teacher_topk, token_sets)
            if not idx:
                continue
            Ts = [lengths[i] for i in idx]
            hs = response_hidden(student, [student_seqs[i] for i in idx], Ts)  # [N, H]
            ht = response_hidden(teacher, [teacher_seqs[i] for i in idx], Ts)  # [N, H]
            s_tok = torch.tensor([x for i in idx for x in student_seqs[i][1][:lengths[i]]])  # [N]
            t_tok = torch.tensor([x for i in idx for x in teacher_seqs[i][1][:lengths[i]]])  # [N]
            parts = [_score_chunk(student, teacher, hs[c:c + chunk_size], ht[c:c + chunk_size],
                                  s_tok[c:c + chunk_size], t_tok[c:c + chunk_size], k,
                                  full_vocab, teacher_topk, token_sets)
                     for c in range(0, hs.shape[0], chunk_size)]
            flat = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
            offsets = np.cumsum([0, *Ts])
            for j, i in enumerate(idx):
                fields = {name: arr[offsets[j]:offsets[j + 1]] for name, arr in flat.items()}
                mass = {name: fields.pop(name) for name in list(fields) if "_mass_" in name}
                results[i] = TokenScores(**fields, token_mass=mass or None)
            bar.update(sum(Ts))
    return results  # type: ignore[return-value]


def _score_chunk(student: ModelHandle, teacher: ModelHandle, hs: torch.Tensor, ht: torch.Tensor,
                 s_tok: torch.Tensor, t_tok: torch.Tensor, k: int, full_vocab: bool,
                 teacher_topk: bool, token_sets: dict[str, list[int]] | None = None) -> dict[str, np.ndarray]:
    """All scores for C positions. hs, ht: [C, H]; s_tok, t_tok: [C] -> dict of [C] / [C, k] arrays."""
    ls = log_softmax_fp32(_project(student.model, hs))  # [C, V] float32
    lt = log_softmax_fp32(_project(teacher.model, ht))  # [C, V] float32, on the teacher's device
    ps = ls.exp()  # [C, V], shared by the student entropy and the full KL
    ids = torch.topk(ls, k, dim=-1).indices  # [C, k], descending
    s_tok_s, s_tok_t = s_tok.to(ls.device)[:, None], s_tok.to(lt.device)[:, None]
    student_topk_lp = ls.gather(-1, ids)  # [C, k]
    teacher_at = lt.gather(-1, ids.to(lt.device)).to(ls.device)  # [C, k]
    out = {
        "student_lp": ls.gather(-1, s_tok_s)[:, 0],
        "teacher_lp": lt.gather(-1, s_tok_t)[:, 0],
        "student_topk_ids": ids.int(),
        "student_topk_lp": student_topk_lp,
        "teacher_at_student_topk_lp": teacher_at,
        # Renormalising the gathered full-vocab log-probs over the slice equals renormalising the
        # gathered logits (shift invariance), so this is topk_kl of divergence.py on the same ids.
        "topk_kl": slice_kl(student_topk_lp, teacher_at),
        "entropy_s": entropy_from_logprobs(ls, p=ps),
        "entropy_t": entropy_from_logprobs(lt),
        "teacher_own_lp": lt.gather(-1, t_tok.to(lt.device)[:, None])[:, 0],
    }
    if full_vocab:
        out["full_kl"] = kl_from_logprobs(ls, lt.to(ls.device), p=ps)
    for name, token_ids in (token_sets or {}).items():
        ids_s = torch.as_tensor(token_ids, dtype=torch.long, device=ls.device)
        out[f"student_mass_{name}"] = ps.index_select(-1, ids_s).sum(-1)
        ids_t = ids_s.to(lt.device)
        out[f"teacher_mass_{name}"] = lt.index_select(-1, ids_t).exp().sum(-1).to(ls.device)
    if teacher_topk:
        top = torch.topk(lt, k, dim=-1)
        out["teacher_topk_ids"], out["teacher_topk_lp"] = top.indices.int(), top.values
    return {name: t.cpu().numpy() for name, t in out.items()}


def _empty(k: int, full_vocab: bool, teacher_topk: bool, token_sets=None) -> TokenScores:
    f1, fk = np.zeros(0, np.float32), np.zeros((0, k), np.float32)
    ik = np.zeros((0, k), np.int32)
    return TokenScores(student_lp=f1, teacher_lp=f1.copy(), student_topk_ids=ik, student_topk_lp=fk,
                       teacher_at_student_topk_lp=fk.copy(), topk_kl=f1.copy(), entropy_s=f1.copy(),
                       entropy_t=f1.copy(), teacher_own_lp=f1.copy(),
                       full_kl=f1.copy() if full_vocab else None,
                       teacher_topk_ids=ik.copy() if teacher_topk else None,
                       teacher_topk_lp=fk.copy() if teacher_topk else None,
                       token_mass={f"{side}_mass_{name}": f1.copy() for name in token_sets
                                   for side in ("student", "teacher")} if token_sets else None)


__all__ = ["TokenScores", "score_rollouts", "response_hidden"]
