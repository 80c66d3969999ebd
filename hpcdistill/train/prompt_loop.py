"""Looped context distillation with prompt optimization (seed 004 sections 1.4, 6.3, 6.5).

`run_loop(loaded)` runs `loop.rounds` rounds; each reads top to bottom:

    1. optimize  GEPA (the `gepa` package: evolutionary Pareto search with LLM reflection) evolves
                 the teacher system prompt; a candidate's score is the CURRENT student's mean reward
                 on the validation split WITH that system prompt ("direct score").
    2. distill   the prompts `loop.distill_selection` picks each drive a context-distillation run per
                 seed: "pareto" (default, seed 6.3.1: "for each Pareto front program") every program
                 on GEPA's per-validation-instance Pareto front (its non-dominated set, as GEPA's own
                 candidate selection computes it), capped by `loop.max_distill_prompts`; "top_k" the
                 `loop.top_k_prompts` best by direct score. One generated spec per round
                 (`distill.toml`: the user's spec with the round's student, teacher.context =
                 "system_prompt", train.save_model = true and a grid over teacher.system_prompt),
                 submitted through `hpcdistill.launch.submit.submit`.
    3. evaluate  every distilled student, and the round's student, WITHOUT the teacher context (the
                 student's own prompt) on the HELD-OUT problems (`loop.heldout_*`, seed 6.3.3: "500
                 held-out examples"), disjoint from the validation problems GEPA selected on.
    4. choose    the prompt whose distilled students score best on the held-out problems; its best
                 run's saved model is the next round's student.

Everything is recorded in `<output_dir>/<name>/<loop.record_file>` (written atomically after every
stage). Caches never cross runs (seed 004 sec. 5.3: "DSPy disk cache corrupts cross-run
evaluations -- must clear before each run"; GEPA likewise resumes silently from any `gepa_state.bin`
in its run_dir): every round gets a fresh directory keyed by the loop spec's hash, the round and its
student; GEPA's run_dir and the round's sweep directory are asserted empty before use; GEPA's
evaluation cache is off; a saved student is checksummed when recorded and checked before reuse.
"""

from __future__ import annotations

import copy
import datetime as dt
import gc
import hashlib
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpcdistill.errors import LaunchError, SpecError
from hpcdistill.rundir import RunPaths, SweepPaths, read_json, write_atomic, write_json_atomic
from hpcdistill.spec.load import LoadedSpec, content_hash, dump_toml, load_spec
from hpcdistill.spec.schema import Spec

log = logging.getLogger(__name__)

COMPONENT = "teacher_system_prompt"  # the one text component GEPA evolves
DISTILL_NAME = "distill"  # the round's sweep: <round_dir>/distill/<run_id>/
RECORD_VERSION = 1


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _int_seed(*parts: Any) -> int:
    """A reproducible 31-bit sampling seed from any JSON-able parts."""
    return int(content_hash(list(parts))[:8], 16) & 0x7FFFFFFF


# ---------------------------------------------------------------------------- validation


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_loop_spec(loaded: LoadedSpec) -> None:
    """Every reason this spec cannot drive a loop, reported at once (before any model loads)."""
    spec, where = loaded.spec, str(loaded.path)
    errors = []
    if spec.train.objective != "context_distill":
        errors.append(f"key 'train.objective': the loop distills with 'context_distill', got "
                      f"{spec.train.objective!r}")
    if spec.train.steps < 1:
        errors.append("key 'train.steps': the loop trains; need at least 1 step")
    if spec.sweep.grid or spec.sweep.zip:
        errors.append("key 'sweep': a loop spec has no [sweep]; the loop writes one per round "
                      "(a grid over teacher.system_prompt)")
    if not (spec.loop.seed_prompt or spec.teacher.system_prompt).strip():
        errors.append("key 'loop.seed_prompt': empty, and so is teacher.system_prompt; GEPA needs a "
                      "starting teacher prompt")
    lp = spec.loop
    if lp.reflection_model != "local" and not lp.reflection_base_url:
        errors.append(f"key 'loop.reflection_base_url': reflection_model = {lp.reflection_model!r} is "
                      "served by an OpenAI-compatible endpoint; give its base URL (or use \"local\")")
    if lp.reflection_api_key_env is not None and not _ENV_NAME.fullmatch(lp.reflection_api_key_env):
        errors.append("key 'loop.reflection_api_key_env': must be the NAME of an environment variable "
                      "(letters, digits, underscores), never the key itself")
    if errors:
        raise SpecError("\n".join(f"{where}: {e}" for e in errors))


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
        seed = _int_seed(self.seed, self.round, [p.problem_id for p in problems])
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
                           temperature=self.temperature, seed=_int_seed(self.seed, "reflect", self.calls),
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


