"""Seed 002, local teachability collapse: the diagnosis and the release-rule diagnostics.

From the original (on-policy) rollouts of each step's shard:
- the sampled-token advantage A_t = log p_T(y_t) - log p_S(y_t) over 20 bins of normalised
  position: mean, std, and std normalised by the overall std (so the student at step 0 and the
  trained student at the last step share a scale), Figure 1 of the seed. The std is sigma_A as
  section 3 defines it, "the local token-level variance ... across adjacent actions": the std
  along each realised trajectory within the bin, averaged over trajectories (`pooled=True`: the
  std of the bin's tokens pooled across trajectories, which also counts how trajectories differ);
- the comparison is on the same instances: when both steps' shards are there, only the problems
  measured at step 0 AND at the last step are used (`train.measure_problems = "step0"` makes the
  last step sample step 0's problems), and the report says how many;
- the teacher's top-1/top-2 margin inside the student's top-K per bin (Figure 2);
- per rollout, the release rule on its recorded sentence segments: BIC gain, whether a release
  was accepted, the release position as a fraction of the response, and the mean margin and
  advantage before vs after it (Figures 3, 6).
Streams shard by shard, keeping per-bin sums and one small record per rollout.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpcdistill.distill.release import (
    aggregate_segment_scores,
    bic_downward_change_point,
    teacher_top2_margin_from_logprobs,
)
from hpcdistill.record import ShardReader, iter_shards

log = logging.getLogger(__name__)

NUM_BINS = 20


def position_bins(length: int, num_bins: int = NUM_BINS) -> np.ndarray:
    """[length] bin of each position t: floor(t * num_bins / length), normalised position."""
    return np.minimum((np.arange(length) * num_bins) // max(length, 1), num_bins - 1)


@dataclass(frozen=True)
class TrajectorySums:
    """What one trajectory adds to a BinStats (kept per rollout until the comparison knows which
    problems it uses): per-bin sums [20], sums of squares [20], counts [20], the std along the
    trajectory in each bin [20], and its std over all its tokens (None below two tokens)."""

    sums: np.ndarray
    sums_sq: np.ndarray
    counts: np.ndarray
    std: np.ndarray
    overall_std: float | None


def trajectory_sums(values: np.ndarray) -> TrajectorySums | None:
    """One trajectory's values [T] -> its increments (None when T = 0)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return None
    bins = position_bins(n)
    sums = np.bincount(bins, weights=values, minlength=NUM_BINS)
    counts = np.bincount(bins, minlength=NUM_BINS)
    # along this trajectory: two-pass variance per bin (exact 0 for a constant stretch)
    with np.errstate(invalid="ignore", divide="ignore"):
        bin_mean = sums / counts
    deviation = values - bin_mean[bins]
    std = np.sqrt(np.bincount(bins, weights=deviation * deviation, minlength=NUM_BINS) / np.maximum(counts, 1))
    return TrajectorySums(sums, np.bincount(bins, weights=values * values, minlength=NUM_BINS), counts, std,
                          float(np.std(values)) if n >= 2 else None)


