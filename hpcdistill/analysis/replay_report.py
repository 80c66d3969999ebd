"""The replay's tables and figure: loss variants side by side on identical tokens.

- per step: the loss the step logged, the run's own loss replayed (their difference), each variant;
- per decile of relative position (t / T): mean token term and mean gradient weight of each variant;
- agreement with the run's own loss: Pearson and Spearman correlation of the per-token gradient
  weights (and terms) over all tokens;
- where they disagree most: each variant's gradient **share** (a token's weight over the mean
  weight, so a variant that is uniformly 10x larger agrees perfectly) minus the run's own share,
  by decile, and the tokens with the largest difference, with their text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from hpcdistill.analysis.replay import BASELINE, ReplayResult
from hpcdistill.analysis.report_writer import Report

DECILES = 10


def _fmt(x: float) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:.4g}"


def _deciles(values: np.ndarray, position: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, stderr) of `values` in each tenth of the relative position."""
    bins = np.minimum((position * DECILES).astype(int), DECILES - 1)
    means, errs = np.full(DECILES, np.nan), np.full(DECILES, np.nan)
    for d in range(DECILES):
        x = values[bins == d].astype(np.float64)
        if len(x):
            means[d] = x.mean()
            errs[d] = x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else 0.0
    return means, errs


def _rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    # ties share their mean rank
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def correlation(a: np.ndarray, b: np.ndarray, spearman: bool = False) -> float:
    if len(a) < 2:
        return float("nan")
    if spearman:
        a, b = _rank(a), _rank(b)
    a, b = a.astype(np.float64) - a.mean(), b.astype(np.float64) - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def share(grads: np.ndarray) -> np.ndarray:
    mean = float(np.mean(grads)) if len(grads) else 0.0
    return grads / mean if mean > 0 else np.zeros_like(grads, dtype=np.float64)


def replay_report(result: ReplayResult, out_dir: Path, *, print_tables: bool = True, top: int = 10,
                  tokenizer=None) -> list[str]:
    """Markdown sections (and, printed, the same tables); writes replay.json and the figure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = result.variants
    report = Report(out_dir, echo=print_tables)

    # 1. per step
    rows = []
    for entry in result.steps:
        logged = entry["logged"]
        diff = abs(entry[BASELINE] - logged) if logged is not None else None
        rows.append([entry["run_id"], str(entry["step"]), str(entry["tokens"]), _fmt(logged),
                     _fmt(entry[BASELINE]), _fmt(diff), *[_fmt(entry[n]) for n in names[1:]]])
    report.table("Replay: loss per step (logged = train/loss of the step; as trained = replayed from the shard)",
                 ["run", "step", "tokens", "logged", BASELINE, "|diff|", *names[1:]], rows)

    position = np.concatenate(result.position) if result.position else np.zeros(0)
    grads = {n: result.pooled("grads", n) for n in names}
    terms = {n: result.pooled("terms", n) for n in names}
    labels = [f"{10 * d}-{10 * (d + 1)}%" for d in range(DECILES)]

    # 2. deciles
    for kind, values, what in (("terms", terms, "mean token term l_t c_t"),
                               ("grads", grads, "mean gradient weight ||d(w l c)/dz||_1")):
        table = []
        for n in names:
            means, errs = _deciles(values[n], position)
            table.append([n, *[f"{_fmt(m)} ± {_fmt(e)}" for m, e in zip(means, errs)]])
        report.table(f"Replay: {what} by decile of position", ["variant", *labels], table)

    # 3. agreement with the run's own loss
    table = []
    base_share = share(grads[BASELINE])
    for n in names[1:]:
        table.append([n, _fmt(correlation(grads[BASELINE], grads[n])),
                      _fmt(correlation(grads[BASELINE], grads[n], spearman=True)),
                      _fmt(correlation(terms[BASELINE], terms[n])),
                      _fmt(float(np.mean(np.abs(share(grads[n]) - base_share))) if len(base_share) else np.nan)])
    report.table(f"Replay: agreement with the run's own loss over {len(position)} tokens",
                 ["variant", "grad Pearson", "grad Spearman", "term Pearson", "mean |share diff|"], table)

    # 4. where they disagree most
    table = []
    for n in names[1:]:
        diff = share(grads[n]) - base_share
        means, _ = _deciles(np.abs(diff), position)
        table.append([n, *[_fmt(m) for m in means]])
    report.table("Replay: mean |gradient share - the run's own share| by decile (share = weight / mean weight)",
                 ["variant", *labels], table)
    where = np.concatenate(result.where) if result.where else np.zeros((0, 3), int)
    ids = np.concatenate(result.ids) if result.ids else np.zeros(0, int)
    for n in names[1:]:
        diff = share(grads[n]) - base_share
        order = np.argsort(-np.abs(diff), kind="stable")[:top]
        table = []
        for j in order:
            batch, rollout, t = (int(x) for x in where[j])
            entry = result.steps[batch]
            problem, sample = entry["rows"][rollout]
            text = repr(tokenizer.decode([int(ids[j])])) if tokenizer is not None else str(int(ids[j]))
            table.append([entry["run_id"], str(entry["step"]), f"{problem}#{sample}", str(t), text,
                          _fmt(base_share[j]), _fmt(share(grads[n])[j]), _fmt(terms[BASELINE][j]), _fmt(terms[n][j])])
        report.table(f"Replay: tokens where '{n}' and the run's own loss disagree most",
                     ["run", "step", "rollout", "t", "token", "share (own)", "share (variant)", "term (own)",
                      "term (variant)"], table)

    report.figure("replay_deciles.png", lambda path: _plot(grads, position, path), "gradient share by decile")
    summary = {"variants": names, "tokens": int(len(position)),
               "steps": [{k: v for k, v in e.items() if k != "rows"} for e in result.steps],
               "correlation_with_own": {n: {"grad_pearson": correlation(grads[BASELINE], grads[n]),
                                            "grad_spearman": correlation(grads[BASELINE], grads[n], spearman=True)}
                                        for n in names[1:]}}
    tmp = out_dir / f".replay.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(summary, indent=1, default=float))
    os.replace(tmp, out_dir / "replay.json")
    return report.sections


def _plot(grads: dict[str, np.ndarray], position: np.ndarray, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    x = (np.arange(DECILES) + 0.5) * 10
    for name, values in grads.items():
        means, errs = _deciles(share(values), position)
        ax.errorbar(x, means, yerr=errs, marker="o", capsize=3, label=name)
    ax.set_xlabel("relative position in the response (%)")
    ax.set_ylabel("gradient share (weight / mean weight)")
    ax.set_title("Where each loss puts its gradient, on identical tokens")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["replay_report", "correlation", "share"]
