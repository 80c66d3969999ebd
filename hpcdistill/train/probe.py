"""The lock/fork probe run of seed 001: carriers -> positions -> both models' distributions -> shard.

`run_probe(spec, out_dir)` (the spec checked by `hpcdistill.spec.command_rules.check_probe_spec`):
1. Carriers (seed 001, "The probing mechanism"; `hpcdistill.train.probe_carriers`): prompt+response
   pairs, either the original/eval rollouts recorded in the shards under `probe.carriers`, or, when
   none are named, responses generated fresh by both models on the task's problems and verified;
   `probe.num_carriers` of them, drawn seeded and stratified by `probe.stratify`.
2. Positions per carrier: every `regular_every`-th position, the positions where a
   `heuristic_tokens` string starts in the decoded response (plus `heuristic_window` after it), and
   `random_positions` random ones on top; at most `max_positions` (seeded subsample).
3. One forward pass of each model (base = `model.student`, trained = `probe.trained_model`; one
   tokenizer required) per carrier; at each position and each probe temperature T the full
   next-token distributions log_softmax(logits / T) give the statistics and classes of
   `hpcdistill.models.lockfork`.
4. Results go to one shard, `RunPaths(out_dir).shard(0)` (`out_dir/shards/step_000000.h5`), written
   atomically by `ShardWriter`; an existing shard is kept and returned (a requeued task redoes nothing).

The probe shard (docs/shard-format.md, schema 1.0, kind = "probe"): one rollout row per
(carrier, temperature) whose tokens are the PROBED POSITIONS only, in order. "student" is the base
model, "teacher" the trained model, both at the row's temperature:

    tokens/ids                         the carrier's response token at the position
    tokens/student_lp, teacher_lp      base / trained log-prob of that token
    tokens/student_topk_ids, _lp       the base model's top-k (k = probe.top_k) and its log-probs
    tokens/teacher_at_student_topk_lp  the trained model at the base top-k ids (column 0: at the base top-1)
    tokens/teacher_topk_ids, _lp       the trained model's own top-k
    tokens/topk_kl, full_kl            KL(base || trained) over the base top-k slice / the full vocabulary
    tokens/entropy_s, entropy_t        full-vocabulary entropies (nats)
    extra float32 token columns        position, char_offset (in response_text), source (bits: 1 regular,
                                       2 heuristic, 4 random), {base,trained}_nucleus_size,
                                       {base,trained}_tail_mass, {base,trained}_trunc_size,
                                       base_trunc_top1, trained_trunc_at_base_top1,
                                       {base,trained}_trunc_entropy, base_class, trained_class
                                       (0 lock, 1 fork, 2 diffuse), lock_subcategory (0 strict, 1 swap,
                                       2 self-correction, 3 loosened, -1 none), fork_subcategory
                                       (0 preserved, 1 collapsed, 2 diffused, -1 none), self_correction (0/1)
    rollouts/problem_id, reward        the carrier's problem and reward (NaN when not scored)
    rollouts/sample_idx                the carrier's index in this probe
    rollouts/prompt_text, response_text  the carrier (response_text = the per-token decoded pieces, joined)
    extra rollout columns              probe_temperature (float), generator (str), carrier_source (str),
                                       length_bin (int), token_text (JSON {id: decoded text} of every
                                       token in either model's top-5, for the rank tables)
    attrs                              spec_toml, spec_hash, run_id, student_model (base),
                                       teacher_model (trained), tokenizer, probe_trained_label, ...
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import hpcdistill
from hpcdistill.distill.divergence import kl_from_logprobs, slice_kl
from hpcdistill.errors import ModelError
from hpcdistill.models import lockfork
from hpcdistill.models.chat import set_chat_options
from hpcdistill.models.loading import ModelHandle, load_model
from hpcdistill.models.scoring import project, response_hidden
from hpcdistill.record import ShardWriter
from hpcdistill.rundir import RunPaths
from hpcdistill.spec.command_rules import check_probe_spec
from hpcdistill.spec.load import content_hash, dump_toml, spec_to_dict
from hpcdistill.spec.schema import ProbeSpec, Spec
from hpcdistill.train.probe_carriers import Carrier, carriers_from_shards, generate_carriers

log = logging.getLogger(__name__)

REGULAR, HEURISTIC, RANDOM = 1, 2, 4  # bits of tokens/source
POSITION_CHUNK = 64  # positions per [chunk, V] statistics pass

TOKEN_COLUMNS = {
    "position": "response position t probed (the distribution over token t given prompt + response[:t])",
    "char_offset": "character offset of the position's token in rollouts/response_text",
    "source": "why the position was probed (bits: 1 regular interval, 2 heuristic token, 4 random)",
    "base_nucleus_size": "base: smallest number of tokens with mass >= probe.top_p",
    "trained_nucleus_size": "trained: smallest number of tokens with mass >= probe.top_p",
    "base_tail_mass": "base: probability mass outside its top-k",
    "trained_tail_mass": "trained: probability mass outside its top-k",
    "base_trunc_size": "base: tokens kept by top-k then top-p truncation",
    "trained_trunc_size": "trained: tokens kept by top-k then top-p truncation",
    "base_trunc_top1": "base: top-1 probability after truncation and renormalisation",
    "trained_trunc_at_base_top1": "trained: truncated, renormalised probability of the base top-1 token",
    "base_trunc_entropy": "base: entropy (nats) of the truncated, renormalised distribution",
    "trained_trunc_entropy": "trained: entropy (nats) of the truncated, renormalised distribution",
    "base_class": "base class: 0 lock-like, 1 fork-like, 2 mixed/diffuse",
    "trained_class": "trained class: 0 lock-like, 1 fork-like, 2 mixed/diffuse",
    "lock_subcategory": "base locks: 0 strict lock, 1 swap, 2 self-correction, 3 loosened; -1 otherwise",
    "fork_subcategory": "base forks: 0 preserved, 1 collapsed (trained lock), 2 diffused; -1 otherwise",
    "self_correction": "1 when the position is in a self-correction context, else 0",
}
ROLLOUT_COLUMNS = {
    "probe_temperature": "temperature T applied to both models' logits (log_softmax(logits / T))",
    "generator": "which model generated the carrier (base, trained, or <model>@<step>)",
    "carrier_source": "the shard the carrier was read from, or 'generated'",
    "length_bin": "response-length quantile bin of the carrier (stratification)",
    "token_text": "JSON {token id: decoded text} of the tokens in either model's top-5",
}


# --------------------------------------------------------------------------------------------------
# models


def check_same_tokenizer(base: ModelHandle, trained: ModelHandle) -> None:
    """Distributions are only comparable over one vocabulary: raise ModelError naming both models."""
    if base is trained:
        return
    vocab_b, vocab_t = base.tokenizer.get_vocab(), trained.tokenizer.get_vocab()
    if base.vocab_size != trained.vocab_size or vocab_b != vocab_t:
        differ = sum(1 for tok, i in vocab_b.items() if vocab_t.get(tok) != i) + len(set(vocab_t) - set(vocab_b))
        raise ModelError(
            f"probe: the base model {base.model_id!r} (model.student) and the trained model "
            f"{trained.model_id!r} (probe.trained_model) do not share a tokenizer (output vocab "
            f"{base.vocab_size} vs {trained.vocab_size}, {differ} token ids differ); the probe compares "
            "both distributions over one vocabulary, so the trained model must be a fine-tune of the base")


def load_probe_models(spec: Spec) -> tuple[ModelHandle, ModelHandle]:
    """(base, trained); the same handle twice when both ids are equal (one copy of the weights)."""
    device = spec.model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    base = load_model(spec.model.student, dtype=spec.model.dtype, device=device)
    set_chat_options(base.tokenizer, enable_thinking=spec.model.enable_thinking)
    if spec.probe.trained_model == spec.model.student:
        log.warning("probe.trained_model is model.student (%s): both sides are one model and every "
                    "delta is zero; point probe.trained_model at a trained model directory", base.model_id)
        return base, base
    trained = load_model(spec.probe.trained_model, dtype=spec.model.dtype, device=device)
    set_chat_options(trained.tokenizer, enable_thinking=spec.model.enable_thinking)
    check_same_tokenizer(base, trained)
    return base, trained


# --------------------------------------------------------------------------------------------------
# positions


def _pattern(text: str) -> re.Pattern:
    """A heuristic string as a regex; word-like ends get word boundaries ("Let" not in "Letter")."""
    return re.compile((r"(?<!\w)" if text[:1].isalnum() else "") + re.escape(text)
                      + (r"(?!\w)" if text[-1:].isalnum() else ""))


def select_positions(pieces: list[str], probe: ProbeSpec, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Positions to probe in a response of len(pieces) tokens (pieces = per-token decoded text).

    Returns (positions int64 [P] ascending, source bits int8 [P]): every `regular_every`-th position,
    the token where each `heuristic_tokens` match starts plus `heuristic_window` after it, and
    `random_positions` random others; a seeded subsample of `max_positions` beyond that.
    """
    T = len(pieces)
    source = np.zeros(T, dtype=np.int8)
    if probe.regular_every > 0:
        source[::probe.regular_every] |= REGULAR
    ends = np.cumsum([len(p) for p in pieces])  # char end of each token
    text = "".join(pieces)
    for token in probe.heuristic_tokens:
        if not token:
            continue
        for match in _pattern(token).finditer(text):
            t = int(np.searchsorted(ends, match.start(), side="right"))
            source[t:min(t + probe.heuristic_window + 1, T)] |= HEURISTIC
    free = np.flatnonzero(source == 0)
    if probe.random_positions and len(free):
        source[rng.choice(free, size=min(probe.random_positions, len(free)), replace=False)] |= RANDOM
    positions = np.flatnonzero(source)
    if len(positions) > probe.max_positions:
        positions = np.sort(rng.choice(positions, size=probe.max_positions, replace=False))
    return positions.astype(np.int64), source[positions]


