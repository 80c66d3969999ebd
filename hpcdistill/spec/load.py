"""TOML file -> validated, frozen `Spec`.

Steps, each reporting every problem it finds at once (as torchtune's config validation does):
read the file and its `extends` chain (deep merge, the extending file wins), apply `--set`
overrides, then build the dataclasses of `hpcdistill.spec.schema`, checking keys, types, choices
and ranges. Errors name the file (or `--set`), the dotted key, its line where it can be found, and
what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import tomli_w

from hpcdistill.errors import SpecError
from hpcdistill.spec import rules
from hpcdistill.spec.schema import Spec

SET_ORIGIN = "--set"


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec and where it came from."""

    spec: Spec
    raw: dict[str, Any]  # merged TOML data after extends and --set (sweep included)
    path: Path
    origins: dict[str, str]  # dotted key -> file (or "--set") that set it

    @property
    def text(self) -> str:
        return dump_toml(self.raw)

    @property
    def spec_hash(self) -> str:
        return content_hash(self.raw)


# ---------------------------------------------------------------------------- reading + merging


def read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: spec file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read spec file: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message ends with "(at line L, column C)"; keep it, prefix the file.
        raise SpecError(f"{path}: TOML syntax error: {exc}") from None


def _merge(base: dict, top: dict, origins: dict[str, str], origin: str, prefix: str = "") -> dict:
    out = dict(base)
    for key, value in top.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("grid", "zip"):
            out[key] = _merge(out[key], value, origins, origin, dotted + ".")
        else:
            out[key] = value
            for k in [k for k in origins if k == dotted or k.startswith(dotted + ".")]:
                del origins[k]
            _record_origins(value, dotted, origins, origin)
    return out


def _record_origins(value: Any, dotted: str, origins: dict[str, str], origin: str) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _record_origins(v, f"{dotted}.{k}", origins, origin)
    else:
        origins[dotted] = origin


def read_with_extends(path: Path, _stack: tuple[Path, ...] = ()) -> tuple[dict, dict[str, str]]:
    """Read `path` and the chain of files it `extends`, merged; returns (data, origins)."""
    path = path.resolve()
    if path in _stack:
        chain = " -> ".join(str(p) for p in (*_stack, path))
        raise SpecError(f"{_stack[-1]}: key 'extends': cycle in the extends chain: {chain}")
    data = read_toml(path)
    parents = data.pop("extends", [])
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise SpecError(f"{path}: key 'extends': expected a path or a list of paths (strings)")
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for parent in parents:
        parent_path = (path.parent / parent)
        if not parent_path.exists():
            raise SpecError(f"{path}: key 'extends': file not found: {parent} "
                            f"(resolved against the spec's folder: {parent_path})")
        pdata, porigins = read_with_extends(parent_path, (*_stack, path))
        merged = _merge(merged, pdata, origins, "")
        origins.update(porigins)
    merged = _merge(merged, data, origins, str(path))
    return merged, origins


# ---------------------------------------------------------------------------- overrides


def parse_override(item: str) -> tuple[str, Any]:
    """`train.steps=2` -> ("train.steps", 2). The value is read as a TOML value, else a string."""
    if "=" not in item:
        raise SpecError(f"{SET_ORIGIN} {item!r}: expected KEY=VALUE, e.g. train.steps=2")
    key, text = item.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+", key):
        raise SpecError(f"{SET_ORIGIN} {item!r}: key must be a dotted path like train.lr")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key, value


def set_dotted(data: dict, key: str, value: Any) -> dict:
    """A copy of `data` with `key` (dotted) set to `value`; creates tables on the way."""
    head, _, rest = key.partition(".")
    out = dict(data)
    if not rest:
        out[head] = value
        return out
    sub = out.get(head, {})
    if not isinstance(sub, dict):
        sub = {}
    out[head] = set_dotted(sub, rest, value)
    return out


def get_dotted(data: dict, key: str, default: Any = None) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return default
        data = data[part]
    return data


# ---------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "a table"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


