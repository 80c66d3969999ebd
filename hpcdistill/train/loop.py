"""The pipeline of one run (DESIGN.md section 2), read top to bottom:

    step 0:  rollout -> feedback -> teacher context -> scoring -> record     (measurement)
    step k:  the same, then mask -> objective -> backward -> clip -> step    (training, issue 4)

Every step ends with its shard written atomically (`RunPaths.shard(step)`); a requeued task skips
the steps whose shard exists, so a preempted run never duplicates or drops a step.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import hpcdistill
from hpcdistill.distill import contexts
from hpcdistill.distill.segments import sentence_segments
from hpcdistill.devices import RoleDevices
from hpcdistill.rundir import RunPaths
from hpcdistill.models.chat import render_prompt, set_chat_options
from hpcdistill.models.generation import generate
from hpcdistill.models.loading import ModelHandle, load_model, tiny_random_model
from hpcdistill.models.parity import check_template_parity
from hpcdistill.models.scoring import TokenScores, score_rollouts
from hpcdistill.models.teachers import self_teacher
from hpcdistill.record import ShardWriter
from hpcdistill.spec.load import content_hash, dump_toml, spec_to_dict
from hpcdistill.spec.schema import BUNDLED_MODEL, Spec
from hpcdistill.tasks import Problem, Verdict, get_task

log = logging.getLogger(__name__)

TINY_PREFIX = "tiny-random:"


@dataclass
class Models:
    student: ModelHandle
    teacher: ModelHandle  # the same object as `student` when model.teacher = "same"
    rollout_server: Any = None  # a VLLMServer when rollout.backend = "vllm" (rank 0 only)
    trainer: Any = None  # the student's `train.distributed.Trainer` while training; None = measurement
    policy_lag: Any = None  # a train.policy_lag.PolicyLag when rollout.policy_lag > 0 (training only)

    @property
    def weight_version(self) -> int | None:
        """The weights the rollout engine samples with (the server's version, or the lagged version
        the in-process sampler last used), if it tracks one."""
        if self.rollout_server is not None:
            return self.rollout_server.weight_version
        lag = self.policy_lag
        return None if lag is None or not lag.in_process else lag.sampled_version

    def behaviour_weights(self, step: int):
        """Around a step's rollout sampling: the student holds the weights that step samples with
        (`rollout.policy_lag` on the in-process backend; vLLM's server already serves them)."""
        if self.policy_lag is None or not self.policy_lag.in_process:
            return contextlib.nullcontext()
        return self.policy_lag.sampling(self.student.model, step)

    @property
    def world_size(self) -> int:
        return 1 if self.trainer is None else self.trainer.world_size

    def full_parameters(self):
        """Context for forwards that call the decoder body directly (scoring): under FSDP or
        ZeRO-3 the student's parameters are gathered there; a no-op otherwise."""
        return contextlib.nullcontext() if self.trainer is None else self.trainer.full_parameters()


def save_for_serving(model, tokenizer, directory: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """The student's current weights as a folder vLLM can serve and reload, written atomically.

    Tied input/output embeddings are written untied (lm_head.weight a copy of the embedding, the
    config saying so): vLLM's in-place weight reload updates the embedding but not a tied lm_head
    (measured: a 0.9-nat sampler/trainer gap after one reload), so the served model must not tie.
    `state`: the whole model's weights when `model` is sharded (FSDP, ZeRO-3: `Trainer.full_state_dict`).
    """
    import copy
    import shutil

    from safetensors.torch import save_file

    if state is not None:
        output = model.get_output_embeddings().weight
        name = next(n for n, p in model.named_parameters(remove_duplicate=False) if p is output)
        state = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
        state["lm_head.weight"] = state[name].clone()
    else:
        if hasattr(model, "merge_and_unload"):  # LoRA: serve the merged weights
            model = copy.deepcopy(model).merge_and_unload()
        state = {name: tensor.detach().to("cpu").clone().contiguous() for name, tensor in model.state_dict().items()}
        state["lm_head.weight"] = model.get_output_embeddings().weight.detach().to("cpu").clone().contiguous()
    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = False
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def serve_student_weights(models: Models, paths: RunPaths) -> Path | None:
    """The student's current weights in `rollout_weights/`, for the rollout server.

    Every trainer rank calls (gathering FSDP / ZeRO-3 weights is collective); rank 0 writes and
    gets the folder, the other ranks None.
    """
    trainer = models.trainer
    state = trainer.full_state_dict() if trainer is not None and trainer.shards_parameters else None
    if trainer is not None and not trainer.is_main:
        return None
    return save_for_serving(models.student.model, models.student.tokenizer, paths.rollout_weights,
                            state=state)


@contextlib.contextmanager
def rollout_engine(spec: Spec, models: Models, paths: RunPaths):
    """Start the rollout role's engine for the run (vLLM's server) and stop it on every exit.

    Over several trainer ranks only rank 0 runs the server; `sample_student` sends its samples
    to the other ranks.
    """
    if spec.rollout.backend != "vllm":
        yield models
        return
    from hpcdistill.models.vllm_backend import VLLMServer, resolve_vllm_python

    served = serve_student_weights(models, paths)
    if served is None:  # not rank 0
        yield models
        return
    server = VLLMServer(served, python=resolve_vllm_python(spec.rollout.vllm_python),
                        dtype="float32" if spec.model.dtype == "float32" else spec.model.dtype,
                        max_logprobs=max(20, spec.scoring.top_k), log_path=paths.vllm_log,
                        startup_timeout_s=spec.rollout.vllm_startup_timeout_s)
    with server:
        models.rollout_server = server
        try:
            yield models
        finally:
            models.rollout_server = None


def sample_student(spec: Spec, models: Models, prompts: list[list[int]], *, seed: int,
                   prefixes: list[list[int]] | None = None, temperature: float | None = None,
                   n: int | None = None, max_new_tokens: int | None = None) -> list[list[Any]]:
    """The student's rollouts on the rollout backend: transformers in process, or vLLM's server."""
    ro = spec.rollout
    kwargs = dict(n=n or ro.samples_per_problem, max_new_tokens=max_new_tokens or ro.max_new_tokens,
                  temperature=ro.temperature if temperature is None else temperature, top_p=ro.top_p,
                  top_k=ro.top_k, seed=seed, prefix_ids=prefixes)
    if ro.backend == "vllm" and models.world_size > 1:  # rank 0 samples, every rank trains on it
        import torch.distributed as dist

        from hpcdistill.models.vllm_backend import generate_vllm

        out = [generate_vllm(models.rollout_server, prompts, stop_token_ids=models.student.stop_token_ids,
                             **kwargs) if models.rollout_server is not None else None]
        dist.broadcast_object_list(out, src=0)
        return out[0]
    if models.rollout_server is not None:
        from hpcdistill.models.vllm_backend import generate_vllm

        return generate_vllm(models.rollout_server, prompts,
                             stop_token_ids=models.student.stop_token_ids, **kwargs)
    return generate(models.student, prompts, batch_size=ro.batch_size, **kwargs)


def resolve_device(spec: Spec, roles: RoleDevices) -> str:
    if spec.model.device != "auto":
        return spec.model.device
    return "cuda" if (torch.cuda.is_available() and not roles.on_cpu) else "cpu"


def _load(model_id: str, spec: Spec, device: str) -> ModelHandle:
    if model_id.startswith(TINY_PREFIX):
        # A randomly initialised small Llama with the bundled tokenizer: for tests of the launch
        # path that need a real model but not a good one. "tiny-random:<seed>".
        bundled = load_model(BUNDLED_MODEL, dtype="float32", device="cpu")
        seed = int(model_id[len(TINY_PREFIX):] or 0)
        handle = tiny_random_model(seed=seed, tokenizer=bundled.tokenizer)
    else:
        handle = load_model(model_id, dtype=spec.model.dtype, device=device)
    # every prompt this handle renders passes the run's template variables (Qwen3's thinking switch)
    set_chat_options(handle.tokenizer, enable_thinking=spec.model.enable_thinking)
    return handle


def load_models(spec: Spec, roles: RoleDevices) -> Models:
    """The student and the teacher: the student itself, a self-teacher made from its weights
    (`teacher.weights`; before any update they equal the student, so measurement runs share it),
    or a separate frozen model."""
    device = resolve_device(spec, roles)
    student = _load(spec.model.student, spec, device)
    if spec.model.teacher in ("same", spec.model.student):
        weights = spec.teacher.weights if spec.train.steps > 0 else "live"
        return Models(student, self_teacher(weights, student, mix=spec.teacher.trust_region_mix))
    return Models(student, _load(spec.model.teacher, spec, device))


def load_reference_model(spec: Spec, models: Models, model_id: str) -> torch.nn.Module:
    """A named frozen reference model (ExOPD's `train.exopd_reference`) on the student's device;
    it must share the student's tokenizer, since it scores the student's token ids."""
    handle = _load(model_id, spec, str(models.student.device))
    if handle.tokenizer is not None and models.student.tokenizer is not None and \
            handle.tokenizer.get_vocab() != models.student.tokenizer.get_vocab():
        raise ValueError(f"train.exopd_reference = {model_id!r} has another vocabulary than model.student = "
                         f"{spec.model.student!r}; the reference scores the student's tokens, so it needs the "
                         "student's tokenizer")
    return handle.model.eval()


def check_parity(spec: Spec, models: Models, problems: list[Problem]) -> None:
    """Stop before anything runs if the two sides' chat templates would misalign positions
    (models.parity); probes the teacher context of the first problem with a placeholder feedback."""
    if not problems or models.student.tokenizer is None:
        return
    problem = problems[0]
    verdict = Verdict(0.0, False, "placeholder feedback", {})
    student = contexts.student_messages(problem, spec.rollout.system_prompt)
    if spec.teacher.context == "regen":
        teacher = contexts.regen_messages(problem, "placeholder attempt", verdict, spec.teacher)
    else:
        teacher = contexts.teacher_contexts([problem, problem], ["placeholder attempt"] * 2,
                                            [verdict, Verdict(1.0, True, "", {})], spec.teacher,
                                            spec.rollout.system_prompt)[0].messages
    check_template_parity(models.student.tokenizer, models.teacher.tokenizer or models.student.tokenizer,
                          student, teacher, student_name=spec.model.student,
                          teacher_name=spec.model.student if spec.model.teacher == "same" else spec.model.teacher)


def step_seed(seed: int, step: int, stream: int) -> int:
    """A distinct, reproducible sampling seed per (run seed, step, stream)."""
    return (seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**31 - 1)


def token_sets(spec: Spec, tokenizer) -> dict[str, list[int]]:
    """Vocabulary ids of the backtracking words (seed 000 exp. 5), when full-vocab scoring is on."""
    if not spec.scoring.full_vocab or not spec.scoring.backtrack_words:
        return {}
    words = {w.strip().lower() for w in spec.scoring.backtrack_words}
    ids = [i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip().lower() in words]
    return {"backtrack": ids}


def shard_columns(spec: Spec) -> dict[str, str]:
    """Extra per-token columns this spec records (registered with the shard writer)."""
    columns = {"sampler_gap": "rollout engine's log p of the sampled token minus the trainer's "
                              "recomputation (nats); original rollouts only"}
    if spec.scoring.full_vocab and spec.scoring.backtrack_words:
        words = ", ".join(repr(w) for w in spec.scoring.backtrack_words)
        columns |= {f"{side}_mass_backtrack": f"{side}'s probability mass on backtracking tokens ({words})"
                    for side in ("student", "teacher")}
    return columns


def shard_attrs(spec: Spec, paths: RunPaths, models: Models, step: int) -> dict[str, Any]:
    data = spec_to_dict(spec)
    return {
        "spec_toml": dump_toml(data),
        "spec_hash": content_hash(data),
        "run_id": paths.run_id,
        "experiment": spec.experiment.name,
        "seed": spec.seeds[0],
        "step": step,
        "package_version": hpcdistill.__version__,
        "student_model": spec.model.student,
        "teacher_model": spec.model.teacher,
        "tokenizer": getattr(models.student.tokenizer, "name_or_path", "") or spec.model.student,
        "task": spec.task.name,
        "teacher_context": spec.teacher.context,
        "teacher_weights": spec.teacher.weights if spec.model.teacher == "same" else "frozen",
    }


@dataclass
class Item:
    """One recorded rollout of a step: what the shard stores, plus what training needs."""

    problem: Problem
    sample_idx: int
    kind: str  # original | regenerated
    student_seq: tuple[list[int], list[int]]  # (prompt_ids, response_ids) the student is scored on
    teacher_seq: tuple[list[int], list[int]]  # (prompt_ids, response_ids) the teacher is scored on
    generation: Any  # hpcdistill.models.generation.Generation of the recorded response
    text: str
    verdict: Verdict
    scores: TokenScores

    weight_version: int | None = None  # the rollout engine's weights; None = the step's
    demonstration: int = -1  # teacher.context = "demonstration": the sibling shown (-1 = none)
    teacher_signal: bool = True  # False: the teacher had nothing to teach from; not trained on
    train_loss: np.ndarray | None = None  # [T] the token's loss term, once the step trained on it

    def row(self, seed: int, step: int) -> dict[str, Any]:
        return {
            "problem_id": self.problem.problem_id,
            "sample_idx": self.sample_idx,
            "step": step,
            "kind": self.kind,
            "reward": float(self.verdict.reward),
            "seed": seed,
            "weight_version": step if self.weight_version is None else self.weight_version,
            "response_text": self.text,
            "feedback": self.verdict.feedback,
            "demonstration": int(self.demonstration),
            "teacher_signal": int(self.teacher_signal),
        }

    def tokens(self, teacher_topk: bool = True) -> dict[str, np.ndarray]:
        """The shard's token columns; `teacher_topk` (scoring.teacher_topk): the teacher's own
        top-k and the student's log-probs there, [T, k] each."""
        s = self.scores
        n = len(s.student_lp)
        out = {
            "ids": np.asarray(self.generation.response_ids[:n], dtype=np.int32),
            "student_lp": s.student_lp,
            "teacher_lp": s.teacher_lp,
            "student_topk_ids": s.student_topk_ids,
            "student_topk_lp": s.student_topk_lp,
            "teacher_at_student_topk_lp": s.teacher_at_student_topk_lp,
            "topk_kl": s.topk_kl,
            "entropy_s": s.entropy_s,
            "entropy_t": s.entropy_t,
            "student_topk_mass": s.student_topk_mass,
            "teacher_topk_mass": s.teacher_topk_mass,
            "teacher_mass_at_student_topk": s.teacher_mass_at_student_topk,
            "student_mass_at_teacher_topk": s.student_mass_at_teacher_topk,
            "topk_overlap": s.topk_overlap,
        }
        if teacher_topk:
            out |= {"teacher_topk_ids": s.teacher_topk_ids, "teacher_topk_lp": s.teacher_topk_lp,
                    "student_at_teacher_topk_lp": s.student_at_teacher_topk_lp}
        if s.full_kl is not None:
            out["full_kl"] = s.full_kl
        if self.train_loss is not None:
            out["train_loss"] = np.asarray(self.train_loss, dtype=np.float32)
        out.update(s.token_mass or {})
        if self.kind == "original":
            out["sampler_lp"] = np.asarray(self.generation.sampler_lp[:n], dtype=np.float32)
            out["sampler_gap"] = self.sampler_gap()
        return out

    def sampler_gap(self) -> np.ndarray:
        """[T] the rollout engine's log p of each sampled token minus the trainer's recomputation:
        ~0 when both run the same weights; a weight-sync or numerics mismatch shows here."""
        n = len(self.scores.student_lp)
        return np.asarray(self.generation.sampled_lp[:n], dtype=np.float32) - self.scores.student_lp


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
    gens = generate(models.teacher, teacher_generation_prompts(spec, models, problems), n=1,
                    max_new_tokens=num_tokens, temperature=spec.teacher.temperature,
                    top_p=spec.teacher.top_p, seed=step_seed(spec.seeds[0], step, 2),
                    batch_size=spec.rollout.batch_size)
    stops = set(models.teacher.stop_token_ids)
    # A prefix that already ended its answer would leave the student nothing to write: cut the stop.
    return [[int(t) for t in g[0].response_ids if int(t) not in stops] for g in gens]


def collect_teacher_completions(spec: Spec, models: Models, problems: list[Problem], step: int,
                                seed_stream: int = 3) -> tuple[list[Item], dict[str, float]]:
    """Off-policy data: teacher completions, trained on under the STUDENT's prompt (SFT)."""
    task = get_task(spec.task.name)
    tok = models.student.tokenizer
    ro, sc = spec.rollout, spec.scoring
    teacher_prompts = teacher_generation_prompts(spec, models, problems)
    student_prompts = [render_prompt(tok, contexts.student_messages(p, ro.system_prompt)) for p in problems]
    t0 = time.monotonic()
    gens = generate(models.teacher, teacher_prompts, n=ro.samples_per_problem,
                    max_new_tokens=ro.max_new_tokens, temperature=spec.teacher.temperature,
                    top_p=spec.teacher.top_p, seed=step_seed(spec.seeds[0], step, seed_stream),
                    batch_size=ro.batch_size)
    seconds = time.monotonic() - t0
    items = []
    for p, sp, tp, samples in zip(problems, student_prompts, teacher_prompts, gens):
        for i, g in enumerate(samples):
            text = tok.decode(g.response_ids, skip_special_tokens=True)
            verdict = task.verify(p, text, timeout_s=spec.task.timeout_s, memory_mb=spec.task.memory_mb)
            response = [int(t) for t in g.response_ids]
            items.append(Item(p, i, "teacher", (list(sp), response), (list(tp), response), g, text, verdict, None))
    with models.full_parameters():
        scores = score_rollouts(models.student, models.teacher, [it.student_seq for it in items],
                                [it.teacher_seq for it in items], top_k=sc.top_k, full_vocab=sc.full_vocab,
                                chunk_size=sc.chunk_size, batch_size=sc.batch_size)
    for item, score in zip(items, scores):
        item.scores = score
    return items, {"teacher_seconds": seconds,
                   "teacher_tokens": float(sum(len(it.student_seq[1]) for it in items)),
                   "teacher_reward_mean": float(np.mean([it.verdict.reward for it in items]))}


def collect_step(spec: Spec, models: Models, problems: list[Problem], step: int,
                 prefixes: list[list[int]] | None = None) -> tuple[list[Item], dict[str, float]]:
    """Rollout, feedback, teacher context and scoring for one step (stages 1-4).

    `prefixes[i]`: teacher-written first tokens of problem i's rollouts (teacher seeding).
    """
    seed = spec.seeds[0]
    task = get_task(spec.task.name)
    tok = models.student.tokenizer
    ro, tc, sc = spec.rollout, spec.teacher, spec.scoring

    # 1. rollout: N samples per problem from the student.
    prompts = [render_prompt(tok, contexts.student_messages(p, ro.system_prompt)) for p in problems]
    t0 = time.monotonic()
    with models.behaviour_weights(step):  # rollout.policy_lag: the weights of step max(0, step - k)
        generations = sample_student(spec, models, prompts, seed=step_seed(seed, step, 0), prefixes=prefixes)
    rollout_s = time.monotonic() - t0
    flat = [(p, i, g) for p, gens in zip(problems, generations) for i, g in enumerate(gens)]
    texts = [tok.decode(g.response_ids, skip_special_tokens=True) for _, _, g in flat]

    # 2. feedback: the task's verifier (sandboxed execution for code).
    verdicts = [task.verify(p, text, timeout_s=spec.task.timeout_s, memory_mb=spec.task.memory_mb)
                for (p, _, _), text in zip(flat, texts)]

    # 3. teacher context, 4. scoring: student on (p, s_<t), teacher on its context + s_<t.
    student_seqs = [(list(g.prompt_ids), [int(t) for t in g.response_ids]) for _, _, g in flat]
    teacher_ctx = contexts.teacher_contexts([p for p, _, _ in flat], texts, verdicts, tc, ro.system_prompt)
    teacher_seqs = [(render_prompt(tok, c.messages), s[1]) for c, s in zip(teacher_ctx, student_seqs)]
    t0 = time.monotonic()
    sets = token_sets(spec, tok)
    with models.full_parameters():  # FSDP / ZeRO-3: the decoder body is called directly
        scores = score_rollouts(models.student, models.teacher, student_seqs, teacher_seqs,
                                top_k=sc.top_k, full_vocab=sc.full_vocab, chunk_size=sc.chunk_size,
                                batch_size=sc.batch_size, token_sets=sets)
    scoring_s = time.monotonic() - t0
    items = [Item(p, i, "original", ss, ts, g, text, v, s, models.weight_version, c.demonstration, c.has_signal)
             for (p, i, g), ss, ts, text, v, s, c in zip(flat, student_seqs, teacher_seqs, texts, verdicts, scores,
                                                        teacher_ctx)]
    metrics = diagnostics_metrics(items) | {
        "reward_mean": float(np.mean([v.reward for v in verdicts])),
        "topk_kl_mean": _token_mean([s.topk_kl for s in scores]),
        "response_tokens": float(sum(len(g.response_ids) for _, _, g in flat)),
        "truncation_rate": float(np.mean([g.finish_reason == "length" for _, _, g in flat])),
        "rollout_seconds": rollout_s,
        "scoring_seconds": scoring_s,
        "scored_tokens": float(sum(len(x) for x in scores)),
    }
    if tc.context == "regen":
        regen_items, regen_metrics = _regenerate(spec, models, items, step)
        items += regen_items
        metrics.update(regen_metrics)
    return items, metrics


def _regenerate(spec: Spec, models: Models, originals: list[Item], step: int
                ) -> tuple[list[Item], dict[str, float]]:
    """SDPO with regeneration (seed 000): the teacher sees p + s + f, writes s', is scored on s'.

    One s' per original rollout s. The student side is the same as for s: its top-k at (p, s_<t);
    the teacher side is (p, s, f, s'_<t); positions align by ordinal t, truncated to the shorter.
    """
    task = get_task(spec.task.name)
    tok = models.student.tokenizer
    ro, tc, sc, seed = spec.rollout, spec.teacher, spec.scoring, spec.seeds[0]
    regen_prompts = [render_prompt(tok, contexts.regen_messages(o.problem, o.text, o.verdict, tc))
                     for o in originals]
    regens = generate(models.teacher, regen_prompts, n=1,
                      max_new_tokens=tc.max_new_tokens or ro.max_new_tokens,
                      temperature=tc.temperature, top_p=tc.top_p, top_k=ro.top_k,
                      seed=step_seed(seed, step, 1), batch_size=ro.batch_size)
    regens = [r[0] for r in regens]
    texts = [tok.decode(r.response_ids, skip_special_tokens=True) for r in regens]
    verdicts = [task.verify(o.problem, text, timeout_s=spec.task.timeout_s,
                            memory_mb=spec.task.memory_mb) for o, text in zip(originals, texts)]
    teacher_seqs = [(rp, [int(t) for t in r.response_ids]) for rp, r in zip(regen_prompts, regens)]
    with models.full_parameters():
        scores = score_rollouts(models.student, models.teacher, [o.student_seq for o in originals],
                                teacher_seqs, top_k=sc.top_k, full_vocab=sc.full_vocab,
                                chunk_size=sc.chunk_size, batch_size=sc.batch_size,
                                token_sets=token_sets(spec, tok))
    items = [Item(o.problem, o.sample_idx, "regenerated", o.student_seq, ts, r, text, v, s)
             for o, ts, r, text, v, s in zip(originals, teacher_seqs, regens, texts, verdicts, scores)]
    return items, {
        "regen_reward_mean": float(np.mean([v.reward for v in verdicts])),
        "regen_topk_kl_mean": _token_mean([s.topk_kl for s in scores]),
    }


def diagnostics_metrics(items: list[Item]) -> dict[str, float]:
    """The step's teaching-signal diagnostics (`diag/`), token means over the items' scores:
    top-k mass of each side, overlap of the two top-k sets, |sampler - trainer| log-prob gap, the
    top-k KL's error against the full KL (when recorded), and the demonstration / signal rates."""
    scores = [it.scores for it in items if len(it.scores)]
    if not scores:
        return {}
    out = {f"diag/{name}": _token_mean([getattr(s, name) for s in scores]) for name in
           ("student_topk_mass", "teacher_topk_mass", "teacher_mass_at_student_topk",
            "student_mass_at_teacher_topk", "topk_overlap")}
    out["diag/sampler_gap_abs"] = _token_mean([np.abs(it.sampler_gap()) for it in items if len(it.scores)])
    if all(s.full_kl is not None for s in scores):
        out["diag/topk_kl_error"] = _token_mean([s.topk_kl - s.full_kl for s in scores])
    out["diag/demonstration_rate"] = float(np.mean([it.demonstration >= 0 for it in items]))
    out["diag/teacher_signal_rate"] = float(np.mean([it.teacher_signal for it in items]))
    return out


def segment_ids(tokenizer, ids: np.ndarray, newlines: bool = True) -> np.ndarray:
    """Sentence segment of each response token (NLTK-style, seed 002), as int32 [T];
    `newlines`: also break after newline runs (`mask.segment_newlines`)."""
    segments = sentence_segments([tokenizer.decode([int(t)]) for t in ids], newlines)
    out = np.zeros(len(ids), dtype=np.int32)
    for number, positions in enumerate(segments):
        out[positions] = number
    return out


def write_items(writer, items: list[Item], seed: int, step: int, tokenizer=None,
                masks: dict[int, np.ndarray] | None = None, teacher_topk: bool = True,
                segment_newlines: bool = True) -> None:
    """Stage 5: one shard row per item; `masks[i]` (supervision weights) joins item i's tokens."""
    for index, item in enumerate(items):
        tokens = item.tokens(teacher_topk)
        if masks is not None and index in masks:
            tokens["mask"] = np.asarray(masks[index], dtype=np.float32)
        row = item.row(seed, step)
        if tokenizer is not None:
            prompt = item.teacher_seq[0] if item.kind == "regenerated" else item.student_seq[0]
            row["prompt_text"] = tokenizer.decode(prompt)
            row["teacher_prompt_text"] = tokenizer.decode(item.teacher_seq[0])
            if item.kind == "original" and len(tokens["ids"]):
                tokens["segment_id"] = segment_ids(tokenizer, tokens["ids"], segment_newlines)
        writer.append(row, tokens)


def _token_mean(arrays: list[np.ndarray]) -> float:
    total = sum(float(np.sum(a)) for a in arrays)
    count = sum(len(a) for a in arrays)
    return total / count if count else float("nan")


def load_problems(spec: Spec) -> list[Problem]:
    # The problem set is the same for every seed of a sweep (seed 000 trains and evaluates on
    # the same fixed problems); the run's seed varies the samples, not the problems.
    task = get_task(spec.task.name)
    return task.load_problems(source=spec.task.source, split=spec.task.split,
                              num_problems=spec.task.num_problems, seed=0)


def load_eval_problems(spec: Spec, train_problems: list[Problem]) -> list[Problem] | dict[str, list[Problem]]:
    """The single eval set, or {benchmark name: problems} with eval.benchmarks (seed 002)."""
    if spec.eval.benchmarks:
        from hpcdistill.train.benchmarks import load_benchmarks

        return load_benchmarks(spec)
    if spec.eval.split is None:
        return train_problems[:spec.eval.num_problems or len(train_problems)]
    task = get_task(spec.task.name)
    return task.load_problems(source=spec.task.source, split=spec.eval.split,
                              num_problems=spec.eval.num_problems or spec.task.num_problems, seed=0)


def run_pipeline(spec: Spec, paths: RunPaths, roles: RoleDevices) -> dict[str, Any]:
    """Run every step of one run whose shard is not yet written; returns a small summary."""
    if spec.train.steps > 0:
        from hpcdistill.train.steps import run_training

        return run_training(spec, paths, roles)
    problems = load_problems(spec)
    shard = paths.shard(0)
    if shard.exists():
        log.info("step 0 already recorded in %s; skipping", shard)
        return {"steps_done": 1, "skipped": [0]}
    models = load_models(spec, roles)
    check_parity(spec, models, problems)
    paths.shards.mkdir(parents=True, exist_ok=True)
    with rollout_engine(spec, models, paths), \
            ShardWriter(shard, attrs=shard_attrs(spec, paths, models, 0), top_k=spec.scoring.top_k,
                        token_columns=shard_columns(spec)) as writer:
        items, metrics = collect_step(spec, models, problems, 0)
        write_items(writer, items, spec.seeds[0], 0, models.student.tokenizer,
                    teacher_topk=spec.scoring.teacher_topk, segment_newlines=spec.mask.segment_newlines)
        writer.add_metrics(0, metrics)
    log.info("step 0: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return {"steps_done": 1, "metrics": metrics}


__all__ = ["run_pipeline", "collect_step", "write_items", "load_models", "load_problems", "Item"]