# --------------------------------------------------------------------------------------------------
# distributions at the positions


@torch.inference_mode()
def position_logits(handle: ModelHandle, carrier: Carrier, positions: np.ndarray) -> torch.Tensor:
    """Next-token logits [P, V] (float32) at response positions `positions` of one carrier.

    One forward pass over prompt + response[:max(positions)]; the lm_head only at the positions.
    """
    last = int(positions.max()) + 1
    hidden = response_hidden(handle, [(list(carrier.prompt_ids), list(carrier.response_ids))], [last])  # [last, H]
    index = torch.as_tensor(positions, dtype=torch.long, device=hidden.device)
    return project(handle.model, hidden.index_select(0, index)).float()


@torch.inference_mode()
def compare_distributions(base_logits: torch.Tensor, trained_logits: torch.Tensor, token_ids: np.ndarray,
                          temperature: float, probe: ProbeSpec) -> dict[str, np.ndarray]:
    """Shard token columns (all but the text-dependent ones) at P positions.

    base_logits, trained_logits: [P, V]; token_ids: [P] the carrier's tokens there.
    """
    th = lockfork.Thresholds.from_spec(probe)
    parts: list[dict[str, np.ndarray]] = []
    for c in range(0, len(token_ids), POSITION_CHUNK):
        lb = lockfork.apply_temperature(base_logits[c:c + POSITION_CHUNK], temperature)  # [C, V]
        lt = lockfork.apply_temperature(trained_logits[c:c + POSITION_CHUNK].to(lb.device), temperature)
        sb, qb = lockfork.distribution_stats(lb, top_k=probe.top_k, top_p=probe.top_p)
        st, qt = lockfork.distribution_stats(lt, top_k=probe.top_k, top_p=probe.top_p)
        tok = torch.as_tensor(token_ids[c:c + POSITION_CHUNK], dtype=torch.long, device=lb.device)[:, None]
        ids_b = torch.as_tensor(sb.topk_ids, device=lb.device)  # [C, k]
        base_topk_lp, trained_at = lb.gather(-1, ids_b), lt.gather(-1, ids_b)
        parts.append({
            "ids": token_ids[c:c + POSITION_CHUNK].astype(np.int32),
            "student_lp": lb.gather(-1, tok)[:, 0].cpu().numpy(),
            "teacher_lp": lt.gather(-1, tok)[:, 0].cpu().numpy(),
            "student_topk_ids": sb.topk_ids.astype(np.int32),
            "student_topk_lp": base_topk_lp.cpu().numpy(),
            "teacher_at_student_topk_lp": trained_at.cpu().numpy(),
            "teacher_topk_ids": st.topk_ids.astype(np.int32),
            "teacher_topk_lp": lt.gather(-1, torch.as_tensor(st.topk_ids, device=lb.device)).cpu().numpy(),
            "topk_kl": slice_kl(base_topk_lp, trained_at).cpu().numpy(),
            "full_kl": kl_from_logprobs(lb, lt).cpu().numpy(),
            "entropy_s": sb.entropy, "entropy_t": st.entropy,
            "base_nucleus_size": sb.nucleus_size, "trained_nucleus_size": st.nucleus_size,
            "base_tail_mass": sb.tail_mass, "trained_tail_mass": st.tail_mass,
            "base_trunc_size": sb.trunc_size, "trained_trunc_size": st.trunc_size,
            "base_trunc_top1": sb.trunc_top1,
            "trained_trunc_at_base_top1": qt.gather(-1, ids_b[:, :1])[:, 0].exp().cpu().numpy(),
            "base_trunc_entropy": sb.trunc_entropy, "trained_trunc_entropy": st.trunc_entropy,
            "base_class": lockfork.classify_stats(sb, th), "trained_class": lockfork.classify_stats(st, th),
        })
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def probe_carrier(base: ModelHandle, trained: ModelHandle, carrier: Carrier, probe: ProbeSpec,
                  rng: np.random.Generator) -> list[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """(row columns of the probe, token columns) per probe temperature for one carrier; the row's
    response_text is the per-token decoded pieces joined, so tokens/char_offset indexes into it."""
    tok = base.tokenizer
    pieces = [tok.decode([t]) for t in carrier.response_ids]
    positions, source = select_positions(pieces, probe, rng)
    if len(positions) == 0:
        return []
    starts = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])[positions]  # char offsets
    logits_b = position_logits(base, carrier, positions)
    logits_t = logits_b if trained is base else position_logits(trained, carrier, positions)
    token_ids = np.asarray(carrier.response_ids, dtype=np.int64)[positions]
    text = "".join(pieces)
    out = []
    for temperature in probe.temperatures:
        cols = compare_distributions(logits_b, logits_t, token_ids, temperature, probe)
        shown = np.unique(np.concatenate([cols["student_topk_ids"][:, :lockfork.RANK_TABLE_SIZE].ravel(),
                                          cols["teacher_topk_ids"][:, :lockfork.RANK_TABLE_SIZE].ravel()]))
        token_text = {int(i): tok.decode([int(i)]) for i in shown}
        window = probe.self_correction_window
        self_correction = np.array([
            lockfork.self_correction_context(
                text[max(0, start - window):start],
                [token_text[int(cols["student_topk_ids"][j, 0])], token_text[int(cols["teacher_topk_ids"][j, 0])]],
                probe.self_correction_markers, window)
            for j, start in enumerate(starts)], dtype=bool)
        same_top = cols["student_topk_ids"][:, 0] == cols["teacher_topk_ids"][:, 0]
        cols["lock_subcategory"] = lockfork.lock_subcategory(cols["base_class"], cols["trained_class"],
                                                            same_top, self_correction)
        cols["fork_subcategory"] = lockfork.fork_subcategory(cols["base_class"], cols["trained_class"])
        cols["self_correction"] = self_correction.astype(np.float32)
        cols["position"], cols["char_offset"], cols["source"] = positions, starts, source
        extra = {"probe_temperature": float(temperature), "response_text": text,
                 "token_text": json.dumps(token_text, ensure_ascii=False)}
        out.append((extra, cols))
    return out


