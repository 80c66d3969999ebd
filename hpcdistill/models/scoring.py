"""Per-token scores of student rollouts under the student and a teacher (DESIGN.md section 2, stage 4).

Alignment (seed 000, "Position alignment"): sequence i gives the student (prompt_s, s) and the
teacher (prompt_t, r), where r = s for the standard teacher and r = s' for the regen teacher. At
ordinal position t the student distribution is conditioned on (prompt_s, s_<t), the teacher's on
(prompt_t, r_<t); both are truncated to T = min(len(s), len(r)). Everything is scored at the
student's token s_t and the student's top-k ids.

Memory: the forward pass returns hidden states only ([B, L, H]); the lm_head is applied to
`chunk_size` response positions at a time, so at most two [chunk, V] float32 log-prob tensors exist
at once, never [B, T, V] for both models (at V = 151,936 and T = 8k that would be ~10 GB). With
`kernels="auto"` on CUDA (or "triton") the fused kernel (`hpcdistill.kernels.scoring`) reads the
two [chunk, V] logits in the model dtype once and no float32 [chunk, V] tensor exists at all.
"""

from __future__ import annotations

import dataclasses
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
    teacher_topk_ids: np.ndarray  # [T, k] int32, the teacher's own top-k (descending)
    teacher_topk_lp: np.ndarray  # [T, k] float32, teacher log-probs there
    student_at_teacher_topk_lp: np.ndarray  # [T, k] float32, student log-probs at the teacher's top-k
    # teaching-signal diagnostics (issue 11): probability mass of each side on each top-k set, and
    # the overlap of the two sets (|S_k & T_k| / k)
    student_topk_mass: np.ndarray  # [T] float32
    teacher_topk_mass: np.ndarray  # [T] float32
    teacher_mass_at_student_topk: np.ndarray  # [T] float32
    student_mass_at_teacher_topk: np.ndarray  # [T] float32
    topk_overlap: np.ndarray  # [T] float32
    full_kl: np.ndarray | None = None  # [T] float32, KL(student||teacher) over the full vocab
    # name -> [T] float32 probability mass a side puts on a token set (`token_sets`), under the
    # keys "student_mass_<set>" and "teacher_mass_<set>" (seed 000 exp. 5: backtracking tokens)
    token_mass: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.student_lp)


def _decoder(model):
    """The transformer body (everything but the lm_head) of a causal LM."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return decoder if decoder is not None else model.model


def project(model, hidden: torch.Tensor) -> torch.Tensor:
    """lm_head on hidden states [C, H] -> logits [C, V], as the model's own forward would."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma-style soft-capping lives in the CausalLM forward, not in the lm_head
        logits = torch.tanh(logits / cap) * cap
    return logits


