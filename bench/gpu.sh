#!/usr/bin/env bash
# The GPU suite (DESIGN.md, "The GPU suite"): every GPU test and benchmark in one command, most
# valuable first, within a time budget (default 480 s), each step under its own `timeout`.
#
#   bash ../shared/gpu/wheelhouse.sh .whl pytest pluggy iniconfig   # here, once: the offline wheels
#   bash bench/gpu.sh --dry-run      # here, on CPU: check every step's command, list missing steps
#   bash bench/gpu.sh                # on the GPU machine ($OUT set by the `run` tool; carry .whl)
#   bash bench/gpu.sh --only synthetic-8b,e2e-rtx4090,plan   # a subset (install always runs)
#
# Steps, most valuable first: install env nf4-test nf4-bench lora-bench gpu-tests synthetic-8b
# e2e-h100 e2e-rtx4090 plan. Each gets min(its limit, what is left of --budget); a step that would
# start with under 20 s left is "skipped". If the budget ends before the end-to-end runs, call again
# with --only on the same warm machine: the synthetic 8B checkpoint stays in $FASTFT_CACHE.
#
# What comes back under $OUT (written as each step ends, so a run cut short keeps what it measured):
#   summary.md / summary.jsonl   one line per step: status (ok, failed, timeout, missing, skipped), rc, seconds
#   results/*.json (+ .md)       result documents (bench.common; FASTFT_BENCH_RESULTS points here)
#   junit-*.xml, logs/<step>.log test reports and every step's full output
# Afterwards, on the CPU machine: copy $OUT/results/* into bench/results/, then
#   python -m bench.report --charts        # charts + README table
#   python -m bench.compare bench/results/train-bench-llama3-8b-h100-*.json --baseline bench/baselines/h100.json --write-baseline
# and commit them.
#
# A step whose module or test file does not exist yet is reported "missing", never a crash.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
BUDGET=480
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) BUDGET=$2; shift ;;
    --only) ONLY=",$2," ; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "bench/gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ -z "${OUT:-}" ]; then
  if [ $DRY = 1 ]; then OUT=$(mktemp -d -t fastft-gpu-dry.XXXXXX); else OUT=$ROOT/gpu-out; fi
fi
mkdir -p "$OUT/logs" "$OUT/results"
export FASTFT_BENCH_RESULTS=$OUT/results
export FASTFT_CACHE=${FASTFT_CACHE:-/tmp/fastft-cache}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
[ -x "$ROOT/.venv/bin/python" ] && [ $DRY = 1 ] && PY=$ROOT/.venv/bin/python

START=$(date +%s)
SUMMARY_MD=$OUT/summary.md
SUMMARY_JSON=$OUT/summary.jsonl
: > "$SUMMARY_JSON"
{
  echo "# fastft GPU suite $( [ $DRY = 1 ] && echo '(dry run on CPU)')"
  echo
  echo "started $(date -u +%Y-%m-%dT%H:%M:%SZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), budget ${BUDGET}s"
  echo
  echo "| step | status | rc | seconds | what |"
  echo "| --- | --- | --- | --- | --- |"
} > "$SUMMARY_MD"
FAILED=0

record() {  # record NAME STATUS RC SECONDS WHAT
  echo "| $1 | $2 | $3 | $4 | $5 |" >> "$SUMMARY_MD"
  printf '{"step": "%s", "status": "%s", "rc": "%s", "seconds": %s, "log": "logs/%s.log", "elapsed": %s}\n' \
    "$1" "$2" "$3" "$4" "$1" "$(( $(date +%s) - START ))" >> "$SUMMARY_JSON"
  echo "bench/gpu.sh: $1: $2 (rc $3, ${4}s)"
  case "$2" in failed|timeout) FAILED=1 ;; esac
}

