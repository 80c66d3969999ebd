"""Sweep expansion: runs = grid (cartesian) x zip (aligned lists) x seeds.

Each run is the base spec with its overrides applied, validated again as a whole, and named by a
stable id hashed from what it computes (the science sections, the experiment name and the seed):
the same spec gives the same ids on any machine, and two different runs never share one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from hpcdistill.errors import SpecError
from hpcdistill.spec.load import (
    SET_ORIGIN,
    LoadedSpec,
    _suggest,
    content_hash,
    dump_toml,
    get_dotted,
    schema_keys,
    set_dotted,
    spec_to_dict,
    validate,
)
from hpcdistill.spec.schema import SCIENCE_SECTIONS, ExperimentSpec, Spec

# Keys a sweep may vary: what a run computes. Launch settings are per array, not per run.
SWEEPABLE_SECTIONS = SCIENCE_SECTIONS


@dataclass(frozen=True)
class Run:
    """One resolved run of a sweep: one spec, one seed."""

    run_id: str
    seed: int
    overrides: dict[str, Any]  # dotted key -> value, from the sweep
    spec: Spec

    def spec_dict(self) -> dict[str, Any]:
        """The run's resolved spec as TOML data: its own seed, no sweep."""
        data = spec_to_dict(self.spec)
        data["experiment"] = {**data["experiment"], "seeds": [self.seed]}
        data["experiment"].pop("num_seeds", None)
        data.pop("sweep", None)
        return data

    def spec_text(self) -> str:
        return dump_toml(self.spec_dict())


# The run id hashes the science values that differ from the schema's defaults, so a new key
# whose default keeps the old behaviour leaves every existing id (and completed run) as it was.
# Changing what an existing default means changes what old ids computed: bump this with it.
# 3: issue 15 changed defaults' meaning (mask.rescale per kind, random_release by position, ExOPD
# with its reference, replay_buffer's bounded injection, the seed-004 lag and frozen teacher).
RUN_ID_VERSION = 3


def _not_default(values: Any, defaults: Any) -> Any:
    if isinstance(values, dict) and isinstance(defaults, dict):
        out = {}
        for key, value in values.items():
            kept = _not_default(value, defaults.get(key, _MISSING))
            if kept is not _MISSING:
                out[key] = kept
        return out if out else _MISSING
    return _MISSING if values == defaults else values


_MISSING = object()


def run_id_for(spec: Spec, seed: int) -> str:
    data = spec_to_dict(spec)
    defaults = spec_to_dict(Spec(experiment=ExperimentSpec(name=spec.experiment.name)))
    science = {name: _not_default(data[name], defaults[name]) for name in SCIENCE_SECTIONS}
    science = {name: value for name, value in science.items() if value is not _MISSING}
    digest = content_hash({"version": RUN_ID_VERSION, "experiment": spec.experiment.name, "seed": seed,
                           **science})
    return f"s{seed}-{digest[:12]}"


def _tables() -> set[str]:
    """Dotted names of the schema's tables (sections and nested tables like train.lora)."""
    return {k.rsplit(".", i)[0] for k in schema_keys() for i in range(1, k.count(".") + 1)}