class _Validator:
    def __init__(self, origins: dict[str, str], default_origin: str):
        self.origins = origins
        self.default_origin = default_origin
        self.errors: list[str] = []

    def where(self, dotted: str) -> str:
        origin = self.origins.get(dotted) or self.default_origin
        if origin == SET_ORIGIN:
            return SET_ORIGIN
        line = _find_line(origin, dotted)
        return f"{origin}:{line}" if line else origin

    def error(self, dotted: str, message: str) -> None:
        self.errors.append(f"{self.where(dotted)}: key '{dotted}': {message}")

    def build(self, cls: type, data: Any, prefix: str) -> Any:
        if not isinstance(data, dict):
            self.error(prefix.rstrip("."), f"expected a table, got {data!r}")
            return None
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in data:
            if key not in fields:
                self.error(prefix + key, "unknown key; " + _suggest(key, list(fields), prefix))
        kwargs = {}
        complete = True
        for name, f in fields.items():
            dotted = prefix + name
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if name in data:
                value = self.convert(hints[name], data[name], dotted, f.metadata)
                if value is not _INVALID:
                    kwargs[name] = value
                elif required:
                    complete = False
            elif required:
                self.error(dotted, f"missing; expected {_type_name(hints[name])}")
                complete = False
        return cls(**kwargs) if complete else None

    def convert(self, tp: Any, value: Any, dotted: str, meta: Any = None) -> Any:
        origin = get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            options = [a for a in get_args(tp) if a is not type(None)]
            if len(options) == 1:
                return self.convert(options[0], value, dotted, meta)
            for option in options:
                sub = _Validator(self.origins, self.default_origin)
                out = sub.convert(option, value, dotted, meta)
                if out is not _INVALID and not sub.errors:
                    return out
            self.error(dotted, f"expected {_type_name(tp)}, got {value!r}")
            return _INVALID
        if origin is Literal:
            allowed = get_args(tp)
            if value not in allowed:
                close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.error(dotted, f"got {value!r}; allowed: {', '.join(map(repr, allowed))}{hint}")
                return _INVALID
            return value
        if dataclasses.is_dataclass(tp):
            out = self.build(tp, value, dotted + ".")
            return _INVALID if out is None else out
        if origin is list:
            if not isinstance(value, list):
                self.error(dotted, f"expected {_type_name(tp)}, got {value!r}")
                return _INVALID
            (item_tp,) = get_args(tp)
            items = [self.convert(item_tp, v, f"{dotted}[{i}]") for i, v in enumerate(value)]
            return _INVALID if any(i is _INVALID for i in items) else items
        if origin is dict:
            if not isinstance(value, dict):
                self.error(dotted, f"expected a table, got {value!r}")
                return _INVALID
            value_tp = get_args(tp)[1] if get_args(tp) else Any
            items = {k: self.convert(value_tp, v, f"{dotted}.{k}") for k, v in value.items()}
            return _INVALID if any(v is _INVALID for v in items.values()) else items
        if tp is Any:
            return value
        ok = (
            (tp is bool and isinstance(value, bool))
            or (tp is int and isinstance(value, int) and not isinstance(value, bool))
            or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
            or (tp is str and isinstance(value, str))
        )
        if not ok:
            self.error(dotted, f"expected {_type_name(tp)}, got {value!r}")
            return _INVALID
        if tp is float:
            value = float(value)
        return self.check_range(value, dotted, meta or {})

    def check_range(self, value: Any, dotted: str, meta: Any) -> Any:
        bounds = []
        ok = True
        if "ge" in meta:
            bounds.append(f">= {meta['ge']}")
            ok &= value >= meta["ge"]
        if "gt" in meta:
            bounds.append(f"> {meta['gt']}")
            ok &= value > meta["gt"]
        if "le" in meta:
            bounds.append(f"<= {meta['le']}")
            ok &= value <= meta["le"]
        if "lt" in meta:
            bounds.append(f"< {meta['lt']}")
            ok &= value < meta["lt"]
        if "pattern" in meta and not re.fullmatch(meta["pattern"], value):
            self.error(dotted, f"got {value!r}; must match {meta['pattern']}")
            return _INVALID
        if not ok:
            self.error(dotted, f"got {value!r}; allowed: {' and '.join(bounds)}")
            return _INVALID
        return value


