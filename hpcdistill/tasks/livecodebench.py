"""LiveCodeBench rows -> code problems, and the hub loader (`livecodebench/code_generation_lite`).

A row has `question_content`, `starter_code`, `public_test_cases` (a JSON list of
{input, output, testtype: "stdin" | "functional"}), `private_test_cases` (the same list, either JSON
or base64(zlib(pickle(JSON string)))) and `metadata` (JSON; `func_name` for functional problems,
whose test input is one JSON value per line, one per argument, and whose output is JSON).
"""

from __future__ import annotations

import base64
import json
import logging
import pickle
import zlib

from hpcdistill.errors import TaskError
from hpcdistill.tasks.base import load_hub_dataset

logger = logging.getLogger(__name__)

DATASET_ID = "livecodebench/code_generation_lite"
VERSION_TAG = "release_v6"
# release_vN is the union of the files of v1..vN (the dataset's loading script, ALLOWED_FILES).
RELEASE_FILES = ["test.jsonl", "test2.jsonl", "test3.jsonl", "test4.jsonl", "test5.jsonl", "test6.jsonl"]


def decode_test_cases(field: str | list) -> list[dict]:
    if isinstance(field, list):
        return field
    try:
        return json.loads(field)
    except json.JSONDecodeError:
        # Only ever applied to the official dataset's own field (pickle of a JSON string).
        return json.loads(pickle.loads(zlib.decompress(base64.b64decode(field.encode("utf-8")))))


def problem_record_from_row(row: dict, where: str) -> dict:
    """One LiveCodeBench row -> the record format of the bundled code problems."""
    try:
        metadata = row.get("metadata") or "{}"
        metadata = json.loads(metadata) if isinstance(metadata, str) else metadata
        public = decode_test_cases(row["public_test_cases"])
        private = decode_test_cases(row.get("private_test_cases") or "[]")
    except (KeyError, ValueError, TypeError, zlib.error, pickle.UnpicklingError) as e:
        raise TaskError(f"{where}: cannot read the LiveCodeBench test cases ({type(e).__name__}: {e})") from None
    return {
        "problem_id": str(row.get("question_id") or row.get("question_title")),
        "title": row.get("question_title", ""),
        "statement": row["question_content"],
        "starter_code": row.get("starter_code") or "",
        "func_name": metadata.get("func_name"),
        "public_tests": [{"input": t["input"], "output": t["output"], "testtype": t["testtype"]} for t in public],
        "private_tests": [{"input": t["input"], "output": t["output"], "testtype": t["testtype"]} for t in private],
        "difficulty": row.get("difficulty"),
        "contest_date": str(row.get("contest_date", "")),
    }


def load_livecodebench(split: str) -> list[dict]:
    """All problems of release_v6 as records (LiveCodeBench has only a "test" split)."""
    if split != "test":
        raise TaskError(f"source 'livecodebench': unknown split {split!r}; LiveCodeBench has only 'test'")

    def load():
        from datasets import load_dataset

        files = [f"hf://datasets/{DATASET_ID}/{name}" for name in RELEASE_FILES]
        return load_dataset("json", data_files=files, split="train")

    rows = load_hub_dataset(f"{DATASET_ID} ({VERSION_TAG})", load)
    return [problem_record_from_row(row, f"{DATASET_ID} row {i}") for i, row in enumerate(rows)]
