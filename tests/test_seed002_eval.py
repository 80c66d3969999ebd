"""Issue 15, seed 002 as its configs say: the non-thinking student (`model.enable_thinking`), and the
multi-benchmark evaluation with per-benchmark sample budgets (`[[eval.benchmarks]]`, appendix A.6).
Tiny random models, real tokenizer, real local benchmark files in the datasets' own row formats."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from hpcdistill.analysis import training
from hpcdistill.analysis.report import analyze_sweep
from hpcdistill.devices import RoleDevices
from hpcdistill.launch.submit import submit
from hpcdistill.models.chat import render_prompt, set_chat_options, single_turn
from hpcdistill.models.loading import load_tokenizer
from hpcdistill.record import iter_shards
from hpcdistill.spec import load_spec
from hpcdistill.spec.load import validate
from hpcdistill.train import benchmarks
from hpcdistill.train.loop import load_eval_problems
from hpcdistill.train.roles import load_models
from tinyspec import tiny_spec

REPO = Path(__file__).resolve().parent.parent

# Qwen3's switch in miniature: an empty think block when enable_thinking is false
THINK_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|>"
                  "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
                  "{% endif %}")

AIME_ROWS = [{"question": "What is 30 + 40?", "answer": "70"}, {"question": "What is 1 + 1?", "answer": "2"}]
GPQA_ROWS = [{"Question": "Which particle is a lepton?", "Correct Answer": "electron",
              "Incorrect Answer 1": "proton", "Incorrect Answer 2": "neutron", "Incorrect Answer 3": "pion",
              "Record ID": "recA1"},
             {"Question": "Symbol of sodium?", "Correct Answer": "Na", "Incorrect Answer 1": "So",
              "Incorrect Answer 2": "S", "Incorrect Answer 3": "N", "Record ID": "recB2"}]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _benchmark_files(tmp_path: Path) -> list[dict]:
    return [{"source": f"aime25:{_write(tmp_path / 'aime25.jsonl', AIME_ROWS)}", "samples": 2},
            {"source": f"gpqa:{_write(tmp_path / 'gpqa.jsonl', GPQA_ROWS)}", "samples": 1, "average": False}]


# ---------------------------------------------------------------------------- thinking mode


def test_enable_thinking_false_reaches_the_template_and_none_leaves_its_default():
    tok = load_tokenizer("tiny-random:0")
    tok.chat_template = THINK_TEMPLATE
    messages = single_turn("What is 1 + 1?")
    default = tok.decode(render_prompt(tok, messages))
    set_chat_options(tok, enable_thinking=False)
    off = tok.decode(render_prompt(tok, messages))
    set_chat_options(tok, enable_thinking=None)
    assert tok.decode(render_prompt(tok, messages)) == default
    assert default.endswith("<|assistant|>") and off == default + "<think>\n\n</think>\n\n"


def test_a_template_that_ignores_enable_thinking_renders_the_same():
    tok = load_tokenizer("tiny-random:0")  # SmolLM2's template: no enable_thinking variable
    messages = single_turn("What is 1 + 1?", "Be brief.")
    plain = render_prompt(tok, messages)
    set_chat_options(tok, enable_thinking=False)
    assert render_prompt(tok, messages) == plain


def test_model_enable_thinking_is_set_on_the_loaded_student_and_teacher():
    def spec(**model):
        return validate({"experiment": {"name": "think"},
                         "model": {"student": "tiny-random:0", "teacher": "tiny-random:1", "device": "cpu", **model},
                         "task": {"name": "math", "num_problems": 1}}, {}, "test")

    off = load_models(spec(enable_thinking=False), RoleDevices((), (), ()))
    for handle in (off.student, off.teacher):
        handle.tokenizer.chat_template = THINK_TEMPLATE
        assert tok_text(handle.tokenizer).endswith("<think>\n\n</think>\n\n")
    default = load_models(spec(), RoleDevices((), (), ()))
    default.student.tokenizer.chat_template = THINK_TEMPLATE
    assert tok_text(default.student.tokenizer).endswith("<|assistant|>")


def tok_text(tok) -> str:
    return tok.decode(render_prompt(tok, single_turn("q")))


# ---------------------------------------------------------------------------- multi-benchmark eval


def _eval_spec(tmp_path: Path, **eval_keys):
    return validate({"experiment": {"name": "bench"},
                     "model": {"student": "tiny-random:0", "device": "cpu"},
                     "task": {"name": "math", "num_problems": 2},
                     "eval": {"every": 1, "temperatures": [1.0], "benchmarks": _benchmark_files(tmp_path),
                              **eval_keys}}, {}, "test")


def test_benchmark_metrics_are_means_over_problems_x_samples_and_avg_leaves_gpqa_out(tmp_path, monkeypatch):
    spec = _eval_spec(tmp_path, samples=3)
    problems = load_eval_problems(spec, [])
    assert list(problems) == ["aime25", "gpqa"] and [len(v) for v in problems.values()] == [2, 2]
    tok = load_tokenizer("tiny-random:0")
    answers = {"aime25-0": ["\\boxed{70}", "\\boxed{71}"], "aime25-1": ["\\boxed{2}", "\\boxed{2}"],
               "recA1": [f"Answer: {problems['gpqa'][0].data['answer']}"], "recB2": ["\\boxed{electron}"]}
    asked = []

    def fake_sample_student(spec, models, prompts, *, seed, temperature, n, max_new_tokens):
        names = [p.problem_id for bench in problems.values() for p in bench]
        batch = names[:2] if len(asked) == 0 else names[2:]
        asked.append((len(prompts), n))
        return [[SimpleNamespace(response_ids=np.asarray(tok.encode(text, add_special_tokens=False)))
                 for text in answers[pid][:n]] for pid in batch]

    monkeypatch.setattr("hpcdistill.train.roles.sample_student", fake_sample_student)
    metrics = benchmarks.evaluate_benchmarks(spec, SimpleNamespace(student=SimpleNamespace(tokenizer=tok)),
                                             problems, step=0)
    assert asked == [(2, 2), (2, 1)]  # each benchmark's own samples per problem (eval.samples = 3 unused)
    assert metrics["eval/aime25/reward@1"] == pytest.approx(0.75)  # 3 of 4 samples right
    assert metrics["eval/gpqa/reward@1"] == pytest.approx(0.5)  # recB2: "electron" is not one of its options
    assert metrics["eval/avg/reward@1"] == metrics["eval/reward@1"] == pytest.approx(0.75)  # GPQA apart
    assert metrics["eval/avg/passed@1"] == pytest.approx(0.75)


def test_tiny_run_with_two_local_benchmarks_records_and_reports_each(tmp_path):
    path = tiny_spec(tmp_path, "bench", train={"steps": 1, "lr": 1e-2},
                     eval={"every": 1, "temperatures": [1.0], "benchmarks": _benchmark_files(tmp_path)})
    result = submit(load_spec(path), executor="debug")
    per_step = [shard.metrics() for shard in iter_shards([result.sweep.root])]  # read while open
    assert len(per_step) == 2
    for metrics in per_step:
        for name in ("eval/aime25/reward@1", "eval/aime25/passed@1", "eval/gpqa/reward@1", "eval/gpqa/passed@1",
                     "eval/avg/reward@1", "eval/reward@1"):
            assert name in metrics, (name, sorted(metrics))
            assert 0.0 <= metrics[name][1][0] <= 1.0
        assert metrics["eval/avg/reward@1"][1][0] == metrics["eval/aime25/reward@1"][1][0]
    tables = training.benchmark_rows({result.runs[0].run_id: per_step[-1]}, {})
    headers, rows = tables["1"]
    assert headers == ["arm", "aime25", "gpqa", "avg"] and len(rows) == 1
    report = analyze_sweep(result.sweep.root, print_tables=False).read_text()
    assert "Final eval reward per benchmark at T=1" in report and "| aime25 | gpqa | avg |" in report


# ---------------------------------------------------------------------------- the spec


def _expand(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcdistill.cli", "expand", str(path)], capture_output=True,
                          text=True)


@pytest.mark.parametrize("extra,needles", [
    ({"split": "test"}, ["eval.split", "eval.benchmarks"]),
    ({"every": 0}, ["eval.benchmarks", "eval.every"]),
    ({"benchmarks": [{"source": "aime25"}, {"source": "aime25:/x/a.jsonl"}]}, ["eval.benchmarks", "used twice"]),
    ({"benchmarks": [{"source": "aime25", "name": "avg"}]}, ["eval.benchmarks", "reserved"]),
])
def test_benchmark_key_conflicts_exit_2_naming_the_keys(tmp_path, extra, needles):
    path = tiny_spec(tmp_path, "conflict", eval={"every": 1, "benchmarks": [{"source": "aime25"}], **extra})
    done = _expand(path)
    assert done.returncode == 2, done.stderr
    assert all(n in done.stderr for n in needles) and "Traceback" not in done.stderr


def test_seed002_base_config_has_the_seeds_benchmarks_budgets_and_non_thinking_student():
    spec = load_spec(REPO / "configs/teachability/base.toml").spec
    assert spec.task.source == "deepmath" and spec.model.enable_thinking is False
    assert [(b.label, b.samples, b.average) for b in spec.eval.benchmarks] == [
        ("aime25", 32, True), ("hmmt25_feb", 32, True), ("hmmt25_nov", 32, True), ("math500", 1, True),
        ("minerva", 4, True), ("gpqa", 4, False)]
    assert spec.eval.max_new_tokens == 32768
    small = load_spec(REPO / "configs/teachability/release_vs_baselines_small.toml").spec
    assert small.eval.benchmarks == [] and small.task.source == "bundled"  # runs without the hub
    assert _expand(REPO / "configs/teachability/release_vs_baselines.toml").returncode == 0
