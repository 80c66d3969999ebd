"""The GEPA search of one loop round (seed 004 sections 1.4, 6.3.1): candidate teacher prompts and
their direct scores.

A candidate's "direct score" is the CURRENT student's mean reward on the validation problems WITH
that teacher system prompt (`Scorer`); GEPA (the `gepa` package: evolutionary Pareto search with
LLM reflection) evolves the prompt through `PromptAdapter`, reflecting with a local model or an
OpenAI-compatible endpoint. `distill_prompts` then picks the candidates a round distils: GEPA's
per-validation-instance Pareto front (its non-dominated set) or the top-k by direct score. The
round around it is `hpcdistill.launch.prompt_loop`.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcdistill.errors import LaunchError
from hpcdistill.spec.load import content_hash
from hpcdistill.spec.schema import Spec

log = logging.getLogger(__name__)

COMPONENT = "teacher_system_prompt"  # the one text component GEPA evolves


def derived_seed(*parts: Any) -> int:
    """A reproducible 31-bit sampling seed from any JSON-able parts."""
    return int(content_hash(list(parts))[:8], 16) & 0x7FFFFFFF


# ---------------------------------------------------------------------------- scoring


@dataclass
class Scorer:
    """Mean reward of a model on problems under a given system prompt (one number per problem).

    Sampling seeds depend on (loop seed, round, the problem ids in the call): the same problems
    scored under two prompts, or by two students, use the same random numbers (paired comparison,
    which matters at temperature 1.0, seed 004 sec. 5.1 finding 4).
    """

    spec: Spec
    handle: Any  # hpcdistill.models.loading.ModelHandle
    seed: int
    round: int
    calls: int = 0

    def score(self, problems: list, system_prompt: str) -> tuple[list[float], list[dict[str, Any]]]:
        from hpcdistill.distill.contexts import student_messages
        from hpcdistill.models.chat import render_prompt
        from hpcdistill.models.generation import generate
        from hpcdistill.tasks import get_task

        spec, lp = self.spec, self.spec.loop
        task = get_task(spec.task.name)
        tok = self.handle.tokenizer
        prompts = [render_prompt(tok, student_messages(p, system_prompt)) for p in problems]
        seed = derived_seed(self.seed, self.round, [p.problem_id for p in problems])
        gens = generate(self.handle, prompts, n=lp.eval_samples,
                        max_new_tokens=lp.eval_max_new_tokens or spec.rollout.max_new_tokens,
                        temperature=lp.eval_temperature, top_p=spec.rollout.top_p, top_k=spec.rollout.top_k,
                        seed=seed, batch_size=spec.rollout.batch_size, progress=False)
        self.calls += len(problems)
        scores, traces = [], []
        for problem, samples in zip(problems, gens):
            rewards = []
            for g in samples:
                text = tok.decode(g.response_ids, skip_special_tokens=True)
                verdict = task.verify(problem, text, timeout_s=spec.task.timeout_s, memory_mb=spec.task.memory_mb)
                rewards.append(float(verdict.reward))
            scores.append(float(np.mean(rewards)))
            traces.append({"problem_id": problem.problem_id, "problem": problem.prompt, "response": text,
                           "reward": rewards[-1], "feedback": verdict.feedback,
                           "truncated": g.finish_reason == "length"})
        return scores, traces


class PromptAdapter:
    """The GEPA adapter: a candidate is {COMPONENT: teacher system prompt}; DataInst = Problem."""

    propose_new_texts = None  # GEPA's reflective proposer with our reflection LM

    def __init__(self, scorer: Scorer, feedback_chars: int = 1500):
        self.scorer = scorer
        self.feedback_chars = feedback_chars

    def evaluate(self, batch: list, candidate: dict[str, str], capture_traces: bool = False):
        from gepa import EvaluationBatch

        scores, traces = self.scorer.score(batch, candidate[COMPONENT])
        return EvaluationBatch(outputs=[t["response"] for t in traces], scores=scores,
                               trajectories=traces if capture_traces else None)

    def make_reflective_dataset(self, candidate: dict[str, str], eval_batch, components_to_update: list[str]):
        records = []
        for trace, score in zip(eval_batch.trajectories or [], eval_batch.scores):
            note = " The response was cut off at the token budget." if trace["truncated"] else ""
            records.append({
                "Inputs": trace["problem"],
                "Generated Outputs": trace["response"][: self.feedback_chars],
                "Feedback": f"Score {score:.2f} (1 = solved). {trace['feedback']}{note}".strip(),
            })
        return {name: records for name in components_to_update}


# ---------------------------------------------------------------------------- reflection models


@dataclass
class LocalReflectionLM:
    """GEPA's reflection LM served by a loaded model (`loop.reflection_model = "local"`)."""

    handle: Any
    max_new_tokens: int
    temperature: float
    seed: int
    calls: int = 0

    def __call__(self, prompt: str | list[dict[str, Any]]) -> str:
        from hpcdistill.models.chat import render_prompt
        from hpcdistill.models.generation import generate

        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = render_prompt(self.handle.tokenizer, messages)
        self.calls += 1
        (gen,), = generate(self.handle, [ids], n=1, max_new_tokens=self.max_new_tokens,
                           temperature=self.temperature, seed=derived_seed(self.seed, "reflect", self.calls),
                           batch_size=1, progress=False)
        return self.handle.tokenizer.decode(gen.response_ids, skip_special_tokens=True)


