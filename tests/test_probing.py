"""Seed 001 lock/fork probing: statistics, classifier, sub-categories, rank tables, the probe run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hpcdistill.analysis import probing
from hpcdistill.analysis.tables import markdown_table
from hpcdistill.errors import ModelError, SpecError
from hpcdistill.spec.command_rules import check_probe_spec
from hpcdistill.spec.load import load_spec, validate
from hpcdistill.spec.schema import ProbeSpec
from hpcdistill.train.probe import (
    HEURISTIC,
    RANDOM,
    REGULAR,
    check_same_tokenizer,
    compare_distributions,
    select_positions,
)
from hpcdistill.train.probe_carriers import length_bins, stratified_sample

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "probing"
TH = probing.Thresholds()


def lp_of(probs: list[float], vocab: int | None = None) -> torch.Tensor:
    """Log-probs [V] of `probs`, padded with the leftover mass spread evenly over `vocab` tokens."""
    probs = list(probs)
    if vocab is not None and vocab > len(probs):
        rest = max(1.0 - sum(probs), 0.0)
        probs += [rest / (vocab - len(probs))] * (vocab - len(probs))
    p = torch.tensor(probs, dtype=torch.float64)
    return torch.log(p / p.sum())


def classes_of(*distributions: torch.Tensor, th: probing.Thresholds = TH) -> list[str]:
    stats, _ = probing.distribution_stats(torch.stack(distributions), top_k=20, top_p=0.95)
    return [probing.CLASSES[c] for c in probing.classify_stats(stats, th)]


# -------------------------------------------------------------------------------- statistics


def test_distribution_stats_before_and_after_truncation_match_hand_computation():
    p = [0.5, 0.2, 0.1, 0.1, 0.05, 0.05]
    stats, q = probing.distribution_stats(lp_of(p), top_k=3, top_p=0.75)
    assert stats.top1_prob[0] == pytest.approx(0.5, abs=1e-6)
    assert stats.top1_id[0] == 0
    assert stats.top5_mass[0] == pytest.approx(0.95, abs=1e-6)
    # nucleus at 0.75: mass before token 3 is 0.7 < 0.75, before token 4 is 0.8 -> 3 tokens
    assert stats.nucleus_size[0] == 3
    assert stats.tail_mass[0] == pytest.approx(0.2, abs=1e-6)  # outside the top-3
    assert stats.entropy[0] == pytest.approx(-sum(x * math.log(x) for x in p), abs=1e-5)
    # top-3 renormalised: .625 .25 .125; top-p .75 of that keeps 2 -> .7142857, .2857143
    assert stats.trunc_size[0] == 2
    assert stats.trunc_mass[0] == pytest.approx(0.7, abs=1e-6)
    a, b = 0.5 / 0.7, 0.2 / 0.7
    assert stats.trunc_top1[0] == pytest.approx(a, abs=1e-6)
    assert stats.trunc_entropy[0] == pytest.approx(-(a * math.log(a) + b * math.log(b)), abs=1e-5)
    assert torch.isinf(q[0, 2:]).all() and torch.allclose(q[0, :2].exp(), torch.tensor([a, b]), atol=1e-6)


def test_apply_temperature_flattens_above_one_and_sharpens_below():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    cold = probing.apply_temperature(logits, 0.7).exp()[0]
    hot = probing.apply_temperature(logits, 1.5).exp()[0]
    expected_hot = torch.softmax(logits[0] / 1.5, -1)
    assert torch.allclose(hot, expected_hot, atol=1e-6)
    assert cold[0] > torch.softmax(logits[0], -1)[0] > hot[0]
    with pytest.raises(ValueError):
        probing.apply_temperature(logits, 0.0)


# -------------------------------------------------------------------------------- classifier


def test_classifier_on_a_clear_lock_a_true_fork_and_a_diffuse_position():
    lock = lp_of([0.92, 0.03, 0.02], vocab=1000)
    fork = lp_of([0.30, 0.25, 0.20, 0.15, 0.05], vocab=1000)  # 4 similar candidates, tail ~ 0
    # five candidates of 0.08 look fork-like, but 60% of the mass is spread over the whole support
    diffuse = lp_of([0.08] * 5, vocab=1000)
    assert classes_of(lock, fork, diffuse) == ["lock", "fork", "diffuse"]
    # the tail is what separates the diffuse case from a fork (seed 001): without it, a fork
    loose = probing.Thresholds(fork_max_tail=1.0)
    assert classes_of(diffuse, th=loose) == ["fork"]


def test_classifier_on_the_seeds_rank_table_distributions():
    # seed 001, "true lock" ({ vs {-) and the "typical fork" (Let / Subtract / Sometimes / ...)
    true_lock_base = lp_of([0.5268, 0.4649, 0.0075144, 0.00037412, 0.00012146], vocab=5000)
    typical_fork = lp_of([0.22876, 0.12245, 0.095362, 0.084157, 0.084157] + [0.0257] * 15, vocab=5000)
    one_candidate = lp_of([0.45, 0.02, 0.02], vocab=5000)  # top-1 below the lock bar, no rival
    assert classes_of(true_lock_base, typical_fork, one_candidate) == ["lock", "fork", "diffuse"]


def test_lock_requires_a_small_nucleus_and_low_tail():
    wide = lp_of([0.6] + [0.01] * 30, vocab=2000)  # high top-1 but nucleus of ~30 tokens
    stats, _ = probing.distribution_stats(wide, top_k=20, top_p=0.95)
    assert stats.nucleus_size[0] > TH.lock_max_nucleus
    assert probing.classify_stats(stats, TH)[0] != probing.LOCK


def test_lock_subcategories_strict_lock_swap_self_correction_and_loosened():
    base = torch.stack([lp_of([0.80, 0.15], 100)] * 4)
    trained = torch.stack([
        lp_of([0.95, 0.03], 100),  # same top token, sharper: strict lock
        lp_of([0.10, 0.85], 100),  # lock-like on another token: swap
        lp_of([0.10, 0.85], 100),  # the same swap, but in a self-correction context
        lp_of([0.40, 0.35, 0.15], 100),  # no longer lock-like: loosened
    ])
    sb, _ = probing.distribution_stats(base, top_k=20, top_p=0.95)
    st, _ = probing.distribution_stats(trained, top_k=20, top_p=0.95)
    base_class, trained_class = probing.classify_stats(sb, TH), probing.classify_stats(st, TH)
    assert list(base_class) == [probing.LOCK] * 4
    same_top = sb.top1_id == st.top1_id
    self_correction = np.array([False, False, True, False])
    sub = probing.lock_subcategory(base_class, trained_class, same_top, self_correction)
    assert [probing.LOCK_SUBCATEGORIES[s] for s in sub] == ["strict lock", "swap", "self-correction", "loosened"]
    # a base fork is no lock sub-category; its fork sub-category follows the trained class
    assert probing.lock_subcategory([probing.FORK], [probing.LOCK], [True], [False])[0] == probing.NONE
    forks = probing.fork_subcategory([probing.FORK] * 3 + [probing.LOCK],
                                     [probing.FORK, probing.LOCK, probing.DIFFUSE, probing.LOCK])
    assert list(forks) == [probing.PRESERVED, probing.COLLAPSED, probing.DIFFUSED, probing.NONE]


def test_self_correction_context_from_preceding_text_or_top_token():
    markers = ProbeSpec().self_correction_markers
    assert probing.self_correction_context("x = 3. Wait, that is wrong. So", ["x", "y"], markers, 200)
    assert probing.self_correction_context("Let me check the sum: 2 + 2", ["=", " ="], markers, 200)
    # the seed's "Wait" lock: the marker is the base model's top token, not in the text
    assert probing.self_correction_context("Final Answer is \\boxed{C}.\n", ["Wait", "</think>"], markers, 200)
    assert not probing.self_correction_context("Waiting times add up. So", [" the", " we"], markers, 200)
    # a marker older than the window does not count
    assert not probing.self_correction_context("Wait." + " ok" * 100, ["a", "b"], markers, 50)


# -------------------------------------------------------------------------------- tables


def test_rank_table_renders_like_the_seeds_table():
    base = [("{", 0.5268), ("{-", 0.4649), ("`.", 0.0075144), ("{}", 0.00037412), ("`", 0.00012146)]
    ssd = [("{", 0.79383), ("{-", 0.20071), ("`.", 0.0041657), ("{}", 0.00082027), ("{}.", 0.0002074)]
    table = markdown_table(probing.rank_table_headers("SSD"), probing.rank_table_rows(base, ssd))
    assert table == "\n".join([
        "| Rank | Base token (prob) | SSD token (prob) |",
        "|---|---|---|",
        "| 1 | { (0.5268) | { (0.79383) |",
        "| 2 | {- (0.4649) | {- (0.20071) |",
        "| 3 | `. (0.0075144) | `. (0.0041657) |",
        "| 4 | {} (0.00037412) | {} (0.00082027) |",
        "| 5 | ` (0.00012146) | {}. (0.0002074) |",
    ])


def test_rank_table_escapes_pipes_and_whitespace_tokens():
    rows = probing.rank_table_rows([("\n\n", 0.5), (" |", 0.25)], [(" Let", 0.9)])
    assert rows == [["1", "\\n\\n (0.5)", "Let (0.9)"], ["2", "\\| (0.25)", "-"]]


def test_mean_stderr_over_finite_values():
    mean, err, n = probing.mean_stderr(np.array([1.0, 2.0, 3.0, np.nan]))
    assert (mean, n) == (2.0, 3)
    assert err == pytest.approx(1.0 / math.sqrt(3))
    assert probing.format_mean_stderr(np.array([0.5])) == "+0.5000"


# -------------------------------------------------------------------------------- run pieces


def test_stratified_sample_covers_every_stratum_before_repeating_and_is_seeded():
    keys = [("a",)] * 5 + [("b",)] + [("c",)] * 2
    picked = stratified_sample(keys, 3, np.random.default_rng(0))
    assert sorted(keys[i] for i in picked) == [("a",), ("b",), ("c",)]
    picked5 = stratified_sample(keys, 5, np.random.default_rng(0))
    assert [keys[i] for i in picked5].count(("a",)) == 2 and [keys[i] for i in picked5].count(("c",)) == 2
    assert picked5 == stratified_sample(keys, 5, np.random.default_rng(0))
    assert len(stratified_sample(keys, 100, np.random.default_rng(0))) == len(keys)


def test_length_bins_are_quantiles():
    assert list(length_bins(np.array([10, 20, 30, 40, 50, 60]), 3)) == [0, 0, 1, 1, 2, 2]
    assert list(length_bins(np.array([5, 7]), 1)) == [0, 0]


def test_select_positions_regular_heuristic_and_random():
    pieces = ["Let", " x", " be", " 2", ".", " So", " \\", "box", "ed", "{", "2", "}", ".", "\n", "\n", "Done",
              " Letter", "s", "!", "?"]
    probe = ProbeSpec(regular_every=8, heuristic_tokens=["Let", "\\boxed", "\n\n"], heuristic_window=1,
                      random_positions=2, max_positions=128)
    positions, source = select_positions(pieces, probe, np.random.default_rng(0))
    by_pos = dict(zip(positions.tolist(), source.tolist()))
    assert {t for t, s in by_pos.items() if s & REGULAR} == {0, 8, 16}
    # "Let" at 0 (+1), "\boxed" starts in token 6 (" \\"), "\n\n" at 13; "Letter" is not "Let"
    assert {t for t, s in by_pos.items() if s & HEURISTIC} == {0, 1, 6, 7, 13, 14}
    randoms = [t for t, s in by_pos.items() if s & RANDOM]
    assert len(randoms) == 2 and not any(by_pos[t] & (REGULAR | HEURISTIC) for t in randoms)
    again, _ = select_positions(pieces, probe, np.random.default_rng(0))
    assert list(again) == list(positions)
    capped, _ = select_positions(pieces, ProbeSpec(regular_every=1, max_positions=5), np.random.default_rng(0))
    assert len(capped) == 5 and list(capped) == sorted(capped)


def test_compare_distributions_of_identical_models_has_zero_deltas():
    torch.manual_seed(0)
    logits = torch.randn(5, 300) * 3
    cols = compare_distributions(logits, logits.clone(), np.arange(5), 1.5, ProbeSpec())
    assert np.allclose(cols["student_topk_lp"], cols["teacher_at_student_topk_lp"])
    assert np.allclose(cols["topk_kl"], 0, atol=1e-6) and np.allclose(cols["full_kl"], 0, atol=1e-5)
    assert np.array_equal(cols["base_class"], cols["trained_class"])
    assert np.allclose(cols["base_trunc_top1"], cols["trained_trunc_at_base_top1"])
    expected = torch.log_softmax(logits / 1.5, -1)[torch.arange(5), torch.arange(5)]
    assert np.allclose(cols["student_lp"], expected.numpy(), atol=1e-5)


def test_compare_distributions_top1_delta_is_taken_at_the_base_top_token():
    base = lp_of([0.9, 0.05], 50)[None].float()
    trained = lp_of([0.2, 0.75], 50)[None].float()  # a swap: the trained model pushes token 0 down
    cols = compare_distributions(base, trained, np.array([0]), 1.0, ProbeSpec())
    assert np.exp(cols["student_topk_lp"][0, 0]) == pytest.approx(0.9, abs=1e-5)
    assert np.exp(cols["teacher_at_student_topk_lp"][0, 0]) == pytest.approx(0.2, abs=1e-5)
    assert cols["teacher_topk_ids"][0, 0] == 1
    assert [probing.CLASSES[c] for c in (cols["base_class"][0], cols["trained_class"][0])] == ["lock", "lock"]


def test_probe_spec_checks_trained_model_and_temperatures():
    data = {"experiment": {"name": "p"}, "probe": {"temperatures": [0.7, 0.0], "fork_top_n": 30}}
    spec = validate(data, {}, "test.toml")
    with pytest.raises(SpecError) as err:
        check_probe_spec(spec)
    text = str(err.value)
    assert "probe.trained_model" in text and "[0.0]" in text and "probe.fork_top_n" in text


def test_probing_configs_load_with_the_seeds_temperatures():
    full = load_spec(CONFIGS / "ssd_vs_base.toml").spec
    small = load_spec(CONFIGS / "ssd_vs_base_small.toml").spec
    assert full.probe.temperatures == [0.7, 1.5] and small.probe.temperatures == [0.7, 1.5]
    assert full.model.student.startswith("Qwen/Qwen3") and full.task.name == "math"
    assert full.probe.trained_label == "SSD"
    assert small.model.student == small.probe.trained_model == "bundled:smollm2-135m-instruct"
    check_probe_spec(full)
    check_probe_spec(small)


def test_models_with_different_tokenizers_are_refused_naming_both():
    from hpcdistill.models.loading import tiny_random_model

    class Vocab:
        def __init__(self, n):
            self.vocab = {f"t{i}": i for i in range(n)}

        def get_vocab(self):
            return self.vocab

    a = tiny_random_model(vocab_size=64, seed=0)
    b = tiny_random_model(vocab_size=80, seed=1)
    a.tokenizer, b.tokenizer = Vocab(64), Vocab(80)
    a.model_id, b.model_id = "base-model", "other-model"
    with pytest.raises(ModelError, match="'base-model'.*'other-model'"):
        check_same_tokenizer(a, b)
    check_same_tokenizer(a, a)


# -------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_generated_carriers_are_stratified_over_both_generators(monkeypatch):
    """With no recorded carriers both models answer the task's problems; the draw covers both."""
    from types import SimpleNamespace

    import hpcdistill.tasks
    from hpcdistill.train.probe_carriers import generate_carriers
    from hpcdistill.models.loading import load_model, tiny_random_model

    class EvenLengthTask:  # a stand-in verifier: "correct" when the answer has an even length
        def load_problems(self, *, source, split, num_problems, seed):
            return [SimpleNamespace(problem_id=f"q{i}", prompt=f"What is {i} + {i}?") for i in range(num_problems)]

        def verify(self, problem, text, **limits):
            return SimpleNamespace(reward=float(len(text) % 2 == 0), passed=len(text) % 2 == 0)

    monkeypatch.setattr(hpcdistill.tasks, "get_task", lambda name: EvenLengthTask(), raising=False)
    tok = load_model("bundled:smollm2-135m-instruct").tokenizer
    base, trained = tiny_random_model(seed=0, tokenizer=tok), tiny_random_model(seed=1, tokenizer=tok)
    spec = load_spec(CONFIGS / "ssd_vs_base_small.toml",
                     ["task.num_problems=3", "rollout.max_new_tokens=6", "rollout.samples_per_problem=2",
                      "probe.num_carriers=4", "probe.stratify=['generator']"]).spec
    carriers = generate_carriers(spec, base, trained, 0, np.random.default_rng(0))
    assert len(carriers) == 4
    assert sorted(c.generator for c in carriers) == ["base", "base", "trained", "trained"]
    assert all(c.source == "generated" and 0 < len(c.response_ids) <= 6 for c in carriers)
    assert all(c.reward in (0.0, 1.0) for c in carriers)
    again = generate_carriers(spec, base, trained, 0, np.random.default_rng(0))
    assert [c.response_ids for c in again] == [c.response_ids for c in carriers]


