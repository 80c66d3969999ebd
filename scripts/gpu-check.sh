#!/usr/bin/env bash
# Issue 17's checks on a machine with one NVIDIA GPU, offline, in under 8 minutes: the fused-kernel
# tests, issue 10's scoring and loss benchmarks, bench/train_memory.py on CUDA and one bf16
# training step of the bundled model through `hpcdistill submit --executor local`; issue 18's
# teacher role in its own process (on its own GPU when there are two). Each step runs
# under its own `timeout` (and the whole script under GPU_CHECK_BUDGET_S, default 450 s); a failing
# step does not stop the next; one PASS/FAIL/TIMEOUT/SKIP table with the seconds of each at the end.
#
#   scripts/gpu-check.sh                 # on the GPU machine (the repo's environment installed)
#   scripts/gpu-check.sh --cpu-dry-run   # the same steps on the CPU at tiny sizes: checks the plumbing
#
# Logs: one file per step in $OUT if set, else ./gpu-check-results/. Exit status 1 if any step
# did not pass. PYTHON picks the interpreter (default: python).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
  "") ;;
  --cpu-dry-run) DRY=1 ;;
  *) echo "usage: $0 [--cpu-dry-run]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python}
RESULTS=${OUT:-gpu-check-results}
mkdir -p "$RESULTS" && RESULTS=$(cd "$RESULTS" && pwd)
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
NAMES=() STATES=() TIMES=()

# step NAME TIMEOUT_S COMMAND...: run COMMAND under timeout (cut to what is left of the budget),
# its output in $RESULTS/NAME.log, its result in the summary
step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET_S - SECONDS)) t0=$SECONDS rc state
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    NAMES+=("$name") STATES+=("SKIP (budget)") TIMES+=(0)
    return
  fi
  echo "== $name (timeout ${limit} s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$RESULTS/$name.log" 2>&1
  rc=$?
  case $rc in
    0) state=PASS ;;
    124 | 137) state="TIMEOUT (${limit} s)" ;;
    *) state="FAIL (exit $rc)" ;;
  esac
  tail -n 4 "$RESULTS/$name.log" | sed 's/^/   | /'
  NAMES+=("$name") STATES+=("$state") TIMES+=($((SECONDS - t0)))
}

# One training step (+ the final measurement step) of the bundled model, written as a spec here;
# passes when every run of the sweep ended "completed". Arguments: a folder name, then `--set
# KEY=VALUE` overrides (teacher_step: the teacher role in its own process).
train_step() {
  local name=${1:-train-step}
  local dir="$RESULTS/$name" device=cuda dtype=bfloat16 tokens=32
  (($#)) && shift
  ((DRY)) && device=cpu dtype=float32 tokens=8
  rm -rf "$dir" && mkdir -p "$dir"
  cat >"$dir/spec.toml" <<EOF
[experiment]
name = "gpu-check"
output_dir = "$dir/runs"
seeds = [0]

[model]
student = "bundled:smollm2-135m-instruct"
dtype = "$dtype"
device = "$device"

[task]
name = "math"
num_problems = 2

[rollout]
samples_per_problem = 2
max_new_tokens = $tokens

[train]
steps = 1

[trainer]
kernels = "auto"

[launch]
executor = "local"
EOF
  "$PY" -m hpcdistill.cli submit "$dir/spec.toml" --executor local --no-analyze "$@" || return
  "$PY" -m hpcdistill.cli status "$dir/runs/gpu-check" --json >"$dir/status.json" || return
  "$PY" -c 'import json, sys
runs = json.load(open(sys.argv[1]))
print("run states:", {r["run_id"]: r["state"] for r in runs})
sys.exit(0 if runs and all(r["state"] == "completed" for r in runs) else 1)' "$dir/status.json" || return
  [[ $name == train-step ]] || return 0
  ((DRY)) && return  # the CPU takes the torch path
  grep -rh "through the fused Triton loss" "$dir/runs/gpu-check" --include=worker.log \
    || { echo "the step did not take the fused Triton loss"; return 1; }
}

# The teacher role apart (issue 18): a frozen teacher (the initial student) in its own process. Two
# or more GPUs: teacher and trainer each on their own (launch.gpus); one GPU: the trainer on it and
# the teacher process on the CPU (launch.teacher_process = "always"). Passes when the run completed
# and the teacher process logged its scoring.
teacher_step() {
  local n gpus
  n=$(nvidia-smi -L 2>/dev/null | wc -l)
  if ((DRY)) || ((n < 2)); then gpus=(--set 'launch.teacher_process="always"')
  else gpus=(--set 'launch.gpus={ teacher = 1, trainer = 1 }' --set 'model.device="auto"'); fi
  train_step teacher-step --set 'teacher.weights="initial"' "${gpus[@]}" || return
  grep -rh "scored .* tokens" "$RESULTS/teacher-step/runs/gpu-check" --include=teacher.log | tail -n 3 | grep . \
    || { echo "the teacher process scored nothing"; return 1; }
  grep -rh "loaded on" "$RESULTS/teacher-step/runs/gpu-check" --include=teacher.log
}
export -f train_step teacher_step
export PY RESULTS DRY

if ((DRY)); then
  echo "cpu dry run: tiny sizes, Triton kernels in the interpreter; no figure here means anything"
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  step env 30 "$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
else
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu --format=csv,noheader \
    | tee "$RESULTS/nvidia-smi.log"
  gpu_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1)
  step env 60 "$PY" -c 'import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
assert torch.cuda.is_available(), "torch sees no CUDA device"
print(torch.cuda.get_device_name())'
fi

# (1) the kernels compiled for the GPU (tests/test_fused_native.py; it skips without CUDA), then the
# interpreter tests (CPU tensors, GPU or not)
if ((DRY)); then
  step fused-tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_fused_scoring.py tests/test_fused_loss.py \
    tests/test_fused_pipeline.py
else
  step fused-native 120 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_fused_native.py
  step fused-tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_fused_scoring.py tests/test_fused_loss.py \
    tests/test_fused_pipeline.py
fi
if ((DRY)); then
  step gpu-scoring 60 "$PY" bench/gpu_scoring.py --cpu-smoke
  step gpu-loss 60 "$PY" bench/gpu_loss.py --cpu-smoke
  step train-memory 180 "$PY" bench/train_memory.py --tokens 128 256 --response 128 --repeats 1 --max-memory-gb 4
  step train-step 300 bash -c train_step
  step teacher-step 300 bash -c teacher_step
else
  step gpu-scoring 90 "$PY" bench/gpu_scoring.py
  naive=(); ((${gpu_mib:-0} < 49152)) && naive=(--skip-naive)  # the naive row needs ~30 GiB
  step gpu-loss 60 "$PY" bench/gpu_loss.py "${naive[@]}"
  step train-memory 180 "$PY" bench/train_memory.py --cuda --repeats 3
  step train-step 150 bash -c train_step
  step teacher-step 150 bash -c teacher_step
fi

echo
echo "gpu-check$( ((DRY)) && echo ' (cpu dry run)'): logs in $RESULTS, $SECONDS s in all"
printf '| %-13s | %-16s | %7s |\n' step result seconds
printf '|%s|%s|%s|\n' "---------------" "------------------" "---------"
failed=0
for i in "${!NAMES[@]}"; do
  printf '| %-13s | %-16s | %7s |\n' "${NAMES[$i]}" "${STATES[$i]}" "${TIMES[$i]}"
  [[ ${STATES[$i]} == PASS ]] || failed=1
done
exit $failed
