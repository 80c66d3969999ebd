"""Rules between spec keys, checked by the loader after types and ranges (`load.validate`).

- Legacy objective names are presets of `objective = "distill"`: `resolve_presets` rewrites them
  before validation, and a key the spec sets explicitly that contradicts the preset is an error
  (`objective = "full_forward_kl"` with `divergence = "reverse"` cannot mean anything).
- Some keys are read only under another key's value (`train.gamma` only with `support =
  "sampled"`); a non-default value elsewhere would be silently ignored, so it is an error.
- Templates may use only the fields the code fills in; anything else would raise KeyError in the
  middle of a run.
- A `[log]` backend must be importable where the spec loads, not fail after the models are loaded.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any

from hpcdistill.spec.schema import Spec, TrainSpec
from hpcdistill.spec.teacher_rules import teacher_role_errors

# objective name -> the keys of train it stands for (docs/objectives.md, "Presets")
LEGACY_OBJECTIVES: dict[str, dict[str, Any]] = {
    "topk_kl": {"support": "topk", "divergence": "reverse"},
    "full_reverse_kl": {"support": "full", "divergence": "reverse"},
    "full_forward_kl": {"support": "full", "divergence": "forward"},
    "jsd": {"support": "full", "divergence": "jsd"},
    "opd": {"support": "sampled", "divergence": "reverse", "sampled_use": "reward"},
}

# dotted key -> the (key, values) conditions under which it is read
ONLY_WHEN: dict[str, tuple[tuple[str, tuple[Any, ...]], ...]] = {
    "train.beta": (("train.divergence", ("jsd",)),),
    "train.topk_support": (("train.support", ("topk",)),),
    "train.topk_normalization": (("train.support", ("topk",)),),
    "train.estimator": (("train.support", ("sampled",)),),
    "train.sampled_use": (("train.support", ("sampled",)),),
    "train.gamma": (("train.support", ("sampled",)), ("train.sampled_use", ("reward",))),
    "teacher.ema_rate": (("teacher.weights", ("ema",)),),
    "teacher.trust_region_mix": (("teacher.weights", ("trust_region",)),),
    "mask.random_release_by": (("mask.kind", ("random_release",)),),
    "train.exopd_alpha": (("train.objective", ("exopd",)),),
    "train.exopd_reference": (("train.objective", ("exopd",)),),
    "loop.top_k_prompts": (("loop.distill_selection", ("top_k",)),),
    "loop.max_distill_prompts": (("loop.distill_selection", ("pareto",)),),
}

# template key -> the fields it may use
TEMPLATE_FIELDS: dict[str, tuple[str, ...]] = {
    "teacher.feedback_template": ("problem", "feedback"),
    "teacher.regen_template": ("problem", "feedback"),
    "teacher.demonstration_template": ("problem", "demonstration", "feedback"),
    "teacher.demonstration_section": ("demonstration",),
    "teacher.feedback_section": ("feedback",),
}

DISTILL_METHODS = ("on_policy", "on_policy_gkd", "extended_on_policy")

# log.backends -> the module it needs (the `track` extra installs both)


def resolve_presets(data: dict[str, Any], origins: dict[str, str]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Rewrite a legacy `train.objective` into `distill` + its keys; returns (data, errors)."""
    train = data.get("train")
    if not isinstance(train, dict) or train.get("objective") not in LEGACY_OBJECTIVES:
        return data, []
    name = train["objective"]
    preset = LEGACY_OBJECTIVES[name]
    errors = []
    for key, value in preset.items():
        if key in train and train[key] != value:
            canonical = ", ".join(f"{k} = {v!r}" for k, v in preset.items())
            errors.append((f"train.{key}", f"got {train[key]!r}, but train.objective = {name!r} means "
                           f"objective = 'distill' with {canonical}; set train.objective = 'distill' "
                           f"and the keys you want instead"))
    resolved = {**train, **preset, "objective": "distill"}
    for key in preset:
        origins.setdefault(f"train.{key}", origins.get("train.objective", ""))
    return {**data, "train": resolved}, errors


