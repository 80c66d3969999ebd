#!/usr/bin/env bash
# The test suite: install (Slurm and munge included), start the one-node Slurm cluster on
# localhost, run every test (the slow end-to-end ones and the Slurm ones included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --with-slurm
bash scripts/local-slurm.sh start
exec "${PYTHON:-python3}" -m pytest -q "$@"