def _write_carrier_shard(path: Path, handle, prompts: list[str]) -> None:
    """A real run-like shard: the bundled model answers `prompts`, scored against itself."""
    from hpcdistill.models.chat import render_prompt, single_turn
    from hpcdistill.models.generation import generate
    from hpcdistill.models.scoring import score_rollouts
    from hpcdistill.record import ShardWriter

    tok = handle.tokenizer
    prompt_ids = [render_prompt(tok, single_turn(p)) for p in prompts]
    gens = generate(handle, prompt_ids, n=1, max_new_tokens=40, temperature=0.7, seed=0, progress=False)
    seqs = [(g[0].prompt_ids, [int(t) for t in g[0].response_ids]) for g in gens]
    scores = score_rollouts(handle, handle, seqs, seqs, top_k=4, progress=False)
    with ShardWriter(path, attrs={"student_model": handle.model_id, "teacher_model": "same"}, top_k=4) as w:
        for i, (p, g, s) in enumerate(zip(prompts, gens, scores)):
            w.append({"problem_id": f"p{i}", "sample_idx": 0, "step": 0, "kind": "original",
                      "reward": float(i % 2), "seed": 0, "weight_version": 0,
                      "prompt_text": tok.decode(g[0].prompt_ids),
                      "response_text": tok.decode(g[0].response_ids, skip_special_tokens=True)},
                     {"ids": g[0].response_ids, "student_lp": s.student_lp, "teacher_lp": s.teacher_lp,
                      "student_topk_ids": s.student_topk_ids, "student_topk_lp": s.student_topk_lp,
                      "teacher_at_student_topk_lp": s.teacher_at_student_topk_lp, "topk_kl": s.topk_kl})


