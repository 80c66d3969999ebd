"""Training loss on the GPU: hidden states -> JSD(beta) forward + backward, naive vs Liger vs ours.

Issue 10's second table (T = 4,096 positions, H = 4,096, V = 151,936, bf16, beta = 0.5; the
teacher given as hidden states + its lm_head weight, as LigerFusedLinearJSD takes it):

    naive      logits = h @ W^T for both models, objectives-style JSD on [T, V], autograd
    liger      liger_kernel.transformers.LigerFusedLinearJSD, when installed
    fused      hpcdistill.kernels.loss.fused_linear_distill_loss(kind="jsd")

time (CUDA events, median), peak extra memory, and errors against float64 on a row subset: the
loss and d loss / d h (each implementation run on the subset alone; float64 computed on device).

    python bench/gpu_loss.py [--tokens 4096 --hidden 4096 --vocab 151936 --beta 0.5]
    python bench/gpu_loss.py --cpu-smoke   # tiny sizes on CPU, kernel in Triton's interpreter
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--chunk", type=int, default=None, help="rows per chunk for ours (default: fused_loss.default_chunk)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--check-rows", type=int, default=64)
    p.add_argument("--skip-naive", action="store_true", help="the naive row needs ~30 GiB at the default size")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny sizes on CPU (kernel in TRITON_INTERPRET=1): checks the script, times nothing useful")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        args.tokens, args.hidden, args.vocab, args.repeats, args.check_rows = 16, 32, 300, 2, 8
        args.dtype, args.chunk = "fp32", 8
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_loss: no CUDA device here. Run it on a GPU machine, or pass --cpu-smoke to check the "
              "script at tiny sizes on CPU.", file=sys.stderr)
        return 2
    from hpcdistill.kernels import loss as fused_loss
    from hpcdistill.kernels.common import triton_available

    if not triton_available():
        print("gpu_loss: triton is not installed (pip install 'hpcdistill[gpu]').", file=sys.stderr)
        return 2
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError:
        LigerFusedLinearJSD = None
    dev = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    T, H, V, beta = args.tokens, args.hidden, args.vocab, args.beta
    g = torch.Generator(device=dev).manual_seed(0)
    h = (torch.randn(T, H, device=dev, generator=g)).to(dtype).requires_grad_()
    W = (torch.randn(V, H, device=dev, generator=g) / math.sqrt(H) * 4).to(dtype).requires_grad_()
    th = (torch.randn(T, H, device=dev, generator=g)).to(dtype)
    tW = (W.detach().float() + torch.randn(V, H, device=dev, generator=g) / math.sqrt(H) * 2).to(dtype)

    def jsd_rows(s, t):  # per-token JSD(beta), objectives.jsd_loss's formula, in fp32
        ls, lt = torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1)
        lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
        return beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)

    def naive(h_, W_, th_, tW_):
        with torch.no_grad():
            t_logits = th_ @ tW_.T
        return jsd_rows(h_ @ W_.T, t_logits).mean()

    def ours(h_, W_, th_, tW_):
        return fused_loss.fused_linear_distill_loss(h_, W_, teacher_hidden=th_, teacher_weight=tW_, kind="jsd",
                                                    beta=beta, chunk=args.chunk, backend="triton")

    impls = [] if args.skip_naive else [("naive torch (full logits, fp32 JSD, autograd)", naive)]
    if LigerFusedLinearJSD is not None and dev.type == "cuda":
        # Liger's JSD mixes M = (1 - beta) P + beta Q with P the teacher: the same loss at beta = 0.5 only
        liger_mod = LigerFusedLinearJSD(jsd_beta=beta)
        impls.append(("Liger LigerFusedLinearJSD", lambda h_, W_, th_, tW_: liger_mod(h_, W_, th_, tW_)))
    impls.append(("ours: fused_linear_distill_loss (Triton)", ours))

    def step(fn):
        h.grad = W.grad = None
        loss = fn(h, W, th, tW)
        loss.backward()
        return loss

    def timed(fn) -> float:
        for _ in range(2):
            step(fn)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times = []
        for _ in range(args.repeats):
            if dev.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                step(fn)
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                step(fn)
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def peak_extra(fn) -> float | None:
        if dev.type != "cuda":
            return None
        h.grad = W.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(fn)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**30  # includes h.grad and W.grad

    # float64 reference on a row subset: loss and d loss / d h (dW needs every row)
    rows = slice(0, min(args.check_rows, T))
    h64 = h.detach()[rows].double().requires_grad_()
    s64 = h64 @ W.detach().double().T
    t64 = th[rows].double() @ tW.double().T
    ls, lt = torch.log_softmax(s64, -1), torch.log_softmax(t64, -1)
    lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
    ref_loss = (beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)).mean()
    (ref_dh,) = torch.autograd.grad(ref_loss, h64)
    del s64, t64, ls, lt, lm

    def errors(fn) -> tuple[float, float]:
        hs = h.detach()[rows].clone().requires_grad_()
        Ws = W.detach().clone().requires_grad_()
        loss = fn(hs, Ws, th[rows], tW)
        (dh,) = torch.autograd.grad(loss, hs)
        return (abs(loss.double().item() - ref_loss.item()) / abs(ref_loss.item()),
                ((dh.double() - ref_dh).norm() / ref_dh.norm()).item())

    results = []
    for name, fn in impls:
        ms = timed(fn)
        gib = peak_extra(fn)
        results.append((name, ms, gib, *errors(fn)))
    flops = 4 * 2 * T * V * H  # student and teacher projections, dh and dW products
    where = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (Triton interpreter; times meaningless)"
    print(f"\nJSD(beta={beta}) forward+backward, T={T} H={H} V={V} {args.dtype} on {where}; median of "
          f"{args.repeats}; {flops / 1e12:.1f} TFLOP of matrix products; errors vs float64 over {rows.stop} rows")
    if LigerFusedLinearJSD is None:
        print("(liger-kernel is not installed: no Liger row)")
    print("| implementation | time (ms) | peak extra memory (incl. grads) | loss rel err | dh rel err |")
    print("|---|---|---|---|---|")
    for name, ms, gib, e_loss, e_dh in results:
        mem = "-" if gib is None else f"{gib:.3f} GiB"
        print(f"| {name} | {ms:.2f} | {mem} | {e_loss:.2e} | {e_dh:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