def round_key(spec_hash: str, round_index: int, student: str, student_sha256: str | None, seed_prompt: str) -> str:
    """What a round computes from: the loop spec, its index, its student (path and weights), its
    starting prompt. Equal keys = the same round; anything else gets a different directory."""
    return content_hash({"spec": spec_hash, "round": round_index, "student": student,
                         "student_sha256": student_sha256, "seed_prompt": seed_prompt})[:12]


def model_checksum(model_dir: Path) -> str:
    """sha256 over a saved model directory's weight and config files (names and bytes)."""
    digest = hashlib.sha256()
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".json") and p.is_file())
    if not files:
        raise LaunchError(f"{model_dir}: no saved model files (train.save_model did not run?)")
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------- the record


@dataclass
class LoopRecord:
    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, loaded: LoadedSpec) -> LoopRecord:
        if path.exists():
            data = read_json(path)
            if data.get("spec_hash") != loaded.spec_hash:
                raise LaunchError(
                    f"{path}: this loop directory belongs to another spec (hash "
                    f"{str(data.get('spec_hash'))[:12]}, this one {loaded.spec_hash[:12]}); choose another "
                    "experiment.name or output_dir, or move the old directory away")
            return cls(path, data)
        return cls(path, {"version": RECORD_VERSION, "name": loaded.spec.experiment.name,
                          "spec_hash": loaded.spec_hash, "spec_path": str(loaded.path),
                          "created": _now(), "rounds": []})

    def round(self, index: int) -> dict[str, Any] | None:
        return next((r for r in self.data["rounds"] if r["round"] == index), None)

    def put(self, entry: dict[str, Any]) -> None:
        self.data["rounds"] = [r for r in self.data["rounds"] if r["round"] != entry["round"]] + [entry]
        self.data["rounds"].sort(key=lambda r: r["round"])
        self.save()

    def save(self) -> None:
        self.data["updated"] = _now()
        write_json_atomic(self.path, self.data)


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


def heldout_problems(task, spec: Spec, val_problems: list) -> list:
    """`loop.heldout_num_problems` problems of `loop.heldout_split` (generated with
    `loop.heldout_seed`) that share neither an id nor a prompt with the validation problems GEPA
    selects on, so the distilled students are scored on problems no selection has seen."""
    lp = spec.loop
    val_ids, val_prompts = {p.problem_id for p in val_problems}, {p.prompt for p in val_problems}
    pool = task.load_problems(source=spec.task.source, split=lp.heldout_split,
                              num_problems=lp.heldout_num_problems + len(val_problems), seed=lp.heldout_seed)
    kept = [p for p in pool if p.problem_id not in val_ids and p.prompt not in val_prompts]
    if not kept:
        raise LaunchError(f"loop.heldout_split = {lp.heldout_split!r} (seed {lp.heldout_seed}) has no problem "
                          f"outside loop.val_split's {len(val_problems)}; choose another split or seed")
    if len(kept) < lp.heldout_num_problems:
        log.warning("loop held-out set: %d problems (asked for %d) after dropping those in the validation set",
                    len(kept), lp.heldout_num_problems)
    return kept[:lp.heldout_num_problems]


# ---------------------------------------------------------------------------- distillation


