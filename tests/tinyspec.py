"""Spec files of tiny real runs for tests: a random 2-layer Llama with the bundled tokenizer as
student (and, by default, its own teacher with a system prompt), two bundled math problems, CPU.

    path = tiny_spec(tmp_path, "name", train={"steps": 2, "support": "full"}, scoring={"full_vocab": True})
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomli_w

BASE: dict[str, dict[str, Any]] = {
    "model": {"student": "tiny-random:0", "device": "cpu"},
    "task": {"name": "math", "num_problems": 2},
    "rollout": {"samples_per_problem": 2, "max_new_tokens": 7},
    "teacher": {"context": "system_prompt", "system_prompt": "Think step by step."},
    "train": {"steps": 2, "lr": 1e-2},
}


def tiny_spec(tmp_path: Path, name: str, **sections: dict[str, Any]) -> Path:
    """Write `<tmp_path>/<name>.toml`: BASE with each given section's keys merged over it."""
    data: dict[str, Any] = {"experiment": {"name": name, "output_dir": str(tmp_path / "runs")}}
    for section in {*BASE, *sections}:
        data[section] = {**BASE.get(section, {}), **sections.get(section, {})}
    path = tmp_path / f"{name}.toml"
    path.write_text(tomli_w.dumps(data))
    return path