_INVALID = object()


def schema_keys(cls: type = Spec, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema (tables like `sweep.grid` count as leaves)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = [a for a in get_args(tp) if dataclasses.is_dataclass(a)] or (
            [tp] if dataclasses.is_dataclass(tp) else [])
        if inner:
            keys.extend(schema_keys(inner[0], f"{prefix}{f.name}."))
        else:
            keys.append(prefix + f.name)
    return keys


def _suggest(key: str, valid: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return f"did you mean '{prefix}{close[0]}'?"
    elsewhere = [k for k in schema_keys() if k.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f"did you mean '{elsewhere[0]}'?"
    return "valid keys here: " + ", ".join(valid)


def _find_line(origin: str, dotted: str) -> int | None:
    """Best effort: the line of `dotted` in the TOML file `origin`."""
    try:
        lines = Path(origin).read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    parts = dotted.split("[")[0].split(".")
    leaf = parts[-1]
    table = ".".join(parts[:-1])
    current = ""
    candidates = []
    for number, line in enumerate(lines, 1):
        header = re.match(r"^\s*\[([^\[\]]+)\]\s*(#.*)?$", line)
        if header:
            current = header.group(1).strip()
            continue
        if re.match(rf"^\s*[\"']?{re.escape(leaf)}[\"']?\s*=", line):
            candidates.append((current == table, number))
        elif f'"{dotted}"' in line or f"'{dotted}'" in line:
            candidates.append((True, number))
    if not candidates:
        return None
    return sorted(candidates, key=lambda c: (not c[0], c[1]))[0][1]


def validate(data: dict[str, Any], origins: dict[str, str], default_origin: str) -> Spec:
    """Build the `Spec` from merged TOML data, or raise SpecError listing every problem."""
    validator = _Validator(origins, default_origin)
    origins = dict(origins)
    data, preset_errors = rules.resolve_presets(data, origins)
    validator.origins = origins
    for dotted, message in preset_errors:
        validator.error(dotted, message)
    spec = validator.build(Spec, data, "")
    if spec is not None:
        for dotted, message in rules.cross_errors(spec):
            validator.error(dotted, message)
        exp = spec.experiment
        if exp.seeds is not None and exp.num_seeds is not None:
            validator.error("experiment.num_seeds", "give either experiment.seeds or "
                            "experiment.num_seeds, not both")
        if exp.seeds is not None and len(set(exp.seeds)) != len(exp.seeds):
            validator.error("experiment.seeds", f"seeds must be distinct, got {exp.seeds}")
        if exp.seeds == []:
            validator.error("experiment.seeds", "empty list: the sweep would expand to zero runs")
    if validator.errors:
        raise SpecError(_format_errors(validator.errors))
    return spec


def _format_errors(errors: list[str]) -> str:
    if len(errors) == 1:
        return errors[0]
    return f"{len(errors)} problems in the spec:\n" + "\n".join(f"  - {e}" for e in errors)


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> LoadedSpec:
    """Read, merge, override and validate a spec file."""
    path = Path(path)
    data, origins = read_with_extends(path)
    for item in overrides:
        key, value = parse_override(item)
        data = set_dotted(data, key, value)
        origins[key] = SET_ORIGIN
    spec = validate(data, origins, str(path.resolve()))
    return LoadedSpec(spec=spec, raw=data, path=path.resolve(), origins=origins)


# ---------------------------------------------------------------------------- serialisation


def spec_to_dict(spec: Any) -> dict[str, Any]:
    """The spec as plain TOML-able data (None values dropped: TOML has no null)."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return clean(dataclasses.asdict(spec))


def dump_toml(data: dict[str, Any]) -> str:
    return tomli_w.dumps(data)


def content_hash(data: Any) -> str:
    """A stable hash of TOML-able data: the same content gives the same hash on any machine."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
