"""Several nodes (launch.nodes): the spec's rules, the rendered sbatch script, the torchrun
arguments each node's task builds from Slurm's variables, and two nodes simulated on localhost.

The simulation runs two node tasks, each as the worker's task does it: `NodeRendezvous.from_environ`
from the variables srun sets (SLURM_NNODES, SLURM_NODEID, SLURM_JOB_ID, SLURM_JOB_NODELIST; the
first host overridden to 127.0.0.1), then `launch_trainer_processes` with one rank per node, on
the CPU (gloo). The ranks train the one FSDP2 step of tests/test_distributed.py (this file is also
their script, see the end), which must equal that file's 2-rank single-node step.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hpcdistill.errors import LaunchError, SpecError
from hpcdistill.spec import load_spec
from hpcdistill.train.trainer_processes import NodeRendezvous, first_host, rendezvous_port, torchrun_args
from test_distributed import LOSS_RTOL, _assert_same_weights, _ranks, _result, initial  # noqa: F401 (fixture)
from test_teacher_role import scored_once, shard_tokens, teacher_log_tokens

SLURM = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[007-008]"}


def _spec(tmp_path: Path, launch: str, trainer: str = 'strategy = "fsdp"') -> Path:
    path = tmp_path / "s.toml"
    path.write_text(f"""
