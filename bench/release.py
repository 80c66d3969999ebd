"""Release rule speed: the linear-time change point against seed 002's A.11 reference.

Run: python bench/release.py [--seed 0]

For each size the same random margin-like score sequences (a drop after the first third) go
through both implementations in one process; the table gives the median time per call and the
ratio reference / ours, and checks that both return the same answer. The reference is quadratic,
so at 10,000 segments it is timed once (about 20-40 s here).
"""

from __future__ import annotations

import argparse
import math
import sys
import random
import statistics
import time
from pathlib import Path
from typing import Callable

from hpcdistill.distill.release import bic_downward_change_point

# The reference is seed 002's appendix A.11, kept verbatim in one place: the tests that hold the
# implementation to it (tests/test_release.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_release import ref_bic_downward_change_point  # noqa: E402


# --- Bench ---
def margin_scores(n: int, rng: random.Random) -> list[float]:
    """Segment scores log1p(mean margin) with a downward shift after the first third."""
    return [math.log1p(rng.expovariate(1.0) * (2.0 if i < n // 3 else 0.7)) for i in range(n)]


def time_calls(fn: Callable, inputs: list[list[float]]) -> tuple[float, list]:
    """Median seconds per call over `inputs`, and the results."""
    times, results = [], []
    for scores in inputs:
        start = time.perf_counter()
        results.append(fn(scores))
        times.append(time.perf_counter() - start)
    return statistics.median(times), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    repeats = {10: 2000, 100: 200, 1000: 5, 10_000: 1}

    print(f"{'segments':>9} {'calls':>6} {'reference (s)':>14} {'ours (s)':>11} {'ratio':>9}  same answer")
    for n, calls in repeats.items():
        inputs = [margin_scores(n, rng) for _ in range(calls)]
        ref_time, ref_results = time_calls(ref_bic_downward_change_point, inputs)
        our_time, our_results = time_calls(bic_downward_change_point, inputs)
        same = all(
            a[0] == b[0] and a[1] == b[1] and abs(a[2] - b[2]) <= 1e-9 * abs(b[2])
            for a, b in zip(our_results, ref_results)
        )
        print(f"{n:>9} {calls:>6} {ref_time:>14.6f} {our_time:>11.6f} {ref_time / our_time:>8.1f}x  {same}")


if __name__ == "__main__":
    main()
