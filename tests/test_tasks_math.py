"""The math task on real completion strings: extraction, equivalence, feedback, loaders."""

from __future__ import annotations

import json
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


# ---------------------------------------------------------------------------- seed 002's datasets
# Small files in each dataset's real row format (columns as on its dataset card), parsed offline.

DATASET_ROWS = {
    "deepmath": [{"question": "Evaluate $\\lim_{x\\to 0} \\frac{\\sin x}{x}$.", "final_answer": "1",
                  "difficulty": 5.0, "topic": "Mathematics -> Calculus", "r1_solution_1": "...",
                  "r1_solution_2": "...", "r1_solution_3": "..."},
                 {"question": "Find the number of subsets of a 4-element set.", "final_answer": "16",
                  "difficulty": 5.5, "topic": "Mathematics -> Discrete Mathematics", "r1_solution_1": "...",
                  "r1_solution_2": "...", "r1_solution_3": "..."}],
    "aime25": [{"question": "Find the sum of all integer bases $b>9$ for which $17_b$ divides $97_b$.",
                "answer": "70"},
               {"question": "What is 1+1?", "answer": "2"}],
    "hmmt25_feb": [{"problem_idx": 1, "problem": "Compute $2^{10}$.", "answer": "1024",
                    "problem_type": ["Algebra"]},
                   {"problem_idx": 2, "problem": "Compute $3^3$.", "answer": "27", "problem_type": ["Algebra"]}],
    "hmmt25_nov": [{"problem_idx": 7, "problem": "Compute $\\binom{5}{2}$.", "answer": "10",
                    "problem_type": ["Combinatorics"]},
                   {"problem_idx": 8, "problem": "Compute $4!$.", "answer": "24", "problem_type": ["Combinatorics"]}],
    "minerva": [{"question": "A star has parallax 0.1 arcsec. Its distance in pc?", "answer": "10"},
                {"question": "Speed of light in m/s, to one significant figure?", "answer": "3e8"}],
    "math500": [{"problem": "What is $\\frac{1}{2}+\\frac{1}{2}$?", "solution": "...", "answer": "1",
                 "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"}],
    "gsm8k": [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"}],
    "gpqa": [{"Question": "Which particle is a lepton?", "Correct Answer": "electron",
              "Incorrect Answer 1": "proton", "Incorrect Answer 2": "neutron", "Incorrect Answer 3": "pion",
              "Record ID": "recA1", "High-level domain": "Physics"},
             {"Question": "What is the chemical symbol of sodium?", "Correct Answer": "Na",
              "Incorrect Answer 1": "So", "Incorrect Answer 2": "S", "Incorrect Answer 3": "N",
              "Record ID": "recB2", "High-level domain": "Chemistry"}],
}


def write_rows(tmp_path, key, suffix=".jsonl"):
    path = tmp_path / f"{key}{suffix}"
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(DATASET_ROWS[key]), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in DATASET_ROWS[key]))
    return path


@pytest.mark.parametrize("key,ids,answers", [
    ("deepmath", ["deepmath-0", "deepmath-1"], ["1", "16"]),
    ("aime25", ["aime25-0", "aime25-1"], ["70", "2"]),
    ("hmmt25_feb", ["hmmt25_feb-1", "hmmt25_feb-2"], ["1024", "27"]),
    ("hmmt25_nov", ["hmmt25_nov-7", "hmmt25_nov-8"], ["10", "24"]),
    ("minerva", ["minerva-0", "minerva-1"], ["10", "3e8"]),
    ("math500", ["test/algebra/1.json"], ["1"]),
    ("gsm8k", ["gsm8k-0"], ["7"]),
])
def test_local_files_in_each_datasets_own_row_format_load_offline(tmp_path, monkeypatch, key, ids, answers):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_rows(tmp_path, key)
    problems = get_task("math").load_problems(source=f"{key}:{path}", split="train", num_problems=10)
    assert [p.problem_id for p in problems] == ids
    assert [p.data["answer"] for p in problems] == answers
    question = DATASET_ROWS[key][0].get("question") or DATASET_ROWS[key][0]["problem"]
    assert problems[0].prompt.startswith(question) and problems[0].prompt.endswith("\\boxed{}.")
    verdict = get_task("math").verify(problems[0], f"so \\boxed{{{answers[0]}}}")
    assert verdict.passed and verdict.reward == 1.0


def test_a_parquet_file_of_dataset_rows_loads_like_jsonl(tmp_path):
    a = get_task("math").load_problems(source=f"deepmath:{write_rows(tmp_path, 'deepmath')}", num_problems=5)
    b = get_task("math").load_problems(source=f"deepmath:{write_rows(tmp_path, 'deepmath', '.parquet')}",
                                       num_problems=5)
    assert [(p.problem_id, p.prompt, p.data) for p in a] == [(p.problem_id, p.prompt, p.data) for p in b]


