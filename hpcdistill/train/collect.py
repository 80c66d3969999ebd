"""Stages 1-4 of a step (DESIGN.md section 2): rollout -> feedback -> teacher context -> scoring.

What a step collects is a list of `ScoredRollout`s: the student's rollouts of the step's problems,
the teacher's regenerations of them (teacher.context = "regen"), or the teacher's own completions
(off-policy methods), each verified and scored on both sides position by position. The verifier and
the scorer carry the run's settings (`Verifier`, `Scorer`), bound once per run by the loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hpcdistill.distill import contexts
from hpcdistill.models.chat import render_prompt
from hpcdistill.models.scoring import TokenScores, score_rollouts
from hpcdistill.models.split_scoring import score_rollouts_split
from hpcdistill.spec.schema import Spec
from hpcdistill.tasks import Problem, Task, Verdict, get_task
from hpcdistill.train.roles import Models, sample_student
from hpcdistill.train.seeds import SeedStream, step_seed
from hpcdistill.train.teacher_role import teacher_generate

Seq = tuple[list[int], list[int]]  # (prompt_ids, response_ids)


@dataclass
class ScoredRollout:
    """One rollout of a step, verified and scored: what its shard row records, plus what training
    needs (`train.recording` maps it to the shard's columns)."""

    problem: Problem
    sample_idx: int
    kind: str  # original | regenerated | teacher | fixed | fixed_regenerated (record.schema.KINDS)
    student_seq: Seq  # (prompt_ids, response_ids) the student is scored on
    teacher_seq: Seq  # (prompt_ids, response_ids) the teacher is scored on
    generation: Any  # hpcdistill.models.generation.Generation of the recorded response
    text: str
    verdict: Verdict
    scores: TokenScores

    weight_version: int | None = None  # the rollout engine's weights; None = the step's
    demonstration: int = -1  # teacher.context = "demonstration": the sibling shown (-1 = none)
    teacher_signal: bool = True  # False: the teacher had nothing to teach from; not trained on
    train_loss: np.ndarray | None = None  # [T] the token's loss term, once the step trained on it

    def sampler_gap(self) -> np.ndarray:
        """[T] the rollout engine's log p of each sampled token minus the trainer's recomputation:
        ~0 when both run the same weights; a weight-sync or numerics mismatch shows here."""
        n = len(self.scores.student_lp)
        return np.asarray(self.generation.sampled_lp[:n], dtype=np.float32) - self.scores.student_lp


@dataclass(frozen=True)
class Verifier:
    """The task's verifier under the run's sandbox limits (`task.timeout_s`, `task.memory_mb`)."""

    task: Task
    timeout_s: float
    memory_mb: int

    @classmethod
    def of(cls, spec: Spec) -> "Verifier":
        return cls(get_task(spec.task.name), spec.task.timeout_s, spec.task.memory_mb)

    def verify(self, problem: Problem, text: str) -> Verdict:
        return self.task.verify(problem, text, timeout_s=self.timeout_s, memory_mb=self.memory_mb)


@dataclass(frozen=True)
class Scorer:
    """Both sides' per-token scores under the run's `[scoring]` settings; `token_sets`: the
    vocabulary ids whose mass is recorded (`scoring.backtrack_words`), looked up once; `kernels`:
    the compute path (`trainer.kernels`: "auto" = the fused kernel on CUDA, "torch").

    Over several trainer ranks each scores its contiguous share of the sequences and every rank
    gathers all of them, so the teacher forwards each token once per step whatever the number of
    ranks; `counts["teacher_tokens"]` adds up what this process's teacher scored."""

    top_k: int
    full_vocab: bool
    chunk_size: int
    batch_size: int
    token_sets: dict[str, list[int]]
    kernels: str
    counts: dict[str, int] = field(default_factory=lambda: {"teacher_tokens": 0})

    @classmethod
    def of(cls, spec: Spec, tokenizer) -> "Scorer":
        sc = spec.scoring
        return cls(sc.top_k, sc.full_vocab, sc.chunk_size, sc.batch_size, token_sets(spec, tokenizer),
                   spec.trainer.kernels)

    def score(self, models: Models, student_seqs: list[Seq], teacher_seqs: list[Seq], *,
              progress: bool = True, with_token_sets: bool = True) -> list[TokenScores]:
        """scores[i]: student_seqs[i] against teacher_seqs[i], position by position."""
        rank0_only = models.world_size > 1 and _rank0_teacher(models)
        if rank0_only:  # a vLLM teacher is rank 0's: it scores the whole batch, every rank gets it
            return self._rank0_scores(models, student_seqs, teacher_seqs, progress, with_token_sets)
        mine = _score_share(models, len(student_seqs))
        scores = self._score(models, [student_seqs[i] for i in mine], [teacher_seqs[i] for i in mine], progress,
                             with_token_sets)
        if models.world_size == 1:
            return scores
        import torch.distributed as dist

        parts: list[Any] = [None] * models.world_size
        dist.all_gather_object(parts, dict(zip(mine, scores)))  # a padding repeat: the same scores
        merged = {i: sc for part in parts for i, sc in part.items()}
        return [merged[i] for i in range(len(student_seqs))]

    def _score(self, models: Models, student_seqs: list[Seq], teacher_seqs: list[Seq], progress: bool,
               with_token_sets: bool) -> list[TokenScores]:
        """This process's scores of the sequences given: both models here, or the student here and
        the teacher role's half over its connection (`models.split_scoring`)."""
        token_sets = self.token_sets if with_token_sets else None
        with models.full_parameters():  # FSDP / ZeRO-3: the decoder body is called directly
            if models.teacher_service is not None:
                scores = score_rollouts_split(models.student, models.teacher_service, student_seqs, teacher_seqs,
                                              top_k=self.top_k, chunk_size=self.chunk_size,
                                              batch_size=self.batch_size, token_sets=token_sets,
                                              ask_student_topk=getattr(models.teacher_service, "answers_student_ids", True))
            else:
                scores = score_rollouts(models.student, models.teacher, student_seqs, teacher_seqs, top_k=self.top_k,
                                        full_vocab=self.full_vocab, chunk_size=self.chunk_size,
                                        batch_size=self.batch_size, progress=progress, token_sets=token_sets,
                                        kernels=self.kernels)
        self.counts["teacher_tokens"] += sum(len(sc) for sc in scores)
        return scores

    def _rank0_scores(self, models: Models, student_seqs: list[Seq], teacher_seqs: list[Seq], progress: bool,
                      with_token_sets: bool) -> list[TokenScores]:
        import torch.distributed as dist

        out = [self._score(models, student_seqs, teacher_seqs, progress, with_token_sets) if models.is_main
               else None]
        dist.broadcast_object_list(out, src=0)
        return out[0]


def _rank0_teacher(models: Models) -> bool:
    """True when only rank 0 reaches the teacher role (a vLLM teacher)."""
    service = models.teacher_service
    if service is None:
        return models.teacher.model is None
    return not getattr(service, "every_rank", True)


def _score_share(models: Models, n: int) -> list[int]:
    """This rank's contiguous share of n sequences. Where every forward is a collective (FSDP,
    ZeRO-3), a rank with fewer repeats its last sequence (or the first), so all run as many batches."""
    if models.world_size == 1:
        return list(range(n))
    trainer, per = models.trainer, -(-n // models.world_size)
    mine = list(range(min(trainer.rank * per, n), min((trainer.rank + 1) * per, n)))
    if trainer.shards_parameters and n:
        mine += [mine[-1] if mine else 0] * (per - len(mine))
    return mine


def token_sets(spec: Spec, tokenizer) -> dict[str, list[int]]:
    """Vocabulary ids of the backtracking words (seed 000 exp. 5), when full-vocab scoring is on."""
    if not spec.scoring.full_vocab or not spec.scoring.backtrack_words:
        return {}
    words = {w.strip().lower() for w in spec.scoring.backtrack_words}
    ids = [i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip().lower() in words]
    return {"backtrack": ids}


# ---------------------------------------------------------------------------- one step's rollouts


def collect_step(spec: Spec, models: Models, problems: list[Problem], step: int,
                 prefixes: list[list[int]] | None = None, *, verifier: Verifier | None = None,
                 scorer: Scorer | None = None) -> tuple[list[ScoredRollout], dict[str, float]]:
    """Rollout, feedback, teacher context and scoring for one step (stages 1-4).

    `prefixes[i]`: teacher-written first tokens of problem i's rollouts (teacher seeding).
    `verifier`, `scorer`: the run's (bound once by the loop; made from `spec` when not given).
    """
    tok = models.student.tokenizer
    verifier, scorer = verifier or Verifier.of(spec), scorer or Scorer.of(spec, tok)
    ro, tc = spec.rollout, spec.teacher

    # 1. rollout: N samples per problem from the student.
    prompts = [render_prompt(tok, contexts.student_messages(p, ro.system_prompt)) for p in problems]
    t0 = time.monotonic()
    with models.behaviour_weights(step):  # rollout.policy_lag: the weights of step max(0, step - k)
        generations = sample_student(spec, models, prompts, seed=step_seed(spec.seeds[0], step, SeedStream.ROLLOUT),
                                     prefixes=prefixes)
    rollout_s = time.monotonic() - t0
    flat = [(p, i, g) for p, gens in zip(problems, generations) for i, g in enumerate(gens)]
    texts = [tok.decode(g.response_ids, skip_special_tokens=True) for _, _, g in flat]

    # 2. feedback: the task's verifier (sandboxed execution for code).
    verdicts = [verifier.verify(p, text) for (p, _, _), text in zip(flat, texts)]

    # 3. teacher context, 4. scoring: student on (p, s_<t), teacher on its context + s_<t.
    student_seqs = [(list(g.prompt_ids), [int(t) for t in g.response_ids]) for _, _, g in flat]
    teacher_ctx = contexts.teacher_contexts([p for p, _, _ in flat], texts, verdicts, tc, ro.system_prompt)
    teacher_seqs = [(render_prompt(tok, c.messages), s[1]) for c, s in zip(teacher_ctx, student_seqs)]
    t0 = time.monotonic()
    scores = scorer.score(models, student_seqs, teacher_seqs)
    scoring_s = time.monotonic() - t0
    items = [ScoredRollout(p, i, "original", ss, ts, g, text, v, s, models.weight_version, c.demonstration,
                           c.has_signal)
             for (p, i, g), ss, ts, text, v, s, c in zip(flat, student_seqs, teacher_seqs, texts, verdicts, scores,
                                                        teacher_ctx)]
    metrics = diagnostics_metrics(items) | {
        "reward_mean": float(np.mean([v.reward for v in verdicts])),
        "topk_kl_mean": token_mean([s.topk_kl for s in scores]),
        "response_tokens": float(sum(len(g.response_ids) for _, _, g in flat)),
        "truncation_rate": float(np.mean([g.finish_reason == "length" for _, _, g in flat])),
        "rollout_seconds": rollout_s,
        "scoring_seconds": scoring_s,
        "scored_tokens": float(sum(len(x) for x in scores)),
    }
    if tc.context == "regen":
        regen_items, regen_metrics = regenerate(spec, models, items, step, verifier, scorer)
        items += regen_items
        metrics.update(regen_metrics)
    return items, metrics


def regenerate(spec: Spec, models: Models, originals: list[ScoredRollout], step: int, verifier: Verifier,
               scorer: Scorer) -> tuple[list[ScoredRollout], dict[str, float]]:
    """SDPO with regeneration (seed 000): the teacher sees p + s + f, writes s', is scored on s'.

    One s' per original rollout s. The student side is the same as for s: its top-k at (p, s_<t);
    the teacher side is (p, s, f, s'_<t); positions align by ordinal t, truncated to the shorter.
    """
    tok = models.student.tokenizer
    ro, tc = spec.rollout, spec.teacher
    regen_prompts = [render_prompt(tok, contexts.regen_messages(o.problem, o.text, o.verdict, tc))
                     for o in originals]
    regens = teacher_generate(models, regen_prompts, n=1,
                      max_new_tokens=tc.max_new_tokens or ro.max_new_tokens,
                      temperature=tc.temperature, top_p=tc.top_p, top_k=ro.top_k,
                      seed=step_seed(spec.seeds[0], step, SeedStream.REGEN), batch_size=ro.batch_size)
    regens = [r[0] for r in regens]
    texts = [tok.decode(r.response_ids, skip_special_tokens=True) for r in regens]
    verdicts = [verifier.verify(o.problem, text) for o, text in zip(originals, texts)]
    teacher_seqs = [(rp, [int(t) for t in r.response_ids]) for rp, r in zip(regen_prompts, regens)]
    scores = scorer.score(models, [o.student_seq for o in originals], teacher_seqs)
    items = [ScoredRollout(o.problem, o.sample_idx, "regenerated", o.student_seq, ts, r, text, v, s)
             for o, ts, r, text, v, s in zip(originals, teacher_seqs, regens, texts, verdicts, scores)]
    return items, {
        "regen_reward_mean": float(np.mean([v.reward for v in verdicts])),
        "regen_topk_kl_mean": token_mean([s.topk_kl for s in scores]),
    }


def teacher_generation_prompts(spec: Spec, models: Models, problems: list[Problem]) -> list[list[int]]:
    """The teacher's own prompt when it writes (completions, seeded prefixes): its system prompt
    (few-shot or enhanced context) when teacher.context = "system_prompt", else the student's."""
    tok = models.teacher.tokenizer or models.student.tokenizer
    if spec.teacher.context == "system_prompt":
        return [render_prompt(tok, contexts.system_prompt_messages(p, spec.teacher)) for p in problems]
    return [render_prompt(tok, contexts.student_messages(p, spec.rollout.system_prompt)) for p in problems]


def teacher_prefixes(spec: Spec, models: Models, problems: list[Problem], step: int, num_tokens: int
                     ) -> list[list[int]]:
    """Teacher seeding (seed 003): the teacher writes the first `num_tokens` of each problem's rollouts."""
    gens = teacher_generate(models, teacher_generation_prompts(spec, models, problems), n=1,
                    max_new_tokens=num_tokens, temperature=spec.teacher.temperature,
                    top_p=spec.teacher.top_p, seed=step_seed(spec.seeds[0], step, SeedStream.PREFIX),
                    batch_size=spec.rollout.batch_size)
    stops = set(models.teacher.stop_token_ids)
    # A prefix that already ended its answer would leave the student nothing to write: cut the stop.
    return [[int(t) for t in g[0].response_ids if int(t) not in stops] for g in gens]


def collect_teacher_completions(spec: Spec, models: Models, problems: list[Problem], step: int,
                                seed_stream: SeedStream = SeedStream.TEACHER_COMPLETIONS, *,
                                verifier: Verifier | None = None, scorer: Scorer | None = None
                                ) -> tuple[list[ScoredRollout], dict[str, float]]:
    """Off-policy data: teacher completions, trained on under the STUDENT's prompt (SFT).
    Scored without `scoring.backtrack_words`' token sets (their mass is a measure of the student's
    own rollouts)."""
    tok = models.student.tokenizer
    verifier, scorer = verifier or Verifier.of(spec), scorer or Scorer.of(spec, tok)
    ro = spec.rollout
    teacher_prompts = teacher_generation_prompts(spec, models, problems)
    student_prompts = [render_prompt(tok, contexts.student_messages(p, ro.system_prompt)) for p in problems]
    t0 = time.monotonic()
    gens = teacher_generate(models, teacher_prompts, n=ro.samples_per_problem,
                    max_new_tokens=ro.max_new_tokens, temperature=spec.teacher.temperature,
                    top_p=spec.teacher.top_p, seed=step_seed(spec.seeds[0], step, seed_stream),
                    batch_size=ro.batch_size)
    seconds = time.monotonic() - t0
    items = []
    for p, sp, tp, samples in zip(problems, student_prompts, teacher_prompts, gens):
        for i, g in enumerate(samples):
            text = tok.decode(g.response_ids, skip_special_tokens=True)
            verdict = verifier.verify(p, text)
            response = [int(t) for t in g.response_ids]
            items.append(ScoredRollout(p, i, "teacher", (list(sp), response), (list(tp), response), g, text,
                                       verdict, None))
    scores = scorer.score(models, [it.student_seq for it in items], [it.teacher_seq for it in items],
                          with_token_sets=False)
    for item, score in zip(items, scores):
        item.scores = score
    return items, {"teacher_seconds": seconds,
                   "teacher_tokens": float(sum(len(it.student_seq[1]) for it in items)),
                   "teacher_reward_mean": float(np.mean([it.verdict.reward for it in items]))}


def diagnostics_metrics(items: list[ScoredRollout]) -> dict[str, float]:
    """The step's teaching-signal diagnostics (`diag/`), token means over the items' scores:
    top-k mass of each side, overlap of the two top-k sets, |sampler - trainer| log-prob gap, the
    top-k KL's error against the full KL (when recorded), and the demonstration / signal rates."""
    scores = [it.scores for it in items if len(it.scores)]
    if not scores:
        return {}
    out = {f"diag/{name}": token_mean([getattr(s, name) for s in scores]) for name in
           ("student_topk_mass", "teacher_topk_mass", "teacher_mass_at_student_topk",
            "student_mass_at_teacher_topk", "topk_overlap")}
    out["diag/sampler_gap_abs"] = token_mean([np.abs(it.sampler_gap()) for it in items if len(it.scores)])
    if all(s.full_kl is not None for s in scores):
        out["diag/topk_kl_error"] = token_mean([s.topk_kl - s.full_kl for s in scores])
    out["diag/demonstration_rate"] = float(np.mean([it.demonstration >= 0 for it in items]))
    out["diag/teacher_signal_rate"] = float(np.mean([it.teacher_signal for it in items]))
    return out


def token_mean(arrays: list[np.ndarray]) -> float:
    total = sum(float(np.sum(a)) for a in arrays)
    count = sum(len(a) for a in arrays)
    return total / count if count else float("nan")


# ---------------------------------------------------------------------------- the problems of a step


def load_problems(spec: Spec) -> list[Problem]:
    """The run's problems. The same for every seed of a sweep (seed 000 trains and evaluates on
    the same fixed problems): the run's seed varies the samples, not the problems."""
    task = get_task(spec.task.name)
    return task.load_problems(source=spec.task.source, split=spec.task.split,
                              num_problems=spec.task.num_problems, seed=0)


def step_problems(spec: Spec, problems: list[Problem], step: int) -> list[Problem]:
    """The problems of one step: all, or `train.problems_per_step` drawn without replacement;
    `train.measure_problems = "step0"`: the last (measurement) step draws step 0's problems again.
    A measurement run (train.steps = 0) scores every problem: it trains on none."""
    if spec.train.steps == 0:
        return list(problems)
    if step == spec.train.steps and spec.train.measure_problems == "step0":
        step = 0
    return [problems[i] for i in _step_indices(spec, len(problems), step)]


def _step_indices(spec: Spec, num_problems: int, step: int) -> list[int]:
    count = spec.train.problems_per_step
    if count is None or count >= num_problems:
        return list(range(num_problems))
    rng = np.random.default_rng(step_seed(spec.seeds[0], step, SeedStream.PROBLEMS))
    return sorted(int(i) for i in rng.choice(num_problems, size=count, replace=False))


def replay_problems(spec: Spec, problems: list[Problem], step: int) -> list[Problem]:
    """replay_buffer's injection at `step` (seed 003): a seeded sample, without replacement, of the
    problems the student trained on before this step (this step's own at step 0), enough for
    `train.replay_size` teacher sequences at rollout.samples_per_problem each."""
    seen = sorted({i for s in range(step) for i in _step_indices(spec, len(problems), s)}) or \
        _step_indices(spec, len(problems), step)
    count = min(len(seen), -(-spec.train.replay_size // spec.rollout.samples_per_problem))
    rng = np.random.default_rng(step_seed(spec.seeds[0], step, SeedStream.REPLAY))
    return [problems[seen[i]] for i in sorted(rng.choice(len(seen), size=count, replace=False))]