def response_hidden(handle: ModelHandle, seqs: list[Seq], lengths: list[int], model=None) -> torch.Tensor:
    """Final hidden states that predict response tokens 0..T_i-1 of each sequence, concatenated.

    seqs[i] = (prompt, response), lengths[i] = T_i <= len(response) -> [sum(T_i), H] on the model's
    device. Hidden state at position len(prompt)+t-1 predicts response token t, so the input is
    prompt + response[:T_i-1]. Right padding keeps default positions correct; causal attention
    keeps the padding out of every real position. `model`: another model than `handle.model`
    on the handle's device (a member of a mixed-logit teacher).
    """
    model = handle.model if model is None else model
    inputs = [list(p) + list(r[:max(T - 1, 0)]) for (p, r), T in zip(seqs, lengths)]
    L = max(len(x) for x in inputs)
    ids = torch.zeros((len(inputs), L), dtype=torch.long)
    mask = torch.zeros((len(inputs), L), dtype=torch.long)
    for b, x in enumerate(inputs):
        ids[b, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[b, :len(x)] = 1
    hidden = _decoder(model)(input_ids=ids.to(handle.device),
                             attention_mask=mask.to(handle.device)).last_hidden_state  # [B, L, H]
    rows = [hidden[b, len(p) - 1:len(p) - 1 + T] for b, ((p, _), T) in enumerate(zip(seqs, lengths))]
    return torch.cat(rows, dim=0)


class TeacherLogits:
    """The teacher's logits at the response positions of a batch, projected chunk by chunk.

    One forward of each member's decoder body (a plain teacher has one member; a trust-region
    teacher two, `models.teachers.LogitMix`), then `chunk(c0, c1)` -> [C, V] float32 logits;
    `chunk(c0, c1, upcast=False)`: a plain teacher's logits in its lm_head's dtype (no float32
    copy, for the fused kernel); a mixture is always summed in float32.
    """

    def __init__(self, teacher: ModelHandle, seqs: list[Seq], lengths: list[int]):
        from hpcdistill.models.teachers import teacher_members

        self.parts = [(model, weight, response_hidden(teacher, seqs, lengths, model=model))
                      for model, weight in teacher_members(teacher)]

    @property
    def num_positions(self) -> int:
        return self.parts[0][2].shape[0]

    def chunk(self, c0: int, c1: int, upcast: bool = True) -> torch.Tensor:
        if len(self.parts) == 1 and self.parts[0][1] == 1.0:  # a plain teacher: no [C, V] copy
            model, _, hidden = self.parts[0]
            logits = project(model, hidden[c0:c1])
            return logits.float() if upcast else logits
        out = None
        for model, weight, hidden in self.parts:
            logits = project(model, hidden[c0:c1]).float()
            out = logits.mul_(weight) if out is None else out.add_(logits, alpha=weight)
        return out


@torch.inference_mode()
def score_rollouts(student: ModelHandle, teacher: ModelHandle, student_seqs: list[Seq],
                   teacher_seqs: list[Seq], *, top_k: int = 20, full_vocab: bool = False,
                   chunk_size: int = 256, batch_size: int = 4, progress: bool = True,
                   token_sets: dict[str, list[int]] | None = None,
                   kernels: str = "torch") -> list[TokenScores]:
    """Score each student rollout against its teacher context (see the module docstring).

    student_seqs[i], teacher_seqs[i]: (prompt_ids, response_ids). The same handle may be passed as
    student and teacher (self-distillation); the teacher still gets its own forward pass on its
    own context. kernels (`trainer.kernels`): "torch" = the chunked torch path; "auto" = the fused
    Triton kernel when the student is on CUDA, triton imports and top_k <= MAX_FUSED_K; "triton" =
    the fused kernel always (CPU tests run it under TRITON_INTERPRET=1). Both give the same fields.
    """
    if kernels not in ("torch", "auto", "triton"):
        raise ValueError(f"kernels must be 'torch', 'auto' or 'triton', got {kernels!r}")
    lengths = aligned_lengths(student_seqs, teacher_seqs, student.vocab_size, teacher.vocab_size)
    k = min(top_k, student.vocab_size)
    results: list[TokenScores | None] = [None] * len(student_seqs)
    show = progress and sys.stderr.isatty()
    with tqdm(total=sum(lengths), desc="scoring", unit="tok", disable=not show) as bar:
        for start in range(0, len(student_seqs), batch_size):
            idx = [i for i in range(start, min(start + batch_size, len(student_seqs))) if lengths[i] > 0]
            for i in range(start, min(start + batch_size, len(student_seqs))):
                if lengths[i] == 0:
                    results[i] = _empty(k, full_vocab, token_sets)
            if not idx:
                continue
            Ts = [lengths[i] for i in idx]
            hs = response_hidden(student, [student_seqs[i] for i in idx], Ts)  # [N, H]
            teacher_logits = TeacherLogits(teacher, [teacher_seqs[i] for i in idx], Ts)
            s_tok = torch.tensor([x for i in idx for x in student_seqs[i][1][:lengths[i]]])  # [N]
            t_tok = torch.tensor([x for i in idx for x in teacher_seqs[i][1][:lengths[i]]])  # [N]
            fused = kernels == "triton" or (kernels == "auto" and hs.is_cuda and _fused_supports(k))
            score_chunk = _score_chunk_fused if fused else _score_chunk
            parts = [score_chunk(student, hs[c:c + chunk_size], teacher_logits, c, s_tok[c:c + chunk_size],
                                 t_tok[c:c + chunk_size], k, full_vocab, token_sets)
                     for c in range(0, hs.shape[0], chunk_size)]
            flat = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
            offsets = np.cumsum([0, *Ts])
            for j, i in enumerate(idx):
                fields = {name: arr[offsets[j]:offsets[j + 1]] for name, arr in flat.items()}
                mass = {name: fields.pop(name) for name in list(fields) if "_mass_" in name and
                        name not in _FIELDS}
                results[i] = TokenScores(**fields, token_mass=mass or None)
            bar.update(sum(Ts))
    return results  # type: ignore[return-value]


_FIELDS = {f.name for f in dataclasses.fields(TokenScores)}


def aligned_lengths(student_seqs: list[Seq], teacher_seqs: list[Seq], student_vocab: int,
                    teacher_vocab: int) -> list[int]:
    """T_i = min(len(s_i), len(r_i)) of each pair, after the checks every scorer makes: as many
    teacher sequences as student ones, no empty prompt, one vocabulary."""
    if len(student_seqs) != len(teacher_seqs):
        raise ValueError(f"{len(student_seqs)} student sequences but {len(teacher_seqs)} teacher sequences")
    for side, seqs in (("student", student_seqs), ("teacher", teacher_seqs)):
        if any(len(p) == 0 for p, _ in seqs):
            raise ValueError(f"a {side} prompt is empty; scoring needs at least one prompt token")
    if student_vocab != teacher_vocab:
        raise ValueError(f"student vocab {student_vocab} != teacher vocab {teacher_vocab}: "
                         "top-k ids are only comparable within one vocabulary")
    return [min(len(s[1]), len(t[1])) for s, t in zip(student_seqs, teacher_seqs)]


def topk_overlap(ids_a: torch.Tensor, ids_b: torch.Tensor) -> torch.Tensor:
    """|A & B| / k for two [C, k] id sets (no duplicates within a row) -> [C] float32."""
    from hpcdistill.distill.loss import in_rows

    return in_rows(ids_b, ids_a).float().mean(-1)


def _score_chunk(student: ModelHandle, hs: torch.Tensor, teacher: TeacherLogits, c0: int,
                 s_tok: torch.Tensor, t_tok: torch.Tensor, k: int, full_vocab: bool,
                 token_sets: dict[str, list[int]] | None = None) -> dict[str, np.ndarray]:
    """All scores for C positions from c0. hs: [C, H] student hidden states; s_tok, t_tok: [C]
    -> dict of [C] / [C, k] arrays. The logits are projected here, so each [C, V] temporary is
    freed as soon as its log-softmax exists."""
    ls = log_softmax_fp32(project(student.model, hs))  # [C, V] float32
    lt = log_softmax_fp32(teacher.chunk(c0, c0 + hs.shape[0])).to(ls.device)  # [C, V] float32
    ps = ls.exp()  # [C, V], shared by the student entropy and the full KL
    ids = torch.topk(ls, k, dim=-1).indices  # [C, k], descending
    top_t = torch.topk(lt, k, dim=-1)
    student_topk_lp = ls.gather(-1, ids)  # [C, k]
    teacher_at = lt.gather(-1, ids)  # [C, k]
    s_tok, t_tok = s_tok.to(ls.device)[:, None], t_tok.to(ls.device)[:, None]
    out = {
        "student_lp": ls.gather(-1, s_tok)[:, 0],
        "teacher_lp": lt.gather(-1, s_tok)[:, 0],
        # Renormalising the gathered full-vocab log-probs over the slice equals renormalising the
        # gathered logits (shift invariance), so this is topk_kl of divergence.py on the same ids.
        "topk_kl": slice_kl(student_topk_lp, teacher_at),
        "entropy_s": entropy_from_logprobs(ls, p=ps),
        "entropy_t": entropy_from_logprobs(lt),
        "teacher_own_lp": lt.gather(-1, t_tok)[:, 0],
        **_topk_fields(ids, student_topk_lp, teacher_at, top_t.indices, top_t.values,
                       ls.gather(-1, top_t.indices)),
    }
    if full_vocab:
        out["full_kl"] = kl_from_logprobs(ls, lt, p=ps)
    for name, token_ids in (token_sets or {}).items():
        ids_s = torch.as_tensor(token_ids, dtype=torch.long, device=ls.device)
        out[f"student_mass_{name}"] = ps.index_select(-1, ids_s).sum(-1)
        out[f"teacher_mass_{name}"] = lt.index_select(-1, ids_s).exp().sum(-1)
    return {name: t.cpu().numpy() for name, t in out.items()}


def _fused_supports(k: int) -> bool:
    """triton imports and the kernel's on-chip top-k holds k. Imported here, not at the top:
    triton (optional, slow to import) loads only where the fused path may run."""
    from hpcdistill.kernels import scoring as kernel_scoring
    from hpcdistill.kernels.common import triton_available

    return triton_available() and k <= kernel_scoring.MAX_FUSED_K


def _score_chunk_fused(student: ModelHandle, hs: torch.Tensor, teacher: TeacherLogits, c0: int,
                       s_tok: torch.Tensor, t_tok: torch.Tensor, k: int, full_vocab: bool,
                       token_sets: dict[str, list[int]] | None = None) -> dict[str, np.ndarray]:
    """`_score_chunk` through the fused kernel, same arguments and fields. One pass over the raw
    [C, V] logits (model dtype) gives the lse of each side, the student top-k, entropies and KLs;
    the rest are gathers of raw logits minus the lse ([C] / [C, k] / [C, |set|] float32), so no
    float32 [C, V] tensor exists (except a mixed teacher's logits, summed in float32)."""
    from hpcdistill.kernels import scoring as kernel_scoring

    s_logits = project(student.model, hs)  # [C, V] model dtype
    t_logits = teacher.chunk(c0, c0 + hs.shape[0], upcast=False).to(s_logits.device)  # [C, V]
    res = kernel_scoring.fused_score(s_logits, t_logits, k)
    lse_s, lse_t = res["student_lse"][:, None], res["teacher_lse"][:, None]  # [C, 1] float32

    def lp_s(ids: torch.Tensor) -> torch.Tensor:  # [C, n] ids -> [C, n] student log-probs
        return s_logits.gather(-1, ids).float() - lse_s

    def lp_t(ids: torch.Tensor) -> torch.Tensor:
        return t_logits.gather(-1, ids).float() - lse_t

    top_t = torch.topk(t_logits, k, dim=-1)  # on raw logits: the same order as on log-probs
    s_tok, t_tok = s_tok.to(s_logits.device)[:, None], t_tok.to(s_logits.device)[:, None]
    out = {
        "student_lp": lp_s(s_tok)[:, 0],
        "teacher_lp": lp_t(s_tok)[:, 0],
        "topk_kl": res["topk_kl"],
        "entropy_s": res["entropy_s"],
        "entropy_t": res["entropy_t"],
        "teacher_own_lp": lp_t(t_tok)[:, 0],
        **_topk_fields(res["student_topk_ids"], res["student_topk_lp"], res["teacher_at_student_topk_lp"],
                       top_t.indices, top_t.values.float() - lse_t, lp_s(top_t.indices)),
    }
    if full_vocab:
        out["full_kl"] = res["full_kl"]
    for name, token_ids in (token_sets or {}).items():
        ids_s = torch.as_tensor(token_ids, dtype=torch.long, device=s_logits.device)
        out[f"student_mass_{name}"] = (s_logits.index_select(-1, ids_s).float() - lse_s).exp().sum(-1)
        out[f"teacher_mass_{name}"] = (t_logits.index_select(-1, ids_s).float() - lse_t).exp().sum(-1)
    return {name: t.cpu().numpy() for name, t in out.items()}


def _topk_fields(ids: torch.Tensor, student_topk_lp: torch.Tensor, teacher_at: torch.Tensor,
                 teacher_ids: torch.Tensor, teacher_topk_lp: torch.Tensor,
                 student_at_teacher: torch.Tensor) -> dict[str, torch.Tensor]:
    """The [C, k] fields of both top-k sets (ids int64 in, int32 out) and the masses and overlap
    derived from them (issue 11) -> dict of [C, k] and [C] tensors."""
    return {
        "student_topk_ids": ids.int(),
        "student_topk_lp": student_topk_lp,
        "teacher_at_student_topk_lp": teacher_at,
        "teacher_topk_ids": teacher_ids.int(),
        "teacher_topk_lp": teacher_topk_lp,
        "student_at_teacher_topk_lp": student_at_teacher,
        "student_topk_mass": student_topk_lp.exp().sum(-1),
        "teacher_topk_mass": teacher_topk_lp.exp().sum(-1),
        "teacher_mass_at_student_topk": teacher_at.exp().sum(-1),
        "student_mass_at_teacher_topk": student_at_teacher.exp().sum(-1),
        "topk_overlap": topk_overlap(ids, teacher_ids),
    }


_TOPK_FIELDS = ("student_topk_ids", "student_topk_lp", "teacher_at_student_topk_lp", "teacher_topk_ids",
                "teacher_topk_lp", "student_at_teacher_topk_lp")  # the [T, k] ones


def _empty(k: int, full_vocab: bool, token_sets=None) -> TokenScores:
    """The scores of a zero-length rollout: every array with T = 0."""
    arrays = {}
    for f in dataclasses.fields(TokenScores):
        if f.name in _TOPK_FIELDS:
            arrays[f.name] = np.zeros((0, k), np.int32 if f.name.endswith("_ids") else np.float32)
        elif f.name not in ("full_kl", "token_mass"):
            arrays[f.name] = np.zeros(0, np.float32)
    return TokenScores(**arrays, full_kl=np.zeros(0, np.float32) if full_vocab else None,
                       token_mass={f"{side}_mass_{name}": np.zeros(0, np.float32) for name in token_sets
                                   for side in ("student", "teacher")} if token_sets else None)


__all__ = ["TokenScores", "TeacherLogits", "score_rollouts", "response_hidden", "project", "topk_overlap"]
