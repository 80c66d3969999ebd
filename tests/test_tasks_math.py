"""The math task on real completion strings: extraction, equivalence, feedback, loaders."""

from __future__ import annotations

import threading

import pytest

from hpcdistill.errors import TaskError
from hpcdistill.tasks import get_task
from hpcdistill.tasks.math import answers_equal, extract_answer, gsm8k_answer, last_boxed


def first_problem():
    problems = get_task("math").load_problems(num_problems=100)
    return next(p for p in problems if p.problem_id == "bundled-math-00")


def test_boxed_extraction_handles_nested_braces():
    assert last_boxed(r"so \boxed{\frac{1}{2}} and finally \boxed{\sqrt{x^{2}+1}}") == r"\sqrt{x^{2}+1}"
    assert last_boxed(r"\boxed{12") is None  # unclosed


def test_extraction_order_is_boxed_then_hashes_then_last_number():
    assert extract_answer(r"#### 7 but really \boxed{8}") == ("8", "boxed")
    assert extract_answer("She has 3 left.\n#### 1,234") == ("1,234", "####")
    assert extract_answer("First 3 apples, then 4.5 pears.") == ("4.5", "last_number")
    assert extract_answer("no digits here") == (None, "none")


def test_equivalence_uses_math_verify_and_falls_back_to_numbers():
    assert answers_equal("12", r"\frac{24}{2}") == (True, "math_verify")
    assert answers_equal("1234", "1,234")[0]
    assert answers_equal("0.5", r"\frac{1}{2}")[0]
    assert answers_equal("12", "13") == (False, "numeric")


def test_equivalence_off_the_main_thread_uses_the_numeric_fallback():
    results = []
    worker = threading.Thread(target=lambda: results.append(answers_equal("15", "15.00")))
    worker.start()
    worker.join()
    assert results == [(True, "numeric")]


def test_gsm8k_reference_answers_lose_their_commas():
    assert gsm8k_answer("He pays 2*500 = <<2*500=1000>>1000.\n#### 1,000") == "1000"


def test_correct_boxed_answer_scores_one_with_feedback():
    problem = first_problem()
    assert problem.data["answer"] == "12"
    verdict = get_task("math").verify(problem, r"24 + 18 - 30 = 12, so the answer is \boxed{12}.")
    assert verdict.reward == 1.0 and verdict.passed
    assert verdict.feedback == "Correct. Expected answer: 12. Extracted answer: 12."
    assert verdict.details["boxed"] is True


def test_wrong_answer_feedback_names_expected_and_extracted():
    verdict = get_task("math").verify(first_problem(), "24 + 18 = 42 and 42 - 30 = 13\n#### 13")
    assert verdict.reward == 0.0 and not verdict.passed
    assert verdict.feedback == "Incorrect. Expected answer: 12. Extracted answer: 13."
    assert verdict.details["extraction"] == "####"


def test_missing_answer_scores_zero():
    verdict = get_task("math").verify(first_problem(), "I am not sure.")
    assert verdict.reward == 0.0 and verdict.details["extracted"] is None
    assert "No final answer found" in verdict.feedback


def test_bundled_splits_are_disjoint_and_selection_is_seeded():
    task = get_task("math")
    test = task.load_problems(split="test", num_problems=100)
    train = task.load_problems(split="train", num_problems=100)
    assert len(test) + len(train) >= 20 and not {p.problem_id for p in test} & {p.problem_id for p in train}
    assert [p.problem_id for p in task.load_problems(num_problems=4, seed=1)] == \
        [p.problem_id for p in task.load_problems(num_problems=4, seed=1)]
    with pytest.raises(TaskError, match="no problems in split 'dev'; available splits: test, train"):
        task.load_problems(split="dev")


def test_local_file_missing_a_key_names_the_line(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text('{"problem_id": "a", "question": "1+1?", "answer": "2"}\n{"problem_id": "b", "question": "x"}\n')
    with pytest.raises(TaskError, match=r"math.jsonl:2: missing key\(s\) answer"):
        get_task("math").load_problems(source=str(path))


@pytest.mark.parametrize("source,dataset_id", [("gsm8k", "openai/gsm8k"), ("math500", "HuggingFaceH4/MATH-500")])
def test_hub_loaders_offline_raise_a_task_error(monkeypatch, source, dataset_id):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TaskError, match=rf"{dataset_id}.*not available offline.*source=\"bundled\""):
        get_task("math").load_problems(source=source)
