"""Stage 5: a step's scored rollouts as shard rows (docs/shard-format.md, the contract).

The token columns come from the schema's column table (`record.schema.TOKEN_COLUMNS`): every
schema column that `TokenScores` carries is recorded under its own name, so a column added to
both lands in the shard without a second list here. What is not a score (the token ids, the
sampler's log-probs, the supervision mask, the sentence segments, the training loss) is mapped
below, one line each.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

import hpcdistill
from hpcdistill.distill.segments import sentence_segments
from hpcdistill.models.scoring import TokenScores
from hpcdistill.record.schema import TOKEN_COLUMNS
from hpcdistill.rundir import RunPaths
from hpcdistill.spec.load import content_hash, dump_toml, spec_to_dict
from hpcdistill.spec.schema import Spec
from hpcdistill.train.collect import ScoredRollout
from hpcdistill.train.roles import Models

# the schema's token columns that scoring fills, recorded as the scores hold them ([T] or [T, k])
SCORE_COLUMNS = tuple(name for name in TOKEN_COLUMNS if name in {f.name for f in dataclasses.fields(TokenScores)})
# the teacher's own top-k and the student there (scoring.teacher_topk = false leaves them out)
TEACHER_TOPK_COLUMNS = ("teacher_topk_ids", "teacher_topk_lp", "student_at_teacher_topk_lp")


def shard_columns(spec: Spec) -> dict[str, str]:
    """Extra per-token columns this spec records (registered with the shard writer)."""
    columns = {"sampler_gap": "rollout engine's log p of the sampled token minus the trainer's "
                              "recomputation (nats); original rollouts only"}
    if spec.scoring.full_vocab and spec.scoring.backtrack_words:
        words = ", ".join(repr(w) for w in spec.scoring.backtrack_words)
        columns |= {f"{side}_mass_backtrack": f"{side}'s probability mass on backtracking tokens ({words})"
                    for side in ("student", "teacher")}
    return columns


def shard_attrs(spec: Spec, paths: RunPaths, models: Models, step: int) -> dict[str, Any]:
    data = spec_to_dict(spec)
    return {
        "spec_toml": dump_toml(data),
        "spec_hash": content_hash(data),
        "run_id": paths.run_id,
        "experiment": spec.experiment.name,
        "seed": spec.seeds[0],
        "step": step,
        "package_version": hpcdistill.__version__,
        "student_model": spec.model.student,
        "teacher_model": spec.model.teacher,
        "tokenizer": getattr(models.student.tokenizer, "name_or_path", "") or spec.model.student,
        "task": spec.task.name,
        "teacher_context": spec.teacher.context,
        "teacher_weights": spec.teacher.weights if spec.model.teacher == "same" else "frozen",
    }


def rollout_row(rollout: ScoredRollout, seed: int, step: int) -> dict[str, Any]:
    """The rollout's row (`record.schema.ROLLOUT_COLUMNS`; the prompt texts are added by `write_rollouts`)."""
    return {
        "problem_id": rollout.problem.problem_id,
        "sample_idx": rollout.sample_idx,
        "step": step,
        "kind": rollout.kind,
        "reward": float(rollout.verdict.reward),
        "seed": seed,
        "weight_version": step if rollout.weight_version is None else rollout.weight_version,
        "response_text": rollout.text,
        "feedback": rollout.verdict.feedback,
        "demonstration": int(rollout.demonstration),
        "teacher_signal": int(rollout.teacher_signal),
    }


def token_columns(rollout: ScoredRollout, teacher_topk: bool = True) -> dict[str, np.ndarray]:
    """The rollout's token columns, [T] or [T, k] each; `teacher_topk` (scoring.teacher_topk): the
    teacher's own top-k and the student's log-probs there."""
    s = rollout.scores
    n = len(s.student_lp)
    out = {"ids": np.asarray(rollout.generation.response_ids[:n], dtype=np.int32)}
    for name in SCORE_COLUMNS:
        value = getattr(s, name)
        if value is not None and (teacher_topk or name not in TEACHER_TOPK_COLUMNS):
            out[name] = value
    if rollout.train_loss is not None:
        out["train_loss"] = np.asarray(rollout.train_loss, dtype=np.float32)
    out.update(s.token_mass or {})
    if rollout.kind == "original":
        out["sampler_lp"] = np.asarray(rollout.generation.sampler_lp[:n], dtype=np.float32)
        out["sampler_gap"] = rollout.sampler_gap()
    return out


def segment_ids(tokenizer, ids: np.ndarray, newlines: bool = True) -> np.ndarray:
    """Sentence segment of each response token (NLTK-style, seed 002), as int32 [T];
    `newlines`: also break after newline runs (`mask.segment_newlines`)."""
    segments = sentence_segments([tokenizer.decode([int(t)]) for t in ids], newlines)
    out = np.zeros(len(ids), dtype=np.int32)
    for number, positions in enumerate(segments):
        out[positions] = number
    return out


def write_rollouts(writer, rollouts: list[ScoredRollout], seed: int, step: int, tokenizer=None,
                   masks: dict[int, np.ndarray] | None = None, teacher_topk: bool = True,
                   segment_newlines: bool = True) -> None:
    """One shard row per rollout; `masks[i]` (supervision weights) joins rollout i's tokens."""
    for index, rollout in enumerate(rollouts):
        tokens = token_columns(rollout, teacher_topk)
        if masks is not None and index in masks:
            tokens["mask"] = np.asarray(masks[index], dtype=np.float32)
        row = rollout_row(rollout, seed, step)
        if tokenizer is not None:
            prompt = rollout.teacher_seq[0] if rollout.kind == "regenerated" else rollout.student_seq[0]
            row["prompt_text"] = tokenizer.decode(prompt)
            row["teacher_prompt_text"] = tokenizer.decode(rollout.teacher_seq[0])
            if rollout.kind == "original" and len(tokens["ids"]):
                tokens["segment_id"] = segment_ids(tokenizer, tokens["ids"], segment_newlines)
        writer.append(row, tokens)


__all__ = ["SCORE_COLUMNS", "rollout_row", "segment_ids", "shard_attrs", "shard_columns", "token_columns",
           "write_rollouts"]
