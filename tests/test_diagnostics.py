"""Teaching-signal diagnostics: the per-token columns a run records, the step metrics, and the
per-run summary of `analyze`, each against a hand computation from the shard's own arrays."""

from __future__ import annotations

import numpy as np
import pytest

from hpcdistill.analysis.diagnostics import diagnostics_rows
from hpcdistill.cli import main
from hpcdistill.launch.submit import submit
from hpcdistill.record import iter_shards
from hpcdistill.spec import load_spec
from tinyspec import tiny_spec

@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    path = tiny_spec(tmp_path_factory.mktemp("diag"), "diag", rollout={"samples_per_problem": 3, "max_new_tokens": 9},
                     teacher={"context": "demonstration", "demonstration_threshold": 0.0,
                              "demonstration_feedback": "never"},
                     scoring={"top_k": 6, "full_vocab": True}, train={"steps": 1})
    return submit(load_spec(path), executor="debug").sweep.root


def _originals(sweep):
    for shard in iter_shards([sweep]):
        yield shard, [r for r in shard.iter_rollouts() if r.row["kind"] == "original"]


def test_recorded_masses_and_overlap_are_what_the_recorded_top_k_arrays_say(sweep):
    for _, records in _originals(sweep):
        for record in records:
            t = record.tokens
            k = t["student_topk_ids"].shape[1]
            np.testing.assert_allclose(t["student_topk_mass"], np.exp(t["student_topk_lp"]).sum(-1), rtol=1e-5)
            np.testing.assert_allclose(t["teacher_topk_mass"], np.exp(t["teacher_topk_lp"]).sum(-1), rtol=1e-5)
            np.testing.assert_allclose(t["teacher_mass_at_student_topk"],
                                       np.exp(t["teacher_at_student_topk_lp"]).sum(-1), rtol=1e-5)
            np.testing.assert_allclose(t["student_mass_at_teacher_topk"],
                                       np.exp(t["student_at_teacher_topk_lp"]).sum(-1), rtol=1e-5)
            overlap = [len(set(a) & set(b)) / k for a, b in zip(t["student_topk_ids"].tolist(),
                                                                t["teacher_topk_ids"].tolist())]
            np.testing.assert_allclose(t["topk_overlap"], overlap)
            # the teacher's own top-k is its best: at least as much mass as on the student's ids
            assert (t["teacher_topk_mass"] >= t["teacher_mass_at_student_topk"] - 1e-6).all()


def test_step_metrics_and_the_per_run_summary_match_the_token_columns(sweep, capsys):
    tokens = {name: [] for name in ("student_topk_mass", "topk_overlap", "topk_kl", "full_kl", "sampler_gap")}
    demonstrated = []
    for shard, records in _originals(sweep):
        step_overlap = np.concatenate([r.tokens["topk_overlap"] for r in records])
        assert shard.metrics()["diag/topk_overlap"][1][0] == pytest.approx(step_overlap.mean(), rel=1e-5)
        for record in records:
            for name in tokens:
                tokens[name].append(record.tokens[name])
            demonstrated.append(record.row["demonstration"] >= 0)
    flat = {name: np.concatenate(v).astype(np.float64) for name, v in tokens.items()}
    headers, rows = diagnostics_rows(sweep)
    (row,) = rows
    cell = dict(zip(headers, row))
    assert float(cell["S mass@S_k"]) == pytest.approx(flat["student_topk_mass"].mean(), rel=6e-3)
    assert float(cell["overlap"]) == pytest.approx(flat["topk_overlap"].mean(), rel=6e-3)
    assert float(cell["topk-full KL"]) == pytest.approx((flat["topk_kl"] - flat["full_kl"]).mean(), rel=6e-3, abs=1e-3)
    assert float(cell["|gap| mean"]) == pytest.approx(np.abs(flat["sampler_gap"]).mean(), rel=6e-3, abs=1e-9)
    assert float(cell["demo rate"]) == pytest.approx(np.mean(demonstrated)) and all(demonstrated)
    assert main(["analyze", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "Teaching-signal diagnostics per run" in out and row[0] in out
