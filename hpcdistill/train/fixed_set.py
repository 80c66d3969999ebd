"""Seed 000 experiment 3's fixed evaluation set (`scoring.rescore_step0`).

"Calculate the delta-KL per decile metric at step 0 ... iteratively do 1 training step ... after
each step, recalculate the standard KL and recompute the delta-KL per decile metric." The curve
of one decile over steps should follow the same positions of the same rollouts, so step 0's
original rollouts s (and their regenerations s') are kept, and every later step re-scores those
same token sequences with the current weights: the standard teacher on (p, f, s_<t), the regen
teacher on (p, s, f, s'_<t), the student on (p, s_<t). The rows go into the step's shard as kinds
`fixed` / `fixed_regenerated` (docs/shard-format.md); step 0's shard holds them too, equal to its
original / regenerated rows, so that a resumed run rebuilds the set from it.

Training is untouched: each step still trains on its own fresh rollouts of the same problems
(SDPO is on-policy; the seed trains "on these same problems", not on these same rollouts).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from hpcdistill.errors import LaunchError
from hpcdistill.rundir import RunPaths
from hpcdistill.models.generation import Generation
from hpcdistill.record import ShardReader
from hpcdistill.spec.schema import Spec
from hpcdistill.tasks import Problem, Verdict
from hpcdistill.train.collect import ScoredRollout, Scorer
from hpcdistill.train.roles import Models

log = logging.getLogger(__name__)

# the kind a step-0 rollout is recorded under when re-scored
FIXED_KINDS = {"original": "fixed", "regenerated": "fixed_regenerated"}


class FixedSet:
    """Step 0's rollouts, held for the run; `measure` returns the step's re-scored copies."""

    def __init__(self, paths: RunPaths, problems: list[Problem]):
        self.paths = paths
        self.problems = {p.problem_id: p for p in problems}
        self.items: list[ScoredRollout] | None = None  # kinds fixed / fixed_regenerated

    def measure(self, spec: Spec, models: Models, items: list[ScoredRollout], step: int,
                scorer: Scorer | None = None) -> tuple[list[ScoredRollout], dict[str, float]]:
        """The fixed set scored at the current weights: at step 0 the step's own original and
        regenerated items relabelled (no second forward pass); later, re-scored (`scorer`: the run's)."""
        if step == 0:
            self.items = [dataclasses.replace(it, kind=FIXED_KINDS[it.kind], weight_version=0, train_loss=None)
                          for it in items if it.kind in FIXED_KINDS]
            _check_round_trip(models.student.tokenizer, self.items)
            return list(self.items), _metrics(self.items)
        if self.items is None:
            self.items = load_fixed_items(self.paths.shard(0), models.student.tokenizer, self.problems)
        rescored = rescore(spec, models, self.items, scorer)
        return rescored, _metrics(rescored)


def rescore(spec: Spec, models: Models, items: list[ScoredRollout], scorer: Scorer | None = None
            ) -> list[ScoredRollout]:
    """The same (prompt, response) sequences of `items`, scored at the current weights."""
    scorer = scorer or Scorer.of(spec, models.student.tokenizer)
    scores = scorer.score(models, [it.student_seq for it in items], [it.teacher_seq for it in items],
                          progress=False)
    return [dataclasses.replace(it, scores=s, train_loss=None) for it, s in zip(items, scores)]


def load_fixed_items(shard, tokenizer, problems: dict[str, Problem]) -> list[ScoredRollout]:
    """The fixed set from step 0's shard (a resumed run): kind fixed rows give (p, s) and the
    standard teacher's prompt; fixed_regenerated rows the regen teacher's prompt and s'."""
    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    standard: dict[tuple[str, int], ScoredRollout] = {}
    regen_rows = []
    with ShardReader(shard) as reader:
        for record in reader.iter_rollouts(columns=["ids"]):
            row, ids = record.row, [int(t) for t in record.tokens["ids"]]
            if row["kind"] not in ("fixed", "fixed_regenerated"):
                continue
            problem = problems.get(row["problem_id"])
            if problem is None:
                raise LaunchError(f"{shard}: fixed rollout of problem {row['problem_id']!r}, which the task "
                                  "no longer loads; the fixed evaluation set cannot be rebuilt")
            verdict = Verdict(float(row["reward"]), False, str(row.get("feedback", "")), {})
            generation = Generation(encode(row["prompt_text"]), np.asarray(ids, dtype=np.int64),
                                    np.full(len(ids), np.nan, np.float32), np.full(len(ids), np.nan, np.float32),
                                    "stop")
            key = (row["problem_id"], int(row["sample_idx"]))
            item = ScoredRollout(problem, int(row["sample_idx"]), row["kind"], (generation.prompt_ids, ids),
                                 (encode(row["teacher_prompt_text"]), ids), generation,
                                 str(row.get("response_text", "")), verdict, None, weight_version=0,
                                 demonstration=int(row.get("demonstration", -1)),
                                 teacher_signal=bool(row.get("teacher_signal", 1)))
            if row["kind"] == "fixed":
                standard[key] = item
            else:
                regen_rows.append((key, item))
    if not standard:
        raise LaunchError(f"{shard}: no 'fixed' rows, so scoring.rescore_step0 cannot rebuild step 0's "
                          "evaluation set; remove the run's shards and checkpoint to start it again")
    items = list(standard.values())
    for key, item in regen_rows:  # the student side of a regeneration is its original (p, s)
        items.append(dataclasses.replace(item, student_seq=standard[key].student_seq))
    log.info("fixed evaluation set: %d rollouts rebuilt from %s", len(items), shard)
    return items


def _check_round_trip(tokenizer, items: list[ScoredRollout]) -> None:
    """A resume re-encodes the recorded prompt texts: say so now if that would not give the same ids."""
    if tokenizer is None:
        return
    for item in items:
        for ids in (item.student_seq[0], item.teacher_seq[0]):
            if list(tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False)) != list(ids):
                log.warning("the tokenizer does not round-trip a prompt of problem %s: a resumed run would "
                            "re-score the fixed set on re-encoded prompts", item.problem.problem_id)
                return


def _metrics(items: list[ScoredRollout]) -> dict[str, float]:
    out = {}
    for kind, name in (("fixed", "fixed/topk_kl_mean"), ("fixed_regenerated", "fixed/regen_topk_kl_mean")):
        arrays = [it.scores.topk_kl for it in items if it.kind == kind]
        count = sum(len(a) for a in arrays)
        if count:
            out[name] = float(sum(float(np.sum(a)) for a in arrays) / count)
    return out
