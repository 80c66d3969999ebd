"""Seed 001, lock/fork probing: statistics, classifier, sub-categories and the report section.

Seed 001 ("The probing mechanism") compares the next-token distributions of a base model and a
trained model at chosen positions of prompt+response "carriers", before and after top-k/top-p
truncation. Everything here is a pure function of log-probabilities or of probe shards; the probe
run that produces those shards is `hpcdistill.analysis.probe_run`.

Statistics of one distribution p over the vocabulary (`distribution_stats`), at a temperature the
caller already applied (`apply_temperature`: log_softmax(logits / T)):
- top-1 probability; top-5 mass;
- nucleus size: the smallest number of tokens whose mass reaches `top_p` (at least 1);
- tail mass: the mass OUTSIDE the `top_k` most likely tokens (the seed's "moving tail mass into
  the top-20": with top_k = 20 this is exactly that tail);
- entropy (nats);
- after truncation (top-k, then top-p on the renormalised top-k, the sampler's own rule,
  `hpcdistill.models.generation.sampling_logprobs`): kept size, kept mass (before renormalising),
  top-1 probability and entropy of the renormalised truncated distribution.

Classifier (`classify`, thresholds from `[probe]`; seed 001 "heuristics"):
- lock-like:  top-1 >= lock_min_top1, nucleus <= lock_max_nucleus, tail <= lock_max_tail;
- fork-like:  not a lock, at least fork_min_candidates tokens in the top fork_top_n with
  p >= fork_min_prob and p >= fork_min_ratio * top-1 ("similar probability"), and a LOW tail
  (tail <= fork_max_tail) -- the tail separates true forks from diffuse uncertainty;
- mixed/diffuse: everything else.

A position's category is the BASE model's class. Lock sub-categories (seed 001 "Lock sharpening"):
self-correction context (a marker such as "Wait" in the preceding text, or as either model's top
token) takes precedence; else strict lock (both lock-like, same top token), swap (both lock-like,
different top token), loosened (the trained model is no longer lock-like). Fork sub-categories
(seed 001 "Fork diversity preservation"): preserved, collapsed (trained lock-like), diffused.

Deltas are trained - base. The top-1 delta is taken at the BASE model's top-1 token,
p_trained(a) - p_base(a) with a = argmax p_base: the seed reads a negative top-1 delta on swaps as
"the trained model disagrees with and pushes down the baseline's choice".
"""

from __future__ import annotations

import heapq
import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcdistill.analysis.tables import format_table, markdown_table
from hpcdistill.distill.divergence import entropy_from_logprobs, log_softmax_fp32
from hpcdistill.models.generation import sampling_logprobs
from hpcdistill.record import iter_shards

log = logging.getLogger(__name__)

LOCK, FORK, DIFFUSE = 0, 1, 2
CLASSES = ("lock", "fork", "diffuse")
STRICT_LOCK, SWAP, SELF_CORRECTION, LOOSENED = 0, 1, 2, 3
LOCK_SUBCATEGORIES = ("strict lock", "swap", "self-correction", "loosened")
PRESERVED, COLLAPSED, DIFFUSED = 0, 1, 2
FORK_SUBCATEGORIES = ("preserved", "collapsed", "diffused")
NONE = -1  # not in the sub-category's parent class
RANK_TABLE_SIZE = 5  # the seed's rank tables show the top-5 of each model


# --------------------------------------------------------------------------------------------------
# statistics of one distribution