def distill_spec_data(loaded: LoadedSpec, round_dir: Path, student: str, prompts: list[str],
                      round_index: int) -> dict[str, Any]:
    """The round's sweep spec: the user's spec (extends and --set merged), minus [loop] and
    [sweep], with the round's student, the teacher context and a grid over the prompts."""
    data = copy.deepcopy({k: v for k, v in loaded.raw.items() if k not in ("loop", "sweep", "extends")})
    experiment = data.setdefault("experiment", {})
    experiment.update(name=DISTILL_NAME, output_dir=str(round_dir),
                      description=f"loop {loaded.spec.experiment.name}, round {round_index}: "
                                  f"context distillation from {len(prompts)} GEPA prompt(s)")
    data.setdefault("model", {})["student"] = student
    teacher = data.setdefault("teacher", {})
    teacher["context"] = "system_prompt"
    teacher.pop("system_prompt", None)
    if data["model"].get("teacher", "same") in ("same", student):  # seed 004 sec. 4.3: a frozen
        teacher.setdefault("weights", "initial")                   # teacher server, unless set
    data.setdefault("train", {})["save_model"] = True
    data["sweep"] = {"grid": {"teacher.system_prompt": list(prompts)}}
    return data


def final_train_eval(run_paths: RunPaths) -> dict[str, float]:
    """The eval/* metrics the training loop wrote at the run's last recorded step, if any."""
    from hpcdistill.record import iter_shards

    best_step, out = -1, {}
    for reader in iter_shards(run_paths.shards):
        for name, (steps, values) in reader.metrics().items():
            if name.startswith("eval/") and len(steps):
                step = int(steps[-1])
                if step > best_step:
                    best_step, out = step, {}
                if step == best_step:
                    out[name] = float(values[-1])
    return out


def _free(handle: Any) -> None:
    import torch

    del handle
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _device(spec: Spec) -> str:
    import torch

    if spec.model.device != "auto":
        return spec.model.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_student(spec: Spec, student: str):
    from hpcdistill.models.chat import set_chat_options
    from hpcdistill.models.loading import load_model

    handle = load_model(student, dtype=spec.model.dtype, device=_device(spec))
    set_chat_options(handle.tokenizer, enable_thinking=spec.model.enable_thinking)  # as the runs render
    return handle


# ---------------------------------------------------------------------------- one round


