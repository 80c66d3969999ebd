"""Loading, chat rendering and generation: tiny random models for the logic, the real bundled
SmolLM2 model (marked slow) for the end-to-end behaviour."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from hpcdistill.errors import ModelError
from hpcdistill.models.chat import multi_turn, render_prompt, render_response, single_turn
from hpcdistill.models.generation import generate, sampling_logprobs
from hpcdistill.models.loading import load_model, load_models, tiny_random_model

BUNDLED = "bundled:smollm2-135m-instruct"


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_model(200, seed=0)


@pytest.fixture(scope="module")
def bundled():
    return load_model(BUNDLED)


@torch.no_grad()
def recomputed_logprobs(handle, prompt, response, temperature=1.0) -> np.ndarray:
    """log softmax(logits / temperature) at each response token, from one unbatched forward."""
    ids = torch.tensor([list(prompt) + [int(x) for x in response]])
    logits = handle.model(input_ids=ids).logits[0, len(prompt) - 1:-1].double() / temperature
    lp = torch.log_softmax(logits, dim=-1)
    return lp.gather(-1, torch.tensor(response, dtype=torch.long)[:, None])[:, 0].numpy()


# --------------------------------------------------------------------------------------------------
# loading errors (fast)


def test_unloadable_hub_id_offline_raises_model_error_naming_id_and_forms(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelError) as info:
        load_model("no-such-org/no-such-model-xyz")
    msg = str(info.value)
    assert "no-such-org/no-such-model-xyz" in msg and "offline" in msg and "bundled:" in msg


@pytest.mark.parametrize("kwargs, word", [({"dtype": "float64"}, "dtype"), ({"device": "tpu"}, "device")])
def test_bad_dtype_or_device_raises_model_error(kwargs, word):
    with pytest.raises(ModelError, match=word):
        load_model(BUNDLED, **kwargs)


def test_unknown_bundled_name_and_missing_gguf_raise_model_error(tmp_path):
    with pytest.raises(ModelError, match="bundled:smollm2-135m-instruct"):
        load_model("bundled:gpt-17")
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))


# --------------------------------------------------------------------------------------------------
# sampling distribution and decode loop on a tiny random model (fast)


def test_sampling_logprobs_applies_temperature_top_k_and_top_p():
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.15), math.log(0.05)]])
    np.testing.assert_allclose(sampling_logprobs(logits, 1.0, 1.0, 0).exp().numpy(),
                               [[0.5, 0.3, 0.15, 0.05]], rtol=1e-6)
    # top_p 0.8: keep 0.5 + 0.3 (mass before the third token is 0.8 >= 0.8).
    np.testing.assert_allclose(sampling_logprobs(logits, 1.0, 0.8, 0).exp().numpy(),
                               [[0.625, 0.375, 0, 0]], rtol=1e-6)
    np.testing.assert_allclose(sampling_logprobs(logits, 1.0, 0.81, 0).exp().numpy(),
                               [[0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]], rtol=1e-6)
    np.testing.assert_allclose(sampling_logprobs(logits, 1.0, 1.0, 1).exp().numpy(), [[1, 0, 0, 0]])
    p2 = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
    np.testing.assert_allclose(sampling_logprobs(logits, 0.5, 1.0, 0).exp().numpy(), [p2 / p2.sum()],
                               rtol=1e-5)


def prompts_for(n_prompts, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 200, size=int(rng.integers(2, 9))).tolist() for _ in range(n_prompts)]


def test_same_seed_same_samples_regardless_of_batch_size_and_other_seed_differs(tiny):
    prompts = prompts_for(3)
    kw = dict(n=3, max_new_tokens=12, temperature=1.0, top_p=1.0, progress=False)
    a = generate(tiny, prompts, seed=5, batch_size=4, **kw)
    b = generate(tiny, prompts, seed=5, batch_size=4, **kw)
    c = generate(tiny, prompts, seed=5, batch_size=1, **kw)
    d = generate(tiny, prompts, seed=6, batch_size=4, **kw)
    flat = lambda gens: [g.response_ids.tolist() for row in gens for g in row]  # noqa: E731
    assert flat(a) == flat(b) == flat(c)
    assert flat(a) != flat(d)
    # Samples of one prompt differ from each other (their own random streams).
    assert len({tuple(x) for x in flat(a)[:3]}) > 1


def test_sampled_lp_is_the_raw_model_logprob_and_sampler_lp_the_tempered_one(tiny):
    prompts = prompts_for(2, seed=1)
    gens = generate(tiny, prompts, n=2, max_new_tokens=10, temperature=0.7, top_p=1.0, seed=0,
                    batch_size=4, progress=False)
    for p, row in zip(prompts, gens):
        for g in row:
            assert g.sampled_lp.dtype == np.float32 and len(g.sampled_lp) == len(g.response_ids) == 10
            np.testing.assert_allclose(g.sampled_lp, recomputed_logprobs(tiny, p, g.response_ids), atol=1e-4)
            np.testing.assert_allclose(g.sampler_lp, recomputed_logprobs(tiny, p, g.response_ids, 0.7),
                                       atol=1e-4)
            assert g.finish_reason == "length"


def test_greedy_stops_at_stop_token_and_prefix_is_forced(tiny):
    prompt = prompts_for(1, seed=2)
    greedy = generate(tiny, prompt, n=1, max_new_tokens=8, temperature=0, top_p=1.0, seed=0,
                      progress=False)[0][0]
    assert (greedy.sampler_lp == 0).all()
    np.testing.assert_allclose(greedy.sampled_lp, recomputed_logprobs(tiny, prompt[0], greedy.response_ids),
                               atol=1e-4)
    # Make the 4th greedy token a stop token: decoding ends right after its first occurrence.
    stop_id = int(greedy.response_ids[3])
    first = int(np.argmax(greedy.response_ids == stop_id))
    stopping = dataclasses.replace(tiny, stop_token_ids=(stop_id,))
    g = generate(stopping, prompt, n=1, max_new_tokens=8, temperature=0, top_p=1.0, seed=0,
                 progress=False)[0][0]
    assert g.finish_reason == "stop" and g.response_ids.tolist() == greedy.response_ids[:first + 1].tolist()
    # Teacher seeding: a forced prefix, then sampling continues from it.
    prefix = [11, 22, 33]
    gens = generate(tiny, prompt * 2, n=2, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3,
                    prefix_ids=[prefix, []], progress=False)
    for g in gens[0]:
        assert g.response_ids[:3].tolist() == prefix and g.num_prefix_tokens == 3
        np.testing.assert_allclose(g.sampled_lp, recomputed_logprobs(tiny, prompt[0], g.response_ids),
                                   atol=1e-4)
    assert all(g.num_prefix_tokens == 0 for g in gens[1])


def test_load_models_same_teacher_is_the_same_object(tmp_path):
    # A local checkpoint directory (one of the id forms), saved from a tiny model.
    tiny = tiny_random_model(64, seed=0)
    tiny.model.save_pretrained(tmp_path / "ckpt")
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<eos>": 1},
                                                                              unk_token="a")),
                                  eos_token="<eos>")
    tok.save_pretrained(tmp_path / "ckpt")
    student, teacher = load_models(str(tmp_path / "ckpt"), "same")
    assert student is teacher and student.stop_token_ids == (1,)
    assert student.model.training is False


# --------------------------------------------------------------------------------------------------
# the bundled model (slow)


@pytest.mark.slow
def test_bundled_model_loads_with_chat_template_and_stop_tokens(bundled):
    tok = bundled.tokenizer
    assert bundled.vocab_size == 49152 and bundled.dtype == torch.float32
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in bundled.stop_token_ids
    ids = render_prompt(tok, single_turn("What is 2+3?", "Be brief."))
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n") and "What is 2+3?" in text
    conv = tok.decode(render_prompt(tok, multi_turn(["problem", "attempt", "feedback"])))
    assert conv.index("user\nproblem") < conv.index("assistant\nattempt") < conv.index("user\nfeedback")
    reply = render_response(tok, single_turn("hi"), "Hello there.")
    assert tok.decode(reply) == "Hello there.<|im_end|>"
    # Loading again comes from the safetensors cache and is fast (first conversion is ~25 s).
    import time

    t0 = time.monotonic()
    again = load_model(BUNDLED)
    assert time.monotonic() - t0 < 15
    p = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(again.model(p).logits, bundled.model(p).logits)


@pytest.mark.slow
def test_bundled_generation_is_seeded_and_logprobs_match_a_forward_pass(bundled):
    tok = bundled.tokenizer
    prompts = [render_prompt(tok, single_turn("Write a haiku about the sea.")),
               render_prompt(tok, single_turn("What is the capital of France?", "Be brief."))]
    kw = dict(n=2, max_new_tokens=12, temperature=1.0, top_p=1.0, batch_size=4, progress=False)
    a = generate(bundled, prompts, seed=1, **kw)
    b = generate(bundled, prompts, seed=1, **kw)
    c = generate(bundled, prompts, seed=2, **kw)
    flat = lambda gens: [g.response_ids.tolist() for row in gens for g in row]  # noqa: E731
    assert flat(a) == flat(b) and flat(a) != flat(c)
    for p, row in zip(prompts, a):
        for g in row:
            np.testing.assert_allclose(g.sampled_lp, recomputed_logprobs(bundled, p, g.response_ids),
                                       atol=1e-4)
            np.testing.assert_allclose(g.sampler_lp, g.sampled_lp, atol=1e-5)  # T=1, no truncation


@pytest.mark.slow
def test_bundled_greedy_answer_stops_and_teacher_prefix_is_honoured(bundled):
    tok = bundled.tokenizer
    prompt = render_prompt(tok, single_turn("What is the capital of France? One word.", "Be brief."))
    greedy = generate(bundled, [prompt], n=1, max_new_tokens=24, temperature=0, top_p=1.0, seed=0,
                      progress=False)[0][0]
    assert greedy.finish_reason == "stop" and int(greedy.response_ids[-1]) in bundled.stop_token_ids
    assert "Paris" in tok.decode(greedy.response_ids)
    prefix = tok.encode("The city of", add_special_tokens=False)
    seeded = generate(bundled, [prompt], n=2, max_new_tokens=8, temperature=0.8, top_p=0.95, seed=0,
                      prefix_ids=[prefix], progress=False)[0]
    for g in seeded:
        assert g.response_ids[:len(prefix)].tolist() == prefix and g.num_prefix_tokens == len(prefix)
        np.testing.assert_allclose(g.sampled_lp, recomputed_logprobs(bundled, prompt, g.response_ids),
                                   atol=1e-4)
