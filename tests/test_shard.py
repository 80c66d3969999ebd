"""The HDF5 shard: round trip, validation, atomic writes, and how damaged shards are skipped.

Every test writes real HDF5 files under tmp_path with the real writer.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcdistill.errors import ShardError
from hpcdistill.record import SCHEMA_VERSION, ShardReader, ShardWriter, iter_shards, scan_shards
from hpcdistill.record.schema import ROLLOUT_COLUMNS, TOKEN_COLUMNS

K = 4
ROOT = Path(__file__).resolve().parents[1]


def make_tokens(rng, length: int, k: int = K, optional: bool = False) -> dict[str, np.ndarray]:
    tokens = {
        "ids": rng.integers(0, 151_936, length).astype(np.int32),
        "student_lp": -rng.exponential(1.0, length).astype(np.float32),
        "teacher_lp": -rng.exponential(1.0, length).astype(np.float32),
        "student_topk_ids": rng.integers(0, 151_936, (length, k)).astype(np.int32),
        "student_topk_lp": -rng.exponential(1.0, (length, k)).astype(np.float32),
        "teacher_at_student_topk_lp": -rng.exponential(1.0, (length, k)).astype(np.float32),
        "topk_kl": rng.exponential(0.3, length).astype(np.float32),
    }
    if optional:
        for name, column in TOKEN_COLUMNS.items():
            if name not in tokens:
                shape = (length, k) if column.per == "token_k" else (length,)
                tokens[name] = (rng.integers(0, 50, shape) if column.dtype == "int32"
                                else rng.standard_normal(shape)).astype(column.dtype)
    return tokens


def make_row(i: int, kind: str = "original", **extra) -> dict:
    return {"problem_id": f"p{i // 2}", "sample_idx": i % 2, "step": 3, "kind": kind, "reward": i / 10,
            "seed": 7, "weight_version": 2, **extra}


def write_shard(path: Path, num_rollouts: int = 3, seed: int = 0, **writer_kwargs) -> list[dict]:
    rng = np.random.default_rng(seed)
    written = []
    with ShardWriter(path, attrs={"run_id": "run-a"}, top_k=K, **writer_kwargs) as writer:
        for i in range(num_rollouts):
            tokens = make_tokens(rng, int(rng.integers(0, 40)))
            writer.append(make_row(i), tokens)
            written.append(tokens)
    return written


def test_round_trip_keeps_every_column_attr_and_metric(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "shards" / "step_000003.h5"
    attrs = {"run_id": "run-a", "spec_toml": "[experiment]\nname = \"x\"\n", "spec_hash": "abc123",
             "git_commit": None, "student_model": "student", "teacher_model": "teacher",
             "tokenizer": "tok", "model_ids": ["student", "teacher"]}
    kinds = ["original", "regenerated", "eval", "teacher", "probe"]
    lengths = [5, 0, 17, 1, 9]
    written = []
    with ShardWriter(path, attrs=attrs, top_k=K, token_columns={"margin": "teacher margin (nats)"},
                     rollout_columns={"temperature": "eval temperature", "note": "free text"},
                     flush_tokens=8) as writer:
        for i, (kind, length) in enumerate(zip(kinds, lengths)):
            tokens = make_tokens(rng, length, optional=True) | {"margin": rng.random(length).astype(np.float32)}
            row = make_row(i, kind, prompt_text=f"prompt {i}", response_text=f"résponse ✓ {i}",
                           feedback="" if i == 0 else f"failed test {i}", temperature=0.6 + i, note=f"n{i}")
            writer.append(row, tokens)
            written.append((row, tokens))
        writer.add_metrics(0, {"reward_mean": 0.25, "topk_kl_mean": 0.5})
        writer.add_metrics(1, {"reward_mean": 0.75})
        assert not path.exists()  # nothing at the target before a clean exit

    with ShardReader(path) as reader:
        assert reader.num_rollouts == 5 and reader.num_tokens == sum(lengths) and reader.top_k == K
        assert reader.attrs["schema_version"] == SCHEMA_VERSION and reader.attrs["complete"] is True
        assert reader.attrs["spec_hash"] == "abc123" and reader.attrs["model_ids"] == ["student", "teacher"]
        assert "git_commit" not in reader.attrs  # None is stored as an absent attr
        assert reader.attrs["package_version"] and reader.attrs["created"]
        table = reader.rollouts()
        assert list(table["kind"]) == kinds
        assert list(table["length"]) == lengths
        assert list(table["offset"]) == [0, 5, 5, 22, 23]
        assert list(table["response_text"]) == [f"résponse ✓ {i}" for i in range(5)]
        assert list(table["temperature"]) == pytest.approx([0.6, 1.6, 2.6, 3.6, 4.6])
        assert list(table["note"]) == [f"n{i}" for i in range(5)]
        for i, (row, tokens) in enumerate(written):
            got = reader.tokens(i)
            assert set(got) == set(tokens)
            for name, array in tokens.items():
                assert got[name].dtype == array.dtype and np.array_equal(got[name], array), name
            assert table["problem_id"][i] == row["problem_id"]
            assert table["reward"][i] == pytest.approx(row["reward"])
        assert reader.tokens(2, columns=["topk_kl", "not_recorded"]).keys() == {"topk_kl"}
        steps, values = reader.metrics()["reward_mean"]
        assert list(steps) == [0, 1] and list(values) == [0.25, 0.75]
        assert list(reader.metrics()["topk_kl_mean"][1]) == [0.5]
        with h5py.File(path, "r") as plain:  # the file explains itself to plain h5py
            assert plain["tokens/student_lp"].attrs["units"].startswith("nats")
            assert plain["tokens/margin"].attrs["description"] == "teacher margin (nats)"


def test_optional_column_missing_in_some_rollouts_reads_back_as_its_fill_value(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "s.h5"
    first, second = make_tokens(rng, 6), make_tokens(rng, 4)
    second["sampler_lp"] = -np.ones(4, dtype=np.float32)
    second["segment_id"] = np.arange(4, dtype=np.int32)
    with ShardWriter(path, attrs={}, top_k=K, flush_tokens=1) as writer:  # second column appears after a flush
        writer.append(make_row(0, feedback="f0"), first)
        writer.append(make_row(1, "regenerated"), second)
    with ShardReader(path) as reader:
        assert np.isnan(reader.tokens(0)["sampler_lp"]).all()
        assert (reader.tokens(0)["segment_id"] == -1).all()
        assert np.array_equal(reader.tokens(1)["segment_id"], np.arange(4))
        assert list(reader.rollouts()["feedback"]) == ["f0", ""]


def test_writer_refuses_top_k_arrays_of_another_k_and_ragged_lengths(tmp_path):
    rng = np.random.default_rng(3)
    with ShardWriter(tmp_path / "k.h5", attrs={}, top_k=K) as writer:
        wrong_k = make_tokens(rng, 5, k=K + 1)
        with pytest.raises(ValueError, match=r"student_topk_ids.*\(5, 5\).*expected \(5, 4\).*k = writer top_k = 4"):
            writer.append(make_row(0), wrong_k)
        ragged = make_tokens(rng, 5) | {"teacher_lp": np.zeros(6, dtype=np.float32)}
        with pytest.raises(ValueError, match=r"teacher_lp.*\(6,\).*expected \(5,\)"):
            writer.append(make_row(0), ragged)
        with pytest.raises(ValueError, match="unknown token columns.*studnet_lp"):
            writer.append(make_row(0), make_tokens(rng, 5) | {"studnet_lp": np.zeros(5)})
        with pytest.raises(ValueError, match="lacks required columns.*reward"):
            writer.append({k: v for k, v in make_row(0).items() if k != "reward"}, make_tokens(rng, 5))
        with pytest.raises(ValueError, match="kind 'bogus'"):
            writer.append(make_row(0, "bogus"), make_tokens(rng, 5))
        writer.append(make_row(0), make_tokens(rng, 5))  # the valid rollout still goes in
    with ShardReader(tmp_path / "k.h5") as reader:
        assert reader.num_rollouts == 1
        assert reader.tokens(0)["teacher_at_student_topk_lp"].shape == (5, K)


def test_exception_inside_writer_leaves_previous_shard_untouched_and_no_temp_file(tmp_path):
    path = tmp_path / "s.h5"
    write_shard(path, num_rollouts=2)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="scoring failed"):
        with ShardWriter(path, attrs={}, top_k=K, flush_tokens=1) as writer:
            writer.append(make_row(0), make_tokens(np.random.default_rng(0), 9))
            raise RuntimeError("scoring failed")
    assert path.read_bytes() == before
    with pytest.raises(TypeError, match="shard attr 'spec'"):
        ShardWriter(path, attrs={"spec": {"nested": 1}}, top_k=K)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]


CHILD = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, {tests!r})
    from test_shard import make_row, make_tokens, K
    from hpcdistill.record import ShardWriter
    rng = np.random.default_rng(0)
    with ShardWriter({path!r}, attrs={{"run_id": "killed"}}, top_k=K, flush_tokens=16) as writer:
        for i in range(10**9):
            writer.append(make_row(i), make_tokens(rng, 20))
            if i == 20:
                print("flushed", flush=True)
""")


