"""The Sokoban task (seed 004): puzzles generated locally by reasoning-gym, scored by its own scorer.

Sources: "bundled" = small boards (6-8 wide, 1-2 boxes) that a small model can attempt;
"reasoning_gym" = reasoning-gym's default configuration (6-10 wide, 4-10 boxes); a local .jsonl of
reasoning-gym entries ({"question", "answer", "metadata": {"gamestr", ...}}). Generation is seeded:
the "train" and "test" splits use disjoint seeds, and the same (split, seed) gives the same puzzles.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache
from pathlib import Path

from hpcdistill.errors import TaskError
from hpcdistill.tasks.base import Problem, Verdict, choose, filter_split, read_jsonl, resolve_source

logger = logging.getLogger(__name__)

SPLIT_SEEDS = {"train": 1_000_003, "test": 2_000_003}  # added to the run's seed: disjoint streams
CONFIGS = {
    "bundled": {"min_w": 6, "max_w": 8, "min_h": 6, "max_h": 8, "min_boxes": 1, "max_boxes": 2, "max_depth": 80},
    "reasoning_gym": {},
}
ANSWER_INSTRUCTION = ("Think about the puzzle, then give the full move sequence (letters L, R, U, D) inside "
                      "<answer></answer> tags, for example <answer>LDURRUDL</answer>.")
_ANSWER = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)


def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError:
        raise TaskError("task 'sokoban' needs the package reasoning-gym (pip install reasoning-gym)") from None
    return reasoning_gym


@lru_cache(maxsize=1)
def _scorer():
    """A dataset object whose score_answer() replays moves on entry["metadata"]["gamestr"]."""
    return _reasoning_gym().create_dataset("sokoban", seed=0, size=1)


def generate_entries(config_name: str, split: str, num_problems: int, seed: int) -> list[dict]:
    if split not in SPLIT_SEEDS:
        raise TaskError(f"task 'sokoban': unknown split {split!r}; allowed: {', '.join(SPLIT_SEEDS)}")
    dataset = _reasoning_gym().create_dataset("sokoban", seed=seed + SPLIT_SEEDS[split], size=num_problems,
                                              **CONFIGS[config_name])
    return [dataset[i] for i in range(num_problems)]


def build_prompt(question: str) -> str:
    return f"{question.rstrip()}\n\n{ANSWER_INSTRUCTION}"


def extract_moves(completion: str) -> str | None:
    """Content of the last <answer>...</answer> (reasoning-gym's extraction), or None."""
    matches = _ANSWER.findall(completion)
    return matches[-1].strip() if matches else None


class SokobanTask:
    name = "sokoban"
    default_sources = ("bundled", "reasoning_gym")

    def load_problems(self, source: str = "bundled", split: str = "test", num_problems: int = 10,
                      seed: int = 0) -> list[Problem]:
        resolved = resolve_source(source, self.name, self.default_sources)
        if isinstance(resolved, Path):
            records = filter_split(read_jsonl(resolved, ("question", "metadata")), split, str(resolved))
            for lineno, r in records:
                if not isinstance(r["metadata"], dict) or "gamestr" not in r["metadata"]:
                    raise TaskError(f"{resolved}:{lineno}: metadata.gamestr (the board) is missing")
            entries = [(f"{resolved.stem}-{r.get('problem_id', n)}", r)
                       for n, r in choose(records, num_problems, seed, str(resolved))]
        else:
            entries = [(f"sokoban-{resolved}-{split}-s{seed}-{i}", e)
                       for i, e in enumerate(generate_entries(resolved, split, num_problems, seed))]
        return [Problem(pid, build_prompt(e["question"]),
                        {"question": e["question"], "answer": e.get("answer"), "metadata": e["metadata"]})
                for pid, e in entries]

    def verify(self, problem: Problem, completion: str, *, timeout_s: float = 6.0,
               memory_mb: int = 512) -> Verdict:
        moves = extract_moves(completion)
        if moves is None:
            feedback = "No <answer>...</answer> tag found: give the move sequence inside <answer></answer>."
            return Verdict(0.0, False, feedback, {"answer_tag_missing": True, "moves": None})
        entry = {"question": problem.data["question"], "answer": problem.data.get("answer"),
                 "metadata": problem.data["metadata"]}
        reward = float(_scorer().score_answer(moves, entry))
        solved = reward >= 1.0
        if solved:
            feedback = f"Solved: the moves {moves} put every box on a goal."
        else:
            feedback = f"Not solved: after the moves {moves or '(none)'} some box is not on a goal."
            if moves and not re.fullmatch(r"[LRUD]+", moves):
                feedback += " Only the letters L, R, U and D are moves."
        return Verdict(reward, solved, feedback, {"answer_tag_missing": False, "moves": moves})
