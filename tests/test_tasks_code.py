"""The code task end to end: bundled problems, real sandboxed runs, execution feedback text."""

from __future__ import annotations

import json

import pytest

from hpcdistill.errors import TaskError
from hpcdistill.tasks import TASK_NAMES, Problem, get_task
from hpcdistill.tasks.code import BUNDLED, extract_code, stdout_matches
from hpcdistill.tasks.livecodebench import decode_test_cases, problem_record_from_row

LIMITS = {"timeout_s": 2.0, "memory_mb": 256}


def bundled(problem_id: str) -> Problem:
    task = get_task("code")
    return next(p for p in task.load_problems(num_problems=100) if p.problem_id == problem_id)


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\n"


def test_get_task_rejects_unknown_names_listing_the_allowed_ones():
    with pytest.raises(TaskError, match="unknown task 'chess'; allowed: code, math, sokoban"):
        get_task("chess")
    assert TASK_NAMES == ("code", "math", "sokoban")


def test_bundled_problems_are_deterministic_and_mix_stdin_and_functional():
    task = get_task("code")
    everything = task.load_problems(num_problems=100)
    assert len(everything) >= 12
    types = {t["testtype"] for p in everything for t in p.data["public_tests"]}
    assert types == {"stdin", "functional"}
    assert all(2 <= len(p.data["public_tests"]) <= 4 and len(p.data["private_tests"]) >= 2 for p in everything)
    a = task.load_problems(num_problems=5, seed=3)
    assert [p.problem_id for p in a] == [p.problem_id for p in task.load_problems(num_problems=5, seed=3)]
    assert [p.problem_id for p in a] != [p.problem_id for p in task.load_problems(num_problems=5, seed=4)]
    assert "### Question:" in a[0].prompt and "```python" in a[0].prompt


def test_extract_code_prefers_the_last_python_block():
    text = "```\nprint(0)\n```\nthen\n```python\nprint(1)\n```\nfinally\n```python\nprint(2)\n```"
    assert extract_code(text) == "print(2)\n"
    assert extract_code("```\nprint(3)\n```") == "print(3)\n"
    assert extract_code("print(4)") == "print(4)"
    assert extract_code("I think the answer is to loop.") is None
    assert extract_code("Sure:\n```python\nprint(5)\n") == "print(5)\n"  # cut off by the token limit


def test_stdout_comparison_ignores_trailing_space_and_float_noise():
    assert stdout_matches("1 2 \n3\n\n", "1 2\n3")
    assert stdout_matches("0.3333333\n", "0.33333333")
    assert not stdout_matches("1 2\n", "1 3\n")


def test_correct_stdin_program_passes_public_and_private_tests():
    verdict = get_task("code").verify(bundled("sum_two"), fenced("a, b = map(int, input().split())\nprint(a + b)"),
                                      **LIMITS)
    assert verdict.reward == 1.0 and verdict.passed
    assert verdict.feedback == "Passed 3 of 3 public tests."
    assert verdict.details["private_reward"] == 1.0
    assert [t["status"] for t in verdict.details["tests"]] == ["passed"] * 3


def test_correct_functional_solution_with_starter_code_passes():
    code = ("class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
            "        seen = {}\n        for i, x in enumerate(nums):\n"
            "            if target - x in seen:\n                return [seen[target - x], i]\n"
            "            seen[x] = i\n")
    verdict = get_task("code").verify(bundled("two_sum"), fenced(code), **LIMITS)
    assert verdict.reward == 1.0 and verdict.details["private_reward"] == 1.0


def test_wrong_program_gets_expected_versus_actual_feedback():
    verdict = get_task("code").verify(bundled("sum_two"), fenced("a, b = map(int, input().split())\nprint(a * b)"),
                                      **LIMITS)
    assert verdict.reward == pytest.approx(0.0) and not verdict.passed
    assert verdict.feedback.startswith("Passed 0 of 3 public tests.")
    assert "Test 1: Wrong answer\nInput:\n3 5\nExpected output:\n8\nActual output:\n15" in verdict.feedback


def test_partially_correct_functional_solution_scores_the_public_fraction():
    verdict = get_task("code").verify(bundled("valid_brackets"),
                                      fenced("def isValid(s):\n    return len(s) % 2 == 0"), **LIMITS)
    # public: "()[]{}" ok, "(]" wrong (true instead of false), "([])" ok
    assert verdict.reward == pytest.approx(2 / 3) and not verdict.passed
    assert "Test 2: Wrong answer\nInput:\n\"(]\"\nExpected output:\nfalse\nActual output:\ntrue" in verdict.feedback
    assert "private_reward" in verdict.details and "((" not in verdict.feedback  # private tests stay hidden


