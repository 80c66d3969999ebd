"""The code task (LiveCodeBench style): programs run against public and private tests in a sandbox.

Reward = fraction of PUBLIC tests passed (seed 000: "public test pass rate"); feedback = the
execution output a feedback teacher sees: which public tests failed, with input, expected and
actual output, or the error tail, or the limit that stopped the program. Private tests are scored
separately (`details["private_reward"]`) and never appear in the feedback.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import re
import warnings
import traceback
from dataclasses import dataclass
from pathlib import Path

from hpcdistill.errors import TaskError
from hpcdistill.tasks.base import DATA_DIR, Problem, Verdict, choose, filter_split, read_jsonl, resolve_source
from hpcdistill.tasks.sandbox import SandboxLimits, SandboxResult, run_python

logger = logging.getLogger(__name__)

BUNDLED = DATA_DIR / "code_problems.jsonl"
REQUIRED = ("problem_id", "statement", "public_tests")
TEST_TYPES = ("stdin", "functional")
MARKER = "@@hpcdistill-result@@"
FEEDBACK_FIELD_CHARS = 400  # per input / output shown in feedback
ERROR_TAIL_LINES = 8

SYSTEM_LINE = ("You are an expert Python programmer. You will be given a question (problem specification) and "
               "will generate a correct Python program that matches the specification and passes all tests.")
FORMAT_STDIN = ("Read the inputs from stdin solve the problem and write the answer to stdout (do not directly "
                "test on the sample inputs). Enclose your code within delimiters as follows. Ensure that when "
                "the python program runs, it reads the inputs, runs the algorithm and writes output to STDOUT.")
FORMAT_STARTER = ("You will use the following starter code to write the solution to the problem and enclose "
                  "your code within delimiters.")

# Functional tests: the solution file is executed with the imports LiveCodeBench prepends, then the
# named function (a method of `Solution`, or a top-level function) is called on one JSON value per line.
FUNCTIONAL_HARNESS = """\
import json, sys
namespace = {"__name__": "solution"}
exec("from typing import *\\nfrom collections import *\\nimport math, heapq, bisect, itertools, functools, "
     "string, re", namespace)
exec(compile(open("solution.py", encoding="utf-8").read(), "solution.py", "exec"), namespace)
name = __FUNC_NAME__
owner = namespace.get("Solution")
function = getattr(owner(), name) if owner is not None and hasattr(owner, name) else namespace.get(name)
if not callable(function):
    sys.exit(f"no function named {name!r} (as a method of class Solution or at top level)")
