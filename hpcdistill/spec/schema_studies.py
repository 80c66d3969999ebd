"""The tables of the studies that are not a training run: `[probe]` (seed 001's lock/fork probe)
and `[loop]` (seed 004's prompt-optimization loop). Part of the experiment spec
(`hpcdistill.spec.schema.Spec` holds them and re-exports both names); every run's spec has them at
their defaults, and `spec.command_rules` checks them for the `probe` and `loop` commands.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hpcdistill.spec.fields import opt


@dataclass(frozen=True)
class ProbeSpec:
    """Lock/fork probing (seed 001). Owned by hpcdistill.analysis.probing; see its docs.

    The base model is `model.student`, the trained model `trained_model`; both must share one
    tokenizer. Carriers come from recorded shards (`carriers`) or, when none are named, are
    generated fresh by both models on the task's problems with the `[rollout]` settings.
    """

    trained_model: str | None = None  # the trained model; the base model is model.student
    trained_label: str = "Trained"  # column label in the rank tables (the seed writes "SSD")
    # -- carriers: prompt+response pairs (seed 001, "The probing mechanism")
    carriers: list[str] = field(default_factory=list)  # sweep/run dirs or shard files; [] = generate
    num_carriers: int = opt(32, ge=1)
    stratify: list[Literal["length", "correctness", "generator"]] = field(
        default_factory=lambda: ["length", "correctness", "generator"])
    length_bins: int = opt(3, ge=1)  # quantile bins of response length
    # -- positions per carrier
    regular_every: int = opt(32, ge=0)  # every n-th response position (0 = none)
    heuristic_tokens: list[str] = field(default_factory=lambda: [
        "\\boxed", "Let", "Suppose", "Wait", "Actually", "So", "Therefore", "Thus", "</think>",
        "**", "$$", "\n\n", "```"])  # matched on the decoded response text
    heuristic_window: int = opt(1, ge=0)  # also probe this many positions after each match
    random_positions: int = opt(8, ge=0)  # random positions on top, per carrier
    max_positions: int = opt(128, ge=1)  # cap per carrier (seeded subsample beyond it)
    # -- distributions: tail = mass outside the top_k; truncation = top-k then top-p
    top_k: int = opt(20, ge=1, le=4096)
    top_p: float = opt(0.95, gt=0, le=1)
    temperatures: list[float] = field(default_factory=lambda: [0.7, 1.5])  # T_eval, each > 0
    # -- classifier thresholds (seed 001: lock = high top-1, small nucleus, low tail; fork = several
    # similar candidates in the top-n with low tail; anything else is mixed/diffuse)
    lock_min_top1: float = opt(0.5, gt=0, le=1)
    lock_max_nucleus: int = opt(8, ge=1)
    lock_max_tail: float = opt(0.1, ge=0, le=1)
    fork_top_n: int = opt(10, ge=2)  # candidates are looked for among the top-n (<= top_k)
    fork_min_candidates: int = opt(2, ge=2)
    fork_min_prob: float = opt(0.05, ge=0, le=1)  # a candidate has p >= this ...
    fork_min_ratio: float = opt(0.25, ge=0, le=1)  # ... and p >= ratio * top-1 ("similar")
    fork_max_tail: float = opt(0.25, ge=0, le=1)
    # -- lock sub-categories: a self-correction context is a marker in the preceding text
    self_correction_markers: list[str] = field(default_factory=lambda: [
        "Wait", "wait,", "Actually", "Hmm", "Let me check", "Let's check", "Let me verify",
        "Let me double-check", "double-check", "re-check", "I made a mistake", "Oops"])
    self_correction_window: int = opt(200, ge=0)  # characters of preceding text searched
    num_examples: int = opt(1, ge=0)  # rank tables per sub-category in the report
    seed: int | None = None  # None = the run's seed


@dataclass(frozen=True)
class LoopSpec:
    """Looped context distillation with prompt optimization (seed 004 sections 6.3, 6.5).

    `hpcdistill loop SPEC` (hpcdistill.launch.prompt_loop), per round: GEPA evolves the teacher
    system prompt, each candidate scored by the current student WITH it on the validation split;
    the prompts `distill_selection` picks (default: GEPA's Pareto front) each drive a
    context-distillation sweep; the distilled students are scored WITHOUT the teacher context on
    the held-out split (disjoint from the validation one); the best one is the next round's student.
    Layout: <output_dir>/<name>/{record_file, spec.toml, round01-<key>/{gepa/, distill.toml,
    distill/<run_id>/...}}, <key> hashing the loop spec, the round and its student.
    """

    rounds: int = opt(2, ge=1)
    # -- GEPA (seed 6.3.2): what it evolves, its budget and search settings
    seed_prompt: str = ""  # round 1's starting prompt; "" = teacher.system_prompt. Later rounds
    #                        start from the previous round's chosen prompt.
    candidates: int = opt(8, ge=1)  # stop once GEPA holds this many prompts (seed prompt included)
    max_metric_calls: int = opt(2000, ge=1)  # and at most this many per-problem evaluations a round
    reflection_minibatch_size: int = opt(10, ge=1)
    candidate_selection: Literal["pareto", "current_best", "epsilon_greedy", "top_k_pareto"] = "pareto"
    # GEPA keeps a child prompt when its minibatch score beats (or, "improvement_or_equal", ties)
    # its parent's; ties are the rule when every reward is 0, as with a tiny model.
    acceptance: Literal["strict_improvement", "improvement_or_equal"] = "strict_improvement"
    use_merge: bool = False
    train_split: str = "train"  # problems GEPA reflects on (minibatches)
    train_num_problems: int = opt(500, ge=1)
    train_seed: int = opt(0, ge=0)  # the task's problem-generation seed for these
    val_split: str = "test"  # problems every candidate and distilled student is scored on ...
    val_num_problems: int = opt(200, ge=1)
    val_seed: int = opt(1, ge=0)  # ... generated with this seed: held out from eval.split's (seed 0)
    eval_samples: int = opt(1, ge=1)  # samples per validation problem (score = mean reward)
    eval_temperature: float = opt(1.0, ge=0)
    eval_max_new_tokens: int | None = opt(None, ge=1)  # None = rollout.max_new_tokens
    # -- the reflection model that proposes new prompts: "local" = the current student through
    # hpcdistill.models.generation; else a model name at an OpenAI-compatible endpoint.
    reflection_model: str = "local"
    reflection_base_url: str | None = None  # e.g. "https://api.openai.com/v1"
    reflection_api_key_env: str | None = None  # NAME of the variable holding the key, never the key
    reflection_max_tokens: int = opt(2048, ge=1)
    reflection_temperature: float = opt(1.0, ge=0)
    # -- distillation: which GEPA prompts each drive a run per seed. pareto (seed 6.3.1: "for each
    # Pareto front program"): every program on GEPA's per-validation-instance Pareto front (its
    # non-dominated set), at most max_distill_prompts of them (best direct score first; None = all);
    # top_k: the top_k_prompts best by direct score.
    distill_selection: Literal["pareto", "top_k"] = "pareto"
    max_distill_prompts: int | None = opt(None, ge=1)
    top_k_prompts: int = opt(2, ge=1)
    # -- the held-out problems the distilled students (and the round's student) are scored on,
    # WITHOUT the teacher context (seed 6.3.3: "500 held-out examples"); kept disjoint from the
    # validation problems GEPA selects on (problems shared by id or prompt text are dropped).
    heldout_split: str = "test"
    heldout_num_problems: int = opt(500, ge=1)
    heldout_seed: int = opt(0, ge=0)  # 0: the problems an in-run eval of that split draws (seed 0)
    keep_student_if_worse: bool = False  # True: a round whose best distilled student scores below
    #                                      the current student keeps the current one
    # -- output
    record_file: str = opt("loop.json", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*\.json$")
    keep_gepa_state: bool = True  # keep each round's GEPA run_dir (state, log) for inspection


__all__ = ["ProbeSpec", "LoopSpec"]
