"""Loss replay vs re-scoring: what comparing a loss variant costs with and without `hpcdistill replay`.

Without replay, comparing a variant on the same tokens means running both models over them again
(the scoring forward passes, then the loss). Replay recomputes the variant from the log-probs the
shard recorded (`analysis.replay.replay_batch`), and also returns each token's gradient weight.

Setup (as bench/scoring.py): student and teacher are 1-layer Llamas with hidden size 576
(SmolLM2's width) and SmolLM2's vocabulary (49,152), so the lm_head dominates as it does for small
real models; B rollouts of T response tokens after a 32-token prompt; top-20. Both sides of each
row compute the same loss on the same tokens; the last column is their largest difference.

    python bench/replay.py [--rollouts 8] [--tokens 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

VARIANTS = {
    "topk student renormalize reverse (SDPO)": {},
    "topk student tail_bucket reverse": {"topk_normalization": "tail_bucket"},
    "topk union tail_bucket jsd(0.5)": {"topk_support": "union", "topk_normalization": "tail_bucket",
                                        "divergence": "jsd"},
    "topk teacher renormalize forward": {"topk_support": "teacher", "divergence": "forward"},
    "sampled k3 reward": {"support": "sampled", "estimator": "k3"},
}


def build(vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hpcdistill.models.loading import ModelHandle

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    return ModelHandle(model=model, tokenizer=None, model_id=f"bench-{seed}", device=torch.device("cpu"),
                       dtype=torch.float32)


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=49_152)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from hpcdistill.analysis.replay import StepBatch, replay_batch
    from hpcdistill.models.scoring import score_rollouts
    from hpcdistill.spec.load import spec_to_dict, validate

    student, teacher = build(args.vocab, 0), build(args.vocab, 1)
    rng = np.random.default_rng(0)
    seqs = [(rng.integers(0, args.vocab, 32).tolist(), rng.integers(0, args.vocab, args.tokens).tolist())
            for _ in range(args.rollouts)]
    lengths = [args.tokens] * args.rollouts

    def score():
        return score_rollouts(student, teacher, seqs, seqs, top_k=20, chunk_size=256, batch_size=4, progress=False)

    def as_batch(spec, scores) -> StepBatch:
        """The shard's view of these scores, as `analysis.replay.read_batches` builds it."""
        names = ("student_lp", "teacher_lp", "student_topk_ids", "student_topk_lp", "teacher_at_student_topk_lp",
                 "teacher_topk_ids", "teacher_topk_lp", "student_at_teacher_topk_lp")
        tokens = {n: np.concatenate([getattr(s, n) for s in scores]) for n in names}
        tokens["ids"] = np.concatenate([np.asarray(r, np.int32) for _, r in seqs])
        tokens["sampler_lp"] = tokens["student_lp"].copy()
        rows = [{"problem_id": str(i), "sample_idx": 0, "weight_version": 0, "teacher_signal": 1}
                for i in range(len(seqs))]
        return StepBatch("bench", 0, spec, spec_to_dict(spec), Path("bench"), rows, lengths, tokens, None, True)

    recorded = score()
    weights = np.ones(sum(lengths))
    n = sum(lengths)
    print(f"{args.rollouts} rollouts x {args.tokens} tokens, vocab {args.vocab}, top-20, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'variant':42s} {'re-score s':>10s} {'replay s':>9s} {'speed x':>8s} {'max |dloss|':>11s}")
    for name, keys in VARIANTS.items():
        spec = validate({"experiment": {"name": "bench"}, "train": keys}, {}, "bench")
        batch = as_batch(spec, recorded)
        replayed = replay_batch(batch, spec, weights)
        baseline = {}

        def rescore():  # without replay: both models over the tokens again, then the same loss
            baseline["out"] = replay_batch(as_batch(spec, score()), spec, weights)

        t_rescore = median_seconds(rescore, args.repeats)
        t_replay = median_seconds(lambda: replay_batch(batch, spec, weights), args.repeats)
        diff = abs(baseline["out"].loss - replayed.loss)
        print(f"{name:42s} {t_rescore:10.3f} {t_replay:9.4f} {t_rescore / t_replay:8.1f} {diff:11.1e}")
    print(f"({n} tokens; replay also returns every token's gradient weight)")


if __name__ == "__main__":
    main()