args = [json.loads(line) for line in sys.stdin.read().splitlines() if line.strip()]
result = function(*args)
encode = lambda o: sorted(o) if isinstance(o, (set, frozenset)) else repr(o)
sys.stdout.write("\\n__MARKER__" + json.dumps(result, default=encode) + "\\n")
"""


def functional_harness(func_name: str | None) -> str:
    return FUNCTIONAL_HARNESS.replace("__FUNC_NAME__", repr(func_name)).replace("__MARKER__", MARKER)


@dataclass(frozen=True)
class TestOutcome:
    index: int  # 1-based within its group (public or private)
    passed: bool
    status: str  # passed | wrong_answer | SandboxResult.status | skipped
    message: str  # the feedback block for this test ("" when passed)


def build_prompt(statement: str, starter_code: str = "") -> str:
    if starter_code:
        fmt = f"### Format: {FORMAT_STARTER}\n```python\n{starter_code}\n```"
    else:
        fmt = f"### Format: {FORMAT_STDIN}\n```python\n# YOUR CODE HERE\n```"
    return f"{SYSTEM_LINE}\n\n### Question:\n{statement}\n\n{fmt}\n\n### Answer: (use the provided format with backticks)\n"


_FENCE = re.compile(r"```([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str | None:
    """The last ```python block, else the last ``` block, else the whole text if it parses, else None."""
    blocks = _FENCE.findall(completion)
    python = [body for lang, body in blocks if lang.lower() in ("python", "python3", "py")]
    if python:
        return python[-1]
    if blocks:
        return blocks[-1][1]
    opened = re.search(r"```(?:python|python3|py)[ \t]*\n(.*)\Z", completion, re.DOTALL)  # cut off
    for candidate in ([opened.group(1)] if opened else []) + [completion]:
        if candidate.strip() and _parses(candidate):
            return candidate
    return None


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
        return True
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.strip().splitlines()]
    return lines


def _close(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6)


def stdout_matches(actual: str, expected: str) -> bool:
    """Line-wise after stripping trailing spaces, else token-wise with a float tolerance."""
    if _lines(actual) == _lines(expected):
        return True
    a, e = actual.split(), expected.split()
    return len(a) == len(e) and all(_close(x, y) for x, y in zip(a, e))


def functional_matches(actual: object, expected: object) -> bool:
    if isinstance(actual, (int, float)) and isinstance(expected, (int, float)) and \
            not isinstance(actual, bool) and not isinstance(expected, bool):
        return math.isclose(actual, expected, rel_tol=1e-6, abs_tol=1e-6)
    if isinstance(actual, list) and isinstance(expected, list):
        return len(actual) == len(expected) and all(functional_matches(a, e) for a, e in zip(actual, expected))
    return actual == expected


def _clip(text: str, limit: int = FEEDBACK_FIELD_CHARS) -> str:
    text = text.rstrip("\n")
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more characters]"


def _error_tail(stderr: str) -> str:
    lines = [line for line in stderr.rstrip().splitlines() if 'File "<string>"' not in line]
    return "\n".join(lines[-ERROR_TAIL_LINES:])


def run_test(code: str, test: dict, index: int, func_name: str | None, limits: SandboxLimits
             ) -> tuple[TestOutcome, SandboxResult]:
    if test["testtype"] == "functional":
        result = run_python(functional_harness(func_name), stdin=test["input"],
                            files={"solution.py": code}, limits=limits)
        stdout, _, payload = result.stdout.rpartition(MARKER)
        shown_actual = payload.strip() if payload else stdout.strip()
    else:
        result = run_python(code, stdin=test["input"], limits=limits)
        payload, shown_actual = "", result.stdout
    head = f"Test {index}"
    shown_input = f"Input:\n{_clip(test['input'])}"
    if result.status != "ok":
        detail = _error_tail(result.stderr) if result.status in ("runtime_error", "blocked") else ""
        message = f"{head}: {result.reason}\n{shown_input}" + (f"\nError:\n{detail}" if detail else "")
        return TestOutcome(index, False, result.status, message), result
    if test["testtype"] == "functional":
        try:
            passed = bool(payload) and functional_matches(json.loads(payload), json.loads(test["output"]))
        except json.JSONDecodeError:
            passed = False
    else:
        passed = stdout_matches(result.stdout, test["output"])
    if passed:
        return TestOutcome(index, True, "passed", ""), result
    message = (f"{head}: Wrong answer\n{shown_input}\nExpected output:\n{_clip(test['output'])}\n"
               f"Actual output:\n{_clip(shown_actual) if shown_actual.strip() else '(no output)'}")
    return TestOutcome(index, False, "wrong_answer", message), result


def run_tests(code: str, tests: list[dict], func_name: str | None, limits: SandboxLimits
              ) -> tuple[list[TestOutcome], dict[str, str]]:
    """Each test in a fresh sandbox; after a time limit the remaining tests are skipped (failed)."""
    outcomes: list[TestOutcome] = []
    isolation: dict[str, str] = {}
    for i, test in enumerate(tests, start=1):
        if any(o.status == "timeout" for o in outcomes):
            outcomes.append(TestOutcome(i, False, "skipped", f"Test {i}: not run (a previous test timed out)"))
            continue
        outcome, result = run_test(code, test, i, func_name, limits)
        outcomes.append(outcome)
        isolation = result.isolation or isolation
    return outcomes, isolation


def execution_feedback(outcomes: list[TestOutcome]) -> str:
    passed = sum(o.passed for o in outcomes)
    lines = [f"Passed {passed} of {len(outcomes)} public tests."]
    lines += [o.message for o in outcomes if not o.passed]
    return "\n\n".join(lines)


def _validate(record: dict, where: str) -> None:
    for group in ("public_tests", "private_tests"):
        tests = record.get(group, [])
        if not isinstance(tests, list) or (group == "public_tests" and not tests):
            raise TaskError(f"{where}: {group} must be a non-empty list of tests")
        for j, t in enumerate(tests):
            if not isinstance(t, dict) or not {"input", "output", "testtype"} <= set(t):
                raise TaskError(f"{where}: {group}[{j}] needs keys input, output, testtype")
            if t["testtype"] not in TEST_TYPES:
                raise TaskError(f"{where}: {group}[{j}].testtype is {t['testtype']!r}; allowed: stdin, functional")
            if t["testtype"] == "functional" and not record.get("func_name"):
                raise TaskError(f"{where}: functional tests need a func_name")


def problem_from_record(record: dict, where: str) -> Problem:
    _validate(record, where)
    data = {"public_tests": record["public_tests"], "private_tests": record.get("private_tests", []),
            "func_name": record.get("func_name"), "starter_code": record.get("starter_code", ""),
            "title": record.get("title", "")}
    return Problem(str(record["problem_id"]), build_prompt(record["statement"], data["starter_code"]), data)


class CodeTask:
    name = "code"
    default_sources = ("bundled", "livecodebench")

    def __init__(self, run_private: bool = True) -> None:
        self.run_private = run_private

    def load_problems(self, source: str = "bundled", split: str = "test", num_problems: int = 10,
                      seed: int = 0) -> list[Problem]:
        resolved = resolve_source(source, self.name, self.default_sources)
        if resolved == "livecodebench":
            from hpcdistill.tasks.livecodebench import DATASET_ID, load_livecodebench, problem_record_from_row

            records = [(i + 1, r) for i, r in enumerate(load_livecodebench(split))]
            where = DATASET_ID
        else:
            path = BUNDLED if resolved == "bundled" else Path(resolved)
            from hpcdistill.tasks.livecodebench import problem_record_from_row

            raw = read_jsonl(path, required=())
            records = []
            for lineno, r in raw:  # a local file may also hold raw LiveCodeBench rows
                r = problem_record_from_row(r, f"{path}:{lineno}") if "question_content" in r else r
                missing = [k for k in REQUIRED if k not in r]
                if missing:
                    raise TaskError(f"{path}:{lineno}: missing key(s) {', '.join(missing)}; a code problem "
                                    f"needs {', '.join(REQUIRED)} (or a LiveCodeBench row)")
                records.append((lineno, r))
            records = filter_split(records, split, str(path))
            where = str(path)
        chosen = choose(records, num_problems, seed, where)
        return [problem_from_record(r, f"{where}:{n}") for n, r in chosen]

    def verify(self, problem: Problem, completion: str, *, timeout_s: float = 6.0,
               memory_mb: int = 512) -> Verdict:
        data = problem.data
        public, private = data["public_tests"], data.get("private_tests", [])
        code = extract_code(completion)
        if code is None:
            feedback = "No code found in the response: expected the program in a ```python block."
            return Verdict(0.0, False, feedback, {"code_found": False, "tests": [], "private_reward": 0.0})
        try:
            with warnings.catch_warnings():  # the model's code may warn; that is not our output
                warnings.simplefilter("ignore")
                compile(code, "main.py", "exec")
        except (SyntaxError, ValueError) as e:
            error = "".join(traceback.format_exception_only(type(e), e)).rstrip()
            feedback = f"Passed 0 of {len(public)} public tests.\n\nCompilation error:\n{error}"
            return Verdict(0.0, False, feedback, {"code_found": True, "compile_error": error, "tests": [],
                                                  "private_reward": 0.0})
        except (RecursionError, MemoryError):
            return Verdict(0.0, False, "Compilation error: the program is too deeply nested to compile.",
                           {"code_found": True, "compile_error": "too deeply nested", "tests": [],
                            "private_reward": 0.0})
        limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb)
        outcomes, isolation = run_tests(code, public, data.get("func_name"), limits)
        reward = sum(o.passed for o in outcomes) / len(outcomes)
        details: dict = {"code_found": True, "tests": [{"index": o.index, "passed": o.passed, "status": o.status}
                                                       for o in outcomes], "isolation": isolation}
        if isolation and any(v.startswith("unavailable") for v in isolation.values()):
            details["isolation_unavailable"] = sorted(k for k, v in isolation.items() if v.startswith("unavailable"))
        if self.run_private and private:
            if any(o.status == "timeout" for o in outcomes):
                details["private_reward"], details["private_tests"] = 0.0, "not run (public tests timed out)"
            else:
                private_outcomes, _ = run_tests(code, private, data.get("func_name"), limits)
                details["private_reward"] = sum(o.passed for o in private_outcomes) / len(private_outcomes)
                details["private_tests"] = [{"index": o.index, "passed": o.passed, "status": o.status}
                                            for o in private_outcomes]
        return Verdict(reward, all(o.passed for o in outcomes), execution_feedback(outcomes), details)
