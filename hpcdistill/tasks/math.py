"""The math task: final-answer extraction and equivalence (GSM8K, MATH-500, bundled problems).

Extraction order: the last `\\boxed{...}` (nested braces), else the last GSM8K `#### answer`, else
the last number in the text. Equivalence: math_verify (parse + verify), then a numeric comparison
as a fallback (math_verify needs the main thread for its timeouts and can fail on odd strings).
"""

from __future__ import annotations

import logging
import math
import re
import threading
from pathlib import Path

from hpcdistill.errors import TaskError
from hpcdistill.tasks.base import (DATA_DIR, Problem, Verdict, choose, filter_split, load_hub_dataset, read_jsonl,
                                   resolve_source)

logger = logging.getLogger(__name__)

BUNDLED = DATA_DIR / "math_problems.jsonl"
GSM8K_ID, MATH500_ID = "openai/gsm8k", "HuggingFaceH4/MATH-500"
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


def gsm8k_answer(solution: str) -> str:
    """The final answer of a GSM8K solution ('... #### 1,234' -> '1234')."""
    return solution.rsplit("####", 1)[-1].strip().replace(",", "")


def build_prompt(question: str) -> str:
    return f"{question.strip()}\n\n{INSTRUCTION}"


class MathTask:
    name = "math"
    default_sources = ("bundled", "gsm8k", "math500")

    def load_problems(self, source: str = "bundled", split: str = "test", num_problems: int = 10,
                      seed: int = 0) -> list[Problem]:
        resolved = resolve_source(source, self.name, self.default_sources)
        if resolved == "gsm8k":
            rows = self._hub(GSM8K_ID, split, ("train", "test"), "main")
            records = [(i + 1, {"problem_id": f"gsm8k-{split}-{i}", "question": r["question"],
                                "answer": gsm8k_answer(r["answer"])}) for i, r in enumerate(rows)]
            where = GSM8K_ID
        elif resolved == "math500":
            rows = self._hub(MATH500_ID, split, ("test",), None)
            records = [(i + 1, {"problem_id": r.get("unique_id") or f"math500-{i}", "question": r["problem"],
                                "answer": r["answer"]}) for i, r in enumerate(rows)]
            where = MATH500_ID
        else:
            path = BUNDLED if resolved == "bundled" else Path(resolved)
            records = filter_split(read_jsonl(path, ("problem_id", "question", "answer")), split, str(path))
            where = str(path)
        chosen = choose(records, num_problems, seed, where)
        return [Problem(str(r["problem_id"]), build_prompt(r["question"]),
                        {"answer": str(r["answer"]), "question": r["question"]}) for _, r in chosen]

    @staticmethod
    def _hub(dataset_id: str, split: str, splits: tuple[str, ...], config: str | None):
        if split not in splits:
            raise TaskError(f"dataset {dataset_id!r}: unknown split {split!r}; allowed: {', '.join(splits)}")

        def load():
            from datasets import load_dataset

            return load_dataset(dataset_id, config, split=split) if config else load_dataset(dataset_id, split=split)

        return load_hub_dataset(dataset_id, load)

    def verify(self, problem: Problem, completion: str, *, timeout_s: float = 6.0,
               memory_mb: int = 512) -> Verdict:
        expected = problem.data["answer"]
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
