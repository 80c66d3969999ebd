"""Launch pieces that need no cluster: GPU roles, Apptainer argv, rendered scripts, time parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcdistill.errors import LaunchError
from hpcdistill.launch.container import container_argv
from hpcdistill.launch.gpus import allocated_devices, assign_roles
from hpcdistill.launch.submit import render_script, time_minutes
from hpcdistill.spec import load_spec
from hpcdistill.spec.schema import ContainerSpec, GpuSpec

PLANTED = "sk-planted-secret-value-0123456789abcdef"


def test_roles_get_disjoint_device_slices_from_cuda_visible_devices():
    roles = assign_roles(GpuSpec(rollout=1, teacher=1, trainer=2), {"CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert (roles.rollout, roles.teacher, roles.trainer) == (("4",), ("5",), ("6", "7"))
    assert roles.env("trainer") == {"CUDA_VISIBLE_DEVICES": "6,7"}


def test_roles_fall_back_to_slurm_gpus_on_node_then_cpu():
    assert allocated_devices({"SLURM_GPUS_ON_NODE": "4"}) == ("0", "1", "2", "3")
    assert allocated_devices({}) == ()
    assert assign_roles(GpuSpec(), {}).on_cpu


def test_spec_asking_for_more_gpus_than_allocated_is_rejected():
    with pytest.raises(LaunchError, match=r"asks for 4 GPUs .* allocation has 2 \(SLURM_GPUS_ON_NODE\)"):
        assign_roles(GpuSpec(rollout=1, teacher=1, trainer=2), {"SLURM_GPUS_ON_NODE": "2"})


def test_apptainer_argv_has_nv_cleanenv_binds_and_image():
    spec = ContainerSpec(image="hpcdistill.sif", binds=["/scratch"], pass_env=["WANDB_API_KEY"])
    argv = container_argv(spec, binds=[Path("/runs/x")], python="python3")
    assert argv == ["apptainer", "exec", "--nv", "--cleanenv", "--bind", "/scratch", "--bind", "/runs/x",
                    "hpcdistill.sif", "python3"]


@pytest.mark.parametrize("text,minutes", [("24:00:00", 1440), ("30", 30), ("1-00:00:00", 1440),
                                          ("00:30:00", 30), ("2-12", 3600), ("10:30", 11)])
def test_slurm_time_formats(text, minutes):
    assert time_minutes(text) == minutes


def test_render_wraps_the_task_in_apptainer_and_never_writes_a_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", PLANTED)
    spec = tmp_path / "s.toml"
    spec.write_text(f"""
[experiment]
name = "render-me"
output_dir = "{tmp_path / 'runs'}"
num_seeds = 3
[teacher]
weights = "initial"
[launch]
executor = "slurm"
partition = "gpu"
account = "m0000"
qos = "premium"
time = "24:00:00"
constraint = "gpu&hbm80g"
array_parallelism = 2
max_array_size = 2
gpus = {{ rollout = 1, teacher = 1, trainer = 2 }}
container = {{ image = "hpcdistill.sif", binds = ["/scratch"], pass_env = ["WANDB_API_KEY", "HF_TOKEN"] }}
""")
    scripts = render_script(load_spec(spec))
    assert len(scripts) == 2  # 3 runs, arrays of at most 2 tasks
    text = scripts[0]
    for line in ["#SBATCH --array=0-1%2", "#SBATCH --partition=gpu", "#SBATCH --account=m0000",
                 "#SBATCH --qos=premium", "#SBATCH --time=1440", "#SBATCH --constraint='gpu&hbm80g'",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --signal=USR2@120"]:
        assert line in text, line
    assert "apptainer exec --nv --cleanenv --bind /scratch --bind" in text
    assert "hpcdistill.sif python3" in text and "-u -m submitit.core._submit" in text
    assert "WANDB_API_KEY HF_TOKEN" in text  # forwarded by name
    assert PLANTED not in "".join(scripts)
    assert not (tmp_path / "runs").exists()


def test_cleanenv_container_gets_slurm_submitit_and_named_variables_by_name(tmp_path):
    """Run the generated wrapper with an `apptainer` on PATH that records its argv and env."""
    import os
    import subprocess

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "apptainer").write_text('#!/bin/sh\necho "ARGV $*"\nenv | grep ^APPTAINERENV_ | sort\n')
    (fake / "apptainer").chmod(0o755)
    spec = ContainerSpec(image="img.sif", binds=["/scratch"], pass_env=["WANDB_API_KEY", "UNSET_NAME"])
    from hpcdistill.launch.container import python_command

    command = python_command(spec, binds=["/runs"], python="python3") + " -u -m submitit.core._submit /logs"
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "WANDB_API_KEY": PLANTED, "SLURM_JOB_ID": "42",
           "SUBMITIT_EXECUTOR": "slurm", "CUDA_VISIBLE_DEVICES": "0,1", "OTHER": "x"}
    out = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, check=True).stdout
    assert ("ARGV exec --nv --cleanenv --bind /scratch --bind /runs img.sif python3 -u -m "
            "submitit.core._submit /logs") in out
    assert f"APPTAINERENV_WANDB_API_KEY={PLANTED}" in out  # the value travels in the environment
    assert "APPTAINERENV_SLURM_JOB_ID=42" in out and "APPTAINERENV_SUBMITIT_EXECUTOR=slurm" in out
    assert "APPTAINERENV_CUDA_VISIBLE_DEVICES=0,1" in out
    assert "UNSET_NAME" not in out and "OTHER" not in out
    assert PLANTED not in command  # but never in the command or script


def test_a_requeue_whose_scontrol_the_requeue_itself_killed_counts_as_requeued_not_failed():
    import signal
    import subprocess

    from hpcdistill.worker import requeue_raced

    killed = subprocess.CalledProcessError(-signal.SIGTERM, ["scontrol", "requeue", "26"])
    assert requeue_raced(killed)
    assert not requeue_raced(subprocess.CalledProcessError(1, ["scontrol", "requeue", "26"]))  # a real refusal
    assert not requeue_raced(subprocess.CalledProcessError(-signal.SIGTERM, ["sbatch", "x"]))
    assert not requeue_raced(RuntimeError("scontrol requeue"))
