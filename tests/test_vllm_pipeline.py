"""The rollout role on vLLM inside the real training loop (bundled model, CPU vLLM server).

After each update the server must serve the new weights: rollouts of step k carry weight version
k, and the sampler's log-prob of each sampled token (vLLM) equals the trainer's recomputation at
the step-k weights (transformers) within tolerance. With a large learning rate a stale server
would show a gap of order 0.1 nats or more.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from hpcdistill.rundir import SweepPaths, read_json
from hpcdistill.launch.submit import submit
from hpcdistill.record import ShardReader
from hpcdistill.spec import load_spec
from vllmfixtures import vllm_python  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

SPEC = """
[experiment]
name = "vllm-sync"
output_dir = "{out}"

[model]
student = "bundled:smollm2-135m-instruct"
device = "cpu"

[task]
name = "math"
num_problems = 2

[rollout]
backend = "vllm"
samples_per_problem = 2
max_new_tokens = 24

[teacher]
context = "system_prompt"
system_prompt = "You are a terse assistant. Answer with the final number only."

[train]
steps = 1
objective = "opd"
lr = 1e-3

[launch]
cpus_per_task = 2
"""


def test_rollouts_after_a_step_come_from_the_updated_weights(vllm_python, tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC.format(out=tmp_path / "runs").replace('objective = "sft"', 'objective = "opd"'))
    result = submit(load_spec(spec), executor="debug")
    paths = result.sweep.run(result.runs[0].run_id)
    status = read_json(paths.status)
    assert status["state"] == "completed", status
    gaps = {}
    for step in (0, 1):
        with ShardReader(paths.shard(step)) as shard:
            rows = shard.rollouts()
            originals = [i for i, k in enumerate(rows["kind"]) if k == "original"]
            assert {int(rows["weight_version"][i]) for i in originals} == {step}
            gaps[step] = np.concatenate([shard.tokens(i, ["sampler_gap"])["sampler_gap"] for i in originals])
            grad = shard.metrics().get("train/grad_norm")
            if step == 0:
                assert grad is not None and grad[1][0] > 0  # the update did change the weights
    for step, gap in gaps.items():
        assert len(gap) and np.max(np.abs(gap)) < 2e-3, (step, np.max(np.abs(gap)))
    assert (paths.root / "vllm.log").exists()