# step NAME TIMEOUT NEEDS DRY_CMD CMD WHAT
#   NEEDS: paths that must exist (space-separated; "" for none); missing ones make the step "missing"
#   DRY_CMD: run instead of CMD by --dry-run (cheap, CPU-only); CMD: the real thing (run by bash -c)
step() {
  local name=$1 limit=$2 needs=$3 dry=$4 cmd=$5 what=$6
  if [ -n "$ONLY" ] && [ "$name" != install ] && [[ "$ONLY" != *",$name,"* ]]; then return; fi
  local missing=""
  for f in $needs; do [ -e "$f" ] || missing="$missing $f"; done
  if [ -n "$missing" ]; then record "$name" missing - 0 "$what (not in this checkout:$missing)"; return; fi
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ $DRY = 0 ] && [ $left -lt 20 ]; then record "$name" skipped - 0 "$what (out of time: ${left}s left)"; return; fi
  [ $DRY = 0 ] && [ $limit -gt $left ] && limit=$left
  local run=$cmd
  [ $DRY = 1 ] && run=$dry && limit=180
  local t0=$(date +%s)
  echo "bench/gpu.sh: $name (limit ${limit}s): $run"
  timeout --signal=TERM --kill-after=15 "$limit" bash -c "$run" > "$OUT/logs/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local status=ok
  if [ $rc = 124 ] || [ $rc = 137 ]; then status=timeout
  elif [ $rc = 5 ] && [[ "$run" == *pytest* ]]; then status=none  # pytest: no test selected
  elif [ $rc != 0 ]; then status=failed; fi
  record "$name" "$status" "$rc" "$dt" "$what"
  [ $status = ok ] || tail -n 15 "$OUT/logs/$name.log" | sed 's/^/    /'
}