def _train_a_few_sft_steps(handle, out: Path) -> Path:
    """A "trained" model: 3 SGD steps of SFT on one boxed answer, saved as a model directory."""
    tok, model = handle.tokenizer, handle.model
    ids = torch.tensor([tok.encode("Let x = 2. Wait, check: 2 + 2 = 4. So the answer is \\boxed{4}.")])
    opt = torch.optim.SGD(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.slow
def test_probe_end_to_end_on_the_bundled_model_writes_a_shard_and_the_report(tmp_path):
    from hpcdistill.train.probe import run_probe
    from hpcdistill.models.loading import load_model
    from hpcdistill.record import ShardReader

    base_id = "bundled:smollm2-135m-instruct"
    carriers = tmp_path / "sweep" / "run0" / "shards" / "step_000000.h5"
    _write_carrier_shard(carriers, load_model(base_id), ["What is 2 + 2? Put the answer in \\boxed{}.",
                                                         "Let x = 3. What is 2x? Answer briefly."])
    trained_dir = _train_a_few_sft_steps(load_model(base_id), tmp_path / "trained")
    small = load_spec(CONFIGS / "ssd_vs_base_small.toml",
                      [f"probe.trained_model={str(trained_dir)!r}",
                       f"probe.carriers=[{str(tmp_path / 'sweep')!r}]", "probe.num_examples=1"]).spec

    shard = run_probe(small, tmp_path / "probe")
    assert shard == tmp_path / "probe" / "shards" / "step_000000.h5"
    with ShardReader(shard) as reader:
        rows = reader.rollouts()
        assert reader.attrs["student_model"] == base_id and reader.attrs["teacher_model"] == str(trained_dir)
        assert sorted(set(rows["probe_temperature"])) == [0.7, 1.5]
        assert len(rows["kind"]) == 4 and set(rows["kind"]) == {"probe"}  # 2 carriers x 2 temperatures
        assert set(rows["problem_id"]) == {"p0", "p1"}
        tokens = reader.tokens(0)
        assert set(np.unique(tokens["base_class"])) <= {0, 1, 2}
        delta = np.exp(tokens["teacher_at_student_topk_lp"][:, 0]) - np.exp(tokens["student_topk_lp"][:, 0])
        assert np.abs(delta).max() > 1e-4  # the SFT steps moved the distributions
        assert np.all(np.diff(tokens["position"]) > 0)
    assert run_probe(small, tmp_path / "probe") == shard  # an existing shard is kept

    sections = probing.probe_report([tmp_path / "probe"], tmp_path / "analysis", print_tables=True)
    report = "\n".join(sections)
    print(report)
    assert "## Lock/fork probe (seed 001)" in report
    assert "Probe at T = 0.7: categories and deltas" in report and "Probe at T = 1.5" in report
    assert "| Rank | Base token (prob) | Trained token (prob) |" in report
    assert (tmp_path / "analysis" / "probe_top1_delta.png").stat().st_size > 0
    assert (tmp_path / "analysis" / "probe_top1_scatter.png").stat().st_size > 0
    # the carrier shards themselves are not probe shards: no section from them
    assert probing.probe_report([tmp_path / "sweep"], tmp_path / "analysis2", print_tables=False) == []
