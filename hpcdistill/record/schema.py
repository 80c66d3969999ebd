"""The shard schema, version 1.2: every dataset, its dtype, shape, fill value, units and meaning.

This module is the single source of the names in `docs/shard-format.md` (the contract); the writer
copies each column's `units` and `description` into the dataset's attrs, so a shard explains itself
to plain h5py. Layout (n = tokens in the file, r = rollouts, k = the file's `top_k` attr):

    /                  attrs: schema_version, complete, top_k, created, run_id, spec_toml, ...
    /tokens/<col>      [n] or [n, k]  ragged per-token data, rollouts stored back to back
    /rollouts/<col>    [r]            one row per rollout; tokens of rollout i are
                                      tokens/*[offset[i] : offset[i] + length[i]]
    /metrics/{step,name,value} [m]    long table of per-step scalars

Versioning (anndata-style, see STYLE.md): the writer stamps `schema_version`; a reader reads the
versions in READABLE_VERSIONS and refuses anything else with the version it found. A minor bump
(1.0 -> 1.1) only adds optional datasets or attrs; a major bump changes or removes something.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCHEMA_VERSION = "1.2"
# 1.1 added optional columns only (the teacher's top-k with the student there, teaching-signal
# diagnostics, per-token training loss, the teacher's prompt and its demonstration): 1.0 reads as is.
# 1.2 added two rollout kinds (fixed, fixed_regenerated: step 0's rollouts re-scored at a later
# step, `scoring.rescore_step0`); the old kinds keep their codes, so 1.0 and 1.1 read as is.
READABLE_VERSIONS: tuple[str, ...] = ("1.0", "1.1", "1.2")

NATS = "nats (natural-log probability)"


@dataclass(frozen=True)
class Column:
    """One dataset: `per` is 'token' ([n]), 'token_k' ([n, k]) or 'rollout' ([r])."""

    name: str
    dtype: str  # numpy dtype name, or "str" (variable-length UTF-8) or "kind" (enum)
    per: str
    required: bool
    units: str
    description: str

    @property
    def fill(self):
        """What a rollout that did not record this optional column reads back as."""
        if self.dtype == "str":
            return ""
        return np.nan if np.dtype(self.dtype).kind == "f" else -1


def _tok(name, dtype, required, units, description, per="token"):
    return Column(name, dtype, per, required, units, description)


TOKEN_COLUMNS: dict[str, Column] = {c.name: c for c in [
    _tok("ids", "int32", True, "token id", "the response token s_t (tokenizer vocabulary id)"),
    _tok("student_lp", "float32", True, NATS, "log p_S(s_t | prompt_s, s_<t): the student at the sampled token"),
    _tok("teacher_lp", "float32", True, NATS,
         "log p_T(s_t | prompt_t, r_<t): the teacher at the STUDENT's token (r = s, or s' for regen)"),
    _tok("student_topk_ids", "int32", True, "token id", "the student's top-k ids at t, by descending log-prob",
         per="token_k"),
    _tok("student_topk_lp", "float32", True, NATS, "student full-vocabulary log-probs at student_topk_ids",
         per="token_k"),
    _tok("teacher_at_student_topk_lp", "float32", True, NATS,
         "teacher full-vocabulary log-probs at student_topk_ids", per="token_k"),
    _tok("topk_kl", "float32", True, "nats",
         "KL(student || teacher) after renormalising both over the student's top-k slice"),
    _tok("full_kl", "float32", False, "nats", "KL(student || teacher) over the full vocabulary"),
    _tok("entropy_s", "float32", False, "nats", "student entropy over the full vocabulary"),
    _tok("entropy_t", "float32", False, "nats", "teacher entropy over the full vocabulary"),
    _tok("teacher_own_lp", "float32", False, NATS,
         "log p_T(r_t | prompt_t, r_<t): the teacher at its own token (= teacher_lp when r = s)"),
    _tok("teacher_topk_ids", "int32", False, "token id", "the teacher's own top-k ids at t", per="token_k"),
    _tok("teacher_topk_lp", "float32", False, NATS, "teacher log-probs at teacher_topk_ids", per="token_k"),
    _tok("segment_id", "int32", False, "index", "sentence segment of the token within its rollout (0-based)"),
    _tok("mask", "float32", False, "weight", "supervision weight of the token (0 = not supervised)"),
    _tok("sampler_lp", "float32", False, NATS, "log-prob the sampler (rollout engine) reported for s_t"),
    # 1.1
    _tok("student_at_teacher_topk_lp", "float32", False, NATS,
         "student full-vocabulary log-probs at teacher_topk_ids", per="token_k"),
    _tok("student_topk_mass", "float32", False, "probability", "the student's mass on its own top-k"),
    _tok("teacher_topk_mass", "float32", False, "probability", "the teacher's mass on its own top-k"),
    _tok("teacher_mass_at_student_topk", "float32", False, "probability",
         "the teacher's mass on the student's top-k ids"),
    _tok("student_mass_at_teacher_topk", "float32", False, "probability",
         "the student's mass on the teacher's top-k ids"),
    _tok("topk_overlap", "float32", False, "fraction", "|student top-k & teacher top-k| / k"),
    _tok("train_loss", "float32", False, "as the objective",
         "the token's term of the training loss before its weight and 1/N (train.objective = distill)"),
]}

# Extra per-token columns a writer registers by name are float32 [n] with this fill.
EXTRA_TOKEN_DTYPE = "float32"

# fixed / fixed_regenerated (1.2): the original / regenerated rollouts of step 0, re-scored with
# the weights of the shard's step (seed 000 exp. 3's fixed evaluation set; weight_version = 0).
KINDS: dict[str, int] = {"original": 0, "regenerated": 1, "eval": 2, "teacher": 3, "probe": 4,
                         "fixed": 5, "fixed_regenerated": 6}


def _row(name, dtype, required, units, description):
    return Column(name, dtype, "rollout", required, units, description)


ROLLOUT_COLUMNS: dict[str, Column] = {c.name: c for c in [
    _row("offset", "int64", True, "token index", "first token of the rollout in tokens/*"),
    _row("length", "int32", True, "tokens", "number of tokens T of the rollout"),
    _row("problem_id", "str", True, "", "the task's problem id"),
    _row("sample_idx", "int32", True, "index", "which of the N samples of the problem"),
    _row("step", "int32", True, "training step", "the step the rollout was recorded at"),
    _row("kind", "kind", True, "enum", "original | regenerated | eval | teacher | probe | fixed | fixed_regenerated"),
    _row("reward", "float32", True, "task reward", "the verifier's reward (NaN when not scored)"),
    _row("seed", "int64", True, "", "the run seed the rollout was sampled under"),
    _row("weight_version", "int32", True, "training step", "the student weights that sampled the rollout"),
    _row("prompt_text", "str", False, "UTF-8 text", "the prompt as rendered for the student"),
    _row("response_text", "str", False, "UTF-8 text", "the decoded response"),
    _row("feedback", "str", False, "UTF-8 text", "the verifier's feedback text"),
    # 1.1
    _row("teacher_prompt_text", "str", False, "UTF-8 text", "the prompt as rendered for the teacher"),
    _row("demonstration", "int32", False, "sample index",
         "the sibling rollout shown to the teacher as a demonstration (-1 = none)"),
    _row("teacher_signal", "int32", False, "0 or 1",
         "1 if the teacher had something to teach from (0: no demonstration nor feedback; not trained on)"),
]}

# Columns the writer fills itself; a row passed to append() must not carry them.
WRITER_ROLLOUT_COLUMNS = ("offset", "length")

# Root attrs the writer owns; passing them in `attrs` is a bug.
WRITER_ATTRS = ("schema_version", "complete", "top_k", "created", "token_columns_extra",
                "rollout_columns_extra")

# Root attrs a run is expected to pass (documented; not enforced, so that benches and probes can
# write minimal shards). None values are not stored: an absent attr reads as None.
RUN_ATTRS = ("run_id", "spec_toml", "spec_hash", "package_version", "git_commit", "student_model",
             "teacher_model", "tokenizer")

METRIC_COLUMNS: dict[str, Column] = {c.name: c for c in [
    Column("step", "int64", "metric", True, "training step", "step the value was measured at"),
    Column("name", "str", "metric", True, "", "metric name, e.g. reward_mean or eval/accuracy@t0.6"),
    Column("value", "float64", "metric", True, "as named", "the scalar value"),
]}

TOKEN_CHUNK = 16384  # tokens per HDF5 chunk of an [n] dataset (64 KiB of float32)
TOKEN_K_CHUNK_BYTES = 1 << 18  # about 256 KiB per chunk of an [n, k] dataset
ROLLOUT_CHUNK = 1024
