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
    assert "hpcdistill.sif python3 -u -m submitit.core._submit" in text
    assert 'export APPTAINERENV_WANDB_API_KEY="${WANDB_API_KEY}"' in text
    assert PLANTED not in "".join(scripts)
    assert not (tmp_path / "runs").exists()