@dataclass(frozen=True)
class Thresholds:
    """Classifier thresholds (the `[probe]` keys of the same names)."""

    lock_min_top1: float = 0.5
    lock_max_nucleus: int = 8
    lock_max_tail: float = 0.1
    fork_top_n: int = 10
    fork_min_candidates: int = 2
    fork_min_prob: float = 0.05
    fork_min_ratio: float = 0.25
    fork_max_tail: float = 0.25

    @classmethod
    def from_spec(cls, probe: Any) -> Thresholds:
        return cls(**{name: getattr(probe, name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class DistributionStats:
    """Statistics of P distributions. k = min(top_k, V)."""

    topk_ids: np.ndarray  # [P, k] int64, descending probability
    topk_probs: np.ndarray  # [P, k] float32
    top5_mass: np.ndarray  # [P]
    nucleus_size: np.ndarray  # [P] int64, smallest set with mass >= top_p
    tail_mass: np.ndarray  # [P], mass outside the top-k
    entropy: np.ndarray  # [P] nats
    trunc_size: np.ndarray  # [P] int64, tokens kept by top-k then top-p
    trunc_mass: np.ndarray  # [P], their mass before renormalising
    trunc_top1: np.ndarray  # [P], top-1 of the renormalised truncated distribution
    trunc_entropy: np.ndarray  # [P] nats, entropy of the renormalised truncated distribution

    @property
    def top1_prob(self) -> np.ndarray:
        return self.topk_probs[:, 0]

    @property
    def top1_id(self) -> np.ndarray:
        return self.topk_ids[:, 0]


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T): [..., V] -> [..., V] float32 (seed 001 compares T_eval 0.7 and 1.5)."""
    if temperature <= 0:
        raise ValueError(f"probe temperature must be > 0, got {temperature}")
    return log_softmax_fp32(logits.float() / temperature)


def truncated_logprobs(logprobs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The renormalised top-k-then-top-p distribution, -inf outside the kept set: [P, V] -> [P, V]."""
    return sampling_logprobs(logprobs, 1.0, top_p, top_k)


def distribution_stats(logprobs: torch.Tensor | np.ndarray, *, top_k: int, top_p: float
                       ) -> tuple[DistributionStats, torch.Tensor]:
    """Statistics of each row of `logprobs` [P, V] (or one [V] vector, as P = 1).

    Rows are renormalised first, so logits work too. Returns (stats, truncated log-probs [P, V]).
    """
    lp = torch.as_tensor(logprobs)
    lp = log_softmax_fp32(lp.reshape(-1, lp.shape[-1]))  # [P, V]
    p = lp.exp()
    k = min(top_k, lp.shape[-1])
    sorted_p, order = torch.sort(p, dim=-1, descending=True)  # [P, V]
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly before each token
    nucleus = (before < top_p).sum(-1).clamp(min=1)  # the sampler's nucleus rule
    q = truncated_logprobs(lp, k, top_p)  # [P, V]
    kept = torch.isfinite(q)
    stats = DistributionStats(
        topk_ids=order[:, :k].cpu().numpy().astype(np.int64),
        topk_probs=sorted_p[:, :k].cpu().numpy(),
        top5_mass=sorted_p[:, :5].sum(-1).cpu().numpy(),
        nucleus_size=nucleus.cpu().numpy().astype(np.int64),
        tail_mass=sorted_p[:, k:].sum(-1).cpu().numpy(),  # summed, not 1 - cum: exact for small tails
        entropy=entropy_from_logprobs(lp, p=p).cpu().numpy(),
        trunc_size=kept.sum(-1).cpu().numpy().astype(np.int64),
        trunc_mass=torch.where(kept, p, torch.zeros_like(p)).sum(-1).cpu().numpy(),
        trunc_top1=q.max(-1).values.exp().cpu().numpy(),
        trunc_entropy=entropy_from_logprobs(q).cpu().numpy(),
    )
    return stats, q


# --------------------------------------------------------------------------------------------------
# classification


def classify(top_probs: np.ndarray, nucleus_size: np.ndarray, tail_mass: np.ndarray,
             th: Thresholds) -> np.ndarray:
    """LOCK / FORK / DIFFUSE per position (see the module docstring).

    top_probs: [P, n] descending probabilities (n >= 1; the first fork_top_n are used);
    nucleus_size, tail_mass: [P] -> int8 [P].
    """
    top_probs = np.atleast_2d(np.asarray(top_probs, dtype=np.float64))
    nucleus_size, tail_mass = np.asarray(nucleus_size), np.asarray(tail_mass)
    top1 = top_probs[:, 0]
    lock = (top1 >= th.lock_min_top1) & (nucleus_size <= th.lock_max_nucleus) & (tail_mass <= th.lock_max_tail)
    candidates = top_probs[:, :th.fork_top_n]
    similar = (candidates >= th.fork_min_prob) & (candidates >= th.fork_min_ratio * top1[:, None])
    fork = ~lock & (similar.sum(-1) >= th.fork_min_candidates) & (tail_mass <= th.fork_max_tail)
    return np.where(lock, LOCK, np.where(fork, FORK, DIFFUSE)).astype(np.int8)


def classify_stats(stats: DistributionStats, th: Thresholds) -> np.ndarray:
    return classify(stats.topk_probs, stats.nucleus_size, stats.tail_mass, th)


def _marker_regex(markers: list[str]) -> re.Pattern | None:
    """One case-sensitive regex; word-like ends get word boundaries ("Wait" not in "Waiting")."""
    parts = [(r"(?<!\w)" if m[:1].isalnum() else "") + re.escape(m) + (r"(?!\w)" if m[-1:].isalnum() else "")
             for m in markers if m]
    return re.compile("|".join(parts)) if parts else None


def self_correction_context(preceding_text: str, top_tokens: list[str], markers: list[str],
                            window: int) -> bool:
    """Seed 001: a self-correction context has a marker ("Wait", "Let me check", ...) in the last
    `window` characters before the position, or a marker as either model's top token there."""
    regex = _marker_regex(markers)
    if regex is None:
        return False
    if window > 0 and regex.search(preceding_text[-window:]):
        return True
    return any(regex.fullmatch(t.strip()) for t in top_tokens if t.strip())


def lock_subcategory(base_class: np.ndarray, trained_class: np.ndarray, same_top: np.ndarray,
                     self_correction: np.ndarray) -> np.ndarray:
    """STRICT_LOCK / SWAP / SELF_CORRECTION / LOOSENED for base locks, NONE elsewhere: [P] -> int8 [P]."""
    base_lock = np.asarray(base_class) == LOCK
    trained_lock = np.asarray(trained_class) == LOCK
    same_top, sc = np.asarray(same_top, bool), np.asarray(self_correction, bool)
    out = np.full(base_lock.shape, NONE, dtype=np.int8)
    out[base_lock & ~trained_lock] = LOOSENED
    out[base_lock & trained_lock & same_top] = STRICT_LOCK
    out[base_lock & trained_lock & ~same_top] = SWAP
    out[base_lock & sc] = SELF_CORRECTION  # precedence: the seed's "Wait" lock is no true lock
    return out


def fork_subcategory(base_class: np.ndarray, trained_class: np.ndarray) -> np.ndarray:
    """PRESERVED / COLLAPSED / DIFFUSED for base forks by the trained class, NONE elsewhere."""
    base_class, trained_class = np.asarray(base_class), np.asarray(trained_class)
    code = np.array([COLLAPSED, PRESERVED, DIFFUSED], dtype=np.int8)[trained_class.astype(np.int64)]
    return np.where(base_class == FORK, code, NONE).astype(np.int8)


# --------------------------------------------------------------------------------------------------
# aggregates and tables


def mean_stderr(values: np.ndarray) -> tuple[float, float, int]:
    """(mean, standard error, n) of the finite values; stderr is NaN below two values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    err = float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(np.mean(v)), err, len(v)


def format_mean_stderr(values: np.ndarray, digits: int = 4, signed: bool = True) -> str:
    mean, err, n = mean_stderr(values)
    if n == 0:
        return "-"
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return f"{text} ± {err:.{digits}f}" if np.isfinite(err) else text


def format_prob(p: float) -> str:
    """Five significant digits, as the seed's tables print them (0.5268, 0.0075144, 0.00037412)."""
    return f"{p:.5g}"


def token_cell(text: str) -> str:
    """A token for a table cell: stripped like the seed's tables; whitespace-only tokens escaped;
    `|` escaped so the markdown table stays intact."""
    shown = text.strip() or text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "␣")
    return shown.replace("|", "\\|")


def rank_table_rows(base: list[tuple[str, float]], trained: list[tuple[str, float]],
                    n: int = RANK_TABLE_SIZE) -> list[list[str]]:
    """Rows `rank | base token (prob) | trained token (prob)` from each model's own top tokens,
    given as (token text, probability) in descending order."""
    rows = []
    for rank in range(min(n, max(len(base), len(trained)))):
        row = [str(rank + 1)]
        for side in (base, trained):
            row.append(f"{token_cell(side[rank][0])} ({format_prob(side[rank][1])})" if rank < len(side) else "-")
        rows.append(row)
    return rows


def rank_table_headers(trained_label: str = "Trained") -> list[str]:
    return ["Rank", "Base token (prob)", f"{trained_label} token (prob)"]


# --------------------------------------------------------------------------------------------------
# reading probe shards


# What the report keeps per position (derived from the shard's columns in `_position_columns`).
DELTAS = {  # name in the tables -> (trained column, base column)
    "Δ top-1": ("trained_at_base_top1", "base_top1"),
    "Δ own top-1": ("trained_top1", "base_top1"),  # each model's own top token
    "Δ nucleus": ("trained_nucleus_size", "base_nucleus_size"),
    "Δ tail": ("trained_tail_mass", "base_tail_mass"),
    "Δ entropy": ("entropy_t", "entropy_s"),
}
TRUNC_DELTAS = {
    "Δ top-1 (truncated)": ("trained_trunc_at_base_top1", "base_trunc_top1"),
    "Δ entropy (truncated)": ("trained_trunc_entropy", "base_trunc_entropy"),
}


@dataclass(frozen=True)
class Example:
    """One probed position, ready to print as a rank table."""

    category: str
    score: float
    delta_top1: float
    context_before: str
    context_after: str
    base_top: list[tuple[str, float]]
    trained_top: list[tuple[str, float]]
    problem_id: str
    generator: str
    position: int


@dataclass
class ProbeCollection:
    """Per temperature: column name -> concatenated [N] arrays; best examples per category."""

    columns: dict[float, dict[str, list[np.ndarray]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    examples: dict[tuple[float, str], list[tuple[float, int, Example]]] = field(default_factory=dict)
    trained_label: str = "Trained"
    models: tuple[str, str] = ("", "")
    carriers: set[tuple[str, int, str]] = field(default_factory=set)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def array(self, temperature: float, name: str) -> np.ndarray:
        parts = self.columns[temperature][name]
        return np.concatenate(parts) if parts else np.zeros(0)


# Which example each sub-category shows (score to maximise) -- the seed's examples: a sharpened true
# lock, a swap / self-correction the trained model pushes down, a fork resolved toward one token.
EXAMPLE_SCORES = {
    "strict lock": 1.0, "swap": -1.0, "self-correction": -1.0, "loosened": -1.0,
    "fork preserved": 1.0, "fork collapsed": 1.0, "fork diffused": -1.0,
}


def _position_columns(tokens: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    base_lp, trained_at = tokens["student_topk_lp"], tokens["teacher_at_student_topk_lp"]
    out = {name: tokens[name].astype(np.float64) for name in (
        "base_nucleus_size", "trained_nucleus_size", "base_tail_mass", "trained_tail_mass",
        "entropy_s", "entropy_t", "base_trunc_top1", "trained_trunc_at_base_top1",
        "base_trunc_entropy", "trained_trunc_entropy", "base_class", "trained_class",
        "lock_subcategory", "fork_subcategory", "self_correction")}
    out["base_top1"] = np.exp(base_lp[:, 0].astype(np.float64))
    out["trained_at_base_top1"] = np.exp(trained_at[:, 0].astype(np.float64))
    out["trained_top1"] = np.exp(tokens["teacher_topk_lp"][:, 0].astype(np.float64))
    return out


def _subcategory_names(cols: dict[str, np.ndarray]) -> np.ndarray:
    """The example category of each position ("" = none): lock sub-categories, then fork ones."""
    names = np.full(len(cols["base_class"]), "", dtype=object)
    for code, name in enumerate(LOCK_SUBCATEGORIES):
        names[cols["lock_subcategory"] == code] = name
    for code, name in enumerate(FORK_SUBCATEGORIES):
        names[cols["fork_subcategory"] == code] = f"fork {name}"
    return names


def _top_tokens(ids: np.ndarray, lps: np.ndarray, token_text: dict[str, str]) -> list[tuple[str, float]]:
    """(text, probability) of the first RANK_TABLE_SIZE of a top-k list ([k] ids, [k] log-probs)."""
    return [(token_text.get(str(int(t)), f"<{int(t)}>"), float(np.exp(lp)))
            for t, lp in zip(ids[:RANK_TABLE_SIZE], lps[:RANK_TABLE_SIZE])]


def collect(paths: list[Path], *, num_examples: int | None = None, context_chars: int = 240) -> ProbeCollection:
    """Read every probe rollout (kind "probe") under `paths`, streaming one shard at a time.

    Keeps the `num_examples` best examples per (temperature, sub-category); None = the shard's
    `probe_num_examples` attr (the spec's `probe.num_examples`), else 1.
    """
    out = ProbeCollection()
    tie = 0
    for reader in iter_shards(paths, skipped=out.skipped):
        if "base_class" not in reader.token_columns:
            continue  # not a probe shard
        keep = int(reader.attrs.get("probe_num_examples", 1)) if num_examples is None else num_examples
        out.trained_label = str(reader.attrs.get("probe_trained_label", out.trained_label))
        out.models = (str(reader.attrs.get("student_model", "")), str(reader.attrs.get("teacher_model", "")))
        for record in reader.iter_rollouts():
            row, tokens = record.row, record.tokens
            if row["kind"] != "probe" or len(tokens["ids"]) == 0:
                continue
            temperature = float(row["probe_temperature"])
            out.carriers.add((str(reader.path), int(row["sample_idx"]), row["problem_id"]))
            cols = _position_columns(tokens)
            for name, values in cols.items():
                out.columns[temperature][name].append(values)
            if keep <= 0:
                continue
            delta = cols["trained_at_base_top1"] - cols["base_top1"]
            names = _subcategory_names(cols)
            text = row.get("response_text", "")
            token_text = json.loads(row.get("token_text") or "{}")
            for i in np.flatnonzero(names != ""):
                category = str(names[i])
                score = EXAMPLE_SCORES[category] * float(delta[i])
                heap = out.examples.setdefault((temperature, category), [])
                if len(heap) >= keep and score <= heap[0][0]:
                    continue
                offset = int(tokens["char_offset"][i])
                example = Example(category, score, float(delta[i]), text[max(0, offset - context_chars):offset],
                                  text[offset:offset + 40],
                                  _top_tokens(tokens["student_topk_ids"][i], tokens["student_topk_lp"][i], token_text),
                                  _top_tokens(tokens["teacher_topk_ids"][i], tokens["teacher_topk_lp"][i], token_text),
                                  row["problem_id"], str(row.get("generator", "")), int(tokens["position"][i]))
                tie += 1
                if len(heap) >= keep:
                    heapq.heapreplace(heap, (score, tie, example))
                else:
                    heapq.heappush(heap, (score, tie, example))
    return out


def category_rows(result: ProbeCollection, temperature: float) -> tuple[list[str], list[list[str]]]:
    """Per class and sub-category: count, share, base top-1 and nucleus, deltas (mean ± stderr)."""
    cols = {name: result.array(temperature, name) for name in result.columns[temperature]}
    total = len(cols["base_class"])
    groups: list[tuple[str, np.ndarray]] = [(name, cols["base_class"] == code) for code, name in enumerate(CLASSES)]
    groups.append(("all", np.ones(total, bool)))
    groups += [(f"lock: {name}", cols["lock_subcategory"] == code) for code, name in enumerate(LOCK_SUBCATEGORIES)]
    groups += [(f"fork: {name}", cols["fork_subcategory"] == code) for code, name in enumerate(FORK_SUBCATEGORIES)]
    headers = ["category", "n", "share", "base top-1", "base nucleus", *DELTAS]
    rows = []
    for name, where in groups:
        n = int(where.sum())
        row = [name, str(n), f"{n / total:.1%}" if total else "-",
               format_mean_stderr(cols["base_top1"][where], 3, signed=False),
               format_mean_stderr(cols["base_nucleus_size"][where], 2, signed=False)]
        row += [format_mean_stderr(cols[t][where] - cols[b][where], 4 if "nucleus" not in label else 2)
                for label, (t, b) in DELTAS.items()]
        rows.append(row)
    return headers, rows


def truncation_rows(result: ProbeCollection, temperature: float) -> tuple[list[str], list[list[str]]]:
    """Per base class: top-1 and entropy deltas before vs after top-k/top-p truncation."""
    cols = {name: result.array(temperature, name) for name in result.columns[temperature]}
    before = {"Δ top-1 (full)": DELTAS["Δ top-1"], "Δ entropy (full)": DELTAS["Δ entropy"]}
    rows = []
    for code, name in [*enumerate(CLASSES), (None, "all")]:
        where = np.ones(len(cols["base_class"]), bool) if code is None else cols["base_class"] == code
        rows.append([name, str(int(where.sum()))] + [
            format_mean_stderr(cols[t][where] - cols[b][where]) for t, b in [*before.values(), *TRUNC_DELTAS.values()]])
    return ["base class", "n", *before, *TRUNC_DELTAS], rows


def transition_rows(result: ProbeCollection, temperature: float) -> tuple[list[str], list[list[str]]]:
    """Counts of base class (rows) -> trained class (columns)."""
    base, trained = result.array(temperature, "base_class"), result.array(temperature, "trained_class")
    rows = [[f"base {b}"] + [str(int(np.sum((base == i) & (trained == j)))) for j in range(len(CLASSES))]
            for i, b in enumerate(CLASSES)]
    return ["", *(f"trained {c}" for c in CLASSES)], rows


def example_sections(result: ProbeCollection, temperature: float) -> list[tuple[str, str, list[list[str]]]]:
    """(title, context block, rank rows) of the chosen examples at one temperature, best first."""
    out = []
    for category in EXAMPLE_SCORES:
        heap = result.examples.get((temperature, category), [])
        for _, _, ex in sorted(heap, key=lambda item: -item[0]):
            title = (f"{category} (T = {temperature:g}; Δ top-1 {ex.delta_top1:+.4f}; problem {ex.problem_id}, "
                     f"generated by {ex.generator or 'unknown'}, position {ex.position})")
            context = (("…" if ex.context_before else "") + ex.context_before + "▮" + ex.context_after + "…")
            out.append((title, context.replace("```", "ʼʼʼ"), rank_table_rows(ex.base_top, ex.trained_top)))
    return out


def plot_deltas(result: ProbeCollection, path: Path) -> Path:
    """Bar chart: mean Δ top-1 (± stderr) per category, one bar per temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temperatures = sorted(result.columns)
    labels = [*CLASSES, *(f"lock:{n}" for n in LOCK_SUBCATEGORIES), *(f"fork:{n}" for n in FORK_SUBCATEGORIES)]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(len(temperatures), 1)
    for j, temperature in enumerate(temperatures):
        cols = {name: result.array(temperature, name) for name in result.columns[temperature]}
        delta = cols["trained_at_base_top1"] - cols["base_top1"]
        masks = [cols["base_class"] == c for c in range(len(CLASSES))]
        masks += [cols["lock_subcategory"] == c for c in range(len(LOCK_SUBCATEGORIES))]
        masks += [cols["fork_subcategory"] == c for c in range(len(FORK_SUBCATEGORIES))]
        stats = [mean_stderr(delta[m]) for m in masks]
        x = np.arange(len(labels)) + (j - (len(temperatures) - 1) / 2) * width
        ax.bar(x, [np.nan_to_num(s[0]) for s in stats], width, yerr=[np.nan_to_num(s[1]) for s in stats],
               capsize=2, label=f"T = {temperature:g}")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xticks(np.arange(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("Δ p(base top-1 token), trained - base")
    ax.set_title("Lock/fork probe: top-1 delta per category (mean ± stderr)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_top1_scatter(result: ProbeCollection, path: Path) -> Path:
    """Per temperature: base p(top-1) vs trained p(base's top-1), coloured by base class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temperatures = sorted(result.columns)
    fig, axes = plt.subplots(1, len(temperatures), figsize=(4.2 * len(temperatures), 4), squeeze=False)
    for ax, temperature in zip(axes[0], temperatures):
        base, trained = result.array(temperature, "base_top1"), result.array(temperature, "trained_at_base_top1")
        classes = result.array(temperature, "base_class")
        for code, name in enumerate(CLASSES):
            m = classes == code
            ax.scatter(base[m], trained[m], s=8, alpha=0.6, label=name)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("base p(top-1)")
        ax.set_ylabel("trained p(base top-1)")
        ax.set_title(f"T = {temperature:g}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def probe_report(paths: list[Path], out_dir: Path, print_tables: bool = False, *,
                 num_examples: int | None = None) -> list[str]:
    """Markdown sections of the lock/fork probe over the probe shards under `paths` ([] when there
    are none); writes the figures into `out_dir`; prints the tables when `print_tables`.
    `num_examples` rank tables per sub-category and temperature (None = the spec's value)."""
    result = collect(paths, num_examples=num_examples)
    if not result.columns:
        return []
    out_dir = Path(out_dir)
    base, trained = result.models
    sections = [f"## Lock/fork probe (seed 001)\n\nBase `{base}` vs {result.trained_label.lower()} "
                f"`{trained}`; {len(result.carriers)} carriers. Deltas are trained - base; Δ top-1 is "
                "taken at the base model's top-1 token. Category = the base model's class.\n"]

    def emit(title: str, headers: list[str], rows: list[list[str]]) -> None:
        sections.append(f"### {title}\n\n{markdown_table(headers, rows)}\n")
        if print_tables:
            print(f"\n{title}\n{format_table(headers, rows)}")

    for temperature in sorted(result.columns):
        emit(f"Probe at T = {temperature:g}: categories and deltas (mean ± stderr)",
             *category_rows(result, temperature))
        emit(f"Probe at T = {temperature:g}: before vs after top-k/top-p truncation",
             *truncation_rows(result, temperature))
        emit(f"Probe at T = {temperature:g}: class transitions (positions)", *transition_rows(result, temperature))
        for title, context, rows in example_sections(result, temperature):
            headers = rank_table_headers(result.trained_label)
            sections.append(f"#### {title}\n\n```text\n{context}\n```\n\n{markdown_table(headers, rows)}\n")
            if print_tables:
                flat = context[-200:].replace("\n", "⏎")
                print(f"\n{title}\n  {flat}\n{format_table(headers, rows)}")
    for fig in (plot_deltas(result, out_dir / "probe_top1_delta.png"),
                plot_top1_scatter(result, out_dir / "probe_top1_scatter.png")):
        sections.append(f"![{fig.stem}]({fig.name})\n")
        if print_tables:
            print(f"figure: {fig}")
    if result.skipped:
        lines = "\n".join(f"- `{p}`: {reason}" for p, reason in result.skipped)
        sections.append(f"### Skipped probe shards\n\n{lines}\n")
    return sections


__all__ = ["Thresholds", "DistributionStats", "apply_temperature", "truncated_logprobs",
           "distribution_stats", "classify", "classify_stats", "self_correction_context",
           "lock_subcategory", "fork_subcategory", "mean_stderr", "rank_table_rows",
           "rank_table_headers", "format_prob", "collect", "category_rows", "truncation_rows",
           "transition_rows", "probe_report", "LOCK", "FORK", "DIFFUSE", "CLASSES"]
