"""The math task: final-answer extraction and equivalence.

Sources: the bundled problems, a local .jsonl file in the bundled format, or one of the hub datasets
of `hpcdistill.tasks.math_sources` (GSM8K, MATH-500, DeepMath-103K, AIME25, HMMT25 Feb/Nov,
Minerva, GPQA-Diamond), from the hub (`"aime25"`) or from a local file of its own rows
(`"aime25:/data/aime25.jsonl"`).

Extraction order: the last `\\boxed{...}` (nested braces), else the last GSM8K `#### answer`, else
the last number in the text. Equivalence: math_verify (parse + verify), then a numeric comparison
as a fallback (math_verify needs the main thread for its timeouts and can fail on odd strings).
Multiple-choice problems (GPQA) compare option letters instead (`math_sources.extract_choice`).
"""

from __future__ import annotations

import logging
import math
import re
import threading
from pathlib import Path

from hpcdistill.errors import TaskError
from hpcdistill.tasks import math_sources
from hpcdistill.tasks.base import DATA_DIR, Problem, Verdict, choose, filter_split, read_jsonl, resolve_source
from hpcdistill.tasks.math_sources import gsm8k_answer  # noqa: F401 - part of this module's API

logger = logging.getLogger(__name__)

BUNDLED = DATA_DIR / "math_problems.jsonl"
INSTRUCTION = "Solve the problem step by step. Put the final answer in \\boxed{}."

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...}, with nested braces; None when absent or unclosed."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i].strip()
        i += 1
    return None


def extract_answer(text: str) -> tuple[str | None, str]:
    """(answer, how): how is "boxed", "####", "last_number" or "none"."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed, "boxed"
    hashes = re.findall(r"####\s*([^\n]+)", text)
    if hashes:
        return hashes[-1].strip(), "####"
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1], "last_number"
    return None, "none"


def _as_number(text: str) -> float | None:
    cleaned = re.sub(r"\\[,!;: ]|\\text\{[^}]*\}|\\%|[$%,\s]|\\\$|\\!", "", text).rstrip(".")
    frac = re.fullmatch(r"\\[dt]?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}|(-?[\d.]+)/(-?[\d.]+)", cleaned)
    try:
        if frac:
            num, den = (frac.group(1), frac.group(2)) if frac.group(1) else (frac.group(3), frac.group(4))
            return float(num) / float(den)
        return float(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def answers_equal(expected: str, extracted: str) -> tuple[bool, str]:
    """(equal, method): math_verify when it decides, else the numeric fallback."""
    if threading.current_thread() is threading.main_thread():  # its timeouts use SIGALRM
        try:
            from math_verify import parse, verify

            gold, pred = parse(f"\\boxed{{{expected}}}"), parse(f"\\boxed{{{extracted}}}")
            if gold and pred:
                if verify(gold, pred):
                    return True, "math_verify"
        except Exception as e:  # noqa: BLE001 - a verifier library failure must not fail a rollout
            logger.debug("math_verify failed on %r vs %r: %s", expected, extracted, e)
    a, b = _as_number(expected), _as_number(extracted)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), "numeric"
    return expected.strip() == extracted.strip(), "string"


def build_prompt(question: str) -> str:
    return f"{question.strip()}\n\n{INSTRUCTION}"


class MathTask:
    name = "math"
    default_sources = ("bundled", *math_sources.SOURCES)

    def load_problems(self, source: str = "bundled", split: str | None = "test", num_problems: int | None = 10,
                      seed: int = 0) -> list[Problem]:
        """`split` None = the source's default split (a benchmark's only one; "test" when bundled);
        a local file of a hub dataset's rows is the whole set (no split). `num_problems` None = all."""
        local = math_sources.split_local(source)
        if local is not None:
            records, where = math_sources.local_records(*local)
        elif source in math_sources.SOURCES:
            records, where = math_sources.hub_records(source, split)
        elif source == "bundled" or source.endswith(".jsonl") or "/" in source:
            path = BUNDLED if source == "bundled" else Path(resolve_source(source, self.name, ("bundled",)))
            where = str(path)
            records = [r for _, r in filter_split(read_jsonl(path, ("problem_id", "question", "answer")),
                                                  split or "test", where)]
        else:
            keys = ", ".join(math_sources.SOURCES)
            raise TaskError(f"task 'math': unknown source {source!r}; allowed: bundled, {keys}; "
                            f"<source>:<path of a .jsonl or .parquet file of that dataset's rows> "
                            f"(e.g. \"deepmath:/data/deepmath.jsonl\"); or the path of a local .jsonl file "
                            f"in the bundled format (problem_id, question, answer)")
        chosen = choose(records, num_problems, seed, where)
        return [_problem(r) for r in chosen]

    def verify(self, problem: Problem, completion: str, *, timeout_s: float = 6.0,
               memory_mb: int = 512) -> Verdict:
        expected = problem.data["answer"]
        if problem.data.get("choices"):
            return _verify_choice(problem, completion)
        extracted, how = extract_answer(completion)
        if extracted is None:
            return Verdict(0.0, False, f"No final answer found in the response. The expected answer is {expected}.",
                           {"expected": expected, "extracted": None, "extraction": how, "boxed": False})
        equal, method = answers_equal(expected, extracted)
        verdict = "Correct" if equal else "Incorrect"
        feedback = f"{verdict}. Expected answer: {expected}. Extracted answer: {extracted}."
        return Verdict(float(equal), equal, feedback, {"expected": expected, "extracted": extracted,
                                                       "extraction": how, "method": method,
                                                       "boxed": how == "boxed"})


def _problem(record: dict) -> Problem:
    question = record["question"]
    if record.get("choices"):  # multiple choice (GPQA): the options are part of the prompt
        return Problem(str(record["problem_id"]), math_sources.choice_prompt(question, record["choices"]),
                       {"answer": str(record["answer"]), "question": question, "choices": list(record["choices"])})
    return Problem(str(record["problem_id"]), build_prompt(question),
                   {"answer": str(record["answer"]), "question": question})


def _verify_choice(problem: Problem, completion: str) -> Verdict:
    """A multiple-choice answer: the letter (or the exact option text) against the correct letter."""
    expected = problem.data["answer"]
    boxed = last_boxed(completion)
    extracted, how = math_sources.extract_choice(completion, problem.data["choices"], boxed)
    if extracted is None:
        return Verdict(0.0, False, f"No option letter found in the response. The expected answer is {expected}.",
                       {"expected": expected, "extracted": None, "extraction": how, "boxed": boxed is not None})
    equal = extracted == expected
    feedback = f"{'Correct' if equal else 'Incorrect'}. Expected answer: {expected}. Extracted answer: {extracted}."
    return Verdict(float(equal), equal, feedback, {"expected": expected, "extracted": extracted, "extraction": how,
                                                   "method": "choice", "boxed": how.startswith("boxed")})
