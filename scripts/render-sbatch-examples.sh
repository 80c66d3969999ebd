#!/usr/bin/env bash
# Regenerates sbatch/*.sbatch: what `hpcdistill render` prints for the shipped cluster configs,
# with the container image and a /scratch output directory (so no path of the rendering machine
# appears). tests/test_sbatch_examples.py checks that they are current.
set -euo pipefail
cd "$(dirname "$0")/.."
for config in prefix_corruption/exp3_convergence cliff/methods context_distill/baseline; do
  out="sbatch/$(echo "$config" | tr '/' '_').sbatch"
  python3 -m hpcdistill.cli render "configs/$config.toml" \
    --set 'experiment.output_dir="/scratch/runs"' \
    --set 'launch.max_array_size=1001' \
    --set 'launch.container={ image = "hpcdistill.sif", binds = ["/scratch"], pass_env = ["WANDB_API_KEY", "HF_TOKEN"] }' \
    > "$out"
  echo "wrote $out"
done
