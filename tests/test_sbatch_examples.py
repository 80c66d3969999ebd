"""sbatch/*.sbatch are exactly what `hpcdistill render` prints for the shipped cluster configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETS = ['experiment.output_dir="/scratch/runs"', "launch.max_array_size=1001",
        'launch.container={ image = "hpcdistill.sif", binds = ["/scratch"], pass_env = ["WANDB_API_KEY", "HF_TOKEN"] }']


@pytest.mark.parametrize("config", ["prefix_corruption/exp3_convergence", "cliff/methods", "context_distill/baseline"])
def test_committed_script_matches_render(config, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "planted-secret-should-not-appear-0123456789")
    args = [sys.executable, "-m", "hpcdistill.cli", "render", str(REPO / "configs" / f"{config}.toml")]
    for item in SETS:
        args += ["--set", item]
    rendered = subprocess.run(args, capture_output=True, text=True, check=True, cwd=REPO).stdout
    committed = (REPO / "sbatch" / f"{config.replace('/', '_')}.sbatch").read_text()
    assert rendered == committed, "sbatch/ is stale: run scripts/render-sbatch-examples.sh"
    assert "planted-secret" not in rendered
    assert "apptainer exec --nv --cleanenv" in rendered and "WANDB_API_KEY" in rendered
