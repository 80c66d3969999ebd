"""Rules a spec must meet for the `probe` and `loop` commands, beyond those of every spec.

Any spec loads with its `[probe]` and `[loop]` at their defaults, so these rules are not part of
`rules.cross_errors`: they say whether a loaded spec can drive a probe run (seed 001) or a
prompt-optimization loop (seed 004). The CLI checks them right after loading, before a model is
loaded or a job submitted (a bad spec exits 2); `run_probe` and `run_loop` check them again for
callers from Python. Each check reports every problem at once.
"""

from __future__ import annotations

import importlib.util
import re
from typing import TYPE_CHECKING

from hpcdistill.errors import SpecError
from hpcdistill.spec.schema import Spec

if TYPE_CHECKING:
    from hpcdistill.spec.load import LoadedSpec

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def probe_errors(spec: Spec) -> list[tuple[str, str]]:
    """(dotted key, message) for what `[probe]` needs that the schema's ranges do not catch."""
    probe, errors = spec.probe, []
    if not probe.trained_model:
        errors.append(("probe.trained_model", "missing; the probe compares model.student (base) with this "
                       "trained model (a hub id, a model directory, or bundled:<name>)"))
    if not probe.temperatures:
        errors.append(("probe.temperatures", "empty; give at least one temperature, e.g. [0.7, 1.5]"))
    bad = [t for t in probe.temperatures if not t > 0]
    if bad:
        errors.append(("probe.temperatures", f"{bad} not allowed; each temperature must be > 0"))
    if probe.fork_top_n > probe.top_k:
        errors.append(("probe.fork_top_n", f"{probe.fork_top_n} > probe.top_k = {probe.top_k}; "
                       "fork candidates are looked for within the top-k"))
    if probe.regular_every == 0 and not probe.heuristic_tokens and probe.random_positions == 0:
        errors.append(("probe.regular_every", "with no heuristic_tokens and random_positions = 0, "
                       "no position would be probed"))
    return errors


def loop_errors(spec: Spec) -> list[tuple[str, str]]:
    """(dotted key, message) for every reason `spec` cannot drive the loop (a context-distillation
    spec with a [loop] and no [sweep])."""
    lp, errors = spec.loop, []
    if spec.train.objective != "context_distill":
        errors.append(("train.objective", f"the loop distills with 'context_distill', got "
                       f"{spec.train.objective!r}"))
    if spec.train.steps < 1:
        errors.append(("train.steps", "the loop trains; need at least 1 step"))
    if spec.sweep.grid or spec.sweep.zip:
        errors.append(("sweep", "a loop spec has no [sweep]; the loop writes one per round "
                       "(a grid over teacher.system_prompt)"))
    if not (lp.seed_prompt or spec.teacher.system_prompt).strip():
        errors.append(("loop.seed_prompt", "empty, and so is teacher.system_prompt; GEPA needs a "
                       "starting teacher prompt"))
    if lp.reflection_model != "local" and not lp.reflection_base_url:
        errors.append(("loop.reflection_base_url", f"reflection_model = {lp.reflection_model!r} is served "
                       "by an OpenAI-compatible endpoint; give its base URL (or use \"local\")"))
    if lp.reflection_api_key_env is not None and not ENV_NAME.fullmatch(lp.reflection_api_key_env):
        errors.append(("loop.reflection_api_key_env", "must be the NAME of an environment variable "
                       "(letters, digits, underscores), never the key itself"))
    return errors


def check_probe_spec(spec: Spec) -> None:
    """Raise SpecError listing every `probe_errors` of `spec`."""
    errors = [f"key '{dotted}': {message}" for dotted, message in probe_errors(spec)]
    if errors:
        raise SpecError(errors[0] if len(errors) == 1 else
                        f"{len(errors)} problems in [probe]:\n" + "\n".join(f"  - {e}" for e in errors))


def check_loop_spec(loaded: "LoadedSpec") -> None:
    """Raise SpecError listing every `loop_errors` of the loaded spec, each with its file."""
    errors = loop_errors(loaded.spec)
    if errors:
        raise SpecError("\n".join(f"{loaded.path}: key '{dotted}': {message}" for dotted, message in errors))


# log.backends -> the module a run imports for it (the `track` extra)
TRACKING_MODULES = {"wandb": "wandb", "tensorboard": "tensorboard"}


def check_tracking_installed(loaded: "LoadedSpec") -> None:
    """Raise SpecError when a backend of log.backends is not importable here: checked before a
    sweep is submitted (`launch.submit`), so a run never starts without its logger."""
    missing = [name for name in dict.fromkeys(loaded.spec.log.backends)
               if name in TRACKING_MODULES and importlib.util.find_spec(TRACKING_MODULES[name]) is None]
    if missing:
        where = loaded.origins.get("log.backends", str(loaded.path))
        raise SpecError(f"{where}: key 'log.backends': names {', '.join(map(repr, missing))}, but "
                        f"{' and '.join(TRACKING_MODULES[m] for m in missing)} is not installed in this Python: "
                        "pip install 'hpcdistill[track]', or remove it from log.backends")


__all__ = ["probe_errors", "loop_errors", "check_probe_spec", "check_loop_spec", "check_tracking_installed",
           "TRACKING_MODULES"]
