"""Scoring on the GPU: floor, naive torch, chunked, torch.compile'd chunk and the fused Triton kernel.

Issue 10's table in one run (T = 4,096 positions, V = 151,936, k = 20, bf16 logits by default):
time (CUDA events, warm-up, median of repeats), peak extra memory (max_memory_allocated above
what the inputs hold) and the largest error against float64 on a subset of rows, for

    floor      reading both logit tensors once, at the copy rate measured in this run
    naive      full fp32 log-softmax of both, topk, gather, full-vocab statistics
    chunked    hpcdistill.kernels.scoring.chunked_score_torch, 512 rows at a time
    compiled   torch.compile of the same 512-row chunk
    fused      hpcdistill.kernels.scoring.fused_score (a few block sizes / warp counts)

    python bench/gpu_scoring.py [--tokens 4096 --vocab 151936 --k 20 --dtype bf16]
    python bench/gpu_scoring.py --cpu-smoke   # tiny sizes on CPU, kernel in Triton's interpreter
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

FUSED_CONFIGS = ((4096, 8), (8192, 8), (8192, 16), (2048, 4))  # (BLOCK_V, num_warps)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--check-rows", type=int, default=64, help="rows compared against float64")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny sizes on CPU (kernel in TRITON_INTERPRET=1): checks the script, times nothing useful")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        args.tokens, args.vocab, args.k, args.repeats, args.check_rows = 8, 300, 8, 2, 8
        args.no_compile = True
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_scoring: no CUDA device here. Run it on a GPU machine, or pass --cpu-smoke to check "
              "the script at tiny sizes on CPU.", file=sys.stderr)
        return 2
    from hpcdistill.kernels import scoring as fs
    from hpcdistill.kernels.common import triton_available

    if not triton_available():
        print("gpu_scoring: triton is not installed (pip install 'hpcdistill[gpu]').", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    T, V, k = args.tokens, args.vocab, args.k
    g = torch.Generator(device=dev).manual_seed(0)
    # random logits with a realistic spread; the teacher is a perturbed student (never zeros)
    s = (torch.randn(T, V, device=dev, generator=g) * 4).to(dtype)
    t = (s.float() + torch.randn(T, V, device=dev, generator=g) * 2).to(dtype)
    in_bytes = 2 * s.numel() * s.element_size()

    def timed(fn) -> float:
        """Median milliseconds of fn() over the repeats, after warm-up."""
        for _ in range(2):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            times = []
            for _ in range(args.repeats):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            return statistics.median(times)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def peak_extra(fn) -> float | None:
        """GiB allocated above the live tensors during one fn() call (CUDA only)."""
        if dev.type != "cuda":
            return None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak / 2**30

    # float64 reference on a subset of rows. Top-k quantities are checked at each implementation's
    # own ids (tied logits make the id choice free; bf16 has many ties), and those ids must hold
    # the reference's k largest student values.
    rows = slice(0, min(args.check_rows, T))
    ref = fs.chunked_score_torch(s[rows].double(), t[rows].double(), k)
    s64, t64 = s[rows].double(), t[rows].double()
    ls64 = s64 - torch.logsumexp(s64, -1, keepdim=True)
    lt64 = t64 - torch.logsumexp(t64, -1, keepdim=True)

    def max_err(out: dict) -> float:
        ids = out["student_topk_ids"][rows].long()
        if not torch.equal(s64.gather(-1, ids), torch.sort(s64, -1, descending=True).values[:, :k]):
            return float("nan")  # not the student's top-k
        a, b = ls64.gather(-1, ids), lt64.gather(-1, ids)
        la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        want = dict(ref, student_topk_lp=a, teacher_at_student_topk_lp=b, topk_kl=(la.exp() * (la - lb)).sum(-1))
        err = 0.0
        for name in ("student_topk_lp", "teacher_at_student_topk_lp", "topk_kl", "reverse_kl", "forward_kl",
                     "entropy_s", "entropy_t", "student_lse", "teacher_lse"):
            got = out[name][rows].double()
            if got.isnan().any():
                return float("nan")
            err = max(err, ((got - want[name]).abs() / (1 + want[name].abs())).max().item())
        return err

    def naive():
        ls = torch.log_softmax(s.float(), -1)  # [T, V] fp32
        lt = torch.log_softmax(t.float(), -1)
        ids = torch.topk(ls, k, -1).indices
        s_at, t_at = ls.gather(-1, ids), lt.gather(-1, ids)
        ps, pt = ls.exp(), lt.exp()
        a, b = torch.log_softmax(s_at, -1), torch.log_softmax(t_at, -1)
        rev = (ps * (ls - lt)).sum(-1)
        return {"student_topk_ids": ids, "student_topk_lp": s_at, "teacher_at_student_topk_lp": t_at,
                "topk_kl": (a.exp() * (a - b)).sum(-1), "reverse_kl": rev, "full_kl": rev,
                "forward_kl": (pt * (lt - ls)).sum(-1), "entropy_s": -(ps * ls).sum(-1),
                "entropy_t": -(pt * lt).sum(-1), "student_lse": torch.logsumexp(s.float(), -1),
                "teacher_lse": torch.logsumexp(t.float(), -1)}

    results = []  # (name, ms, GiB, err)
    # floor: a device-to-device copy of both tensors measures the copy rate (bytes read + written)
    dst_s, dst_t = torch.empty_like(s), torch.empty_like(t)
    copy_ms = timed(lambda: (dst_s.copy_(s), dst_t.copy_(t)))
    rate = 2 * in_bytes / (copy_ms * 1e-3)  # B/s, read + write
    floor_ms = in_bytes / rate * 1e3
    del dst_s, dst_t
    results.append((f"floor: read both once ({in_bytes / 1e9:.2f} GB at {rate / 1e12:.2f} TB/s)", floor_ms, None, None))
    results.append(("naive torch (fp32 log-softmax of both, topk, gather)", timed(naive), peak_extra(naive),
                    max_err(naive())))
    chunked = lambda: fs.chunked_score_torch(s, t, k, chunk=512)  # noqa: E731
    results.append(("chunked torch (512 rows)", timed(chunked), peak_extra(chunked), max_err(chunked())))
    if not args.no_compile:
        compiled_chunk = torch.compile(lambda a, b: fs.chunked_score_torch(a, b, k, chunk=a.shape[0]))

        def compiled():
            parts = [compiled_chunk(s[c:c + 512], t[c:c + 512]) for c in range(0, T, 512)]
            return {n: torch.cat([p[n] for p in parts]) for n in fs.SCORE_NAMES}
        results.append(("torch.compile of the 512-row chunk", timed(compiled), peak_extra(compiled),
                        max_err(compiled())))
    if dev.type == "cuda":
        topk_only = lambda: torch.topk(s, k, -1)  # noqa: E731
        results.append(("torch.topk alone on the student logits", timed(topk_only), peak_extra(topk_only), None))
    configs = FUSED_CONFIGS if dev.type == "cuda" else ((64, 4),)
    for block_v, warps in configs:
        fused = lambda: fs.fused_score(s, t, k, block_v=block_v, num_warps=warps)  # noqa: E731
        results.append((f"fused Triton (BLOCK_V={block_v}, num_warps={warps})", timed(fused), peak_extra(fused),
                        max_err(fused())))

    where = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (Triton interpreter; times meaningless)"
    print(f"\nscoring T={T} V={V} k={k} {args.dtype} on {where}; median of {args.repeats}; "
          f"error = max |x - x64| / (1 + |x64|) over {rows.stop} rows")
    print(f"| implementation | time (ms) | x floor | peak extra memory | max error vs float64 |")
    print("|---|---|---|---|---|")
    for name, ms, gib, err in results:
        mem = "-" if gib is None else f"{gib:.3f} GiB"
        e = "-" if err is None else f"{err:.2e}"
        print(f"| {name} | {ms:.3f} | {ms / floor_ms:.1f} | {mem} | {e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
