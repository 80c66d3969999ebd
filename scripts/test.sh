#!/usr/bin/env bash
# The test suite: install (Slurm, munge, DeepSpeed and vLLM's CPU build included), start the
# one-node Slurm cluster on localhost, run every test (slow end-to-end, Slurm, vLLM and DeepSpeed
# tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --with-slurm --with-cluster-tools
bash scripts/local-slurm.sh start
export HPCDISTILL_VLLM_PYTHON="$PWD/.venv-vllm/bin/python"
exec "${PYTHON:-python3}" -m pytest -q "$@"
