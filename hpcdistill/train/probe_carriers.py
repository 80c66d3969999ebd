"""The carriers of the lock/fork probe (seed 001, "The probing mechanism"): prompt+response pairs.

Either the original/eval rollouts recorded in the shards under `probe.carriers` (their `tokens/ids`
are the response; the prompt is `rollouts/prompt_text`, else the task's problem re-rendered with
the recording run's spec), or, when none are named, responses generated fresh by both models on the
task's problems with the `[rollout]` settings and scored by the task's verifier. `probe.num_carriers`
of them are drawn, seeded, round-robin over the strata of `probe.stratify`: response-length
quantile bin, correctness (reward > 0) and generator model. The run that probes them is
`hpcdistill.train.probe`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcdistill.errors import ModelError, ShardError, SpecError, TaskError
from hpcdistill.models.chat import render_prompt, single_turn
from hpcdistill.models.generation import generate
from hpcdistill.models.loading import ModelHandle
from hpcdistill.record import ShardReader, iter_shards
from hpcdistill.spec.schema import ProbeSpec, Spec

log = logging.getLogger(__name__)

CARRIER_KINDS = ("original", "eval")  # recorded rollouts usable as carriers (not teacher contexts)


@dataclass(frozen=True)
class Carrier:
    """One prompt+response pair to probe."""

    problem_id: str
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    prompt_text: str
    reward: float  # NaN when not scored
    generator: str
    source: str  # shard path or "generated"
    length_bin: int = 0



def generator_label(model_id: str, weight_version: int, spec: Spec) -> str:
    """"base" (model.student before any step), "trained" (probe.trained_model), else <model>@<step>."""
    if model_id == spec.probe.trained_model:
        return "trained"
    if model_id == spec.model.student and weight_version <= 0:
        return "base"
    return f"{model_id}@{weight_version}"


def length_bins(lengths: np.ndarray, num_bins: int) -> np.ndarray:
    """Quantile bin 0..num_bins-1 of each length: [N] -> int64 [N]."""
    lengths = np.asarray(lengths, dtype=np.float64)
    if num_bins <= 1 or len(lengths) == 0:
        return np.zeros(len(lengths), dtype=np.int64)
    edges = np.quantile(lengths, np.linspace(0, 1, num_bins + 1)[1:-1])
    return np.searchsorted(edges, lengths, side="right").astype(np.int64)


def correctness(reward: float) -> str:
    return "unscored" if not np.isfinite(reward) else "correct" if reward > 0 else "incorrect"


def stratified_sample(keys: list[tuple], n: int, rng: np.random.Generator) -> list[int]:
    """n indices drawn round-robin over the strata `keys[i]` (each stratum shuffled by `rng`), so
    every stratum is represented before any gets a second carrier; sorted indices."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    order = sorted(groups, key=repr)
    shuffled = [list(rng.permutation(groups[key])) for key in order]
    picked: list[int] = []
    depth = 0
    while len(picked) < n and any(depth < len(g) for g in shuffled):
        for group in shuffled:
            if depth < len(group) and len(picked) < n:
                picked.append(int(group[depth]))
        depth += 1
    return sorted(picked)


def _strata(carriers_meta: list[dict], probe: ProbeSpec) -> list[tuple]:
    return [tuple(m["length_bin"] if key == "length" else correctness(m["reward"]) if key == "correctness"
                  else m["generator"] for key in probe.stratify) for m in carriers_meta]


def _task_prompts(recorded: Spec | None, fallback: Spec, tokenizer, cache: dict, kind: str) -> dict[str, list[int]]:
    """problem_id -> prompt ids, rebuilt as the recording run rendered them: its [task] (for eval
    rollouts its eval.split and eval.num_problems) and its rollout.system_prompt. `recorded`: the
    run's validated Spec (`ShardReader.spec`); None (a shard without one) takes the probe's."""
    run = recorded or fallback
    task = {"name": run.task.name, "source": run.task.source, "split": run.task.split,
            "num_problems": run.task.num_problems}
    split, num = task["split"], task["num_problems"]
    if kind == "eval":
        split = run.eval.split or split
        num = run.eval.num_problems or num
    system = run.rollout.system_prompt
    key = (task["name"], task["source"], split, num, system)
    if key not in cache:
        from hpcdistill.tasks import get_task  # the task package is only needed here

        problems = get_task(task["name"]).load_problems(source=task["source"], split=split,
                                                        num_problems=num, seed=0)
        cache[key] = {p.problem_id: render_prompt(tokenizer, single_turn(p.prompt, system or None))
                      for p in problems}
    return cache[key]


def _recorded_spec(reader) -> Spec | None:
    try:
        return reader.spec
    except ShardError:
        return None


