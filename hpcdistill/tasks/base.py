"""What every task shares: Problem, Verdict, the Task protocol, problem files and hub access.

A task turns a source (bundled package data, a local .jsonl file, or a hub dataset) into Problems,
and scores a completion text into a Verdict (DESIGN.md section 2, stage 2: reward + feedback text).
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from hpcdistill.errors import TaskError

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


@dataclass(frozen=True)
class Problem:
    problem_id: str
    prompt: str  # the user message the student sees
    data: dict  # what the verifier needs: tests, answers, puzzle


@dataclass(frozen=True)
class Verdict:
    reward: float  # in [0, 1]
    passed: bool
    feedback: str  # the text a feedback teacher sees (execution output, expected answer)
    details: dict  # per-test results, extracted answers, isolation, ...


class Task(Protocol):
    name: str
    default_sources: tuple[str, ...]

    def load_problems(self, source: str = "bundled", split: str = "test", num_problems: int = 10,
                      seed: int = 0) -> list[Problem]: ...

    def verify(self, problem: Problem, completion: str, *, timeout_s: float = 6.0,
               memory_mb: int = 512) -> Verdict: ...


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line number, record) for each non-empty line; TaskError names the file and line."""
    if not path.is_file():
        raise TaskError(f"{path}: problem file not found")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise TaskError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            missing = [k for k in required if k not in record]
            if missing:
                raise TaskError(f"{path}:{lineno}: missing key(s) {', '.join(missing)}; "
                                f"a problem needs {', '.join(required)}")
            records.append((lineno, record))
    if not records:
        raise TaskError(f"{path}: no problems in the file")
    return records


def filter_split(records: list[tuple[int, dict]], split: str, where: str) -> list[tuple[int, dict]]:
    """Records of `split`; a record without a "split" key belongs to every split."""
    chosen = [(n, r) for n, r in records if r.get("split", split) == split]
    if not chosen:
        splits = sorted({str(r.get("split")) for _, r in records})
        raise TaskError(f"{where}: no problems in split {split!r}; available splits: {', '.join(splits)}")
    return chosen


def choose(items: list, num_problems: int | None, seed: int, where: str) -> list:
    """`num_problems` items chosen by `seed`, kept in source order; all of them when there are fewer
    (or when `num_problems` is None: a whole benchmark)."""
    if num_problems is None:
        return list(items)
    if num_problems < 1:
        raise TaskError(f"{where}: num_problems must be >= 1, got {num_problems}")
    if num_problems >= len(items):
        if num_problems > len(items):
            logger.warning("%s has %d problems, fewer than the %d asked for; using all", where, len(items),
                           num_problems)
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), num_problems))
    return [items[i] for i in keep]


def resolve_source(source: str, task: str, allowed: tuple[str, ...]) -> str | Path:
    """A named source from `allowed`, or the path of a local .jsonl file."""
    if source in allowed:
        return source
    if source.endswith(".jsonl") or os.sep in source:
        return Path(source).expanduser()
    raise TaskError(f"task {task!r}: unknown source {source!r}; allowed: {', '.join(allowed)} "
                    f"or the path of a local .jsonl file")


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connect within `timeout_s` (or a proxy is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("HF_DATASETS_OFFLINE", "0") \
            not in ("0", ""):
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # cannot probe through a proxy cheaply; the short HTTP timeouts still apply
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def load_hub_dataset(dataset_id: str, load: Callable[[], Any]) -> Any:
    """Call `load` (a datasets.load_dataset call); unreachable hub and no cached copy -> TaskError.

    When the hub does not answer a quick probe, the load runs in offline mode (the local cache only),
    so a compute node without network fails in seconds instead of retrying for minutes.
    """
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    online = hub_reachable()
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    try:
        if not online:
            os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
            _set_offline_flags(True)
        return load()
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        where = "the hub is unreachable and there is no copy in the local Hugging Face cache" if not online \
            else "loading from the hub failed"
        raise TaskError(f"dataset {dataset_id!r} is not available offline ({where}: {type(e).__name__}: "
                        f"{str(e)[:200]}); use source=\"bundled\" or the path of a local .jsonl file") from None
    finally:
        if not online:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            _set_offline_flags(None)


_saved_flags: dict[str, Any] = {}


def _set_offline_flags(offline: bool | None) -> None:
    """huggingface_hub and datasets read the offline variables at import: set their constants too."""
    try:
        import datasets.config as dc
        import huggingface_hub.constants as hc
    except ImportError:
        return
    for module, name in [(hc, "HF_HUB_OFFLINE"), (dc, "HF_HUB_OFFLINE"), (dc, "HF_DATASETS_OFFLINE")]:
        if not hasattr(module, name):
            continue
        key = f"{module.__name__}.{name}"
        if offline is None:
            if key in _saved_flags:
                setattr(module, name, _saved_flags.pop(key))
        else:
            _saved_flags.setdefault(key, getattr(module, name))
            setattr(module, name, offline)