@dataclass
class BinStats:
    """A per-token quantity over 20 bins of normalised position, streamed trajectory by trajectory.

    mean: over every token of the bin. std (sigma_A, seed 002 section 3): per trajectory, the std
    (ddof 0) of its tokens in the bin, then the mean over the trajectories with >= 2 tokens there
    (one token has no spread); `pooled=True`: the std of all the bin's tokens pooled together.
    """

    total: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BINS))
    total_sq: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BINS))
    count: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BINS))
    trajectory_std_sum: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BINS))
    trajectory_count: np.ndarray = field(default_factory=lambda: np.zeros(NUM_BINS))
    trajectory_overall_std_sum: float = 0.0
    trajectories: int = 0  # with >= 2 tokens

    def add(self, values: np.ndarray) -> None:
        """One trajectory's values [T]."""
        self.add_trajectory(trajectory_sums(values))

    def add_trajectory(self, t: "TrajectorySums | None") -> None:
        if t is None:
            return
        self.total += t.sums
        self.total_sq += t.sums_sq
        self.count += t.counts
        spread = t.counts >= 2
        self.trajectory_std_sum[spread] += t.std[spread]
        self.trajectory_count[spread] += 1
        if t.overall_std is not None:
            self.trajectory_overall_std_sum += t.overall_std
            self.trajectories += 1

    def mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.total / self.count

    def std(self, pooled: bool = False) -> np.ndarray:
        """[20] sigma per bin: mean over trajectories of the std along each (default), or pooled."""
        with np.errstate(invalid="ignore", divide="ignore"):
            if not pooled:
                return self.trajectory_std_sum / self.trajectory_count
            var = self.total_sq / self.count - self.mean() ** 2
        return np.sqrt(np.maximum(var, 0.0))

    def overall_std(self, pooled: bool = False) -> float:
        """The scale `normalised std` divides by: the mean over trajectories of each one's std over
        all its tokens (default), or the std of every token pooled."""
        if not pooled:
            return self.trajectory_overall_std_sum / self.trajectories if self.trajectories else float("nan")
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
    problems: dict[str, int] = field(default_factory=dict)  # label -> distinct problems used
    # run id -> problems measured at both step 0 and the last step (the comparison uses only
    # these when there are any; 0 = the two steps measured different instances)
    common_problems: dict[str, int] = field(default_factory=dict)

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


@dataclass(frozen=True)
class _Rollout:
    """One original rollout of a step-0 or last-step shard, reduced to what the tables need."""

    label: str
    run_id: str
    problem_id: str
    advantage: TrajectorySums | None
    margin: TrajectorySums | None
    release: dict | None


class Collector:
    """Teachability fed one open shard at a time (`add`). The step-0 vs last-step comparison
    keeps only the problems both steps measured, known after the last shard: so each rollout is
    kept reduced (its per-bin sums, its release record) and `result()` adds the kept ones up in
    shard order, as a second pass over the shards would."""

    def __init__(self, support_k: int | None = None):
        self.support_k = support_k
        self.skipped: list[tuple[str, str]] = []
        self.rollouts: list[_Rollout] = []
        # (run id, label) -> the problem ids of the original rollouts there
        self.measured: dict[tuple[str, str], set[str]] = defaultdict(set)

    def add(self, reader: ShardReader) -> None:
        spec = reader.spec
        label = Teachability().label(int(reader.attrs.get("step", 0)), spec.train.steps)
        if label is None:
            return
        k = self.support_k or spec.mask.support_k or spec.scoring.top_k
        run_id = str(reader.attrs.get("run_id"))
        for record in reader.iter_rollouts(columns=COLUMNS):
            if record.row["kind"] != "original":
                continue
            problem = record.row["problem_id"]
            self.measured[(run_id, label)].add(str(problem))
            tokens = record.tokens
            advantages = (tokens["teacher_lp"] - tokens["student_lp"]).astype(np.float64)
            margins = teacher_top2_margin_from_logprobs(tokens["teacher_at_student_topk_lp"], k)
            release = None
            if "segment_id" in tokens and len(advantages) >= 2:
                release = release_record(np.asarray(margins), advantages, np.asarray(tokens["segment_id"]))
            self.rollouts.append(_Rollout(label, run_id, problem, trajectory_sums(advantages),
                                          trajectory_sums(np.asarray(margins, dtype=np.float64)), release))

    def result(self, same_problems: bool = True) -> Teachability:
        """`same_problems`: compare step 0 and the last step on the problems both measured (seed 002
        samples "from both models across 500 training instances"), when a run has any in common."""
        out = Teachability(skipped=self.skipped)
        keep: dict[str, set[str]] = {}  # run id -> the problems to use (absent: all)
        if same_problems:
            for run_id in {r for r, _ in self.measured}:
                labels = [lab for r, lab in self.measured if r == run_id]
                if len(labels) < 2:
                    continue
                common = set.intersection(*(self.measured[(run_id, lab)] for lab in labels))
                out.common_problems[run_id] = len(common)
                if common:
                    keep[run_id] = common
                else:
                    log.warning("run %s: step 0 and the last step measured no problem in common; comparing "
                                "different instances (set train.measure_problems = 'step0')", run_id)
        used: dict[str, set[str]] = defaultdict(set)
        for r in self.rollouts:
            wanted = keep.get(r.run_id)
            if wanted is not None and r.problem_id not in wanted:
                continue
            used[r.label].add(r.problem_id)
            out.advantage[r.label].add_trajectory(r.advantage)
            out.margin[r.label].add_trajectory(r.margin)
            if r.release is not None:
                out.releases[r.label].append(r.release)
        out.problems = {label: len(ids) for label, ids in used.items()}
        return out