def test_writer_killed_mid_write_leaves_no_shard_and_its_temp_file_is_ignored(tmp_path, caplog):
    shards = tmp_path / "shards"
    path = shards / "step_000000.h5"
    code = CHILD.format(tests=str(Path(__file__).parent), path=str(path))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=ROOT,
                             env=os.environ | {"PYTHONPATH": str(ROOT)})
    try:
        assert child.stdout.readline().strip() == b"flushed"
        temp = path.with_name(f"{path.name}.tmp-{child.pid}")
        assert temp.exists() and temp.stat().st_size > 0
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not path.exists()
    assert temp.exists()
    good_path = shards / "step_000001.h5"
    write_shard(good_path)
    with caplog.at_level(logging.WARNING):
        assert [r.path for r in iter_shards([tmp_path])] == [good_path]  # temp file not even listed
        assert scan_shards(tmp_path) == ([good_path], [])
        good, bad = scan_shards([temp])  # named explicitly, it is refused, not read
    assert good == [] and bad[0][0] == temp
    assert str(temp) in caplog.text


def _damaged(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "run" / "a_good.h5"
    write_shard(good, num_rollouts=20)
    truncated = tmp_path / "run" / "b_truncated.h5"
    shutil.copy(good, truncated)
    with open(truncated, "r+b") as fh:
        fh.truncate(truncated.stat().st_size // 2)
    garbage = tmp_path / "run" / "c_garbage.h5"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    incomplete = tmp_path / "run" / "d_incomplete.h5"
    write_shard(incomplete)
    with h5py.File(incomplete, "r+") as f:
        f.attrs["complete"] = False
    return {"good": good, "truncated": truncated, "garbage": garbage, "incomplete": incomplete}


def test_truncated_garbage_and_incomplete_shards_are_skipped_with_a_warning_naming_each(tmp_path, caplog):
    files = _damaged(tmp_path)
    skipped: list = []
    with caplog.at_level(logging.WARNING, logger="hpcdistill.record.reader"):
        rewards = [float(r.rollouts()["reward"].mean()) for r in iter_shards([tmp_path / "run"], skipped=skipped)]
    assert len(rewards) == 1  # only the good shard was averaged
    assert [p for p, _ in skipped] == [files["truncated"], files["garbage"], files["incomplete"]]
    reasons = dict(skipped)
    assert "cannot be opened as HDF5" in reasons[files["truncated"]]
    assert "cannot be opened as HDF5" in reasons[files["garbage"]]
    assert "incomplete" in reasons[files["incomplete"]]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    for name in ("truncated", "garbage", "incomplete"):
        assert any(str(files[name]) in r.getMessage() for r in warnings), name
    good, bad = scan_shards([tmp_path / "run", tmp_path / "missing.h5"])
    assert good == [files["good"]]
    assert [p for p, _ in bad] == [tmp_path / "missing.h5", files["truncated"], files["garbage"], files["incomplete"]]
    with pytest.raises(ShardError, match="incomplete"):
        ShardReader(files["incomplete"])


def test_damaged_chunk_inside_a_readable_shard_is_caught_by_its_checksum(tmp_path):
    path = tmp_path / "s.h5"
    write_shard(path, num_rollouts=200, seed=4)
    with h5py.File(path, "r") as f:  # find where a chunk of student_topk_lp lies in the file
        offset = f["tokens/student_topk_lp"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(offset + 100)
        fh.write(b"\xff" * 64)
    with ShardReader(path) as reader:  # metadata is intact: it opens
        with pytest.raises(ShardError, match="corrupt shard"):
            for _ in reader.iter_rollouts():
                pass
    good, bad = scan_shards(path, verify=True)
    assert good == [] and "student_topk_lp" in bad[0][1]


def test_unknown_schema_version_is_refused_with_found_and_readable_versions(tmp_path):
    path = tmp_path / "future.h5"
    write_shard(path)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = "9.0"
    with pytest.raises(ShardError) as info:
        ShardReader(path)
    message = str(info.value)
    assert str(path) in message and "'9.0'" in message and SCHEMA_VERSION in message


def test_iter_rollouts_streams_every_rollout_in_order_in_batched_reads(tmp_path):
    path = tmp_path / "many.h5"
    written = write_shard(path, num_rollouts=1500, seed=5, flush_tokens=5000)

    class CountingReader(ShardReader):
        reads = 0

        def _read(self, columns, start, stop):
            CountingReader.reads += 1
            return super()._read(columns, start, stop)

    with CountingReader(path) as reader:
        records = list(reader.iter_rollouts(columns=["ids", "student_topk_lp"], batch_size=100))
    assert len(records) == 1500
    assert [r.row["sample_idx"] for r in records] == [i % 2 for i in range(1500)]
    assert [r.row["problem_id"] for r in records] == [f"p{i // 2}" for i in range(1500)]
    for record, tokens in zip(records, written):
        assert record.tokens.keys() == {"ids", "student_topk_lp"}
        assert np.array_equal(record.tokens["ids"], tokens["ids"])
        assert np.array_equal(record.tokens["student_topk_lp"], tokens["student_topk_lp"])
    assert CountingReader.reads == 15  # one read per batch of 100, not one per rollout


def test_shard_format_doc_names_every_schema_column():
    doc = (ROOT / "docs" / "shard-format.md").read_text()
    for name in [*TOKEN_COLUMNS, *ROLLOUT_COLUMNS]:
        assert f"`{name}`" in doc, name
