"""Seed 002, local teachability collapse: the diagnosis and the release-rule diagnostics.

From the original (on-policy) rollouts of each step's shard:
- the sampled-token advantage A_t = log p_T(y_t) - log p_S(y_t) over 20 bins of normalised
  position: mean, std, and std normalised by the rollout set's overall std (so the student at
  step 0 and the trained student at the last step share a scale), Figure 1 of the seed;
- the teacher's top-1/top-2 margin inside the student's top-K per bin (Figure 2);
- per rollout, the release rule on its recorded sentence segments: BIC gain, whether a release
  was accepted, the release position as a fraction of the response, and the mean margin and
  advantage before vs after it (Figures 3, 6).
Streams shard by shard, keeping per-bin sums and one small record per rollout.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpcdistill.distill.release import (
    aggregate_segment_scores,
    bic_downward_change_point,
    teacher_top2_margin_from_logprobs,
)
from hpcdistill.record import iter_shards

NUM_BINS = 20


@dataclass
class BinStats:
    total: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BINS))
    total_sq: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BINS))
    count: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BINS))

    def add(self, values: np.ndarray) -> None:
        n = len(values)
        if n == 0:
            return
        bins = np.minimum((np.arange(n) * NUM_BINS) // n, NUM_BINS - 1)
        self.total += np.bincount(bins, weights=values, minlength=NUM_BINS)
        self.total_sq += np.bincount(bins, weights=values * values, minlength=NUM_BINS)
        self.count += np.bincount(bins, minlength=NUM_BINS)

    def mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.total / self.count

    def std(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            var = self.total_sq / self.count - self.mean() ** 2
        return np.sqrt(np.maximum(var, 0.0))

    def overall_std(self) -> float:
        n = self.count.sum()
        if n == 0:
            return float("nan")
        mean = self.total.sum() / n
        return float(np.sqrt(max(self.total_sq.sum() / n - mean * mean, 0.0)))


@dataclass
class Teachability:
    advantage: dict[str, BinStats] = field(default_factory=lambda: defaultdict(BinStats))
    margin: dict[str, BinStats] = field(default_factory=lambda: defaultdict(BinStats))
    releases: dict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def label(self, step: int, last: int) -> str | None:
        return "student (step 0)" if step == 0 else f"trained (step {last})" if step == last else None


COLUMNS = ["student_lp", "teacher_lp", "teacher_at_student_topk_lp", "segment_id"]


def release_record(margins: np.ndarray, advantages: np.ndarray, segment_id: np.ndarray) -> dict:
    """The release rule on one rollout's recorded segments (segment_id [T], contiguous, in order)."""
    length = len(margins)
    bounds = np.flatnonzero(np.diff(segment_id)) + 1
    segments = [list(range(a, b)) for a, b in zip(np.r_[0, bounds], np.r_[bounds, length])]
    scores = aggregate_segment_scores(margins.tolist(), segments)
    release_segment, accepted, gain = bic_downward_change_point(scores)
    release_token = sum(len(s) for s in segments[:release_segment]) if accepted else length
    pre, post = slice(0, release_token), slice(release_token, length)
    return {
        "accepted": accepted, "bic_gain": gain, "release_fraction": release_token / length,
        "segments": len(segments),
        "margin_pre": float(np.mean(margins[pre])) if release_token else np.nan,
        "margin_post": float(np.mean(margins[post])) if release_token < length else np.nan,
        "advantage_pre": float(np.mean(advantages[pre])) if release_token else np.nan,
        "advantage_post": float(np.mean(advantages[post])) if release_token < length else np.nan,
    }