def canonical_objective(objective: str) -> str:
    """The objective `train.objective` names: 'distill' for a preset name, else the name itself."""
    return "distill" if objective in LEGACY_OBJECTIVES else objective


def resolve_train(train: TrainSpec) -> TrainSpec:
    """`train` as the loader leaves it: a preset name becomes objective = 'distill' with the
    preset's keys (over the explicit ones, which the loader would have rejected if they differed).
    A TrainSpec the loader resolved comes back as it is; one built in code (tests) is resolved."""
    preset = LEGACY_OBJECTIVES.get(train.objective)
    return train if preset is None else dataclasses.replace(train, **preset, objective="distill")


def _get(spec: Spec, dotted: str) -> Any:
    value: Any = spec
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _default(spec: Spec, dotted: str) -> Any:
    section, key = dotted.split(".")
    field = {f.name: f for f in dataclasses.fields(getattr(spec, section))}[key]
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


def template_errors(template: str, allowed: tuple[str, ...]) -> str | None:
    """Why `template` cannot be filled with `allowed` fields by str.format, or None."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:  # a lone "{" or "}"
        return f"not a valid template ({exc}); write a literal brace as {{{{ or }}}}"
    bad = sorted({f for f in fields if f.split(".")[0].split("[")[0] not in allowed or f == ""})
    if bad:
        shown = ", ".join("{" + f + "}" for f in bad)
        return f"uses {shown}; allowed fields: {', '.join('{' + a + '}' for a in allowed)}"
    return None


def cross_errors(spec: Spec) -> list[tuple[str, str]]:
    """(dotted key, message) for every rule between keys that `spec` breaks."""
    errors = []
    for dotted, conditions in ONLY_WHEN.items():
        if _get(spec, dotted) == _default(spec, dotted):
            continue
        for depends, values in conditions:
            if _get(spec, depends) not in values:
                errors.append((dotted, f"is read only when {depends} is {' or '.join(map(repr, values))} "
                                       f"(it is {_get(spec, depends)!r}); remove it or set {depends}"))
                break
    for dotted, allowed in TEMPLATE_FIELDS.items():
        problem = template_errors(_get(spec, dotted), allowed)
        if problem:
            errors.append((dotted, problem))
    train, teacher = spec.train, spec.teacher
    if teacher.weights != "live" and spec.model.teacher not in ("same", spec.model.student):
        errors.append(("teacher.weights", f"{teacher.weights!r} is a self-teacher made from the student's "
                       f"weights; model.teacher = {spec.model.teacher!r} is a separate, frozen model: use "
                       "teacher.weights = 'live' with it, or model.teacher = 'same'"))
    if train.on_policy_fraction < 1.0 and train.method not in DISTILL_METHODS:
        errors.append(("train.on_policy_fraction", f"mixes teacher samples into methods "
                       f"{', '.join(map(repr, DISTILL_METHODS))}; method {train.method!r} schedules its "
                       "own off-policy data"))
    if train.exopd_reference != "initial" and train.method == "kl_anchored":
        errors.append(("train.exopd_reference", f"is {train.exopd_reference!r}, but method 'kl_anchored' anchors "
                       "to the initial student, which ExOPD would then not use; keep exopd_reference = 'initial'"))
    mask, scoring = spec.mask, spec.scoring
    if mask.support_k is not None and mask.support_k > scoring.top_k:
        errors.append(("mask.support_k", f"is {mask.support_k}, but scoring.top_k = {scoring.top_k} is all "
                       "of the student's top-k that scoring records; set mask.support_k <= scoring.top_k "
                       f"or scoring.top_k >= {mask.support_k}"))
    if spec.scoring.rescore_step0 and train.steps == 0:
        errors.append(("scoring.rescore_step0", "re-scores step 0's rollouts after every training step; "
                       "train.steps is 0 (measurement only): set train.steps > 0 or remove it"))
    if train.measure_problems != "drawn" and train.problems_per_step is None:
        errors.append(("train.measure_problems", f"is {train.measure_problems!r}, but train.problems_per_step "
                       "is not set, so every step already measures all problems; set train.problems_per_step "
                       "or remove it"))
    if train.off_policy_loss == "divergence" and train.objective != "distill":
        errors.append(("train.off_policy_loss", f"'divergence' trains teacher samples with objective "
                       f"'distill'; train.objective is {train.objective!r}"))
    if spec.rollout.policy_lag > 0 and (spec.trainer.strategy == "fsdp" or
                                        (spec.trainer.strategy == "deepspeed" and spec.trainer.zero_stage == 3)):
        errors.append(("rollout.policy_lag", f"keeps the lagged weights by swapping them into the student's "
                       f"parameters, which trainer.strategy = {spec.trainer.strategy!r} shards over ranks; use "
                       "trainer.strategy 'single' or 'deepspeed' with zero_stage 1 or 2, or policy_lag = 0"))
    errors += benchmark_errors(spec) + nodes_errors(spec) + tracking_errors(spec) + teacher_role_errors(spec)
    return errors


def benchmark_errors(spec: Spec) -> list[tuple[str, str]]:
    """eval.benchmarks (seed 002's multi-benchmark eval) against the keys of the single-set eval."""
    ev = spec.eval
    if not ev.benchmarks:
        return []
    errors = []
    for key in ("split", "num_problems"):
        if getattr(ev, key) is not None:
            errors.append((f"eval.{key}", f"is the single-set eval's; eval.benchmarks is set, where each "
                           f"benchmark has its own {key}: set it in the [[eval.benchmarks]] tables or remove it"))
    if ev.every == 0:
        errors.append(("eval.benchmarks", "is read only when eval.every > 0 (it is 0); set eval.every or "
                       "remove eval.benchmarks"))
    if spec.task.name != "math":
        errors.append(("eval.benchmarks", f"benchmark loaders exist for task.name = 'math' (seed 002); task.name "
                       f"is {spec.task.name!r}: use eval.split for the single-set eval"))
    labels = [b.label for b in ev.benchmarks]
    for label in sorted({x for x in labels if labels.count(x) > 1 or x == "avg"}):
        errors.append(("eval.benchmarks", f"benchmark name {label!r} is " + (
            "reserved for the average (eval/avg/...)" if label == "avg" else "used twice") +
            "; give the tables distinct `name`s"))
    return errors


def nodes_errors(spec: Spec) -> list[tuple[str, str]]:
    """launch.nodes > 1: the trainer ranks of one run span several nodes of a Slurm job."""
    nodes, executor = spec.launch.nodes, spec.launch.executor
    if nodes == 1:
        return []
    errors = []
    if spec.trainer.strategy == "single":
        errors.append(("launch.nodes", f"is {nodes}: the nodes hold trainer ranks, which trainer.strategy "
                       "'deepspeed' or 'fsdp' starts; trainer.strategy is 'single': set it, or launch.nodes = 1"))
    if executor != "slurm":
        errors.append(("launch.nodes", f"is {nodes}: several nodes are a Slurm job's (launch.executor = "
                       f"'slurm'); launch.executor is {executor!r}, which runs on this machine only: "
                       "set launch.executor = 'slurm', or launch.nodes = 1"))
    return errors


def tracking_errors(spec: Spec) -> list[tuple[str, str]]:
    """log.backends: each backend listed once. Whether its package is installed is checked where
    runs are submitted (`command_rules.check_tracking_installed`), not wherever a spec loads: a
    shard's spec must still read on a machine without wandb."""
    backends = spec.log.backends
    return [("log.backends", f"names {name!r} twice; list each backend once")
            for name in sorted({b for b in backends if backends.count(b) > 1})]


__all__ = ["LEGACY_OBJECTIVES", "ONLY_WHEN", "TEMPLATE_FIELDS", "resolve_presets", "canonical_objective",
           "resolve_train", "cross_errors", "template_errors", "nodes_errors", "tracking_errors"]