def run_round(loaded: LoadedSpec, record: LoopRecord, loop_dir: Path, round_index: int, student: str,
              student_sha256: str | None, seed_prompt: str, train_problems: list, val_problems: list,
              executor: str | None, heldout: list | None = None) -> dict[str, Any]:
    from hpcdistill.launch.submit import run_state, submit

    spec, lp = loaded.spec, loaded.spec.loop
    seed = spec.seeds[0]
    key = round_key(loaded.spec_hash, round_index, student, student_sha256, seed_prompt)
    round_dir = loop_dir / f"round{round_index:02d}-{key}"
    if round_dir.exists():  # an interrupted earlier attempt: keep it for inspection, never reuse it
        stale = round_dir.with_name(f"{round_dir.name}.stale-{dt.datetime.now():%Y%m%d-%H%M%S}")
        log.warning("round %d: %s is left from an interrupted attempt; moving it to %s and starting fresh",
                    round_index, round_dir, stale.name)
        os.replace(round_dir, stale)
    round_dir.mkdir(parents=True)
    entry: dict[str, Any] = {"round": round_index, "key": key, "dir": round_dir.name, "state": "started",
                             "started": _now(), "student": student, "student_sha256": student_sha256,
                             "seed_prompt": seed_prompt}
    record.put(entry)

    # 1. optimize: GEPA over the teacher prompt, scored by the current student WITH each prompt.
    handle = _load_student(spec, student)
    scorer = Scorer(spec, handle, seed, round_index)
    base_scores, _ = scorer.score(val_problems, spec.rollout.system_prompt)
    entry["student_score"] = float(np.mean(base_scores))  # the current student, no teacher context
    heldout = val_problems if heldout is None else heldout
    student_heldout, _ = scorer.score(heldout, spec.rollout.system_prompt)
    entry["student_heldout_score"] = float(np.mean(student_heldout))  # what distilled students must beat
    lm = reflection_lm(spec, handle, _int_seed(seed, round_index))
    search = optimize_prompts(spec, scorer, lm, train_problems, val_problems, round_dir / "gepa",
                              seed_prompt, seed=_int_seed(seed, round_index, "gepa"))
    del scorer, lm
    _free(handle)
    entry["gepa"] = {k: v for k, v in search.items() if k != "candidates"}
    entry["candidates"] = search["candidates"]
    top = distill_prompts(search["candidates"], lp)
    if not top:
        raise LaunchError(f"round {round_index}: GEPA produced no non-empty prompt"
                          + (" on its Pareto front" if lp.distill_selection == "pareto" else ""))
    entry["distill_selection"] = lp.distill_selection
    entry["top_k"] = [c["index"] for c in top]  # the distilled candidates (the name predates "pareto")
    entry["state"] = "optimized"
    record.put(entry)
    log.info("round %d: %d candidate prompt(s); distilling %d (%s; direct scores %s)", round_index,
             len(search["candidates"]), len(top), lp.distill_selection, [round(c["direct_score"], 4) for c in top])

    # 2. distill: one sweep, a grid over the top-k prompts (x the spec's seeds).
    sweep_dir = SweepPaths.for_spec(round_dir, DISTILL_NAME).root
    assert_fresh(sweep_dir, "the round's sweep directory")
    spec_path = round_dir / f"{DISTILL_NAME}.toml"
    header = (f"# Generated by hpcdistill loop for {loaded.spec.experiment.name}, round {round_index}.\n"
              f"# Loop spec: {loaded.path} (hash {loaded.spec_hash[:12]}).\n")
    write_atomic(spec_path, header + dump_toml(distill_spec_data(loaded, round_dir, student,
                                                                 [c["prompt"] for c in top], round_index)))
    round_loaded = load_spec(spec_path)
    submission = submit(round_loaded, executor=executor, wait=True)
    if submission.skipped:  # a fresh sweep directory has nothing completed or queued
        raise LaunchError(f"{sweep_dir}: submit skipped {len(submission.skipped)} run(s) in a fresh "
                          "directory; a stale cache leaked in")
    by_prompt = {c["prompt"]: c for c in top}
    distilled = []
    for run in submission.runs:
        paths = submission.sweep.run(run.run_id)
        state = run_state(paths)
        if state != "completed" or not paths.model.exists():
            status = read_json(paths.status) if paths.status.exists() else {}
            raise LaunchError(f"round {round_index}: run {run.run_id} is {state} "
                              f"({status.get('error') or 'no saved model'}); see {paths.log}")
        candidate = by_prompt[run.overrides["teacher.system_prompt"]]
        distilled.append({"candidate": candidate["index"], "run_id": run.run_id, "seed": run.seed,
                          "model_dir": str(paths.model), "model_sha256": model_checksum(paths.model),
                          "train_eval": final_train_eval(paths)})
    entry["distill_spec"] = spec_path.name
    entry["state"] = "distilled"
    record.put(entry)

    # 3. evaluate the distilled students WITHOUT the teacher context, on the held-out problems with
    #    the seeds the round's student was scored with there (a paired comparison).
    for item in distilled:
        handle = _load_student(spec, item["model_dir"])
        scores, _ = Scorer(spec, handle, seed, round_index).score(heldout, spec.rollout.system_prompt)
        _free(handle)
        item["distilled_score"] = float(np.mean(scores))
        item["heldout_scores"] = scores
    entry["distilled"] = distilled

    # 4. choose: the prompt with the best mean distilled score; its best run is the next student.
    for c in entry["candidates"]:
        runs = [d["distilled_score"] for d in distilled if d["candidate"] == c["index"]]
        c["distilled_score"] = float(np.mean(runs)) if runs else None
    best = max(top, key=lambda c: (entry["candidates"][c["index"]]["distilled_score"], c["direct_score"],
                                   -c["index"]))
    best_run = max((d for d in distilled if d["candidate"] == best["index"]),
                   key=lambda d: (d["distilled_score"], -d["seed"]))
    keep = lp.keep_student_if_worse and best_run["distilled_score"] < entry["student_heldout_score"]
    entry["chosen"] = {"candidate": best["index"], "prompt": best["prompt"], "direct_score": best["direct_score"],
                       "distilled_score": entry["candidates"][best["index"]]["distilled_score"],
                       "run_id": best_run["run_id"], "kept_previous_student": keep}
    entry["chosen_prompt"] = best["prompt"]
    entry["next_student"] = student if keep else best_run["model_dir"]
    entry["next_student_sha256"] = student_sha256 if keep else best_run["model_sha256"]
    entry["state"] = "completed"
    entry["ended"] = _now()
    record.put(entry)
    log.info("round %d: chose candidate %d (direct %.4f, distilled %.4f); next student %s", round_index,
             best["index"], best["direct_score"], entry["chosen"]["distilled_score"], entry["next_student"])
    return entry