[experiment]
name = "two-nodes"
output_dir = "{tmp_path / 'runs'}"
[train]
steps = 1
[teacher]
weights = "initial"
[trainer]
{trainer}
[launch]
{launch}
""")
    return path


# ---------------------------------------------------------------------------- the spec


def test_several_nodes_need_a_distributed_strategy_and_the_slurm_executor(tmp_path):
    assert load_spec(_spec(tmp_path, 'executor = "slurm"\nnodes = 2')).spec.launch.nodes == 2
    assert load_spec(_spec(tmp_path, 'nodes = 1', 'strategy = "single"')).spec.launch.nodes == 1
    with pytest.raises(SpecError) as err:
        load_spec(_spec(tmp_path, 'executor = "local"\nnodes = 2', 'strategy = "single"'))
    text = str(err.value)
    assert "key 'launch.nodes': is 2: the nodes hold trainer ranks, which trainer.strategy 'deepspeed' or " \
           "'fsdp' starts; trainer.strategy is 'single'" in text
    assert "key 'launch.nodes': is 2: several nodes are a Slurm job's (launch.executor = 'slurm'); " \
           "launch.executor is 'local'" in text
    with pytest.raises(SpecError, match=r"launch.executor is 'debug'"):
        load_spec(_spec(tmp_path, 'executor = "debug"\nnodes = 3', 'strategy = "deepspeed"'))
    with pytest.raises(SpecError, match=r"key 'launch.nodes': got 0; allowed: >= 1"):
        load_spec(_spec(tmp_path, 'executor = "slurm"\nnodes = 0'))


def test_an_executor_override_cannot_run_several_nodes_here(tmp_path):
    from hpcdistill.launch.submit import make_executor
    from hpcdistill.rundir import SweepPaths

    spec = load_spec(_spec(tmp_path, 'executor = "slurm"\nnodes = 2')).spec
    with pytest.raises(LaunchError, match=r"--executor 'local': launch.nodes = 2 needs the slurm executor"):
        make_executor("local", spec.launch, SweepPaths(tmp_path / "sweep"), "x")


# ---------------------------------------------------------------------------- rendering


def test_render_asks_for_n_nodes_with_one_task_each_and_prints_the_layout(tmp_path, capsys):
    from hpcdistill.cli import main
    from hpcdistill.launch.submit import render_script

    spec = _spec(tmp_path, 'executor = "slurm"\npartition = "gpu"\nnodes = 2\n'
                           'gpus = { rollout = 1, teacher = 1, trainer = 2 }')
    (script,) = render_script(load_spec(spec))
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4"]:
        assert line in script.splitlines(), line
    assert "%t_log.out" in script  # srun starts one task per node, each with its own log
    assert main(["render", str(spec)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(script)  # the script exactly as sbatch gets it, then the layout
    assert out[len(script):].strip().splitlines() == [
        "# launch.nodes = 2: one task per node, each with 4 GPUs (Slurm allocates the same on every node); "
        "4 fsdp trainer ranks, 2 per node",
        "#   node 0: rollout GPUs 0, teacher GPUs 1, trainer GPUs 2,3 (ranks 0,1); records the run",
        "#   node 1: trainer GPUs 2,3 (ranks 2,3); GPUs 0,1 idle"]

    (one,) = render_script(load_spec(_spec(tmp_path, 'executor = "slurm"\ngpus = { trainer = 2 }')))
    assert "#SBATCH --nodes=1" in one and "ntasks-per-node" not in one


# ---------------------------------------------------------------------------- torchrun's arguments


def test_one_node_stays_standalone_and_several_meet_at_the_first_node():
    assert torchrun_args(2) == ["--standalone", "--nnodes=1", "--nproc_per_node=2", "--max_restarts=0"]
    rendezvous = NodeRendezvous(nnodes=2, node_rank=1, host="gpu007", port=33742, job_id="4242")
    assert torchrun_args(4, rendezvous) == [
        "--nnodes=2", "--node_rank=1", "--rdzv_backend=static", "--rdzv_endpoint=gpu007:33742",
        "--rdzv_id=4242", "--nproc_per_node=4", "--max_restarts=0"]


def test_every_node_derives_the_same_rendezvous_from_slurms_variables():
    nodes = [NodeRendezvous.from_environ(2, {**SLURM, "SLURM_NODEID": str(k)}) for k in (0, 1)]
    assert [n.node_rank for n in nodes] == [0, 1]
    assert {(n.host, n.port, n.job_id) for n in nodes} == {("gpu007", 29500 + 4242, "4242")}
    assert rendezvous_port("123456789") == 29500 + 123456789 % 20000
    assert first_host("gpu[003-004,007],cpu1") == "gpu003" and first_host("node12") == "node12"
    forced = NodeRendezvous.from_environ(2, {**SLURM, "HPCDISTILL_RDZV_HOST": "127.0.0.1",
                                             "HPCDISTILL_RDZV_PORT": "40001"})
    assert (forced.host, forced.port) == ("127.0.0.1", 40001)


def test_a_task_outside_a_job_of_that_many_nodes_is_refused():
    with pytest.raises(LaunchError, match=r"key 'launch.nodes': is 2, but this task has no SLURM_NODEID"):
        NodeRendezvous.from_environ(2, {k: v for k, v in SLURM.items() if k != "SLURM_NODEID"})
    with pytest.raises(LaunchError, match=r"key 'launch.nodes': is 3, but the job has 2 nodes \(SLURM_NNODES\)"):
        NodeRendezvous.from_environ(3, SLURM)


# ---------------------------------------------------------------------------- two nodes on localhost


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_simulated_on_localhost_train_the_two_rank_single_node_step(tmp_path, initial):  # noqa: F811
    out = tmp_path / "nodes.json"
    base = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", SLURM_NNODES="2", SLURM_JOB_ID="4242",
                SLURM_JOB_NODELIST="localhost", HPCDISTILL_RDZV_HOST="127.0.0.1",
                HPCDISTILL_RDZV_PORT=str(_free_port()))
    tasks = [subprocess.Popen([sys.executable, __file__, "node", str(out)], env={**base, "SLURM_NODEID": str(k)},
                              stdout=(tmp_path / f"node{k}.log").open("w"), stderr=subprocess.STDOUT)
             for k in (1, 0)]  # node 1 first: its agent waits for node 0's store
    try:
        codes = [task.wait(timeout=300) for task in tasks]
    finally:
        for task in tasks:
            task.kill()
    logs = "".join((tmp_path / f"node{k}.log").read_text()[-3000:] for k in (0, 1))
    assert codes == [0, 0], logs
    assert json.loads(out.with_suffix(".where").read_text()) == {
        "RANK": "0", "GROUP_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"}  # rank 0 is node 0's

    _ranks(tmp_path, "--strategy", "fsdp", "--steps", "1", "--out", str(tmp_path / "one_node.json"))
    (got, got_weights), (want, want_weights) = _result(out), _result(tmp_path / "one_node.json")
    assert got["losses"]["0"] == pytest.approx(want["losses"]["0"], rel=LOSS_RTOL)
    assert got["metrics"]["0"]["train/grad_norm"] == pytest.approx(want["metrics"]["0"]["train/grad_norm"], rel=1e-4)
    _assert_same_weights(got_weights, want_weights, initial)


WORKER_SPEC = """
[experiment]
name = "two-nodes-worker"
seeds = [0]
output_dir = "{out}"
[model]
student = "bundled:smollm2-135m-instruct"
device = "cpu"
[task]
name = "math"
num_problems = 2
[rollout]
samples_per_problem = 1
max_new_tokens = 8
batch_size = 2
[teacher]
context = "system_prompt"
system_prompt = "Think step by step."
weights = "initial"
[scoring]
top_k = 8
[train]
steps = 1
objective = "topk_kl"
lr = 1e-5
[trainer]
strategy = "fsdp"
nproc = 1
[launch]
executor = "slurm"
nodes = 2
cpus_per_task = 1
teacher_process = "always"
"""


@pytest.mark.slow
def test_the_workers_of_two_nodes_run_one_run_and_only_node_0_records_it(tmp_path):
    """`python -m hpcdistill.worker RUN_DIR` in each node's task, as submitit's srun starts it; the
    teacher in its own process on node 0, which node 1's rank reaches at the rendezvous host."""
    from hpcdistill.launch.submit import prepare_run_dir
    from hpcdistill.rundir import SweepPaths, read_json
    from hpcdistill.spec import expand

    spec_path = tmp_path / "s.toml"
    spec_path.write_text(WORKER_SPEC.format(out=tmp_path / "runs"))
    loaded = load_spec(spec_path)
    (run,) = expand(loaded)
    sweep = SweepPaths.for_spec(loaded.spec.experiment.output_dir, loaded.spec.experiment.name)
    paths = prepare_run_dir(sweep, run, loaded.spec_hash)
    base = dict(os.environ, CUDA_VISIBLE_DEVICES="", SLURM_NNODES="2", SLURM_JOB_ID="4243",
                SLURM_JOB_NODELIST="localhost", HPCDISTILL_RDZV_HOST="127.0.0.1",
                HPCDISTILL_RDZV_PORT=str(_free_port()))
    tasks = [subprocess.Popen([sys.executable, "-m", "hpcdistill.worker", str(paths.root)],
                              env={**base, "SLURM_NODEID": str(k)}, stdout=(tmp_path / f"task{k}.log").open("w"),
                              stderr=subprocess.STDOUT) for k in (1, 0)]
    try:
        codes = [task.wait(timeout=400) for task in tasks]
    finally:
        for task in tasks:
            task.kill()
    status = read_json(paths.status)
    assert codes == [0, 0], (status, paths.log.read_text()[-3000:], (tmp_path / "task1.log").read_text()[-3000:])
    assert status["state"] == "completed" and status["attempts"] == 1 and status["job_id"] == "4243"
    assert status["trainer"] == {"strategy": "fsdp", "ranks": 2, "nodes": 2}
    assert status["summary"]["steps_done"] == 2
    assert sorted(p.name for p in paths.shards.glob("*.h5")) == ["step_000000.h5", "step_000001.h5"]
    log = paths.log.read_text().splitlines()
    assert any(" rank0: " in line for line in log)  # rank 0 (node 0's) speaks for the ranks
    assert not [line for line in log if " rank1:" in line and " INFO " in line]
    teacher_log = paths.teacher_log.read_text()
    assert "listening on 0.0.0.0:" in teacher_log  # several nodes: every interface, not loopback only
    assert teacher_log_tokens(teacher_log) == scored_once(shard_tokens(paths.root))  # both ranks' shares, each once


def _node_task(out: Path) -> int:
    """One node's task: its agent and rank, as the worker starts them under launch.nodes = 2."""
    from hpcdistill.train.trainer_processes import launch_trainer_processes

    rendezvous = NodeRendezvous.from_environ(2, os.environ)
    return launch_trainer_processes([__file__, "rank", str(out)], devices=(), nproc=1, rendezvous=rendezvous)


def _rank(out: Path) -> None:
    """One rank: test_distributed's FSDP2 step; rank 0 writes it and where it ran."""
    from test_distributed import run_steps

    run_steps("fsdp", 1, out)
    if os.environ["RANK"] == "0":
        keys = ("RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
        out.with_suffix(".where").write_text(json.dumps({k: os.environ[k] for k in keys}))


if __name__ == "__main__":
    if sys.argv[1] == "node":
        sys.exit(_node_task(Path(sys.argv[2])))
    _rank(Path(sys.argv[2]))