def collect(paths: list[Path], support_k: int | None = None, same_problems: bool = True) -> Teachability:
    """Teachability of the shards under `paths` (see `Collector.result` for `same_problems`)."""
    collector = Collector(support_k)
    for reader in iter_shards(paths, skipped=collector.skipped, spec=True):
        collector.add(reader)
    return collector.result(same_problems)


def comparison_note(result: Teachability) -> str:
    """Which instances the step-0 vs last-step comparison is on, for the report."""
    if not result.common_problems:
        return ", ".join(f"{lab}: {n} problems" for lab, n in sorted(result.problems.items()))
    counts = sorted(result.common_problems.values())
    if all(n == 0 for n in counts):
        return "no problem measured at both steps: different instances " + \
            f"({', '.join(f'{lab}: {n}' for lab, n in sorted(result.problems.items()))})"
    if len(counts) == 1:
        return f"the same {counts[0]} problems at both steps"
    return f"the same problems at both steps in each of {len(counts)} runs ({', '.join(map(str, counts))})"


def bin_rows(stats: dict[str, BinStats], normalise: bool, pooled: bool = False
             ) -> tuple[list[str], list[list[str]]]:
    """One row per bin: the mean and the std (normalised by the overall std when `normalise`);
    `pooled`: the std pooled across trajectories instead of along each (sigma_A)."""
    labels = sorted(stats)
    headers = ["bin"] + [f"{lab} mean" for lab in labels] + [f"{lab} {'norm. std' if normalise else 'std'}"
                                                             for lab in labels]
    rows = []
    for b in range(NUM_BINS):
        row = [f"{b * 5:>2d}-{(b + 1) * 5}%"]
        row += [f"{stats[lab].mean()[b]:+.4f}" for lab in labels]
        for lab in labels:
            std = stats[lab].std(pooled)[b]
            row.append(f"{std / stats[lab].overall_std(pooled):.3f}" if normalise else f"{std:.4f}")
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


def plot_bins(result: Teachability, path: Path, pooled: bool = False) -> Path:
    """Figures 1 and 2 of the seed: mean and normalised std of the advantage, and the margin, by bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(NUM_BINS) * 5 + 2.5
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for label, stats in sorted(result.advantage.items()):
        axes[0].plot(x, stats.mean(), marker=".", label=label)
        axes[1].plot(x, stats.std(pooled) / stats.overall_std(pooled), marker=".", label=label)
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def release_records(result: Teachability) -> list[dict]:
    return [r for rs in result.releases.values() for r in rs]


def plot_releases(result: Teachability, path: Path) -> Path:
    """Figures 3 and 6: BIC gains of every rollout, release positions of the accepted ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = release_records(result)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].hist([r["bic_gain"] for r in recs], bins=20)
    axes[0].set_xlabel("BIC gain (H0 - H1)")
    axes[0].set_ylabel("rollouts")
    axes[1].hist([r["release_fraction"] for r in recs if r["accepted"]], bins=20, range=(0, 1))
    axes[1].set_xlabel("release position (fraction of the response)")
    axes[1].set_ylabel("accepted releases")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
