"""Scoring throughput and peak memory: chunked `score_rollouts` vs a naive full-vocab baseline.

DESIGN.md section 8: tokens scored per second and peak memory of the scoring stage against a naive
implementation that materialises full [T, V] logits and log-softmax for both models.

Setup: a student and a teacher that are 1-layer Llamas with hidden 576 (SmolLM2's width) and the
vocabulary under test (49,152 = SmolLM2, 151,936 = Qwen3), one rollout of T response tokens each.
The lm_head dominates the compute at these vocab sizes, as it does for small real models; the
layer count only adds a constant. Each (implementation, vocab) runs in a fresh subprocess so its
peak RSS (`ru_maxrss`) is its own; we report the peak above the RSS measured right before scoring
(weights and the torch runtime are the same for both implementations).

    python bench/scoring.py [--tokens 2048] [--top-k 20]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VOCABS = (49_152, 151_936)
HIDDEN = 576


def current_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build(vocab: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hpcdistill.models.loading import ModelHandle

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=1536, num_hidden_layers=1,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True, initializer_range=0.1)
    model = LlamaForCausalLM(config).eval()
    return ModelHandle(model=model, tokenizer=None, model_id=f"bench-{vocab}-{seed}",
                       device=torch.device("cpu"), dtype=torch.float32)


def naive_scores(student, teacher, s_seq, t_seq, k: int, full_vocab: bool) -> dict:
    """The baseline: full logits of both models, full log-softmax, then gather; the same outputs as
    `score_rollouts` (top-k of both sides, teaching-signal diagnostics, full KL, entropies)."""
    import torch

    with torch.inference_mode():
        T = min(len(s_seq[1]), len(t_seq[1]))
        outs = []
        for handle, (p, r) in ((student, s_seq), (teacher, t_seq)):
            logits = handle.model(input_ids=torch.tensor([p + r[:T - 1]])).logits[0]  # [L, V]
            outs.append(torch.log_softmax(logits[len(p) - 1:].float(), dim=-1))  # [T, V]
        ls, lt = outs
        tok = torch.tensor(s_seq[1][:T])[:, None]
        ids = torch.topk(ls, k, dim=-1).indices
        ss = torch.log_softmax(ls.gather(-1, ids), -1)
        tt = torch.log_softmax(lt.gather(-1, ids), -1)
        top_t = torch.topk(lt, k, dim=-1)  # the teacher's own top-k and the diagnostics, as scoring
        res = {"student_lp": ls.gather(-1, tok)[:, 0], "teacher_lp": lt.gather(-1, tok)[:, 0],
               "topk_kl": (ss.exp() * (ss - tt)).sum(-1),
               "entropy_s": -(ls.exp() * ls).sum(-1), "entropy_t": -(lt.exp() * lt).sum(-1),
               "student_at_teacher_topk_lp": ls.gather(-1, top_t.indices),
               "student_topk_mass": ls.gather(-1, ids).exp().sum(-1), "teacher_topk_mass": top_t.values.exp().sum(-1),
               "teacher_mass_at_student_topk": lt.gather(-1, ids).exp().sum(-1),
               "student_mass_at_teacher_topk": ls.gather(-1, top_t.indices).exp().sum(-1),
               "topk_overlap": (ids[:, :, None] == top_t.indices[:, None, :]).any(-1).float().mean(-1)}
        if full_vocab:
            res["full_kl"] = (ls.exp() * (ls - lt)).sum(-1)
        return {name: v.numpy() for name, v in res.items()}


def run_one(impl: str, vocab: int, tokens: int, top_k: int, chunk_size: int) -> dict:
    import numpy as np
    import torch

    from hpcdistill.models.scoring import score_rollouts

    torch.set_num_threads(os.cpu_count() or 1)
    student, teacher = build(vocab, 0), build(vocab, 1)
    rng = np.random.default_rng(0)
    prompt_s = rng.integers(0, vocab, 64).tolist()
    prompt_t = rng.integers(0, vocab, 96).tolist()
    response = rng.integers(0, vocab, tokens).tolist()
    s_seq, t_seq = (prompt_s, response), (prompt_t, response)
    rss_before = current_rss_mb()
    t0 = time.perf_counter()
    if impl == "chunked":
        out = score_rollouts(student, teacher, [s_seq], [t_seq], top_k=top_k, full_vocab=True,
                             chunk_size=chunk_size, progress=False)[0]
        topk_kl = out.topk_kl
    else:
        topk_kl = naive_scores(student, teacher, s_seq, t_seq, top_k, full_vocab=True)["topk_kl"]
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"impl": impl, "vocab": vocab, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "rss_before_mb": rss_before, "peak_mb": peak,
            "peak_above_before_mb": peak - rss_before, "topk_kl_mean": float(np.mean(topk_kl)),
            "topk_kl_first": [float(x) for x in topk_kl[:4]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, vocab = args.child[0], int(args.child[1])
        print(json.dumps(run_one(impl, vocab, args.tokens, args.top_k, args.chunk_size)))
        return

    print(f"scoring one rollout of T={args.tokens} tokens, top-k {args.top_k}, full-vocab KL on, "
          f"chunk {args.chunk_size}, {os.cpu_count()} CPU threads; each cell a fresh process")
    rows = {}
    for vocab in VOCABS:
        for impl in ("naive", "chunked"):
            cmd = [sys.executable, __file__, "--child", impl, str(vocab), "--tokens", str(args.tokens),
                   "--top-k", str(args.top_k), "--chunk-size", str(args.chunk_size)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows[impl, vocab] = json.loads(proc.stdout.strip().splitlines()[-1])
    header = (f"{'vocab':>8} | {'naive tok/s':>11} {'chunked tok/s':>13} {'speed x':>7} | "
              f"{'naive peak+MB':>13} {'chunked peak+MB':>15} {'mem ratio':>9} | {'max |dKL|':>9}")
    print(header)
    print("-" * len(header))
    for vocab in VOCABS:
        n, c = rows["naive", vocab], rows["chunked", vocab]
        dkl = max(abs(a - b) for a, b in zip(n["topk_kl_first"], c["topk_kl_first"]))
        print(f"{vocab:>8} | {n['tokens_per_s']:>11.0f} {c['tokens_per_s']:>13.0f} "
              f"{c['tokens_per_s'] / n['tokens_per_s']:>7.2f} | {n['peak_above_before_mb']:>13.0f} "
              f"{c['peak_above_before_mb']:>15.0f} {n['peak_above_before_mb'] / c['peak_above_before_mb']:>8.1f}x"
              f" | {dkl:>9.1e}")
    print("peak+MB: peak RSS above the RSS right before scoring (weights excluded); speed x = chunked/naive;"
          " mem ratio = naive/chunked; dKL: top-k KL of the first tokens, chunked vs naive")


if __name__ == "__main__":
    main()