@dataclass
class OpenAIReflectionLM:
    """GEPA's reflection LM at an OpenAI-compatible `/chat/completions` endpoint.

    The key is read from the environment variable NAMED by `api_key_env` at call time; it is never
    stored, logged or written to the loop record.
    """

    base_url: str
    model: str
    api_key_env: str | None
    max_tokens: int
    temperature: float
    timeout_s: float = 600.0
    retries: int = 3
    calls: int = 0

    def __call__(self, prompt: str | list[dict[str, Any]]) -> str:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise LaunchError(f"loop.reflection_api_key_env names {self.api_key_env}, which is not set "
                                  "in this environment")
            headers["Authorization"] = f"Bearer {key}"
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                           "temperature": self.temperature}).encode()
        url = self.base_url.rstrip("/") + "/chat/completions"
        self.calls += 1
        for attempt in range(1, self.retries + 1):
            try:
                request = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    data = json.loads(response.read())
                return data["choices"][0]["message"]["content"] or ""
            except (urllib.error.URLError, TimeoutError, KeyError, ValueError) as exc:
                if attempt == self.retries:
                    raise LaunchError(f"reflection model {self.model!r} at {url} failed after "
                                      f"{attempt} attempts: {exc}") from None
                log.warning("reflection call failed (%s); retrying", exc)
                time.sleep(2.0 * attempt)
        raise AssertionError("unreachable")


def reflection_lm(spec: Spec, handle: Any, seed: int):
    lp = spec.loop
    if lp.reflection_model == "local":
        return LocalReflectionLM(handle, lp.reflection_max_tokens, lp.reflection_temperature, seed)
    return OpenAIReflectionLM(lp.reflection_base_url or "", lp.reflection_model, lp.reflection_api_key_env,
                              lp.reflection_max_tokens, lp.reflection_temperature)


# ---------------------------------------------------------------------------- fresh directories


def assert_fresh(path: Path, what: str) -> None:
    """Refuse to reuse a directory with content: GEPA resumes from any state it finds there, and
    submit skips runs it finds completed there; either would silently mix in another run."""
    if path.exists() and any(path.iterdir()):
        raise LaunchError(f"{path}: {what} is not fresh (it already has {sorted(p.name for p in path.iterdir())[:5]}); "
                          "refusing to reuse a stale cache")


# ---------------------------------------------------------------------------- GEPA