# --------------------------------------------------------------------------------------------------
# the run


def probe_attrs(spec: Spec, out_dir: Path, base: ModelHandle, trained: ModelHandle, seed: int) -> dict[str, Any]:
    data = spec_to_dict(spec)
    return {
        "spec_toml": dump_toml(data), "spec_hash": content_hash(data), "run_id": out_dir.name,
        "experiment": spec.experiment.name, "seed": seed, "step": 0,
        "package_version": hpcdistill.__version__,
        "student_model": base.model_id, "teacher_model": trained.model_id,
        "tokenizer": getattr(base.tokenizer, "name_or_path", "") or base.model_id,
        "task": spec.task.name, "probe_trained_label": spec.probe.trained_label,
        "probe_temperatures": [float(t) for t in spec.probe.temperatures],
        "probe_top_k": spec.probe.top_k, "probe_top_p": spec.probe.top_p,
        "probe_num_examples": spec.probe.num_examples,
    }


def run_probe(spec: Spec, out_dir: str | Path) -> Path:
    """Run the lock/fork probe of `spec` into `out_dir`; returns the probe shard's path."""
    check_probe_spec(spec)
    out_dir = Path(out_dir).absolute()
    shard = RunPaths(out_dir).shard(0)
    if shard.exists():
        log.info("probe shard %s already exists; keeping it", shard)
        return shard
    probe = spec.probe
    seed = spec.seeds[0] if probe.seed is None else probe.seed
    t0 = time.monotonic()
    base, trained = load_probe_models(spec)
    rng = np.random.default_rng([seed, 1])
    if probe.carriers:
        carriers = carriers_from_shards(spec, base.tokenizer, rng)
    else:
        carriers = generate_carriers(spec, base, trained, seed, rng)
    log.info("probing %d carriers (%s)", len(carriers),
             ", ".join(f"{g}: {n}" for g, n in sorted(Counter(c.generator for c in carriers).items())))
    counts: dict[float, list[np.ndarray]] = defaultdict(list)
    with ShardWriter(shard, attrs=probe_attrs(spec, out_dir, base, trained, seed), top_k=probe.top_k,
                     token_columns=TOKEN_COLUMNS, rollout_columns=ROLLOUT_COLUMNS) as writer:
        show = sys.stderr.isatty()
        for index, carrier in enumerate(tqdm(carriers, desc="probe", unit="carrier", disable=not show)):
            for extra, cols in probe_carrier(base, trained, carrier, probe, np.random.default_rng([seed, 2, index])):
                row = {"problem_id": carrier.problem_id, "sample_idx": index, "step": 0, "kind": "probe",
                       "reward": carrier.reward, "seed": seed, "weight_version": 0,
                       "prompt_text": carrier.prompt_text,
                       "generator": carrier.generator, "carrier_source": carrier.source,
                       "length_bin": int(carrier.length_bin), **extra}
                writer.append(row, cols)
                counts[extra["probe_temperature"]].append(cols["base_class"])
        for temperature, parts in counts.items():
            classes = np.concatenate(parts)
            writer.add_metrics(0, {f"probe/{name}_share@t{temperature:g}": float(np.mean(classes == code))
                                   for code, name in enumerate(lockfork.CLASSES)}
                               | {f"probe/positions@t{temperature:g}": float(len(classes))})
    log.info("probe: %d carriers, %s positions in %.1f s -> %s", len(carriers),
             sum(len(np.concatenate(v)) for v in counts.values()) // max(len(counts), 1),
             time.monotonic() - t0, shard)
    return shard


__all__ = ["run_probe", "check_same_tokenizer", "load_probe_models", "select_positions", "position_logits",
           "compare_distributions", "probe_carrier", "probe_attrs", "TOKEN_COLUMNS", "ROLLOUT_COLUMNS",
           "REGULAR", "HEURISTIC", "RANDOM"]
