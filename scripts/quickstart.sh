#!/usr/bin/env bash
# The main job on the embedded default: install, then run configs/quickstart.toml with the local
# executor on the CPU and the bundled SmolLM2-135M; prints the per-decile delta-KL table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m hpcdistill.cli submit configs/quickstart.toml "$@"