# ---------------------------------------------------------------------------- the loop


def run_loop(loaded: LoadedSpec, *, executor: str | None = None) -> Path:
    """Run (or finish) the loop of `loaded`; returns the loop directory (holding the record)."""
    from hpcdistill.tasks import get_task

    check_loop_spec(loaded)
    spec, lp = loaded.spec, loaded.spec.loop
    loop_dir = SweepPaths.for_spec(spec.experiment.output_dir, spec.experiment.name).root
    loop_dir.mkdir(parents=True, exist_ok=True)
    record = LoopRecord.open(loop_dir / lp.record_file, loaded)
    write_atomic(loop_dir / "spec.toml", loaded.text)

    task = get_task(spec.task.name)
    train_problems = task.load_problems(source=spec.task.source, split=lp.train_split,
                                        num_problems=lp.train_num_problems, seed=lp.train_seed)
    val_problems = task.load_problems(source=spec.task.source, split=lp.val_split,
                                      num_problems=lp.val_num_problems, seed=lp.val_seed)
    overlap = {p.problem_id for p in train_problems} & {p.problem_id for p in val_problems}
    if overlap:
        log.warning("%d problem(s) are in both loop.train_split and loop.val_split", len(overlap))
    heldout = heldout_problems(task, spec, val_problems)
    record.data.update(val_problem_ids=[p.problem_id for p in val_problems],
                       train_problem_ids=[p.problem_id for p in train_problems],
                       heldout_problem_ids=[p.problem_id for p in heldout])
    record.save()

    student, student_sha256 = spec.model.student, None
    prompt = lp.seed_prompt or spec.teacher.system_prompt
    for round_index in range(1, lp.rounds + 1):
        done = record.round(round_index)
        key = round_key(loaded.spec_hash, round_index, student, student_sha256, prompt)
        if done and done.get("state") == "completed" and done.get("key") == key:
            log.info("round %d already completed in %s; reusing it", round_index, done["dir"])
            entry = done
            if entry["next_student_sha256"] and model_checksum(Path(entry["next_student"])) != entry["next_student_sha256"]:
                raise LaunchError(f"{entry['next_student']}: the saved student of round {round_index} changed "
                                  "since it was recorded; refusing to continue from it")
        else:
            entry = run_round(loaded, record, loop_dir, round_index, student, student_sha256, prompt,
                              train_problems, val_problems, executor, heldout)
        student, student_sha256, prompt = entry["next_student"], entry["next_student_sha256"], entry["chosen_prompt"]
    record.data["final_student"] = student
    record.data["final_prompt"] = prompt
    record.save()
    return loop_dir


__all__ = ["run_loop", "check_loop_spec", "PromptAdapter", "Scorer", "LocalReflectionLM",
           "OpenAIReflectionLM", "top_k_prompts", "pareto_front", "distillable", "distill_prompts", "heldout_problems",
           "distill_spec_data", "round_key", "assert_fresh"]
