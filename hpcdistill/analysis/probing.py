"""Seed 001, lock/fork probing: the probe's analysis, from probe shards (kind "probe").

The probe run records, per probed position, both models' statistics and classes
(`hpcdistill.models.lockfork`: the statistics, the classifier and the sub-categories, re-exported
here as seed 001's entry point); this module reads them back: per category the counts and the
deltas (mean +/- stderr), the before/after truncation table, the class transitions, the best
examples as the seed's rank tables, and two figures.

Deltas are trained - base. The top-1 delta is taken at the BASE model's top-1 token,
p_trained(a) - p_base(a) with a = argmax p_base: the seed reads a negative top-1 delta on swaps as
"the trained model disagrees with and pushes down the baseline's choice".
"""

from __future__ import annotations

import heapq
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpcdistill.analysis.report_writer import Report
from hpcdistill.analysis.tables import format_table, markdown_table
from hpcdistill.models.lockfork import (  # noqa: F401  (the statistics and classifier, re-exported)
    CLASSES, COLLAPSED, DIFFUSE, DIFFUSED, FORK, FORK_SUBCATEGORIES, LOCK, LOCK_SUBCATEGORIES, LOOSENED, NONE,
    PRESERVED, RANK_TABLE_SIZE, SELF_CORRECTION, STRICT_LOCK, SWAP, DistributionStats, Thresholds,
    apply_temperature, classify, classify_stats, distribution_stats, fork_subcategory, lock_subcategory,
    self_correction_context, truncated_logprobs)
from hpcdistill.record import ShardReader, iter_shards

log = logging.getLogger(__name__)

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


class Collector:
    """Every probe rollout (kind "probe"), fed one open shard at a time (`add`); other shards are
    passed over. Keeps the `num_examples` best examples per (temperature, sub-category); None =
    the probe spec's `probe.num_examples`."""

    def __init__(self, num_examples: int | None = None, context_chars: int = 240):
        self.num_examples, self.context_chars = num_examples, context_chars
        self.out = ProbeCollection()
        self._tie = 0

    def add(self, reader: ShardReader) -> None:
        if "base_class" not in reader.token_columns:
            return  # not a probe shard
        out, probe = self.out, reader.spec.probe
        keep = probe.num_examples if self.num_examples is None else self.num_examples
        out.trained_label = probe.trained_label
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
            if keep > 0:
                self._examples(row, tokens, cols, temperature, keep)

    def _examples(self, row: dict, tokens: dict, cols: dict, temperature: float, keep: int) -> None:
        delta = cols["trained_at_base_top1"] - cols["base_top1"]
        names = _subcategory_names(cols)
        text = row.get("response_text", "")
        token_text = json.loads(row.get("token_text") or "{}")
        context = self.context_chars
        for i in np.flatnonzero(names != ""):
            category = str(names[i])
            score = EXAMPLE_SCORES[category] * float(delta[i])
            heap = self.out.examples.setdefault((temperature, category), [])
            if len(heap) >= keep and score <= heap[0][0]:
                continue
            offset = int(tokens["char_offset"][i])
            example = Example(category, score, float(delta[i]), text[max(0, offset - context):offset],
                              text[offset:offset + 40],
                              _top_tokens(tokens["student_topk_ids"][i], tokens["student_topk_lp"][i], token_text),
                              _top_tokens(tokens["teacher_topk_ids"][i], tokens["teacher_topk_lp"][i], token_text),
                              row["problem_id"], str(row.get("generator", "")), int(tokens["position"][i]))
            self._tie += 1
            if len(heap) >= keep:
                heapq.heapreplace(heap, (score, self._tie, example))
            else:
                heapq.heappush(heap, (score, self._tie, example))

    def result(self) -> ProbeCollection:
        return self.out


def collect(paths: list[Path], *, num_examples: int | None = None, context_chars: int = 240) -> ProbeCollection:
    """Read every probe rollout under `paths`, streaming one shard at a time (see `Collector`)."""
    collector = Collector(num_examples, context_chars)
    for reader in iter_shards(paths, skipped=collector.out.skipped, spec=True):
        collector.add(reader)
    return collector.result()


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
    report = Report(out_dir, echo=print_tables)
    probe_sections(report, result, result.skipped)
    return report.sections


def probe_sections(report: Report, result: ProbeCollection, skipped: list) -> None:
    """The probe's tables, rank-table examples and figures, into `report` (nothing without probe data)."""
    if not result.columns:
        return
    base, trained = result.models
    report.section(f"## Lock/fork probe (seed 001)\n\nBase `{base}` vs {result.trained_label.lower()} "
                   f"`{trained}`; {len(result.carriers)} carriers. Deltas are trained - base; Δ top-1 is "
                   "taken at the base model's top-1 token. Category = the base model's class.\n")
    for temperature in sorted(result.columns):
        report.table(f"Probe at T = {temperature:g}: categories and deltas (mean ± stderr)",
                     *category_rows(result, temperature), level=3)
        report.table(f"Probe at T = {temperature:g}: before vs after top-k/top-p truncation",
                     *truncation_rows(result, temperature), level=3)
        report.table(f"Probe at T = {temperature:g}: class transitions (positions)",
                     *transition_rows(result, temperature), level=3)
        headers = rank_table_headers(result.trained_label)
        for title, context, rows in example_sections(result, temperature):
            flat = context[-200:].replace("\n", "⏎")
            report.section(f"#### {title}\n\n```text\n{context}\n```\n\n{markdown_table(headers, rows)}\n",
                           f"\n{title}\n  {flat}\n{format_table(headers, rows)}")
    report.figure("probe_top1_delta.png", lambda path: plot_deltas(result, path))
    report.figure("probe_top1_scatter.png", lambda path: plot_top1_scatter(result, path))
    report.skipped("Skipped probe shards", skipped, level=3)


__all__ = ["Thresholds", "DistributionStats", "apply_temperature", "truncated_logprobs",
           "distribution_stats", "classify", "classify_stats", "self_correction_context",
           "lock_subcategory", "fork_subcategory", "mean_stderr", "rank_table_rows",
           "rank_table_headers", "format_prob", "Collector", "collect", "category_rows", "truncation_rows",
           "transition_rows", "probe_report", "probe_sections", "LOCK", "FORK", "DIFFUSE", "CLASSES"]