def _check_sweep_keys(loaded: LoadedSpec) -> list[tuple[str, list[Any]]] | None:
    # A key is a leaf (`train.lr`) or a table (`model`) whose values are tables merged into it,
    # so that several keys vary together: grid = { model = [{student = "a", teacher = "b"}, ...] }.
    valid = set(schema_keys()) | _tables()
    errors = []
    for kind in ("grid", "zip"):
        for key, values in getattr(loaded.spec.sweep, kind).items():
            where = loaded.origins.get(f"sweep.{kind}.{key}", str(loaded.path))
            section = key.split(".", 1)[0]
            if key not in valid:
                leaf = key.rsplit(".", 1)[-1]
                prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
                options = [k.rsplit(".", 1)[-1] for k in valid if k.startswith(prefix)] or [
                    k for k in valid]
                errors.append(f"{where}: key 'sweep.{kind}.\"{key}\"': no such key in the spec "
                              f"schema; {_suggest(leaf, sorted(set(options)), prefix)}")
            elif section not in SWEEPABLE_SECTIONS:
                errors.append(f"{where}: key 'sweep.{kind}.\"{key}\"': only keys of "
                              f"{', '.join(SWEEPABLE_SECTIONS)} can be swept")
            elif not isinstance(values, list):
                errors.append(f"{where}: key 'sweep.{kind}.\"{key}\"': expected a list of values, "
                              f"got {values!r}")
    zips = loaded.spec.sweep.zip
    lengths = {k: len(v) for k, v in zips.items() if isinstance(v, list)}
    if len(set(lengths.values())) > 1:
        errors.append(f"{loaded.path}: key 'sweep.zip': lists must have the same length, got "
                      + ", ".join(f"{k}: {n}" for k, n in lengths.items()))
    if errors:
        raise SpecError("\n".join(errors) if len(errors) == 1 else
                        f"{len(errors)} problems in the sweep:\n" + "\n".join(f"  - {e}" for e in errors))
    return None


def expand(loaded: LoadedSpec, *, force: bool = False) -> list[Run]:
    """All runs of a spec, in a stable order (grid, then zip, then seed)."""
    _check_sweep_keys(loaded)
    sweep = loaded.spec.sweep
    grid_keys = list(sweep.grid)
    grid_combos = list(itertools.product(*(sweep.grid[k] for k in grid_keys)))
    zip_keys = list(sweep.zip)
    zip_rows = list(zip(*(sweep.zip[k] for k in zip_keys))) if zip_keys else [()]
    seeds = loaded.spec.seeds

    base = {k: v for k, v in loaded.raw.items() if k != "sweep"}
    runs: list[Run] = []
    errors: list[str] = []
    for grid_values in grid_combos:
        for zip_values in zip_rows:
            overrides = dict(zip(grid_keys, grid_values)) | dict(zip(zip_keys, zip_values))
            data = base
            origins = dict(loaded.origins)
            for key, value in overrides.items():
                for leaf, leaf_value in leaves(key, value):
                    data = set_dotted(data, leaf, leaf_value)
                    origins[leaf] = f"{loaded.path} (sweep value {key} = {value!r})"
            try:
                spec = validate(data, origins, str(loaded.path))
            except SpecError as exc:
                errors.append(str(exc))
                continue
            for seed in seeds:
                runs.append(Run(run_id_for(spec, seed), seed, overrides, spec))
    if errors:
        unique = list(dict.fromkeys(errors))
        raise SpecError(unique[0] if len(unique) == 1 else
                        f"{len(unique)} sweep values are invalid:\n" + "\n".join(f"  - {e}" for e in unique))
    if not runs:
        raise SpecError(f"{loaded.path}: key 'sweep': the spec expands to zero runs "
                        "(an empty grid or zip list, or no seeds)")
    seen: dict[str, Run] = {}
    for run in runs:
        if run.run_id in seen:
            raise SpecError(
                f"{loaded.path}: key 'sweep': two sweep points give the same run "
                f"({seen[run.run_id].overrides} and {run.overrides}, seed {run.seed}); "
                "a value repeats or equals what another key already sets")
        seen[run.run_id] = run
    limit = loaded.spec.launch.max_runs
    if len(runs) > limit and not force:
        raise SpecError(f"{loaded.path}: key 'launch.max_runs': the spec expands to {len(runs)} runs, "
                        f"more than launch.max_runs = {limit}; raise it or pass --force")
    return runs


def leaves(key: str, value: Any) -> list[tuple[str, Any]]:
    """A table-valued sweep entry as the dotted leaves it sets."""
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in leaves(f"{key}.{k}", v)]
    return [(key, value)]


def describe_override(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


__all__ = ["Run", "expand", "run_id_for", "get_dotted", "SET_ORIGIN"]
