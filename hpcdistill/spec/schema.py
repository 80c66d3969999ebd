"""The experiment spec: one frozen dataclass per TOML table.

Every key a user may write is a field here, with its default. The loader (`hpcdistill.spec.load`)
rejects any other key, checks types, choices (`Literal`) and ranges (`field(metadata=...)`), and
reports every problem of a file at once. Defaults follow the codebase defaults of seed 000
(lr 1e-6, weight decay 0.01, max grad norm 1.0, top-k 20, temperature 1.0). The studies' tables
`[probe]` and `[loop]` are in `spec.schema_studies` (imported here), `opt` / `rng` in `spec.fields`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from hpcdistill.spec.fields import opt, rng
from hpcdistill.spec.schema_studies import LoopSpec, ProbeSpec

BUNDLED_MODEL = "bundled:smollm2-135m-instruct"


@dataclass(frozen=True)
class ExperimentSpec:
    name: str = field(metadata=rng(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$"))
    seeds: list[int] | None = None  # explicit seeds, or
    num_seeds: int | None = opt(None, ge=1)  # seeds 0..num_seeds-1 (default: [0])
    output_dir: str = "runs"  # runs land in <output_dir>/<name>/<run_id>/
    description: str = ""


@dataclass(frozen=True)
class ModelSpec:
    student: str = BUNDLED_MODEL  # hub id, local directory, or bundled:<name>
    teacher: str = "same"  # "same" = the student's weights (no second copy), or a model id
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    trust_remote_code: bool = False
    # The chat template's `enable_thinking` variable for every prompt of the run (student and
    # teacher): false = Qwen3's non-thinking mode (seed 002's student), None = the template's
    # default (not passed). Templates that do not read it are unaffected.
    enable_thinking: bool | None = None


@dataclass(frozen=True)
class TaskSpec:
    name: Literal["code", "math", "sokoban"] = "code"
    source: str = "bundled"  # bundled | livecodebench | gsm8k | math500 | reasoning_gym | path.jsonl
    split: str = "test"
    num_problems: int = opt(10, ge=1)
    timeout_s: float = opt(6.0, gt=0, doc="sandbox wall-clock limit per test")
    memory_mb: int = opt(512, ge=16, doc="sandbox address-space limit")


@dataclass(frozen=True)
class RolloutSpec:
    backend: Literal["transformers", "vllm"] = "transformers"
    samples_per_problem: int = opt(8, ge=1)
    max_new_tokens: int = opt(512, ge=1)
    temperature: float = opt(1.0, ge=0)
    top_p: float = opt(1.0, gt=0, le=1)
    top_k: int = opt(0, ge=0)  # 0 = no top-k truncation while sampling
    batch_size: int = opt(8, ge=1)
    system_prompt: str = ""  # the student's system prompt ("" = none)
    # Off-policy lag (prime-rl's async_level, seed 004 sec. 6.1 metrics is_masked / geo_seq_ratio):
    # step s samples its rollouts with the weights of step max(0, s - policy_lag); the trainer's
    # log-probs are at step s. 0 = synchronous on-policy (the loop's behaviour before this key).
    policy_lag: int = opt(0, ge=0)
    # backend = "vllm": the Python that runs vLLM's server ($HPCDISTILL_VLLM_PYTHON overrides it)
    vllm_python: str = "python3"
    vllm_startup_timeout_s: float = opt(600.0, gt=0)


@dataclass(frozen=True)
class TeacherSpec:
    # What the teacher sees before the response (hpcdistill.distill.contexts). feedback: p + f,
    # scored on s (SDPO); regen: p + s + f, generates s' and is scored on s' (seed 000);
    # system_prompt: an enhanced system prompt (seed 004); demonstration: p + a successful sibling
    # rollout of the same problem (+ optionally f), scored on s (SDPO's reprompting); none: the
    # student's own prompt.
    context: Literal["feedback", "regen", "system_prompt", "demonstration", "none"] = "feedback"
    system_prompt: str = ""
    feedback_template: str = (
        "{problem}\n\nA previous attempt was executed. Feedback:\n{feedback}\n\n"
        "Write a correct solution."
    )
    regen_template: str = (
        "Your solution was executed. Feedback:\n{feedback}\n\nWrite a corrected solution."
    )
    # context = "demonstration": the teacher's user message is demonstration_template with
    # {demonstration} = demonstration_section (or "" when no sibling succeeded) and {feedback} =
    # feedback_section (or "", see demonstration_feedback). A rollout with neither gets no teacher
    # signal: it is recorded, and left out of the loss (SDPO's self-distillation mask).
    demonstration_template: str = "{problem}{demonstration}{feedback}\n\nSolve the original problem correctly."
    demonstration_section: str = "\n\nA correct solution from another attempt:\n\n{demonstration}\n"
    feedback_section: str = "\n\nFeedback on your earlier attempt:\n\n{feedback}\n"
    demonstration_threshold: float = 1.0  # a sibling with reward >= this is a demonstration
    demonstration_exclude_self: bool = True  # a successful rollout is not its own demonstration
    # never | always | fallback (only when no sibling succeeded: SDPO's default)
    demonstration_feedback: Literal["never", "always", "fallback"] = "fallback"
    # Which weights the self-teacher (model.teacher = "same") runs (hpcdistill.models.teachers):
    # live: the student itself; initial: a frozen copy of the initial student; ema: after every
    # update theta_T <- (1 - ema_rate) theta_T + ema_rate theta_S (SDPO: 0.05); trust_region: logits
    # lerp(initial, live, trust_region_mix) (SDPO's trust-region teacher).
    weights: Literal["live", "initial", "ema", "trust_region"] = "live"
    ema_rate: float = opt(0.05, gt=0, le=1)
    trust_region_mix: float = opt(0.05, ge=0, le=1)
    temperature: float = opt(1.0, ge=0)  # whenever the teacher samples: s' (regen), completions, seeds
    top_p: float = opt(1.0, gt=0, le=1)
    max_new_tokens: int | None = opt(None, ge=1)  # None = rollout.max_new_tokens
    # What serves the teacher: transformers (in the trainer, or its own process: launch.teacher_process),
    # or a vLLM server's prompt log-probs on the teacher's GPUs (its own top-k and the sampled token
    # only: train.topk_support = "teacher"; docs/trainer.md, "The teacher role")
    backend: Literal["transformers", "vllm"] = "transformers"


@dataclass(frozen=True)
class ScoringSpec:
    top_k: int = opt(20, ge=1, le=4096)
    full_vocab: bool = False  # also full-vocabulary KL, and both sides' mass on backtrack_words
    # seed 000 exp. 5: tokens whose text (stripped, case-insensitive) is one of these
    backtrack_words: list[str] = field(default_factory=lambda: ["wait", "actually", "no", "#", "//"])
    chunk_size: int = opt(256, ge=1)
    batch_size: int = opt(4, ge=1)
    # Record the teacher's own top-k (ids, its log-probs, the student's log-probs there): what the
    # teacher and union top-k supports train on, and what `hpcdistill replay` needs to recompute
    # them. About 12 k bytes per token (k = 20: 240 B/token, roughly doubling a shard).
    teacher_topk: bool = True
    # Seed 000 exp. 3, "after each step, recalculate the standard KL": keep step 0's rollouts and
    # regenerations as a fixed evaluation set and re-score those same token sequences with the
    # current weights at every step (shard kinds "fixed" / "fixed_regenerated"); training still
    # uses each step's fresh rollouts. False = only the fresh rollouts of each step are measured.
    rescore_step0: bool = False


@dataclass(frozen=True)
class LoraSpec:
    enabled: bool = False
    rank: int = opt(16, ge=1)
    alpha: float = opt(32.0, gt=0)
    dropout: float = opt(0.0, ge=0, lt=1)
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass(frozen=True)
class TrainSpec:
    steps: int = opt(0, ge=0)  # 0 = measurement only (rollout, feedback, scoring, record)
    method: Literal["on_policy", "on_policy_gkd", "hybrid", "extended_on_policy", "teacher_seeded",
                    "mixture", "replay_buffer", "kl_anchored", "reverse_curriculum"] = "on_policy"
    # distill: the loss below (docs/objectives.md). The old names are presets of it, resolved by the
    # loader (LEGACY_OBJECTIVES): topk_kl, full_reverse_kl, full_forward_kl, jsd, opd.
    objective: Literal["distill", "exopd", "context_distill", "sft", "topk_kl", "full_reverse_kl",
                       "full_forward_kl", "jsd", "opd"] = "distill"
    # -- objective = "distill" (hpcdistill.distill.loss)
    support: Literal["topk", "full", "sampled"] = "topk"  # where the divergence is computed
    divergence: Literal["forward", "reverse", "jsd"] = "reverse"  # reverse = KL(student || teacher)
    beta: float = opt(0.5, ge=0, le=1)  # jsd: M = beta p_T + (1 - beta) p_S; 0 = forward, 1 = reverse
    topk_support: Literal["student", "teacher", "union"] = "student"  # whose top-k ids (SDPO: student)
    topk_normalization: Literal["renormalize", "tail_bucket"] = "renormalize"  # or log(1 - sum p) bucket
    estimator: Literal["k1", "k2", "k3"] = "k1"  # support = "sampled": single-sample estimator
    sampled_use: Literal["reward", "loss"] = "reward"  # policy-gradient reward, or a supervised loss
    gamma: float = opt(0.0, ge=0, le=1)  # reward: advantage = discounted future sum of -estimate
    is_clip: float | None = opt(None, gt=0)  # importance ratio vs the sampler's log-probs, clipped
    # GKD's lambda: each problem of a step is the student's rollouts with this probability, else
    # teacher samples (methods on_policy / on_policy_gkd / extended_on_policy only)
    on_policy_fraction: float = opt(1.0, ge=0, le=1)
    # what teacher-sampled (off-policy) rollouts train with: sft = token NLL (sequence-level KD,
    # Kim & Rush), divergence = the objective above on the teacher's samples (GKD)
    off_policy_loss: Literal["sft", "divergence"] = "sft"
    lr: float = opt(1e-6, gt=0)
    weight_decay: float = opt(0.01, ge=0)
    max_grad_norm: float = opt(1.0, gt=0)
    # ExOPD (G-OPD's reward extrapolation, seed 002's baseline): per sampled token
    # A = alpha (log p_T - log p_ref) - (log p_S - log p_ref); alpha = 1 is OPD
    exopd_alpha: float = opt(1.0, ge=0)
    exopd_reference: str = "initial"  # p_ref: "initial" = the frozen initial student, or a model id
    adv_tau: float = 1.0  # seed 004: full_reward = adv_tau*R + teacher_tau*sum(lp_T) - student_tau*sum(lp_S)
    teacher_tau: float = 1.0
    student_tau: float = 1.0
    use_full_reward_baseline: bool = True
    token_mask_low: float = opt(0.0, ge=0)  # importance-ratio masking bounds
    token_mask_high: float = opt(10.0, gt=0)
    checkpoint_every: int = opt(1, ge=1)
    # Problems per step drawn (seeded by step) from the task's problems; None = all of them every
    # step (seed 000 trains and evaluates on the same fixed problems).
    problems_per_step: int | None = opt(None, ge=1)
    # The problems of the last (measurement-only) step when problems_per_step draws per step:
    # "drawn" = its own draw; "step0" = step 0's draw again, so the base student (step 0) and the
    # trained one (last step) are measured on the same instances (seed 002's diagnosis).
    measure_problems: Literal["drawn", "step0"] = "drawn"
    # method schedules (seed 003; see hpcdistill.distill.schedules)
    switch_step: int = opt(50, ge=0)  # hybrid: off-policy before this step
    seed_tokens_start: int = opt(20, ge=0)  # teacher_seeded: prefix tokens at step 0 ...
    seed_decay_steps: int = opt(50, ge=0)  # ... decaying linearly to 0 over this many steps
    off_policy_weight: float = opt(0.3, ge=0, le=1)  # mixture: 0.3 off + 0.7 on per step
    replay_every: int = opt(10, ge=1)  # replay_buffer: inject off-policy teacher data every k steps:
    replay_size: int = opt(64, ge=1)  # at most this many teacher sequences, on a seeded sample of past problems
    replay_weight: float = opt(1.0, ge=0)
    kl_anchor_beta: float = opt(0.1, ge=0)  # kl_anchored: beta * KL(current || initial student)
    reverse_steps: int = opt(30, ge=0)  # reverse_curriculum: off-policy for the last N steps
    save_model: bool = False  # save the final student as a model directory (RunPaths.model)
    lora: LoraSpec = field(default_factory=LoraSpec)


@dataclass(frozen=True)
class TrainerSpec:
    """Where and how the student is trained (docs/trainer.md). Not science: the same run under
    another strategy computes the same update (up to float reduction order) and has the same id."""

    strategy: Literal["single", "deepspeed", "fsdp"] = "single"
    zero_stage: int = opt(2, ge=1, le=3)  # deepspeed only
    nproc: int = opt(2, ge=1)  # ranks on the CPU (gloo); on GPUs one rank per trainer device
    # The memory-bounded step (docs/trainer.md, "Micro-batches"): each rank's items are packed into
    # micro-batches of at most this many forward tokens (rows x longest row, padding included),
    # one backward each, one optimizer step per step; an item longer than this is a micro-batch
    # of its own. The loss and its gradient equal the whole batch's.
    micro_batch_tokens: int = opt(8192, ge=1)
    # The compute path of scoring and of the loss: "auto" = the fused Triton kernels on CUDA where
    # they compute what the spec asks (docs/gpu-kernels.md), else the chunked torch path;
    # "torch" = always the chunked torch path (the reference).
    kernels: Literal["auto", "torch"] = "auto"
    # Recompute each decoder layer's activations in backward (transformers' gradient
    # checkpointing): the decoder's memory per micro-batch from one layer's, at ~1/3 more compute.
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class MaskSpec:
    kind: Literal["full", "first_half", "last_half", "first_fraction", "last_fraction",
                  "fixed_prefix", "release", "random_release", "std_release"] = "full"
    fraction: float = opt(0.5, gt=0, le=1)
    prefix_tokens: int = opt(1024, ge=1)
    # Loss-mass rescale of the kept tokens (x T / kept). None = each seed's own reading: on for seed
    # 002's prefix and release kinds ("rescale the retained prefix to preserve the per-sample loss
    # mass"), off for full and seed 000's windows (experiment 4 does not rescale its half windows).
    rescale: bool | None = None
    # student top-K for the release margin (None = scoring.top_k); at most scoring.top_k, which is
    # what scoring records
    support_k: int | None = opt(None, ge=2)
    # random_release: permute the release points (token positions, the seed's reading) or the
    # kept fractions of the rollouts' lengths
    random_release_by: Literal["position", "fraction"] = "position"
    # Sentence segments (release rule, std_release, recorded segment_id): NLTK Punkt plus a break
    # after every newline run (true), or Punkt alone (false: a bare newline never splits). The
    # newline breaks add segments, i.e. raise the n of the BIC test (docs/objectives.md).
    segment_newlines: bool = True


@dataclass(frozen=True)
class EvalSpec:
    every: int = opt(0, ge=0)  # 0 = no periodic eval; else at step 0, every k steps and the last
    temperatures: list[float] = field(default_factory=lambda: [1.0])
    samples: int = opt(1, ge=1)
    split: str | None = None  # None = the training problems (seed 000); else this split of the task
    num_problems: int | None = opt(None, ge=1)  # None = task.num_problems
    max_new_tokens: int | None = opt(None, ge=1)  # None = rollout.max_new_tokens
    # Several benchmarks instead of the single set above (seed 002 section 4.1, appendix A.6): each
    # [[eval.benchmarks]] table is one set with its own samples per problem, reported as
    # eval/<name>/reward@T and passed@T, plus eval/avg/... (= eval/reward@T) over those with
    # average = true. [] = the single set (eval.split / eval.num_problems).
    benchmarks: list[BenchmarkSpec] = field(default_factory=list)


@dataclass(frozen=True)
class BenchmarkSpec:
    """One evaluation benchmark of `eval.benchmarks` (a task source, hpcdistill.tasks.math_sources)."""

    source: str  # aime25 | hmmt25_feb | hmmt25_nov | math500 | minerva | gpqa | ... | <key>:<file> | path.jsonl
    name: str | None = opt(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # None = the source key / file stem
    samples: int | None = opt(None, ge=1)  # samples per problem; None = eval.samples
    split: str | None = None  # None = the source's default split (a benchmark's only one)
    num_problems: int | None = opt(None, ge=1)  # None = every problem of the benchmark
    average: bool = True  # counted in eval/avg (seed 002 reports GPQA apart: average = false)

    @property
    def label(self) -> str:
        """The name in metric keys: `name`, else the source key ("aime25", "aime25:/x.jsonl") or
        the stem of a bundled-format file."""
        if self.name:
            return self.name
        key, sep, _ = self.source.partition(":")
        if sep and "/" not in key:
            return key
        if self.source.endswith(".jsonl") or "/" in self.source:
            return self.source.rstrip("/").rsplit("/", 1)[-1].removesuffix(".jsonl")
        return self.source


@dataclass(frozen=True)
class SweepSpec:
    grid: dict[str, list[Any]] = field(default_factory=dict)  # cartesian product
    zip: dict[str, list[Any]] = field(default_factory=dict)  # aligned lists, varied together


@dataclass(frozen=True)
class GpuSpec:
    rollout: int = opt(0, ge=0)
    teacher: int = opt(0, ge=0)
    trainer: int = opt(0, ge=0)


@dataclass(frozen=True)
class ContainerSpec:
    image: str
    binds: list[str] = field(default_factory=list)
    pass_env: list[str] = field(default_factory=list)  # names only; values never written anywhere
    nv: bool = True
    cleanenv: bool = True
    extra_args: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LaunchSpec:
    executor: Literal["local", "slurm", "debug"] = "local"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = opt("01:00:00", pattern=r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")
    constraint: str | None = None
    array_parallelism: int = opt(16, ge=1)
    cpus_per_task: int | None = opt(None, ge=1)
    mem_gb: float | None = opt(None, gt=0)
    gpus: GpuSpec = field(default_factory=GpuSpec)
    # Nodes per run, one Slurm task each: the trainer ranks span them (deepspeed/fsdp); each gets
    # `gpus`, rollout and teacher run on node 0 (docs/trainer.md, "Several nodes")
    nodes: int = opt(1, ge=1)
    # Where a frozen teacher runs (docs/trainer.md, "The teacher role"): auto = its own process on
    # the launch.gpus.teacher devices when there are any, else inside the trainer; always = its own
    # process, on the CPU too; never = inside every trainer rank. Not science: the same scores.
    teacher_process: Literal["auto", "always", "never"] = "auto"
    container: ContainerSpec | None = None
    pass_env: list[str] = field(default_factory=list)  # variables a task needs, by name
    setup: list[str] = field(default_factory=list)  # shell lines before the task (module load ...)
    max_runs: int = opt(1000, ge=1)
    max_array_size: int | None = opt(None, ge=1)  # None = ask Slurm (MaxArraySize)
    gpu_hour_price: float = opt(0.0, ge=0)  # for cost accounting (seed 003's cost tables), per GPU-hour
    # ... or per wall-clock hour of a run, all its GPUs included, by model.student (seed 003 prices a
    # run-hour: ~$0.75 Qwen, ~$1.00 Llama); a listed student's runs use this instead of gpu_hour_price
    run_hour_price: dict[str, float] = field(default_factory=dict)
    slurm_extra: dict[str, Any] = field(default_factory=dict)  # more sbatch options


@dataclass(frozen=True)
class LogSpec:
    """Where rank 0 reports each step's metrics while the run trains (hpcdistill.train.tracking,
    docs/tracking.md). Not science: the same run logged elsewhere has the same id."""

    # jsonl: RUN_DIR/metrics.jsonl (what `hpcdistill status --watch` reads); tensorboard: scalars in
    # RUN_DIR/tensorboard/; wandb: one W&B run per run. wandb and tensorboard: pip install 'hpcdistill[track]'
    backends: list[Literal["jsonl", "wandb", "tensorboard"]] = field(default_factory=lambda: ["jsonl"])
    project: str | None = None  # W&B project; None = experiment.name
    entity: str | None = None  # W&B entity (team or user); None = the account's default
    # offline: W&B writes under RUN_DIR/wandb/ and needs no network or key (`wandb sync` uploads later)
    mode: Literal["offline", "online"] = "offline"


@dataclass(frozen=True)
class Spec:
    experiment: ExperimentSpec
    model: ModelSpec = field(default_factory=ModelSpec)
    task: TaskSpec = field(default_factory=TaskSpec)
    rollout: RolloutSpec = field(default_factory=RolloutSpec)
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    scoring: ScoringSpec = field(default_factory=ScoringSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    mask: MaskSpec = field(default_factory=MaskSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    probe: ProbeSpec = field(default_factory=ProbeSpec)
    loop: LoopSpec = field(default_factory=LoopSpec)
    sweep: SweepSpec = field(default_factory=SweepSpec)
    launch: LaunchSpec = field(default_factory=LaunchSpec)
    log: LogSpec = field(default_factory=LogSpec)

    @property
    def seeds(self) -> list[int]:
        if self.experiment.seeds is not None:
            return list(self.experiment.seeds)
        return list(range(self.experiment.num_seeds or 1))


# Sections that define what a run computes; the run id hashes these (plus the seed), so the same
# science under another partition or container is the same run and is not redone.
SCIENCE_SECTIONS = ("model", "task", "rollout", "teacher", "scoring", "train", "mask", "eval", "probe",
                    "loop")
