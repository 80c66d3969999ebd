"""Reading shards: ShardReader (one file, streaming) and iter_shards / scan_shards (a sweep).

A shard is read only if it opens, carries a schema version this reader knows, says `complete`
and is structurally consistent (every column as long as its table; rollouts back to back and
covering tokens/* exactly). Anything else is a ShardError naming the file and the reason;
iter_shards logs it as a WARNING and skips the file, so analysis never averages it in.

`ShardReader.spec` is the run's validated `Spec` (attrs/spec_toml through the spec validator, so
every default is the schema's, not a reader's guess); a shard whose spec no longer validates is a
ShardError like a corrupt one, and `iter_shards(..., spec=True)` skips it.
"""

from __future__ import annotations

import functools
import logging
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpcdistill.errors import ShardError, SpecError
from hpcdistill.record.schema import KINDS, READABLE_VERSIONS, ROLLOUT_COLUMNS, TOKEN_COLUMNS
from hpcdistill.spec.load import validate
from hpcdistill.spec.schema import Spec

log = logging.getLogger(__name__)

_KIND_NAMES = np.array(sorted(KINDS, key=KINDS.get), dtype=object)


@dataclass
class RolloutRecord:
    """One rollout: its row (column -> Python scalar or str) and its tokens (column -> array)."""

    row: dict[str, Any]
    tokens: dict[str, np.ndarray]


def _error(path: Path, reason: str) -> ShardError:
    err = ShardError(f"{path}: {reason}")
    err.reason = reason  # what iter_shards / scan_shards report next to the path
    return err


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


@functools.lru_cache(maxsize=64)
def _validated_spec(spec_toml: str) -> Spec:
    """One validation per distinct spec text: a run's shards all carry the same one. A SpecError
    (not cached) names the key and what is allowed."""
    return validate(tomllib.loads(spec_toml), {}, "attrs/spec_toml")