# --- 0. environment: the carried wheelhouse, fastft itself -----------------------------------------
if [ $DRY = 0 ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    step install 120 "" true \
      "$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl" \
      "install the carried wheelhouse (.whl) into /tmp/site"
  else
    record install missing - 0 "no .whl/ carried: build it with bash ../shared/gpu/wheelhouse.sh .whl pytest pluggy iniconfig"
  fi
  export PYTHONPATH=/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
  # fastft.kernels is kernels/ (a package-dir mapping): an editable install gives it; a link is the fallback
  if ! $PY -c "import fastft.kernels" >/dev/null 2>&1; then
    $PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/logs/install-fastft.log" 2>&1 \
      || { [ -e fastft/kernels ] || ln -s ../kernels fastft/kernels; }
  fi
else
  if ls .whl/*.whl >/dev/null 2>&1; then
    record install ok - 0 "dry run: .whl/ holds $(ls .whl/*.whl | wc -l) wheels ($(du -sh .whl | cut -f1)); carry .whl"
  else
    record install missing - 0 "no .whl/: build it with bash ../shared/gpu/wheelhouse.sh .whl pytest pluggy iniconfig"
  fi
fi

T="--target"
E2E_RUNS="--run unsloth:unsloth --run unsloth:fastft --run hf"  # the kernels comparison first, then the hf baseline
E2E_STEPS="--steps 3 --warmup 1"

# --- 1. what the machine is -------------------------------------------------------------------------
step env 60 "" \
  "$PY -m fastft info" \
  "nvidia-smi; $PY -m fastft info" \
  "GPU, driver and versions"

# --- 2. NF4 dequant: bit-exactness on GPU, then its microbenchmark -----------------------------------
step nf4-test 120 "tests/test_nf4.py" \
  "$PY -m pytest -q -p no:cacheprovider --collect-only -m gpu tests/test_nf4.py" \
  "$PY -m pytest -q -p no:cacheprovider -m gpu tests/test_nf4.py --junitxml=$OUT/junit-nf4.xml" \
  "NF4 dequant bit-exact vs bitsandbytes (pytest -m gpu)"
step nf4-bench 90 "bench/kernels.py bench/kernels_nf4.py" \
  "$PY -m bench.kernels nf4 --help" \
  "$PY -m bench.kernels nf4" \
  "NF4 dequant microbenchmark (python -m bench.kernels nf4)"

# --- 3. fused LoRA: microbenchmark, then every other GPU test -------------------------------------------
step lora-bench 90 "bench/kernels.py bench/kernels_lora.py kernels/lora.py" \
  "$PY -m bench.kernels lora --help" \
  "$PY -m bench.kernels lora" \
  "fused LoRA microbenchmark (python -m bench.kernels lora)"
step gpu-tests 150 "" \
  "$PY -m pytest -q -p no:cacheprovider --collect-only -m gpu --ignore=tests/test_nf4.py" \
  "$PY -m pytest -q -p no:cacheprovider -m gpu --ignore=tests/test_nf4.py --junitxml=$OUT/junit-gpu.xml" \
  "every other GPU test (pytest -m gpu)"

# --- 4. end to end: Llama-3-8B synthetic QLoRA, hf vs unsloth vs unsloth + fastft kernels ------------------
step synthetic-8b 150 "" \
  "$PY -c 'from fastft import models; print(models.resolve, models.synthetic_names())'" \
  "$PY -c 'import time; from fastft import models; t = time.time(); print(models.resolve(\"synthetic:llama-3-8b\"), round(time.time() - t, 1), \"s\")'" \
  "build the synthetic Llama-3-8B NF4 checkpoint once (FASTFT_CACHE)"
step e2e-h100 330 "" \
  "$PY -m bench.train recipes/bench-llama3-8b.yaml $T h100 $E2E_RUNS $E2E_STEPS --dry-run" \
  "$PY -m bench.train recipes/bench-llama3-8b.yaml $T h100 $E2E_RUNS $E2E_STEPS --timeout 150 --no-chart" \
  "Llama-3-8B synthetic, seq 2048, batch 2x4, r=16 all-linear: unsloth / unsloth+fastft / hf (80 GiB cap)"
step e2e-rtx4090 300 "" \
  "$PY -m bench.train recipes/bench-llama3-8b.yaml $T rtx4090 $E2E_RUNS $E2E_STEPS --dry-run" \
  "$PY -m bench.train recipes/bench-llama3-8b.yaml $T rtx4090 $E2E_RUNS $E2E_STEPS --timeout 120 --no-chart" \
  "the same under the RTX 4090's 24 GiB cap (does it fit?)"

# --- 5. the planner's predictions (config only, no GPU needed; kept here to sit beside the measurements) ----
# exit 0 fits, 1 does not fit (both are answers), 2 an error. The bench recipe's synthetic model is
# planned as the hub checkpoint of the same architecture.
PLAN_RECIPES=$(ls recipes/llama3-*.yaml 2>/dev/null | tr '\n' ' ')
PLAN_ONE='plan1() { out=$1; shift; '"$PY"' -m fastft plan "$@" --json > "$out"; rc=$?; [ $rc -le 1 ] || { cat "$out"; exit $rc; }; }'
PLAN_BENCH="plan1 $OUT/results/plan-bench-llama3-8b-h100.json recipes/bench-llama3-8b.yaml --target h100 --set model.name=unsloth/llama-3-8b-bnb-4bit; plan1 $OUT/results/plan-bench-llama3-8b-rtx4090.json recipes/bench-llama3-8b.yaml --target rtx4090 --set model.name=unsloth/llama-3-8b-bnb-4bit"
PLAN_ALL="for r in $PLAN_RECIPES; do plan1 $OUT/results/plan-\$(basename \$r .yaml).json \$r; done"
step plan 90 "fastft/plan.py $PLAN_RECIPES" \
  "$PLAN_ONE; plan1 $OUT/results/plan-dry.json recipes/bench-llama3-8b.yaml --target rtx4090 --set model.name=unsloth/llama-3-8b-bnb-4bit" \
  "$PLAN_ONE; $PLAN_BENCH; $PLAN_ALL" \
  "fastft plan --json: the bench recipe (h100, rtx4090) and recipes/llama3-*.yaml, to set beside the measured peaks"

{
  echo
  echo "finished $(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - START ))s; results: $(ls "$OUT/results" | grep -c '\.json$') JSON files"
} >> "$SUMMARY_MD"
echo
cat "$SUMMARY_MD"
exit $FAILED
