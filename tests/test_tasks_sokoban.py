"""The Sokoban task: seeded reasoning-gym puzzles, answer-tag check, reasoning-gym's own scoring."""

from __future__ import annotations

import json

import pytest

from hpcdistill.errors import TaskError
from hpcdistill.tasks import get_task


def test_generation_is_deterministic_per_seed_and_split():
    task = get_task("sokoban")
    a = task.load_problems(num_problems=3, seed=0)
    assert [p.prompt for p in a] == [p.prompt for p in task.load_problems(num_problems=3, seed=0)]
    assert [p.prompt for p in a] != [p.prompt for p in task.load_problems(num_problems=3, seed=1)]
    assert [p.prompt for p in a] != [p.prompt for p in task.load_problems(num_problems=3, seed=0, split="train")]
    assert "<answer></answer>" in a[0].prompt and "Here is your puzzle:" in a[0].prompt


def test_reference_solution_scores_one():
    task = get_task("sokoban")
    for problem in task.load_problems(num_problems=3, seed=0):
        verdict = task.verify(problem, f"Let me think.\n<answer>{problem.data['answer']}</answer>")
        assert verdict.reward == 1.0 and verdict.passed
        assert verdict.details == {"answer_tag_missing": False, "moves": problem.data["answer"]}


def test_wrong_moves_score_zero_with_feedback():
    task = get_task("sokoban")
    problem = task.load_problems(num_problems=1, seed=0)[0]
    assert problem.data["answer"] != "U"
    verdict = task.verify(problem, "<answer>U</answer>")
    assert verdict.reward == 0.0 and not verdict.passed
    assert verdict.feedback == "Not solved: after the moves U some box is not on a goal."
    assert "Only the letters" in task.verify(problem, "<answer>go left</answer>").feedback


def test_missing_answer_tag_is_recorded():
    task = get_task("sokoban")
    problem = task.load_problems(num_problems=1, seed=0)[0]
    verdict = task.verify(problem, f"The moves are {problem.data['answer']}")  # right moves, no tag
    assert verdict.reward == 0.0 and verdict.details["answer_tag_missing"] is True
    assert "No <answer>" in verdict.feedback


def test_reasoning_gym_source_uses_the_library_defaults():
    problems = get_task("sokoban").load_problems(source="reasoning_gym", num_problems=1, seed=0)
    assert problems[0].problem_id == "sokoban-reasoning_gym-test-s0-0"
    assert get_task("sokoban").verify(problems[0], f"<answer>{problems[0].data['answer']}</answer>").reward == 1.0


def test_local_file_of_entries_loads_and_bad_ones_name_the_line(tmp_path):
    task = get_task("sokoban")
    problem = task.load_problems(num_problems=1, seed=0)[0]
    path = tmp_path / "boards.jsonl"
    entry = {"problem_id": "p0", "question": problem.data["question"], "answer": problem.data["answer"],
             "metadata": problem.data["metadata"]}
    path.write_text(json.dumps(entry) + "\n")
    (loaded,) = task.load_problems(source=str(path))
    assert task.verify(loaded, f"<answer>{problem.data['answer']}</answer>").reward == 1.0
    path.write_text(json.dumps(entry) + "\n" + json.dumps({**entry, "metadata": {}}) + "\n")
    with pytest.raises(TaskError, match=r"boards.jsonl:2: metadata.gamestr"):
        task.load_problems(source=str(path))


def test_unknown_split_is_a_task_error():
    with pytest.raises(TaskError, match="unknown split 'dev'; allowed: train, test"):
        get_task("sokoban").load_problems(split="dev")