class ShardReader:
    """An open, validated shard. Context manager; `close()` when used without `with`.

    Token arrays returned by `tokens()` and `iter_rollouts()` are slices of one batch read
    (views); copy them if you keep many of them alive for long.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise _error(self.path, "no such shard file")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:  # truncated, garbage, permissions
            raise _error(self.path, f"cannot be opened as HDF5 ({exc})") from None
        try:
            self._validate()
        except BaseException:
            self._file.close()
            raise
        self._table: dict[str, np.ndarray] | None = None
        self._spec: Spec | None = None

    @property
    def spec(self) -> Spec:
        """The run's validated Spec, from attrs/spec_toml (cached). ShardError when the shard has
        none or it no longer validates (a key renamed or a value no longer allowed)."""
        if self._spec is None:
            text = self.attrs.get("spec_toml")
            if not text:
                raise _error(self.path, "no spec_toml attribute: not written by an hpcdistill run")
            try:
                self._spec = _validated_spec(str(text))
            except tomllib.TOMLDecodeError as exc:
                raise _error(self.path, f"attrs/spec_toml is not valid TOML ({exc})") from None
            except SpecError as exc:
                raise _error(self.path, f"its spec (attrs/spec_toml) no longer validates: {exc}") from None
        return self._spec

    def _validate(self) -> None:
        f, path = self._file, self.path
        try:
            version = _plain(f.attrs.get("schema_version"))
            if version is None:
                raise _error(path, "not an hpcdistill shard (no schema_version attribute)")
            if version not in READABLE_VERSIONS:
                raise _error(path, f"shard schema version {version!r} is not one this reader can read "
                                   f"(readable: {', '.join(READABLE_VERSIONS)}); upgrade hpcdistill")
            if not bool(f.attrs.get("complete", False)):
                raise _error(path, "incomplete shard (complete=False): its writer did not finish")
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            missing = [f"tokens/{n}" for n, c in TOKEN_COLUMNS.items() if c.required and n not in f["tokens"]]
            missing += [f"rollouts/{n}" for n, c in ROLLOUT_COLUMNS.items() if c.required and n not in f["rollouts"]]
            if missing:
                raise _error(path, f"corrupt shard: missing datasets {missing}")
            rollouts, tokens = f["rollouts"], f["tokens"]
            r = rollouts["offset"].shape[0]
            n = tokens["ids"].shape[0]
            bad = [f"rollouts/{k}" for k, d in rollouts.items() if d.shape[0] != r]
            bad += [f"tokens/{k}" for k, d in tokens.items() if d.shape[0] != n]
            bad += [f"tokens/{k}" for k, d in tokens.items() if d.ndim == 2 and d.shape[1] != attrs["top_k"]]
            if bad:
                raise _error(path, f"corrupt shard: datasets of the wrong length {bad}")
            offset, length = rollouts["offset"][:], rollouts["length"][:].astype(np.int64)
            expected = np.concatenate([[0], np.cumsum(length)])
            if np.any(length < 0) or not np.array_equal(offset, expected[:-1]) or expected[-1] != n:
                raise _error(path, "corrupt shard: rollouts/offset and length do not tile tokens/*")
        except ShardError:
            raise
        except Exception as exc:  # a damaged object header, a bad chunk, ...
            raise _error(path, f"corrupt shard ({type(exc).__name__}: {exc})") from None
        self.attrs: dict[str, Any] = attrs
        self.num_rollouts = int(r)
        self.num_tokens = int(n)
        self.top_k = int(attrs["top_k"])
        self.token_columns: list[str] = list(tokens)
        self._offset, self._length = offset, length

    # ------------------------------------------------------------------ tables

    def rollouts(self, columns: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """The rollouts table: column -> [num_rollouts] array (str columns as object arrays)."""
        if self._table is None:
            self._table = {}
            try:
                for name, ds in self._file["rollouts"].items():
                    if h5py.check_enum_dtype(ds.dtype) is not None:
                        self._table[name] = _KIND_NAMES[ds[:].astype(np.int64)]
                    elif h5py.check_string_dtype(ds.dtype) is not None:
                        self._table[name] = ds.asstr()[:] if len(ds) else np.array([], dtype=object)
                    else:
                        self._table[name] = ds[:]
            except (OSError, ValueError, IndexError) as exc:
                self._table = None
                raise _error(self.path, f"corrupt shard: cannot read rollouts ({exc})") from None
        names = self._table.keys() if columns is None else [c for c in columns if c in self._table]
        return {name: self._table[name] for name in names}

    def metrics(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """name -> (steps int64 [m], values float64 [m]) in the order they were recorded."""
        group = self._file["metrics"]
        steps, values = group["step"][:], group["value"][:]
        names = group["name"].asstr()[:] if len(steps) else np.array([], dtype=object)
        out = {}
        for name in dict.fromkeys(names):  # first-seen order
            where = names == name
            out[str(name)] = (steps[where], values[where])
        return out

    # ------------------------------------------------------------------ tokens

    def _columns(self, columns: Iterable[str] | None) -> list[str]:
        # Columns this shard does not have are left out (optional data, e.g. full_kl).
        return list(self.token_columns) if columns is None else [c for c in columns if c in self.token_columns]

    def _read(self, columns: list[str], start: int, stop: int) -> dict[str, np.ndarray]:
        try:
            return {name: self._file["tokens"][name][start:stop] for name in columns}
        except OSError as exc:  # e.g. a Fletcher-32 checksum mismatch in a damaged chunk
            raise _error(self.path, f"corrupt shard: cannot read tokens [{start}, {stop}) ({exc})") from None

    def tokens(self, i: int, columns: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Token columns of rollout i: name -> [T] or [T, k]."""
        if not 0 <= i < self.num_rollouts:
            raise IndexError(f"rollout {i} out of range [0, {self.num_rollouts})")
        start = int(self._offset[i])
        return self._read(self._columns(columns), start, start + int(self._length[i]))

    def iter_rollouts(self, columns: Iterable[str] | None = None, batch_size: int = 256,
                      batch_tokens: int = 1 << 16) -> Iterator[RolloutRecord]:
        """Every rollout in file order. Reads tokens in contiguous batches of at most
        `batch_size` rollouts and about `batch_tokens` tokens: one HDF5 read per column per batch."""
        names = self._columns(columns)
        table = {name: col.tolist() for name, col in self.rollouts().items()}
        i = 0
        while i < self.num_rollouts:
            j, tokens_in_batch = i, 0
            while j < self.num_rollouts and j - i < batch_size and (j == i or tokens_in_batch + self._length[j] <= batch_tokens):
                tokens_in_batch += int(self._length[j])
                j += 1
            base = int(self._offset[i])
            batch = self._read(names, base, base + tokens_in_batch)
            for r in range(i, j):
                lo = int(self._offset[r]) - base
                hi = lo + int(self._length[r])
                yield RolloutRecord({name: col[r] for name, col in table.items()},
                                    {name: arr[lo:hi] for name, arr in batch.items()})
            i = j

    def verify(self) -> None:
        """Read every dataset once (chunk by chunk) so that damaged chunks raise ShardError now."""
        for group in ("tokens", "rollouts", "metrics"):
            for name, ds in self._file[group].items():
                step = ds.chunks[0] * 16 if ds.chunks else max(len(ds), 1)
                try:
                    for start in range(0, len(ds), step):
                        ds[start:start + step]
                except OSError as exc:
                    raise _error(self.path, f"corrupt shard: {group}/{name} unreadable ({exc})") from None

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ShardReader({str(self.path)!r}, rollouts={self.num_rollouts}, tokens={self.num_tokens})"


