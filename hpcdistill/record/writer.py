"""ShardWriter: append rollouts to one HDF5 shard, atomically (DESIGN.md section 4).

Protocol: everything goes to `<path>.tmp-<pid>` next to the target; on a clean exit the writer sets
`complete = True`, closes, fsyncs the file, renames it onto `path` (os.replace, atomic on POSIX)
and fsyncs the directory. On an exception the temp file is removed and the exception re-raised.
A task killed mid-write (SIGKILL, preemption) leaves only the temp file, which readers ignore;
nothing half-written ever appears at `path`.

Rollouts are buffered in memory and flushed to resizable chunked datasets every `flush_tokens`
tokens, so a step of many short rollouts costs a few large HDF5 writes, not one per rollout.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import hpcdistill
from hpcdistill.record import schema
from hpcdistill.record.schema import KINDS, ROLLOUT_COLUMNS, TOKEN_COLUMNS, Column

log = logging.getLogger(__name__)

# Chosen by bench/shards.py (see docs/shard-format.md, "Compression"): name -> h5py dataset kwargs.
COMPRESSIONS: dict[str, dict[str, Any]] = {
    "none": {},
    "lzf": {"compression": "lzf", "shuffle": True},
    "gzip1": {"compression": "gzip", "compression_opts": 1, "shuffle": True},
    "gzip4": {"compression": "gzip", "compression_opts": 4, "shuffle": True},
}
DEFAULT_COMPRESSION = "gzip1"

_STR = h5py.string_dtype("utf-8")
_KIND = h5py.enum_dtype(KINDS, basetype="i1")


def temp_path(path: Path) -> Path:
    """Where a writer in this process builds `path` (the name readers know to ignore)."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _attr_value(key: str, value: Any) -> Any:
    if isinstance(value, (str, bool, int, float, np.integer, np.floating, np.bool_)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return np.array(value, dtype=_STR)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        return np.asarray(value)
    raise TypeError(f"shard attr {key!r}: {type(value).__name__} cannot be stored "
                    "(allowed: str, int, float, bool, None, or a list of str or of numbers)")


class ShardWriter:
    """Writes one shard. Use as a context manager:

        with ShardWriter(path, attrs=run_attrs, top_k=20) as writer:
            writer.append(row, tokens)        # row: rollout columns, tokens: name -> [T] or [T, k]
            writer.add_metrics(step, {"reward_mean": 0.4})

    `token_columns` / `rollout_columns` register extra columns by name -> meaning (extra token
    columns are float32 [T]; an extra rollout column takes the type of its first value: int, float
    or str). Any other unknown name is a bug and raises ValueError.
    """

    def __init__(self, path: str | Path, *, attrs: Mapping[str, Any], top_k: int,
                 token_columns: Mapping[str, str] | None = None,
                 rollout_columns: Mapping[str, str] | None = None,
                 compression: str = DEFAULT_COMPRESSION, fletcher32: bool = True,
                 flush_tokens: int = 1 << 16):
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression {compression!r} is not one of {list(COMPRESSIONS)}")
        clash = sorted(set(attrs) & set(schema.WRITER_ATTRS))
        if clash:
            raise ValueError(f"attrs {clash} are set by the writer itself")
        for extra, known in ((token_columns, TOKEN_COLUMNS), (rollout_columns, ROLLOUT_COLUMNS)):
            if extra and set(extra) & set(known):
                raise ValueError(f"extra columns {sorted(set(extra) & set(known))} are schema columns")
        self.path = Path(path)
        self.top_k = int(top_k)
        self.temp_path = temp_path(self.path)
        self._filters = dict(COMPRESSIONS[compression], fletcher32=fletcher32)
        self._flush_tokens = flush_tokens
        self._extra_tokens = dict(token_columns or {})
        self._extra_rollouts = dict(rollout_columns or {})
        self._extra_rollout_dtype: dict[str, str] = {}
        self._pending: list[tuple[dict, dict]] = []
        self._pending_tokens = 0
        self._num_tokens = 0
        self._num_rollouts = 0
        self._metrics: list[tuple[int, str, float]] = []

        run_attrs = {k: _attr_value(k, v) for k, v in attrs.items() if v is not None}  # absent = None

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = h5py.File(self.temp_path, "w", libver=("v110", "latest"))
        try:
            self._start(run_attrs)
        except BaseException:
            self.abort()
            raise

    def _start(self, run_attrs: dict[str, Any]) -> None:
        f = self._file
        f.attrs["schema_version"] = schema.SCHEMA_VERSION
        f.attrs["complete"] = False
        f.attrs["top_k"] = self.top_k
        f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        f.attrs["package_version"] = hpcdistill.__version__
        f.attrs["token_columns_extra"] = np.array(sorted(self._extra_tokens), dtype=_STR)
        f.attrs["rollout_columns_extra"] = np.array(sorted(self._extra_rollouts), dtype=_STR)
        for key, value in run_attrs.items():
            f.attrs[key] = value
        for group, doc in (("tokens", "per-token data of all rollouts, back to back"),
                           ("rollouts", "one row per rollout; tokens at [offset, offset + length)"),
                           ("metrics", "long table of per-step scalar metrics (step, name, value)")):
            f.create_group(group).attrs["description"] = doc
        for column in ROLLOUT_COLUMNS.values():
            if column.required:
                self._create(f["rollouts"], column, 0)
        for column in TOKEN_COLUMNS.values():
            if column.required:
                self._create(f["tokens"], column, 0)
        for column in schema.METRIC_COLUMNS.values():
            self._create(f["metrics"], column, 0)

    # ------------------------------------------------------------------ public

    def append(self, row: Mapping[str, Any], tokens: Mapping[str, np.ndarray | None]) -> None:
        """Add one rollout. `tokens` maps column -> [T] or [T, k] (None = not recorded)."""
        tokens = {name: a for name, a in tokens.items() if a is not None}
        self._pending.append((self._check_row(row), self._check_tokens(tokens)))
        self._pending_tokens += len(tokens["ids"])
        if self._pending_tokens >= self._flush_tokens:
            self._flush()

    def add_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record scalar metrics of one step; read back as name -> (steps, values)."""
        for name, value in metrics.items():
            self._metrics.append((int(step), str(name), float(value)))

    @property
    def num_rollouts(self) -> int:
        return self._num_rollouts + len(self._pending)

    def close(self) -> None:
        """Finish: mark complete, fsync, rename onto `path`, fsync the directory."""
        self._flush()
        self._write_metrics()
        self._file.attrs["complete"] = True
        self._file.flush()
        self._file.close()
        _fsync(self.temp_path)
        os.replace(self.temp_path, self.path)
        _fsync(self.path.parent, directory=True)
        log.info("wrote shard %s (%d rollouts, %d tokens)", self.path, self._num_rollouts, self._num_tokens)

    def abort(self) -> None:
        """Drop everything: close and remove the temp file; `path` is left untouched."""
        try:
            self._file.close()
        finally:
            self.temp_path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.close()
            except BaseException:
                self.temp_path.unlink(missing_ok=True)
                raise
        else:
            self.abort()

    # ------------------------------------------------------------------ checks (bugs raise)

    def _check_row(self, row: Mapping[str, Any]) -> dict:
        required = [n for n, c in ROLLOUT_COLUMNS.items() if c.required and n not in schema.WRITER_ROLLOUT_COLUMNS]
        missing = [n for n in required if n not in row]
        if missing:
            raise ValueError(f"rollout row lacks required columns {missing}")
        if set(row) & set(schema.WRITER_ROLLOUT_COLUMNS):
            raise ValueError(f"rollout row must not set {list(schema.WRITER_ROLLOUT_COLUMNS)}: the writer does")
        unknown = sorted(set(row) - set(ROLLOUT_COLUMNS) - set(self._extra_rollouts))
        if unknown:
            raise ValueError(f"rollout row has unknown columns {unknown}; schema columns: "
                             f"{[n for n in ROLLOUT_COLUMNS if n not in schema.WRITER_ROLLOUT_COLUMNS]}, "
                             f"registered extras: {sorted(self._extra_rollouts)}")
        if row["kind"] not in KINDS:
            raise ValueError(f"rollout kind {row['kind']!r} is not one of {list(KINDS)}")
        out = {}
        for name, value in row.items():
            if value is None:
                continue
            if name in ROLLOUT_COLUMNS and ROLLOUT_COLUMNS[name].dtype == "str" and not isinstance(value, str):
                raise ValueError(f"rollout column {name!r} must be str, got {type(value).__name__}")
            if name in self._extra_rollouts:
                dtype = "str" if isinstance(value, str) else "float64" if isinstance(value, (float, np.floating)) \
                    else "int64" if isinstance(value, (int, np.integer)) else None
                if dtype is None:
                    raise ValueError(f"extra rollout column {name!r}: {type(value).__name__} is not int, float or str")
                known = self._extra_rollout_dtype.setdefault(name, dtype)
                if known != dtype and (known, dtype) != ("float64", "int64"):  # an int fits a float column
                    raise ValueError(f"extra rollout column {name!r} changed type from {known} to {dtype}")
            out[name] = value
        return out

    def _check_tokens(self, tokens: Mapping[str, np.ndarray]) -> dict:
        missing = [n for n, c in TOKEN_COLUMNS.items() if c.required and n not in tokens]
        if missing:
            raise ValueError(f"tokens lack required columns {missing}")
        unknown = sorted(set(tokens) - set(TOKEN_COLUMNS) - set(self._extra_tokens))
        if unknown:
            raise ValueError(f"unknown token columns {unknown}; schema columns: {list(TOKEN_COLUMNS)}, "
                             f"registered extras: {sorted(self._extra_tokens)}")
        length = len(tokens["ids"])
        out = {}
        for name, array in tokens.items():
            column = TOKEN_COLUMNS.get(name)
            array = np.asarray(array)
            expected = (length, self.top_k) if column is not None and column.per == "token_k" else (length,)
            if array.shape != expected:
                raise ValueError(f"token column {name!r} has shape {array.shape}, expected {expected} "
                                 f"(T = len(ids) = {length}, k = writer top_k = {self.top_k})")
            dtype = np.dtype(column.dtype if column is not None else schema.EXTRA_TOKEN_DTYPE)
            if dtype.kind == "i" and array.size and array.dtype.kind not in "iu":
                raise ValueError(f"token column {name!r} must hold integers, got {array.dtype}")
            out[name] = array.astype(dtype, copy=False)
        return out

    # ------------------------------------------------------------------ storage

    def _column(self, group: str, name: str) -> Column:
        if group == "tokens":
            if name in TOKEN_COLUMNS:
                return TOKEN_COLUMNS[name]
            return Column(name, schema.EXTRA_TOKEN_DTYPE, "token", False, "", self._extra_tokens[name])
        if name in ROLLOUT_COLUMNS:
            return ROLLOUT_COLUMNS[name]
        return Column(name, self._extra_rollout_dtype[name], "rollout", False, "", self._extra_rollouts[name])

    def _create(self, group: h5py.Group, column: Column, size: int) -> h5py.Dataset:
        """A resizable chunked dataset; rows before `size` read as the column's fill value."""
        tail = (self.top_k,) if column.per == "token_k" else ()
        if column.per == "token_k":
            chunk = max(1, schema.TOKEN_K_CHUNK_BYTES // (4 * self.top_k))
        elif column.per == "token":
            chunk = schema.TOKEN_CHUNK
        else:
            chunk = schema.ROLLOUT_CHUNK
        dtype = {"str": _STR, "kind": _KIND}.get(column.dtype) or np.dtype(column.dtype)
        # HDF5 filters cannot apply to variable-length strings (they live in the global heap).
        kwargs = {} if column.dtype == "str" else dict(self._filters)
        if column.dtype not in ("str", "kind"):
            kwargs["fillvalue"] = column.fill
        ds = group.create_dataset(column.name, shape=(size, *tail), maxshape=(None, *tail), dtype=dtype,
                                  chunks=(chunk, *tail), **kwargs)
        if column.dtype == "str" and size:
            ds[:] = np.array([""] * size, dtype=object)
        ds.attrs["units"] = column.units
        ds.attrs["description"] = column.description
        if not column.required:
            ds.attrs["fill_value"] = column.fill
        return ds

    def _flush(self) -> None:
        if not self._pending:
            return
        rows = [r for r, _ in self._pending]
        toks = [t for _, t in self._pending]
        lengths = np.array([len(t["ids"]) for t in toks], dtype=np.int64)
        n0, r0 = self._num_tokens, self._num_rollouts
        n1, r1 = n0 + int(lengths.sum()), r0 + len(rows)

        tokens = self._file["tokens"]
        for name in {n for t in toks for n in t} - set(tokens):
            self._create(tokens, self._column("tokens", name), n0)
        for name in tokens:
            column = self._column("tokens", name)
            ds = tokens[name]
            parts = [t[name] if name in t else np.full((len(t["ids"]), *ds.shape[1:]), column.fill, ds.dtype)
                     for t in toks]
            ds.resize(n1, axis=0)
            ds[n0:n1] = np.concatenate(parts) if parts else np.empty((0, *ds.shape[1:]), ds.dtype)

        group = self._file["rollouts"]
        for name in {n for r in rows for n in r} - set(group):
            self._create(group, self._column("rollouts", name), r0)
        offsets = n0 + np.concatenate([[0], np.cumsum(lengths)[:-1]])
        for name in group:
            column = self._column("rollouts", name)
            ds = group[name]
            if name == "offset":
                values = offsets
            elif name == "length":
                values = lengths.astype(np.int32)
            elif column.dtype == "kind":
                values = np.array([KINDS[r["kind"]] for r in rows], dtype=np.int8)
            elif column.dtype == "str":
                values = np.array([r.get(name, "") for r in rows], dtype=object)
            else:
                values = np.array([r.get(name, column.fill) for r in rows], dtype=ds.dtype)
            ds.resize(r1, axis=0)
            ds[r0:r1] = values
        self._num_tokens, self._num_rollouts = n1, r1
        self._pending, self._pending_tokens = [], 0

    def _write_metrics(self) -> None:
        if not self._metrics:
            return
        group = self._file["metrics"]
        steps, names, values = zip(*self._metrics)
        m = len(self._metrics)
        for name, data in (("step", np.array(steps, dtype=np.int64)), ("name", np.array(names, dtype=object)),
                           ("value", np.array(values, dtype=np.float64))):
            group[name].resize(m, axis=0)
            group[name][:] = data
        self._metrics = []


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
