"""The math task's hub datasets, each in its own row format (seed 002's training set and benchmarks).

A source key names one dataset: its hub id, configs, splits, the columns a row needs, and how a row
becomes a problem record {"problem_id", "question", "answer"} (+ "choices" for multiple choice).
The same rows load from the hub (`task.source = "aime25"`) or, offline, from a local file of rows
in that dataset's own format (`task.source = "aime25:/data/aime25.jsonl"`, or `.parquet`): one
converter for both, so a file exported with `datasets` (`ds.to_json(...)`) loads unchanged.

Columns (checked against the dataset cards):
  gsm8k       openai/gsm8k (config main)       train, test    question, answer ("... #### 42")
  math500     HuggingFaceH4/MATH-500           test           problem, answer, unique_id
  deepmath    zwhe99/DeepMath-103K             train          question, final_answer (difficulty, topic)
  aime25      opencompass/AIME2025 (configs AIME2025-I, AIME2025-II)  test   question, answer
  hmmt25_feb  MathArena/hmmt_feb_2025          train          problem_idx, problem, answer
  hmmt25_nov  MathArena/hmmt_nov_2025          train          problem_idx, problem, answer
  minerva     math-ai/minervamath              test           question, answer
  gpqa        Idavidrein/gpqa (gpqa_diamond)   train          Question, Correct Answer,
                                                              Incorrect Answer 1..3, Record ID
GPQA is multiple choice: the four options are shuffled in an order seeded by the problem id (the
same order on every run and machine), and the reference answer is the option's letter.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcdistill.errors import TaskError
from hpcdistill.tasks.base import load_hub_dataset, read_jsonl

LETTERS = "ABCD"
CHOICE_INSTRUCTION = "Solve the problem step by step. Put the letter of the correct option in \\boxed{}."
LOCAL_SUFFIXES = (".jsonl", ".parquet")

Record = dict[str, Any]


@dataclass(frozen=True)
class HubSource:
    key: str
    dataset_id: str
    configs: tuple[str | None, ...]  # loaded in order and concatenated (AIME25: I then II)
    splits: tuple[str, ...]  # the dataset's splits; the first is the default
    columns: tuple[str, ...]  # what a row must have (the rest is dropped before iterating)
    record: Callable[[Record, str], Record]  # (row, fallback id) -> problem record
    note: str = ""  # added to the hub error (gated datasets)


def gsm8k_answer(solution: str) -> str:
    """The final answer of a GSM8K solution ('... #### 1,234' -> '1234')."""
    return solution.rsplit("####", 1)[-1].strip().replace(",", "")


def gpqa_record(row: Record, fallback_id: str) -> Record:
    """A GPQA row -> question, the four options in a seeded order, the correct option's letter."""
    problem_id = str(row.get("Record ID") or fallback_id)
    correct = str(row["Correct Answer"]).strip()
    options = [correct] + [str(row[f"Incorrect Answer {i}"]).strip() for i in (1, 2, 3)]
    random.Random(f"gpqa:{problem_id}").shuffle(options)  # str seeds hash with sha512: stable
    return {"problem_id": problem_id, "question": str(row["Question"]).strip(), "choices": options,
            "answer": LETTERS[options.index(correct)]}


def _matharena(prefix: str) -> Callable[[Record, str], Record]:
    def record(row: Record, fallback_id: str) -> Record:
        idx = row.get("problem_idx")
        return {"problem_id": f"{prefix}-{idx}" if idx is not None else fallback_id,
                "question": row["problem"], "answer": str(row["answer"])}
    return record


SOURCES: dict[str, HubSource] = {s.key: s for s in [
    HubSource("gsm8k", "openai/gsm8k", ("main",), ("train", "test"), ("question", "answer"),
              lambda r, i: {"problem_id": i, "question": r["question"], "answer": gsm8k_answer(r["answer"])}),
    HubSource("math500", "HuggingFaceH4/MATH-500", (None,), ("test",), ("problem", "answer"),
              lambda r, i: {"problem_id": r.get("unique_id") or i, "question": r["problem"],
                            "answer": str(r["answer"])}),
    HubSource("deepmath", "zwhe99/DeepMath-103K", (None,), ("train",), ("question", "final_answer"),
              lambda r, i: {"problem_id": i, "question": r["question"], "answer": str(r["final_answer"])}),
    HubSource("aime25", "opencompass/AIME2025", ("AIME2025-I", "AIME2025-II"), ("test",),
              ("question", "answer"),
              lambda r, i: {"problem_id": i, "question": r["question"], "answer": str(r["answer"])}),
    HubSource("hmmt25_feb", "MathArena/hmmt_feb_2025", (None,), ("train",), ("problem", "answer"),
              _matharena("hmmt25_feb")),
    HubSource("hmmt25_nov", "MathArena/hmmt_nov_2025", (None,), ("train",), ("problem", "answer"),
              _matharena("hmmt25_nov")),
    HubSource("minerva", "math-ai/minervamath", (None,), ("test",), ("question", "answer"),
              lambda r, i: {"problem_id": i, "question": r["question"], "answer": str(r["answer"])}),
    HubSource("gpqa", "Idavidrein/gpqa", ("gpqa_diamond",), ("train",),
              ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"),
              gpqa_record, note="the dataset is gated: accept its terms on the hub and pass HF_TOKEN "
                                "(launch.pass_env)"),
]}

