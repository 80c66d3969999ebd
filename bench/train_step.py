"""Tokens per second of one SDPO training step on the bundled model, against scoring alone.

Both run on the same batch (B sequences of P prompt + T response tokens, random ids): the
baseline is the measurement pass every step pays anyway (student and teacher forward, chunked
top-k scoring, no grad); the training step is the student forward with grad, the top-k KL loss
against the recorded teacher log-probs, backward, clipping and AdamW. The ratio says what
training adds on top of measuring. Run: python bench/train_step.py [--batch 4 --prompt 128 --response 256]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from hpcdistill.distill.loss import DistillInputs, LossConfig, distill_loss
from hpcdistill.models.loading import load_model
from hpcdistill.models.scoring import _project, response_hidden, score_rollouts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    handle = load_model("bundled:smollm2-135m-instruct")
    rng = np.random.default_rng(0)
    vocab = handle.vocab_size
    seqs = [(rng.integers(100, vocab, args.prompt).tolist(), rng.integers(100, vocab, args.response).tolist())
            for _ in range(args.batch)]
    tokens = args.batch * args.response

    def scoring() -> list:
        return score_rollouts(handle, handle, seqs, seqs, top_k=20, chunk_size=256, batch_size=args.batch,
                              progress=False)

    scores = scoring()  # warm-up, and the recorded teacher side for the loss
    ids = torch.as_tensor(np.concatenate([s.student_topk_ids for s in scores]), dtype=torch.long)
    teacher = torch.as_tensor(np.concatenate([s.teacher_at_student_topk_lp for s in scores]))
    optimizer = torch.optim.AdamW(handle.model.parameters(), lr=1e-6, weight_decay=0.01)
    lengths = [args.response] * args.batch

    def train_step() -> float:
        handle.model.train()
        optimizer.zero_grad(set_to_none=True)
        logits = _project(handle.model, response_hidden(handle, seqs, lengths)).float()
        loss = distill_loss(LossConfig(), DistillInputs(  # SDPO's top-k KL, the default
            weights=torch.ones(tokens), lengths=lengths, student_lp=torch.zeros(tokens),
            student_buckets=logits.gather(-1, ids), teacher_buckets=teacher)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(handle.model.parameters(), 1.0)
        optimizer.step()
        handle.model.eval()
        return float(loss.detach())

    train_step()  # warm-up
    timings = {}
    for name, fn in (("scoring (student + teacher, no grad)", scoring), ("SDPO train step", train_step)):
        samples = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        timings[name] = float(np.median(samples))
    base = timings["scoring (student + teacher, no grad)"]
    print(f"batch {args.batch} x (prompt {args.prompt} + response {args.response}), "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'pass':38s} {'seconds':>8s} {'tokens/s':>9s} {'vs scoring':>10s}")
    for name, seconds in timings.items():
        print(f"{name:38s} {seconds:8.2f} {tokens / seconds:9.1f} {seconds / base:9.2f}x")


if __name__ == "__main__":
    main()
