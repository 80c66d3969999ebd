"""Rollout throughput: vLLM's server vs our transformers decode loop, side by side in one run.

Same model folder, same chat prompts, same sampling settings (n samples per prompt, temperature,
top-p, max_new_tokens, seed). Each backend gets one untimed warm-up call; then tokens per second
= response tokens generated / wall seconds of `generate(...)` resp. `generate_vllm(...)` (HTTP and
JSON included for vLLM). Prints one table and the ratio vLLM / transformers. The vLLM server's
startup time is reported separately, not counted in its throughput.

    HPCDISTILL_VLLM_PYTHON=.venv-vllm/bin/python python bench/rollout.py \
        [--model bundled:smollm2-135m-instruct] [--prompts 8] [--n 4] [--max-new-tokens 64]
        [--device auto] [--dtype auto]

On a GPU machine pass `--device cuda --dtype bfloat16` (vLLM then runs on CUDA too).
"""

from __future__ import annotations

import argparse
import json
import time

QUESTIONS = [
    "What is 17 times 23?", "Name three primary colors.", "Write a haiku about the sea.",
    "Explain recursion in one sentence.", "What is the capital of Australia?",
    "Give a synonym for 'happy'.", "How many legs does a spider have?",
    "Write a Python function that reverses a string.", "Why is the sky blue?",
    "List the first five prime numbers.", "What does CPU stand for?", "Translate 'thank you' to French.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8, help="transformers batch size")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vllm-python", default="python3")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    from hpcdistill.models.generation import generate
    from hpcdistill.models.loading import (BUNDLED_PREFIX, bundled_gguf_path, converted_gguf_dir,
                                           load_model)
    from hpcdistill.models.vllm_backend import VLLMServer, generate_vllm, resolve_vllm_python

    handle = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.model.startswith(BUNDLED_PREFIX):
        name = args.model[len(BUNDLED_PREFIX):]
        model_dir = converted_gguf_dir(bundled_gguf_path(name), name)
    else:
        model_dir = args.model
    questions = (QUESTIONS * (args.prompts // len(QUESTIONS) + 1))[:args.prompts]
    prompts = []
    for q in questions:
        ids = handle.tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                   add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    sampling = dict(n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p)

    def timed(fn, **kw):
        fn(prompt_ids=prompts[:1], seed=args.seed + 1, **{**sampling, "n": 1}, **kw)  # warm-up
        t0 = time.perf_counter()
        gens = fn(prompt_ids=prompts, seed=args.seed, **sampling, **kw)
        seconds = time.perf_counter() - t0
        tokens = sum(len(g.response_ids) for row in gens for g in row)
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}

    rows = {"transformers": timed(lambda **kw: generate(handle, progress=False, **kw),
                                  batch_size=args.batch_size)}
    vllm_dtype = str(handle.dtype).removeprefix("torch.")
    t0 = time.perf_counter()
    with VLLMServer(model_dir, python=resolve_vllm_python(args.vllm_python), dtype=vllm_dtype) as srv:
        startup_s = time.perf_counter() - t0
        rows["vllm"] = timed(lambda **kw: generate_vllm(srv, progress=False, **kw))
    ratio = rows["vllm"]["tokens_per_s"] / rows["transformers"]["tokens_per_s"]

    print(f"model {args.model} on {handle.device} ({vllm_dtype}); {len(prompts)} prompts x "
          f"{args.n} samples, max_new_tokens {args.max_new_tokens}, temperature {args.temperature}")
    print(f"{'backend':<14}{'tokens':>8}{'seconds':>10}{'tokens/s':>10}")
    for name, r in rows.items():
        print(f"{name:<14}{r['tokens']:>8}{r['seconds']:>10.2f}{r['tokens_per_s']:>10.1f}")
    print(f"vLLM server startup {startup_s:.1f} s (not counted)")
    print(f"ratio vLLM / transformers: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "ratio": ratio, "startup_s": startup_s, "args": vars(args)}, fh,
                      indent=2)


if __name__ == "__main__":
    main()
