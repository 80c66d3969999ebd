"""Looped context distillation with prompt optimization (seed 004 sections 1.4, 6.3, 6.5).

`run_loop(loaded)` runs `loop.rounds` rounds; each reads top to bottom:

    1. optimize  GEPA (the `gepa` package: evolutionary Pareto search with LLM reflection) evolves
                 the teacher system prompt; a candidate's score is the CURRENT student's mean reward
                 on the validation split WITH that system prompt ("direct score";
                 `hpcdistill.launch.prompt_search`).
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

The spec is checked first (`hpcdistill.spec.command_rules.check_loop_spec`); the loop's directory
is `hpcdistill.rundir.LoopPaths` (the record `<output_dir>/<name>/<loop.record_file>`, written
atomically after every stage, and one `roundNN-<key>/` per round attempt). Caches never cross runs (seed 004 sec. 5.3: "DSPy disk cache corrupts cross-run
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
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpcdistill.errors import LaunchError
from hpcdistill.launch.prompt_search import (
    Scorer,
    assert_fresh,
    derived_seed,
    distill_prompts,
    optimize_prompts,
    reflection_lm,
)
from hpcdistill.launch.submit import run_state, submit
from hpcdistill.rundir import LOOP_DISTILL, LoopPaths, RunPaths, read_json, write_atomic, write_json_atomic
from hpcdistill.spec.command_rules import check_loop_spec
from hpcdistill.spec.load import LoadedSpec, content_hash, dump_toml, load_spec
from hpcdistill.spec.schema import Spec

log = logging.getLogger(__name__)

RECORD_VERSION = 1


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------- round directories


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


# ---------------------------------------------------------------------------- problems


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
    experiment.update(name=LOOP_DISTILL, output_dir=str(round_dir),
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


def run_round(loaded: LoadedSpec, record: LoopRecord, loop_paths: LoopPaths, round_index: int, student: str,
              student_sha256: str | None, seed_prompt: str, train_problems: list, val_problems: list,
              executor: str | None, heldout: list | None = None) -> dict[str, Any]:
    spec, lp = loaded.spec, loaded.spec.loop
    seed = spec.seeds[0]
    key = round_key(loaded.spec_hash, round_index, student, student_sha256, seed_prompt)
    round_paths = loop_paths.round(round_index, key)
    round_dir = round_paths.root
    if round_dir.exists():  # an interrupted earlier attempt: keep it for inspection, never reuse it
        stale = round_paths.stale(f"{dt.datetime.now():%Y%m%d-%H%M%S}")
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
    lm = reflection_lm(spec, handle, derived_seed(seed, round_index))
    search = optimize_prompts(spec, scorer, lm, train_problems, val_problems, round_paths.gepa,
                              seed_prompt, seed=derived_seed(seed, round_index, "gepa"))
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
    sweep_dir = round_paths.distill.root
    assert_fresh(sweep_dir, "the round's sweep directory")
    spec_path = round_paths.distill_spec
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
    loop_paths = LoopPaths.for_spec(spec.experiment.output_dir, spec.experiment.name, lp.record_file)
    loop_paths.root.mkdir(parents=True, exist_ok=True)
    record = LoopRecord.open(loop_paths.record, loaded)
    write_atomic(loop_paths.spec, loaded.text)

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
            entry = run_round(loaded, record, loop_paths, round_index, student, student_sha256, prompt,
                              train_problems, val_problems, executor, heldout)
        student, student_sha256, prompt = entry["next_student"], entry["next_student_sha256"], entry["chosen_prompt"]
    record.data["final_student"] = student
    record.data["final_prompt"] = prompt
    record.save()
    return loop_paths.root


__all__ = ["run_loop", "run_round", "LoopRecord", "heldout_problems", "distill_spec_data",
           "final_train_eval", "round_key", "model_checksum"]
