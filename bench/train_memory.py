"""Peak memory and tokens/s of one training step: the whole-batch step against the memory-bounded one.

Issue 17. Both steps have the signature of `hpcdistill.train.update.update` and are compared by name:

    baseline   hpcdistill.train.whole_batch.update: the batch's student logits as one [N, V]
               float32 tensor with grad (memory grows with the step's tokens N)
    new        hpcdistill.train.update.update: micro-batches of trainer.micro_batch_tokens with
               gradient accumulation, the lm_head projected scoring.chunk_size rows at a time and
               recomputed in backward (on CUDA with trainer.kernels = "auto": the fused Triton loss)

Model: a random 2-layer Llama (V = 151,936, hidden 256, intermediate 512, 4 heads, seed 0),
float32 on CPU, bf16 with --cuda. Batch: N response tokens per step as N / 512 synthetic
rollouts of 32 prompt + 512 response tokens, shaped like `train.collect.ScoredRollout`; the
default objective (distill: SDPO's top-k KL on the student's top-20), `StepPlan(1.0, 0.0)`.

Each (step, N) runs in a fresh child process (`--child`), so its peak is its own:
peak extra memory = CPU: VmHWM during the update minus VmRSS just before it (the high-water mark
reset through /proc/self/clear_refs); CUDA: max_memory_allocated minus memory_allocated before;
both with the gradients of the previous step freed first, so the step's own gradients count.
tokens/s = N / wall time of one update, median of --repeats after one warm-up update; the peak
is the largest over those repeats. A CPU child runs under RLIMIT_AS = its size before the first
update + --max-memory-gb, so a step that would exhaust the machine fails to allocate and reads "OOM"
(as does a child killed by a signal); a child that fails otherwise reads "FAIL".

    python bench/train_memory.py [--tokens 2048 8192 32768 --repeats 3]
    python bench/train_memory.py --quick    # 512 and 2048 tokens: a smoke run
    python bench/train_memory.py --cuda     # bf16 on the GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import re
import resource
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np

STEPS = {"baseline": "hpcdistill.train.whole_batch", "new": "hpcdistill.train.update"}  # module.update
VOCAB, HIDDEN, INTERMEDIATE, LAYERS, HEADS, TOP_K, SEED = 151_936, 256, 512, 2, 4, 20, 0
OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "bad_alloc")
RESULT = "RESULT "  # prefix of the child's one line of JSON on stdout


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 32768], help="response tokens per step")
    p.add_argument("--quick", action="store_true", help="tokens 512 and 2048 only (a smoke run)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens of each rollout")
    p.add_argument("--response", type=int, default=512, help="response tokens of each rollout")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--cuda", action="store_true", help="bf16 on the GPU instead of float32 on the CPU")
    p.add_argument("--max-memory-gb", type=float, default=None,
                   help="memory a child may add (CPU: RLIMIT_AS; CUDA: a per-process fraction); "
                        "default on CPU: min(24, 0.7 x MemAvailable), on CUDA: no limit")
    p.add_argument("--micro-batch-tokens", type=int, default=None,
                   help="trainer.micro_batch_tokens (default: the spec's)")
    p.add_argument("--chunk-size", type=int, default=None, help="scoring.chunk_size (default: the spec's)")
    p.add_argument("--kernels", choices=("auto", "torch"), default=None,
                   help="trainer.kernels (default: the spec's, auto: the fused Triton loss on CUDA)")
    p.add_argument("--support", choices=("topk", "sampled", "full"), default="topk",
                   help="train.support: topk (SDPO's default, logits gathered at the top-k ids), sampled "
                        "(OPD: log p of the sampled token, a full-row logsumexp per token), full (vs the teacher)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per child")
    p.add_argument("--child", choices=sorted(STEPS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.tokens = [512, 2048]
    if args.max_memory_gb is None and not args.cuda:
        args.max_memory_gb = min(24.0, 0.7 * _proc_kib("/proc/meminfo", "MemAvailable") / 2**20)
    return args


def _proc_kib(path: str, key: str) -> int:
    """A `key: N kB` line of /proc/meminfo or /proc/self/status, in KiB."""
    with open(path) as f:
        return int(re.search(rf"^{key}:\s+(\d+)", f.read(), re.M).group(1))


# ---------------------------------------------------------------------------- the child: one step, one N


def synthetic_rollouts(tokens: int, prompt: int, response: int, rng: np.random.Generator) -> list[SimpleNamespace]:
    """ceil(tokens / response) rollouts with what the update reads of a `ScoredRollout` (the
    top-k columns of all three supports, so every `train.topk_support` finds its own)."""
    def topk_ids() -> np.ndarray:  # [T, k] int32, distinct per row
        return np.stack([rng.choice(VOCAB, TOP_K, replace=False) for _ in range(response)]).astype(np.int32)

    def lps(*shape: int) -> np.ndarray:
        return rng.normal(-3.0, 1.0, size=shape).astype(np.float32)

    items = []
    for i in range(-(-tokens // response)):
        seq = (rng.integers(100, VOCAB, prompt).tolist(), rng.integers(100, VOCAB, response).tolist())
        scores = SimpleNamespace(student_lp=lps(response), teacher_lp=lps(response),
                                 student_topk_ids=topk_ids(), teacher_at_student_topk_lp=lps(response, TOP_K),
                                 teacher_topk_ids=topk_ids(), teacher_topk_lp=lps(response, TOP_K),
                                 student_at_teacher_topk_lp=lps(response, TOP_K))
        items.append(SimpleNamespace(
            problem=SimpleNamespace(problem_id=f"bench-{i}"), sample_idx=0, kind="original",
            student_seq=seq, teacher_seq=seq, scores=scores, teacher_signal=True, train_loss=None,
            generation=SimpleNamespace(sampler_lp=lps(response), sampled_lp=lps(response), num_prefix_tokens=0),
            verdict=SimpleNamespace(reward=0.0)))
    return items


class PeakMemory:
    """Extra memory of one call over what the process held just before it, in bytes."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.base = self.torch.cuda.memory_allocated()
            self.torch.cuda.reset_peak_memory_stats()
            return
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS (Linux)
        self.base = _proc_kib("/proc/self/status", "VmRSS") * 1024
        if _proc_kib("/proc/self/status", "VmHWM") * 1024 > self.base + 2**20:
            raise RuntimeError("could not reset VmHWM through /proc/self/clear_refs: no clean peak on this system")

    def stop(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated() - self.base
        return _proc_kib("/proc/self/status", "VmHWM") * 1024 - self.base


def child(args: argparse.Namespace) -> dict:
    """One step at one N in this process -> {"peak_bytes", "tokens_per_s", "loss"}."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hpcdistill.distill.schedules import StepPlan
    from hpcdistill.models.loading import ModelHandle
    from hpcdistill.spec.schema import ExperimentSpec, Spec, TrainSpec
    from hpcdistill.train.distributed import TrainerConfig, build_trainer
    from hpcdistill.train.roles import Models

    update = importlib.import_module(STEPS[args.child]).update
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda else "cpu")
    dtype = torch.bfloat16 if args.cuda else torch.float32
    spec = Spec(experiment=ExperimentSpec(name="bench"), train=TrainSpec(steps=1, lr=1e-5, support=args.support))
    trainer_keys = {k: v for k, v in (("micro_batch_tokens", args.micro_batch_tokens), ("kernels", args.kernels)) if v}
    scoring_keys = {"chunk_size": args.chunk_size} if args.chunk_size else {}
    spec = dataclasses.replace(spec, trainer=dataclasses.replace(spec.trainer, **trainer_keys),
                               scoring=dataclasses.replace(spec.scoring, **scoring_keys))
    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                         max_position_embeddings=args.prompt + args.response)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    trainer = build_trainer(TrainerConfig(strategy="single", lr=spec.train.lr), model)
    handle = ModelHandle(trainer.model, None, "bench", device, dtype)
    models = Models(student=handle, teacher=handle, trainer=trainer)
    items = synthetic_rollouts(args.tokens[0], args.prompt, args.response, np.random.default_rng(SEED))
    weights = [np.ones(args.response, np.float32) for _ in items]
    tokens = len(items) * args.response

    if args.max_memory_gb:
        if args.cuda:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.max_memory_gb * 2**30 / total), device)
        else:  # address space, not RSS: the step fails to allocate instead of swapping the machine
            limit = _proc_kib("/proc/self/status", "VmSize") * 1024 + int(args.max_memory_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def step() -> dict[str, float]:
        for it in items:
            it.train_loss = None
        return update(spec, models, trainer, items, weights, StepPlan(1.0, 0.0), [], None)

    step()  # warm-up: the optimizer's state, the allocator's first blocks
    memory, seconds, peaks = PeakMemory(device), [], []
    for _ in range(args.repeats):
        trainer.model.zero_grad(set_to_none=True)  # the step's own gradients count in its peak
        memory.start()
        t0 = time.perf_counter()
        metrics = step()
        if args.cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        peaks.append(memory.stop())
    return {"peak_bytes": max(peaks), "tokens_per_s": tokens / statistics.median(seconds),
            "loss": metrics["train/loss_total"]}


def child_main(args: argparse.Namespace) -> int:
    try:
        out = child(args)
    except Exception as exc:  # MemoryError, torch.cuda.OutOfMemoryError, or the allocator's RuntimeError
        text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
        oom = isinstance(exc, MemoryError) or any(w in str(exc).lower() for w in OOM_WORDS)
        if not oom:
            raise
        out = {"oom": text}
    print(RESULT + json.dumps(out), flush=True)
    return 0


# ---------------------------------------------------------------------------- the parent: table and targets


def run_child(args: argparse.Namespace, step: str, tokens: int) -> dict:
    """{"peak_bytes", "tokens_per_s", "loss"}, or {"oom": why} / {"fail": why}."""
    argv = [sys.executable, __file__, "--child", step, "--tokens", str(tokens), "--prompt", str(args.prompt),
            "--response", str(args.response), "--repeats", str(args.repeats), "--max-memory-gb",
            str(args.max_memory_gb or 0)]
    for flag, value in (("--threads", args.threads), ("--micro-batch-tokens", args.micro_batch_tokens),
                        ("--chunk-size", args.chunk_size), ("--kernels", args.kernels),
                        ("--support", args.support)):
        if value:
            argv += [flag, str(value)]
    argv += ["--cuda"] if args.cuda else []
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"fail": f"timed out after {args.timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1][len(RESULT):])
    if proc.returncode < 0:  # a signal: the kernel's OOM killer, most likely
        return {"oom": f"killed by signal {-proc.returncode}"}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"fail": f"exit {proc.returncode}: {tail[:300]}"}


def _mb(r: dict) -> str:
    return "OOM" if "oom" in r else "FAIL" if "fail" in r else f"{r['peak_bytes'] / 1e6:.0f}"


def _tps(r: dict) -> str:
    return "OOM" if "oom" in r else "FAIL" if "fail" in r else f"{r['tokens_per_s']:.0f}"


def _ok(r: dict) -> bool:
    return "peak_bytes" in r


def targets(results: dict[int, dict[str, dict]]) -> list[str]:
    """Issue 17's targets, at the largest and smallest N measured (2k and 32k by default)."""
    small, large = min(results), max(results)
    at2k = 2048 if 2048 in results else small
    new_s, new_l, base_l = results[small]["new"], results[large]["new"], results[large]["baseline"]
    base_c, new_c = results[at2k]["baseline"], results[at2k]["new"]

    def line(ok: bool, what: str, ratio: str) -> str:
        return f"{'PASS' if ok else 'FAIL'} {what}: {ratio}"

    if small == large:
        a = "n/a  (a) peak flat in N: needs two token counts"
    elif _ok(new_s) and _ok(new_l):
        growth = new_l["peak_bytes"] / new_s["peak_bytes"]
        a = line(growth <= 1.15, f"(a) new peak at {large} within 1.15x of new peak at {small}", f"{growth:.2f}x")
    else:
        a = line(False, f"(a) new peak at {large} within 1.15x of new peak at {small}", "a step did not run")
    b_what = f"(b) new peak at {large} at least 8x below baseline (or baseline OOM)"
    if _ok(new_l) and "oom" in base_l:
        b = line(True, b_what, "baseline OOM")
    elif _ok(new_l) and _ok(base_l):
        saving = base_l["peak_bytes"] / new_l["peak_bytes"]
        b = line(saving >= 8, b_what, f"{saving:.1f}x")
    else:
        b = line(False, b_what, "a step did not run")
    c_what = f"(c) new tok/s at {at2k} >= 0.8x baseline"
    if _ok(base_c) and _ok(new_c):
        speed = new_c["tokens_per_s"] / base_c["tokens_per_s"]
        c = line(speed >= 0.8, c_what, f"{speed:.2f}x")
    else:
        c = line(False, c_what, "a step did not run")
    return [a, b, c]


def main() -> int:
    args = parse_args()
    if args.child:
        return child_main(args)
    results: dict[int, dict[str, dict]] = {}
    for tokens in sorted(set(args.tokens)):
        for step in STEPS:
            t0 = time.perf_counter()
            results.setdefault(tokens, {})[step] = r = run_child(args, step, tokens)
            print(f"  {step:8s} {tokens:6d} tokens: peak {_mb(r)} MB, {_tps(r)} tok/s "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    where = "CUDA bf16" if args.cuda else "CPU float32"
    guard = f"{args.max_memory_gb:.1f} GB per child" if args.max_memory_gb else "none"
    print(f"\nOne training step, baseline = {STEPS['baseline']}.update, new = {STEPS['new']}.update; "
          f"2-layer Llama V={VOCAB} H={HIDDEN} on {where}; rollouts of {args.prompt} + {args.response} "
          f"tokens; micro_batch_tokens={args.micro_batch_tokens or 'spec'} chunk_size={args.chunk_size or 'spec'} "
          f"kernels={args.kernels or 'spec'} support={args.support}; median of {args.repeats}; memory guard {guard}")
    print("| tokens | baseline peak MB | new peak MB | baseline tok/s | new tok/s | memory baseline/new "
          "| speed new/baseline |")
    print("|---|---|---|---|---|---|---|")
    for tokens, r in results.items():
        base, new = r["baseline"], r["new"]
        mem = f"{base['peak_bytes'] / new['peak_bytes']:.2f}x" if _ok(base) and _ok(new) else "-"
        speed = f"{new['tokens_per_s'] / base['tokens_per_s']:.2f}x" if _ok(base) and _ok(new) else "-"
        print(f"| {tokens} | {_mb(base)} | {_mb(new)} | {_tps(base)} | {_tps(new)} | {mem} | {speed} |")
    for tokens, r in results.items():
        for step, res in r.items():
            if "oom" in res or "fail" in res:
                print(f"{step} at {tokens}: {res.get('oom') or res.get('fail')}")
    print("\n".join(targets(results)))
    return 1 if any("fail" in res for r in results.values() for res in r.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
