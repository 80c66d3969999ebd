"""Shard size and throughput against the raw arrays and the disk (DESIGN.md section 8).

Writes one synthetic shard of realistic shape (default 2,000 rollouts x ~500 tokens, k = 20) per
compression setting through the real ShardWriter.append path, then streams it back with
ShardReader.iter_rollouts. The baseline, measured in the same run on the same disk: the same raw
bytes written with numpy.tofile + fsync and read back with numpy.fromfile. Reads come from the
page cache in both cases (the files were just written), so read ratios compare CPU-side cost.

    python bench/shards.py [--rollouts 2000] [--tokens 500] [--top-k 20] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from hpcdistill.record import ShardReader, ShardWriter

VOCAB = 151_936


def synthetic(num_rollouts: int, mean_tokens: int, k: int, seed: int = 0):
    """Flat token arrays with the statistics of real scores, and per-rollout lengths."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.gamma(4.0, mean_tokens / 4.0, num_rollouts), 8, 8 * mean_tokens).astype(np.int64)
    n = int(lengths.sum())
    # Top-k log-probs: sorted logits, log-softmax over the slice, minus the mass outside the top-k.
    logits = np.sort(rng.standard_normal((n, k), dtype=np.float32) * 2.5, axis=1)[:, ::-1]
    topk_lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    topk_lp -= rng.exponential(0.2, (n, 1)).astype(np.float32)
    teacher_at = np.minimum(topk_lp + rng.normal(0, 0.7, (n, k)).astype(np.float32), 0)
    # Token ids: Zipf-like (frequent tokens have small ids), as in BPE vocabularies.
    topk_ids = ((rng.zipf(1.15, (n, k)) - 1) % VOCAB).astype(np.int32)
    sampled_top1 = rng.random(n) < 0.8
    ids = np.where(sampled_top1, topk_ids[:, 0], topk_ids[:, 3])
    student_lp = np.where(sampled_top1, topk_lp[:, 0], topk_lp[:, 3])
    tokens = {
        "ids": ids,
        "student_lp": student_lp,
        "teacher_lp": np.minimum(student_lp + rng.normal(0, 0.7, n).astype(np.float32), 0),
        "student_topk_ids": topk_ids,
        "student_topk_lp": np.ascontiguousarray(topk_lp),
        "teacher_at_student_topk_lp": teacher_at,
        "topk_kl": rng.exponential(0.3, n).astype(np.float32),
        "full_kl": rng.exponential(0.4, n).astype(np.float32),
        "entropy_s": rng.exponential(1.0, n).astype(np.float32),
        "entropy_t": rng.exponential(1.0, n).astype(np.float32),
        "sampler_lp": (student_lp + rng.normal(0, 1e-3, n)).astype(np.float32),
    }
    return lengths, {name: np.ascontiguousarray(a) for name, a in tokens.items()}


def raw_baseline(tokens: dict, directory: Path) -> tuple[float, float]:
    """Seconds to write (tofile + fsync) and read (fromfile) the raw arrays."""
    paths = {name: directory / f"raw_{name}.bin" for name in tokens}
    t0 = time.perf_counter()
    for name, array in tokens.items():
        with open(paths[name], "wb") as fh:
            array.tofile(fh)
            fh.flush()
            os.fsync(fh.fileno())
    write_s = time.perf_counter() - t0
    read_s = float("inf")
    for _ in range(3):  # best of three: the first read also pays for page faults of fresh memory
        t0 = time.perf_counter()
        for name, array in tokens.items():
            np.fromfile(paths[name], dtype=array.dtype)
        read_s = min(read_s, time.perf_counter() - t0)
    for p in paths.values():
        p.unlink()
    return write_s, read_s


def write_shard(path: Path, lengths, tokens, k: int, compression: str, fletcher32: bool) -> float:
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    t0 = time.perf_counter()
    with ShardWriter(path, attrs={"run_id": "bench"}, top_k=k, compression=compression,
                     fletcher32=fletcher32) as writer:
        for i, length in enumerate(lengths):
            lo, hi = offsets[i], offsets[i + 1]
            row = {"problem_id": f"problem-{i // 8:05d}", "sample_idx": i % 8, "step": 0,
                   "kind": "original", "reward": float(i % 3 == 0), "seed": 1, "weight_version": 0}
            writer.append(row, {name: a[lo:hi] for name, a in tokens.items()})
        writer.add_metrics(0, {"reward_mean": 0.33})
    return time.perf_counter() - t0


def read_shard(path: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    seen = 0
    with ShardReader(path) as reader:
        for record in reader.iter_rollouts():
            seen += len(record.tokens["ids"])
    return time.perf_counter() - t0, seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=2000)
    parser.add_argument("--tokens", type=int, default=500, help="mean tokens per rollout")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--settings", default="none,lzf,gzip1,gzip4,gzip1-nocheck")
    args = parser.parse_args()

    t0 = time.perf_counter()
    lengths, tokens = synthetic(args.rollouts, args.tokens, args.top_k)
    n = int(lengths.sum())
    raw_bytes = sum(a.nbytes for a in tokens.values())
    mb = raw_bytes / 1e6
    print(f"synthetic data: {args.rollouts} rollouts, {n:,} tokens, k={args.top_k}, "
          f"{raw_bytes / n:.0f} raw bytes/token, {mb:.0f} MB raw ({time.perf_counter() - t0:.1f} s to generate)")

    directory = Path(tempfile.mkdtemp(prefix="bench-shards-", dir=args.dir))
    try:
        disk_w, disk_r = raw_baseline(tokens, directory)
        print(f"disk baseline (numpy tofile+fsync / fromfile): write {mb / disk_w:,.0f} MB/s, "
              f"read {mb / disk_r:,.0f} MB/s (page cache)\n")
        header = (f"{'setting':<14} {'B/token':>8} {'size/raw':>9} {'write MB/s':>11} {'vs disk':>8} "
                  f"{'read MB/s':>10} {'vs disk':>8} {'read tok/s':>12}")
        print(header)
        print("-" * len(header))
        for setting in args.settings.split(","):
            compression, _, check = setting.partition("-")
            path = directory / f"{setting}.h5"
            write_s = write_shard(path, lengths, tokens, args.top_k, compression, fletcher32=check != "nocheck")
            read_s, seen = read_shard(path)
            assert seen == n, (seen, n)
            size = path.stat().st_size
            print(f"{setting:<14} {size / n:>8.1f} {size / raw_bytes:>9.3f} {mb / write_s:>11.0f} "
                  f"{disk_w / write_s:>8.2f} {mb / read_s:>10.0f} {disk_r / read_s:>8.2f} {n / read_s:>12,.0f}")
            path.unlink()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - t0:.1f} s; 'vs disk' = raw numpy time / shard time (1.0 = disk speed)")


if __name__ == "__main__":
    main()