def collect(paths: list[Path], support_k: int | None = None) -> Teachability:
    out = Teachability()
    for reader in iter_shards(paths, skipped=out.skipped):
        import tomllib

        spec = tomllib.loads(reader.attrs.get("spec_toml", "")) if reader.attrs.get("spec_toml") else {}
        last = int(spec.get("train", {}).get("steps", 0))
        k = support_k or spec.get("mask", {}).get("support_k") or spec.get("scoring", {}).get("top_k")
        step = int(reader.attrs.get("step", 0))
        label = out.label(step, last)
        if label is None:
            continue
        for record in reader.iter_rollouts(columns=COLUMNS):
            if record.row["kind"] != "original":
                continue
            tokens = record.tokens
            advantages = (tokens["teacher_lp"] - tokens["student_lp"]).astype(np.float64)
            margins = teacher_top2_margin_from_logprobs(tokens["teacher_at_student_topk_lp"], k)
            out.advantage[label].add(advantages)
            out.margin[label].add(np.asarray(margins, dtype=np.float64))
            if "segment_id" in tokens and len(advantages) >= 2:
                out.releases[label].append(release_record(np.asarray(margins), advantages,
                                                          np.asarray(tokens["segment_id"])))
    return out


def bin_rows(stats: dict[str, BinStats], normalise: bool) -> tuple[list[str], list[list[str]]]:
    labels = sorted(stats)
    headers = ["bin"] + [f"{lab} mean" for lab in labels] + [f"{lab} {'norm. std' if normalise else 'std'}"
                                                             for lab in labels]
    rows = []
    for b in range(NUM_BINS):
        row = [f"{b * 5:>2d}-{(b + 1) * 5}%"]
        row += [f"{stats[lab].mean()[b]:+.4f}" for lab in labels]
        for lab in labels:
            std = stats[lab].std()[b]
            row.append(f"{std / stats[lab].overall_std():.3f}" if normalise else f"{std:.4f}")
        rows.append(row)
    return headers, rows


def release_rows(result: Teachability) -> tuple[list[str], list[list[str]]]:
    rows = []
    for label in sorted(result.releases):
        recs = result.releases[label]
        if not recs:
            continue
        accepted = [r for r in recs if r["accepted"]]
        rows.append([
            label, str(len(recs)), f"{len(accepted) / len(recs):.2f}",
            f"{np.mean([r['release_fraction'] for r in recs]):.3f}",
            f"{np.mean([r['bic_gain'] for r in recs]):.3f}",
            f"{np.nanmean([r['margin_pre'] for r in accepted]) if accepted else np.nan:.3f}",
            f"{np.nanmean([r['margin_post'] for r in accepted]) if accepted else np.nan:.3f}",
            f"{np.nanmean([r['advantage_pre'] for r in accepted]) if accepted else np.nan:+.3f}",
            f"{np.nanmean([r['advantage_post'] for r in accepted]) if accepted else np.nan:+.3f}",
        ])
    return ["rollouts", "n", "accepted", "mean release position", "mean BIC gain", "margin pre",
            "margin post", "A pre", "A post"], rows


def plot(result: Teachability, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(NUM_BINS) * 5 + 2.5
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for label, stats in sorted(result.advantage.items()):
        axes[0].plot(x, stats.mean(), marker=".", label=label)
        axes[1].plot(x, stats.std() / stats.overall_std(), marker=".", label=label)
    for label, stats in sorted(result.margin.items()):
        axes[2].plot(x, stats.mean(), marker=".", label=label)
    for ax, title, ylabel in zip(axes, ["(a) mean advantage", "(b) normalised std of advantage",
                                        "teacher top-1/top-2 margin in student top-K"],
                                 ["A_t = log p_T - log p_S", "std / overall std", "margin (nats)"]):
        ax.set_title(title)
        ax.set_xlabel("normalised position (%)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [out_dir / "teachability_bins.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    recs = [r for rs in result.releases.values() for r in rs]
    if recs:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        axes[0].hist([r["bic_gain"] for r in recs], bins=20)
        axes[0].set_xlabel("BIC gain (H0 - H1)")
        axes[0].set_ylabel("rollouts")
        axes[1].hist([r["release_fraction"] for r in recs if r["accepted"]], bins=20, range=(0, 1))
        axes[1].set_xlabel("release position (fraction of the response)")
        axes[1].set_ylabel("accepted releases")
        fig.tight_layout()
        paths.append(out_dir / "release_diagnostics.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