def carriers_from_shards(spec: Spec, tokenizer, rng: np.random.Generator) -> list[Carrier]:
    """Select carriers among the original/eval rollouts recorded under `probe.carriers`."""
    meta: list[dict] = []
    skipped: list = []
    for reader in iter_shards(spec.probe.carriers, skipped=skipped):
        table = reader.rollouts(["kind", "length", "reward", "problem_id", "weight_version"])
        model_id = str(reader.attrs.get("student_model", ""))
        for i, (kind, length) in enumerate(zip(table["kind"], table["length"])):
            if kind in CARRIER_KINDS and length > 0:
                meta.append({"path": reader.path, "index": i, "length": int(length), "kind": str(kind),
                             "reward": float(table["reward"][i]), "problem_id": str(table["problem_id"][i]),
                             "generator": generator_label(model_id, int(table["weight_version"][i]), spec)})
    if not meta:
        raise SpecError(f"key 'probe.carriers': no original or eval rollouts found in {spec.probe.carriers}"
                        + (f" ({len(skipped)} unreadable shard(s) skipped)" if skipped else ""))
    for m, b in zip(meta, length_bins(np.array([m["length"] for m in meta]), spec.probe.length_bins)):
        m["length_bin"] = int(b)
    chosen = [meta[i] for i in stratified_sample(_strata(meta, spec.probe), spec.probe.num_carriers, rng)]
    carriers, prompt_cache = [], {}
    by_path: dict[Path, list[dict]] = defaultdict(list)
    for m in chosen:
        by_path[m["path"]].append(m)
    for path, items in by_path.items():
        with ShardReader(path) as reader:
            table = reader.rollouts(["prompt_text", "response_text"])
            for m in items:
                ids = tuple(int(t) for t in reader.tokens(m["index"], ["ids"])["ids"])
                prompt_text = str(table.get("prompt_text", [""] * (m["index"] + 1))[m["index"]])
                if prompt_text:
                    prompt_ids = list(tokenizer.encode(prompt_text, add_special_tokens=False))
                else:
                    prompts = _task_prompts(_recorded_spec(reader), spec, tokenizer, prompt_cache, m["kind"])
                    if m["problem_id"] not in prompts:
                        log.warning("carrier %s#%d: problem %r not found in its task; skipped",
                                    path, m["index"], m["problem_id"])
                        continue
                    prompt_ids = prompts[m["problem_id"]]
                    prompt_text = tokenizer.decode(prompt_ids)
                if max(ids) >= len(tokenizer):
                    raise ModelError(f"{path}: rollout {m['index']} has token ids beyond the base model's "
                                     f"vocabulary ({len(tokenizer)}); it was recorded with another tokenizer")
                carriers.append(Carrier(m["problem_id"], tuple(prompt_ids), ids, prompt_text, m["reward"],
                                        m["generator"], str(path), m["length_bin"]))
    return carriers


def generate_carriers(spec: Spec, base: ModelHandle, trained: ModelHandle, seed: int,
                      rng: np.random.Generator) -> list[Carrier]:
    """Both models answer the task's problems (rollout settings); verified; then stratified."""
    from hpcdistill.tasks import get_task

    task = get_task(spec.task.name)
    problems = task.load_problems(source=spec.task.source, split=spec.task.split,
                                  num_problems=spec.task.num_problems, seed=0)
    if not problems:
        raise TaskError(f"task {spec.task.name!r} ({spec.task.source}) gave no problems to generate carriers")
    ro, tok = spec.rollout, base.tokenizer
    prompts = [render_prompt(tok, single_turn(p.prompt, ro.system_prompt or None)) for p in problems]
    sides = [("base", base)] + ([("trained", trained)] if trained is not base else [])
    meta: list[dict] = []
    for stream, (label, handle) in enumerate(sides):
        gens = generate(handle, prompts, n=ro.samples_per_problem, max_new_tokens=ro.max_new_tokens,
                        temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k,
                        seed=seed * 1_000_003 + stream, batch_size=ro.batch_size)
        for problem, prompt, samples in zip(problems, prompts, gens):
            for g in samples:
                ids = tuple(int(t) for t in g.response_ids)
                if not ids:
                    continue
                text = tok.decode(list(ids), skip_special_tokens=True)
                verdict = task.verify(problem, text, timeout_s=spec.task.timeout_s, memory_mb=spec.task.memory_mb)
                meta.append({"carrier": Carrier(problem.problem_id, tuple(prompt), ids, tok.decode(prompt),
                                                float(verdict.reward), label, "generated"),
                             "length": len(ids), "reward": float(verdict.reward), "generator": label})
    for m, b in zip(meta, length_bins(np.array([m["length"] for m in meta]), spec.probe.length_bins)):
        m["length_bin"] = int(b)
    chosen = stratified_sample(_strata(meta, spec.probe), spec.probe.num_carriers, rng)
    return [_with_bin(meta[i]["carrier"], meta[i]["length_bin"]) for i in chosen]


def _with_bin(c: Carrier, length_bin: int) -> Carrier:
    return Carrier(c.problem_id, c.prompt_ids, c.response_ids, c.prompt_text, c.reward, c.generator,
                   c.source, length_bin)


__all__ = ["Carrier", "CARRIER_KINDS", "generator_label", "length_bins", "correctness", "stratified_sample",
           "carriers_from_shards", "generate_carriers"]