# ---------------------------------------------------------------------- many shards


def find_shards(paths: str | Path | Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """(shard files, missing paths): directories are searched recursively for *.h5, sorted;
    temp files of writers (`*.tmp-*`) are never listed. Files named explicitly are kept as given."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found, missing = [], []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(q for q in p.rglob("*.h5") if ".tmp-" not in q.name and q.is_file())
        elif p.exists():
            found.append(p)
        else:
            missing.append(p)
    return found, missing


def iter_shards(paths: str | Path | Iterable[str | Path], *, skipped: list | None = None,
                verify: bool = False, spec: bool = False) -> Iterator[ShardReader]:
    """Open readable shards one at a time (each closed when the caller moves on).

    A missing, corrupt, truncated, unreadable, incomplete or unknown-version shard is logged as a
    WARNING with the file and the reason, appended to `skipped` as (path, reason), and skipped.
    `verify=True` also reads every chunk before yielding (a full extra read) to catch damage
    inside the data, which otherwise surfaces as a ShardError while the caller reads.
    `spec=True` also validates each shard's spec (`ShardReader.spec`) and skips those it refuses.
    """
    found, missing = find_shards(paths)
    for path in missing:
        _skip(path, "no such file or directory", skipped)
    for path in found:
        try:
            reader = ShardReader(path)
        except ShardError as exc:
            _skip(path, exc.reason, skipped)
            continue
        with reader:
            try:
                if verify:
                    reader.verify()
                if spec:
                    _ = reader.spec  # validated (and cached) here
            except ShardError as exc:
                _skip(path, exc.reason, skipped)
                continue
            yield reader


def scan_shards(paths: str | Path | Iterable[str | Path], *, verify: bool = False
                ) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(good shard paths, [(bad path, reason)]) without keeping any file open."""
    bad: list[tuple[Path, str]] = []
    good = [reader.path for reader in iter_shards(paths, skipped=bad, verify=verify)]
    return good, bad


def _skip(path: Path, reason: str, skipped: list | None) -> None:
    log.warning("skipping shard %s: %s", path, reason)
    if skipped is not None:
        skipped.append((path, reason))