class _CandidateCount:
    """GEPA stopper: stop once the search holds `n` prompts (the seed prompt included)."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, gepa_state) -> bool:
        return len(gepa_state.program_candidates) >= self.n


def optimize_prompts(spec: Spec, scorer: Scorer, lm, train_problems: list, val_problems: list,
                     run_dir: Path, seed_prompt: str, seed: int) -> dict[str, Any]:
    """One GEPA search; returns every candidate with its direct score on the validation problems."""
    import gepa

    lp = spec.loop
    assert_fresh(run_dir, "GEPA's run_dir")
    run_dir.mkdir(parents=True)
    calls_before = scorer.calls
    t0 = time.monotonic()
    result = gepa.optimize(
        seed_candidate={COMPONENT: seed_prompt},
        trainset=train_problems,
        valset=val_problems,
        adapter=PromptAdapter(scorer),
        reflection_lm=lm,
        candidate_selection_strategy=lp.candidate_selection,
        reflection_minibatch_size=min(lp.reflection_minibatch_size, len(train_problems)),
        acceptance_criterion=lp.acceptance,
        use_merge=lp.use_merge,
        max_metric_calls=lp.max_metric_calls,
        stop_callbacks=[_CandidateCount(lp.candidates)],
        run_dir=str(run_dir),
        cache_evaluation=False,  # no evaluation cache, in memory or on disk
        track_best_outputs=False,
        seed=seed,
        raise_on_exception=True,
    )
    candidates = []
    for index, (candidate, score) in enumerate(zip(result.candidates, result.val_aggregate_scores)):
        subscores = result.val_subscores[index]
        candidates.append({
            "index": index,
            "prompt": candidate[COMPONENT],
            "direct_score": float(score),
            "val_scores": [float(subscores[i]) for i in sorted(subscores)],
            "parents": [p for p in result.parents[index] if p is not None],
            "discovered_at_metric_call": int(result.discovery_eval_counts[index]),
        })
    # the Pareto front over the distillable prompts (GEPA's own per-instance front is recorded too:
    # a tiny reflection model can write an empty prompt that GEPA keeps)
    front = set(pareto_front([dict(s) for s in result.val_subscores], [c["direct_score"] for c in candidates],
                             distillable(candidates)))
    gepa_front = sorted({p for best in result.per_val_instance_best_candidates.values() for p in best})
    for c in candidates:
        c["pareto_front"] = c["index"] in front
        c["gepa_instance_best"] = c["index"] in gepa_front
    return {"candidates": candidates, "metric_calls": scorer.calls - calls_before,
            "reflection_calls": getattr(lm, "calls", None), "seconds": round(time.monotonic() - t0, 3),
            "run_dir": str(run_dir)}


def top_k_prompts(candidates: list[dict[str, Any]], k: int | None) -> list[dict[str, Any]]:
    """The k best distinct, non-empty prompts by direct score (ties: the earlier candidate);
    k = None: all of them."""
    ranked = sorted(candidates, key=lambda c: (-c["direct_score"], c["index"]))
    chosen, seen = [], set()
    for c in ranked:
        text = c["prompt"].strip()
        if text and text not in seen:
            seen.add(text)
            chosen.append(c)
        if len(chosen) == k:
            break
    return chosen


def pareto_front(val_scores: list, scores: list[float], eligible: set[int] | None = None) -> list[int]:
    """GEPA's Pareto-front programs among `eligible` (default: all): per validation instance the
    programs with the best score there (what `GEPAResult.per_val_instance_best_candidates` holds
    when every program is eligible), reduced to the non-dominated set (a program is dropped when
    every instance it is best on has another front program too) as GEPA's own Pareto candidate
    selection reduces them (`gepa.gepa_utils.find_dominator_programs`). val_scores[p]: program p's
    score per instance (a list, or GEPA's `val_subscores[p]` dict by instance id: an instance only
    counts the programs scored on it); scores[p]: its aggregate. Sorted program indices."""
    from gepa.gepa_utils import find_dominator_programs

    programs = sorted(range(len(val_scores)) if eligible is None else eligible)
    subs = [s if isinstance(s, dict) else dict(enumerate(s)) for s in val_scores]
    fronts = {}
    for key in sorted({k for p in programs for k in subs[p]}, key=str):
        scored = [p for p in programs if key in subs[p]]
        best = max(subs[p][key] for p in scored)
        fronts[key] = {p for p in scored if subs[p][key] == best}
    if not fronts:
        return []
    return sorted(find_dominator_programs(fronts, list(scores)))


def distillable(candidates: list[dict[str, Any]]) -> set[int]:
    """Candidates a round can distil: a non-empty prompt, the first of any identical texts (an
    empty teacher prompt is the student's own context: nothing to distil)."""
    seen, out = set(), set()
    for c in sorted(candidates, key=lambda c: c["index"]):
        text = c["prompt"].strip()
        if text and text not in seen:
            seen.add(text)
            out.add(c["index"])
    return out


def distill_prompts(candidates: list[dict[str, Any]], loop) -> list[dict[str, Any]]:
    """The candidates the round distils (`loop.distill_selection`): the Pareto-front programs
    (capped at `loop.max_distill_prompts`, best direct score first), or the top-k by direct score."""
    if loop.distill_selection == "top_k":
        return top_k_prompts(candidates, loop.top_k_prompts)
    return top_k_prompts([c for c in candidates if c.get("pareto_front")], loop.max_distill_prompts)


__all__ = ["COMPONENT", "derived_seed", "Scorer", "PromptAdapter", "LocalReflectionLM", "OpenAIReflectionLM",
           "reflection_lm", "assert_fresh", "optimize_prompts", "top_k_prompts", "pareto_front", "distillable",
           "distill_prompts"]