def test_syntax_error_is_reported_without_running():
    verdict = get_task("code").verify(bundled("sum_two"), fenced("def f(:\n    pass"), **LIMITS)
    assert verdict.reward == 0.0
    assert "Compilation error:" in verdict.feedback and "SyntaxError" in verdict.feedback
    assert verdict.details["tests"] == []


def test_runtime_error_feedback_shows_the_traceback_tail():
    verdict = get_task("code").verify(bundled("sum_two"), fenced("print(1 // 0)"), **LIMITS)
    assert verdict.reward == 0.0
    assert "Test 1: Runtime error (exit code 1)" in verdict.feedback
    assert "ZeroDivisionError: integer division or modulo by zero" in verdict.feedback
    assert '<string>' not in verdict.feedback  # the sandbox's own frames are dropped


def test_missing_function_name_is_a_clear_runtime_error():
    verdict = get_task("code").verify(bundled("two_sum"), fenced("def other(nums, target):\n    return [0, 1]"),
                                      **LIMITS)
    assert verdict.reward == 0.0 and "no function named 'twoSum'" in verdict.feedback


def test_infinite_loop_times_out_and_skips_the_remaining_tests():
    verdict = get_task("code").verify(bundled("sum_two"), fenced("while True:\n    pass"),
                                      timeout_s=1.0, memory_mb=256)
    assert verdict.reward == 0.0
    assert [t["status"] for t in verdict.details["tests"]] == ["timeout", "skipped", "skipped"]
    assert "Test 1: Time limit exceeded" in verdict.feedback
    assert verdict.details["private_reward"] == 0.0


def test_program_opening_a_socket_fails_with_the_reason():
    verdict = get_task("code").verify(bundled("sum_two"), fenced("import socket\nsocket.socket()\nprint(8)"),
                                      **LIMITS)
    assert verdict.reward == 0.0
    assert "Blocked by the sandbox: opening a socket is not allowed" in verdict.feedback


def test_no_code_in_the_completion_scores_zero():
    verdict = get_task("code").verify(bundled("sum_two"), "I would add the numbers.", **LIMITS)
    assert verdict.reward == 0.0 and verdict.details["code_found"] is False
    assert "No code found" in verdict.feedback


def test_local_file_with_a_bad_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "problems.jsonl"
    good = BUNDLED.read_text().splitlines()[0]
    path.write_text(good + "\n{not json}\n")
    with pytest.raises(TaskError, match=rf"{path}:2: not valid JSON"):
        get_task("code").load_problems(source=str(path))
    record = json.loads(good)
    record["public_tests"][0]["testtype"] = "interactive"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(TaskError, match=r"problems.jsonl:1: public_tests\[0\].testtype is 'interactive'"):
        get_task("code").load_problems(source=str(path))


def test_local_file_in_the_bundled_format_loads(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(BUNDLED.read_text().splitlines()[:3]) + "\n")
    problems = get_task("code").load_problems(source=str(path), num_problems=10)
    assert [p.problem_id for p in problems] == ["sum_two", "reverse_words", "fizzbuzz"]


def test_unknown_source_lists_the_allowed_ones():
    with pytest.raises(TaskError, match="unknown source 'leetcode'; allowed: bundled, livecodebench"):
        get_task("code").load_problems(source="leetcode")


def test_livecodebench_rows_decode_compressed_private_tests():
    import base64
    import pickle
    import zlib

    private = [{"input": "1\n", "output": "2\n", "testtype": "stdin"}]
    encoded = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(private)))).decode()
    assert decode_test_cases(encoded) == private
    row = {"question_id": "abc100_a", "question_title": "A", "question_content": "Print N+1.",
           "starter_code": "", "metadata": "{}", "public_test_cases": json.dumps(private),
           "private_test_cases": encoded}
    record = problem_record_from_row(row, "row 0")
    assert record["problem_id"] == "abc100_a" and record["private_tests"] == private


def test_livecodebench_offline_raises_a_task_error_quickly(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(TaskError, match=r"livecodebench/code_generation_lite.*not available offline.*bundled"):
        get_task("code").load_problems(source="livecodebench")
    assert time.monotonic() - start < 30