def test_a_local_dataset_file_missing_a_column_names_the_line_and_the_columns(tmp_path):
    path = tmp_path / "aime.jsonl"
    path.write_text('{"question": "1+1?", "answer": "2"}\n{"problem": "x", "answer": "3"}\n')
    with pytest.raises(TaskError, match=r"aime.jsonl:2: missing key\(s\) question; a problem needs question, answer"):
        get_task("math").load_problems(source=f"aime25:{path}")
    with pytest.raises(TaskError, match=r"must end with \.jsonl or \.parquet"):
        get_task("math").load_problems(source=f"aime25:{tmp_path / 'aime.csv'}")


def test_gpqa_options_are_shuffled_in_a_seeded_order_and_the_answer_is_their_letter(tmp_path):
    source = f"gpqa:{write_rows(tmp_path, 'gpqa')}"
    first = get_task("math").load_problems(source=source, num_problems=5)
    again = get_task("math").load_problems(source=source, num_problems=5)
    assert [p.prompt for p in first] == [p.prompt for p in again]  # the order is seeded by the record id
    assert [p.problem_id for p in first] == ["recA1", "recB2"]
    for problem, row in zip(first, DATASET_ROWS["gpqa"]):
        choices = problem.data["choices"]
        assert sorted(choices) == sorted([row["Correct Answer"]] + [row[f"Incorrect Answer {i}"] for i in (1, 2, 3)])
        assert choices["ABCD".index(problem.data["answer"])] == row["Correct Answer"]
        for letter, choice in zip("ABCD", choices):
            assert f"\n{letter}) {choice}\n" in problem.prompt + "\n"
    # the order is random.Random("gpqa:<Record ID>").shuffle of [correct, incorrect 1, 2, 3]: fixed values
    assert [p.data["choices"] for p in first] == [["neutron", "electron", "proton", "pion"], ["N", "So", "Na", "S"]]
    assert [p.data["answer"] for p in first] == ["B", "C"]


def test_gpqa_verification_reads_the_letter_from_a_box_or_an_answer_line(tmp_path):
    problem = get_task("math").load_problems(source=f"gpqa:{write_rows(tmp_path, 'gpqa')}", num_problems=5)[0]
    right = problem.data["answer"]
    wrong = next(letter for letter in "ABCD" if letter != right)
    task = get_task("math")
    assert task.verify(problem, f"The electron is a lepton. \\boxed{{{right}}}").passed
    assert task.verify(problem, f"so \\boxed{{\\text{{({right})}}}}").details["extraction"] == "boxed"
    assert task.verify(problem, f"Reasoning...\nAnswer: {right}").details["extraction"] == "answer_line"
    assert task.verify(problem, "\\boxed{electron}").details == {
        "expected": right, "extracted": right, "extraction": "boxed_text", "method": "choice", "boxed": True}
    verdict = task.verify(problem, f"\\boxed{{{wrong}}}")
    assert not verdict.passed and verdict.feedback == f"Incorrect. Expected answer: {right}. Extracted answer: {wrong}."
    assert task.verify(problem, "The answer is a bit unclear.").details["extracted"] is None
    assert task.verify(problem, "\\boxed{42}").reward == 0.0


@pytest.mark.parametrize("key,dataset_id", [("deepmath", "zwhe99/DeepMath-103K"), ("aime25", "opencompass/AIME2025"),
                                            ("hmmt25_feb", "MathArena/hmmt_feb_2025"),
                                            ("hmmt25_nov", "MathArena/hmmt_nov_2025"),
                                            ("minerva", "math-ai/minervamath"), ("gpqa", "Idavidrein/gpqa")])
def test_seed002_hub_sources_offline_name_the_key_and_the_local_file_alternative(monkeypatch, key, dataset_id):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TaskError, match=rf"task.source '{key}': dataset '{dataset_id}' is not available offline"
                                        rf".*source = \"{key}:/path/to/rows.jsonl\""):
        get_task("math").load_problems(source=key, split=None)


def test_a_hub_source_rejects_a_split_it_does_not_have():
    with pytest.raises(TaskError, match=r"MathArena/hmmt_feb_2025.*unknown split 'test'; allowed: train"):
        get_task("math").load_problems(source="hmmt25_feb", split="test")


def test_an_unknown_source_lists_every_allowed_source():
    with pytest.raises(TaskError) as info:
        get_task("math").load_problems(source="deepmth")
    message = str(info.value)
    for key in ("bundled", "gsm8k", "math500", "deepmath", "aime25", "hmmt25_feb", "hmmt25_nov", "minerva", "gpqa",
                "<source>:<path of a .jsonl or .parquet file"):
        assert key in message


def test_aime25_from_the_hub_concatenates_both_configs_and_drops_unused_columns(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(dataset_id, config=None, split=None):  # the hub's answer, as a real Dataset
        calls.append((dataset_id, config, split))
        rows = DATASET_ROWS["aime25"] if config == "AIME2025-I" else [{"question": "What is 2+2?", "answer": "4"}]
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    problems = get_task("math").load_problems(source="aime25", split=None, num_problems=30)
    assert calls == [("opencompass/AIME2025", "AIME2025-I", "test"), ("opencompass/AIME2025", "AIME2025-II", "test")]
    assert [p.problem_id for p in problems] == ["aime25-I-0", "aime25-I-1", "aime25-II-0"]
    assert [p.data["answer"] for p in problems] == ["70", "2", "4"]