OPTIONAL_COLUMNS = ("unique_id", "problem_idx", "Record ID")


def local_alternative(key: str) -> str:
    columns = ", ".join(SOURCES[key].columns)
    return (f"offline, write the dataset's rows (columns {columns}) to a file and use "
            f"source = \"{key}:/path/to/rows.jsonl\" (or .parquet)")


def split_local(source: str) -> tuple[str, Path] | None:
    """("aime25", Path) for "aime25:/data/aime25.jsonl"; None when `source` is not of that form."""
    key, sep, path = source.partition(":")
    if not sep or key not in SOURCES or not path:
        return None
    if not path.endswith(LOCAL_SUFFIXES):
        raise TaskError(f"source {source!r}: a local file of {key} rows must end with "
                        f"{' or '.join(LOCAL_SUFFIXES)}")
    return key, Path(path).expanduser()


def hub_records(key: str, split: str | None) -> tuple[list[Record], str]:
    """(records, where) of the hub dataset `key`; split None = its default split."""
    source = SOURCES[key]
    split = split or source.splits[0]
    if split not in source.splits:
        raise TaskError(f"dataset {source.dataset_id!r} (source {key!r}): unknown split {split!r}; "
                        f"allowed: {', '.join(source.splits)}")

    def load():
        from datasets import load_dataset

        parts = []
        for config in source.configs:
            ds = load_dataset(source.dataset_id, config, split=split) if config else \
                load_dataset(source.dataset_id, split=split)
            keep = [c for c in (*source.columns, *OPTIONAL_COLUMNS) if c in ds.column_names]
            parts.append((config, ds.select_columns(keep)))  # DeepMath's R1 solutions stay on disk
        return parts

    try:
        parts = load_hub_dataset(source.dataset_id, load)
    except TaskError as exc:
        note = f"; {source.note}" if source.note else ""
        raise TaskError(f"task.source {key!r}: {exc}; {local_alternative(key)}{note}") from None
    records = []
    for config, ds in parts:
        tag = f"{key}-{config.rsplit('-', 1)[-1]}" if len(source.configs) > 1 else f"{key}-{split}"
        records += [source.record(row, f"{tag}-{i}") for i, row in enumerate(ds)]
    return records, source.dataset_id


def local_records(key: str, path: Path) -> tuple[list[Record], str]:
    """(records, where) of a local .jsonl / .parquet file of `key`'s rows."""
    source = SOURCES[key]
    if path.suffix == ".parquet":
        if not path.is_file():
            raise TaskError(f"{path}: problem file not found")
        import pyarrow.parquet as pq

        rows = list(enumerate(pq.read_table(path).to_pylist(), start=1))
        for number, row in rows:
            missing = [c for c in source.columns if c not in row]
            if missing:
                raise TaskError(f"{path}: row {number}: missing column(s) {', '.join(missing)}; "
                                f"a {key} row needs {', '.join(source.columns)}")
    else:
        rows = read_jsonl(path, source.columns)
    return [source.record(row, f"{key}-{n - 1}") for n, row in rows], str(path)


def choice_prompt(question: str, choices: list[str]) -> str:
    options = "\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(choices))
    return f"{question.strip()}\n\n{options}\n\n{CHOICE_INSTRUCTION}"


# "Answer: C", "the answer is (C)", "**Answer:** C": the word in any case, the letter a capital
_ANSWER_LINE = re.compile(r"(?i:answer)(?:\s+is)?\s*[:：]?\s*\**\s*\(?\s*([A-D])\b")


def _letter(text: str, letters: str) -> str | None:
    """"C", "(C)", "C)", "\\text{C}", "C. option text" -> "C"."""
    inner = re.sub(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}", r"\1", text).strip()
    match = re.fullmatch(rf"\(?\s*([{letters}])\s*\)?(?:[.:)]\s*.*)?", inner, flags=re.DOTALL)
    return match.group(1) if match else None


def extract_choice(text: str, choices: list[str], boxed: str | None) -> tuple[str | None, str]:
    """(letter, how) of a multiple-choice answer: the last \\boxed{} (a letter, or an option's
    exact text), else the last "Answer: C" line; how is "boxed", "boxed_text", "answer_line", "none"."""
    letters = LETTERS[:len(choices)]
    if boxed is not None:
        letter = _letter(boxed, letters)
        if letter:
            return letter, "boxed"
        normal = [re.sub(r"\s+", " ", c).strip().lower() for c in choices]
        said = re.sub(r"\s+", " ", boxed).strip().lower()
        if said in normal:
            return letters[normal.index(said)], "boxed_text"
    lines = [m.group(1) for m in _ANSWER_LINE.finditer(text) if m.group(1) in letters]
    if lines:
        return lines[-1], "answer_line"
    return None, "none"


__all__ = ["SOURCES", "HubSource", "LETTERS", "split_local", "hub_records", "local_records", "choice_prompt",
           "extract_choice", "gsm8k_answer", "local_alternative"]
