#!/usr/bin/env bash
# The GPU suite (DESIGN.md, "The GPU suite"), in two calls of the `run` tool, most decisive first.
#   call 1 (--budget 360): install the carried wheelhouse, env (versions by find_spec), imports (every
#     carried package), nf4 (exactness + dequant benchmark), lora (LoRA layer on both NF4 paths),
#     synthetic-8b, e2e (unsloth:unsloth vs unsloth:fastft on synthetic Llama-3-8B, same compile regime)
#   call 2 (--budget 300, if device time is left): install, env, synthetic-8b (kept from call 1 on a warm
#     machine), e2e-hf (the plain stack), e2e-rtx4090 (unsloth:fastft capped to 24 GB), plan (planner
#     vs measured), gpu-tests (pytest-xdist, a per-test timeout sized from the first compile)
# Every step has a floor (what it needs to measure anything); its limit is its share of what is left,
# in proportion to the floors; each benchmark writes every case or step to its JSON as it finishes.
#
#   bash ../shared/gpu/wheelhouse.sh .whl pytest pluggy iniconfig pytest-xdist execnet pytest-timeout  # once, here
#   bash bench/gpu.sh --dry-run            # here, on CPU (CI): call 1's plan against the floors, then
#   bash bench/gpu.sh --dry-run --call 2   # every step's CPU stand-in; fails naming a step below its floor
# On the GPU machine, with the `run` tool (carry [".whl"]):
#   call 1: command "bash bench/gpu.sh --out $OUT", timeout_s 420
#   call 2: command "bash bench/gpu.sh --call 2 --out $OUT", timeout_s 360 (on the machine still warm)
#   bash bench/gpu.sh --only e2e --budget 200     # a subset of call 1 (install always runs)
#
# What comes back under $OUT (written as each step ends, so a call cut short keeps what it measured):
#   summary.json / summary.md    the plan (step, limit, floor) and one record per step: status (ok,
#                                partial, failed, timeout, cut, missing), rc, seconds, limit, floor
#   results/*.json               result documents (FASTFT_BENCH_RESULTS points here)
#   junit-gpu.xml, logs/<step>.log
# Afterwards, on the CPU machine: copy $OUT/results/* into bench/results/, then
#   python -m bench.report --charts        # charts + README table
# and commit them. The steps, floors and the dry run: bench/suite.py (python -m bench.suite --help).
set -uo pipefail
cd "$(dirname "$0")/.."
case " $* " in
  *" -h "*|*" --help "*) sed -n '2,27p' "$0"; echo; ;;
esac
PY=${PYTHON:-python3}
case " $* " in
  *" --dry-run "*) [ -x .venv/bin/python ] && PY=.venv/bin/python ;;
esac
exec "$PY" -m bench.suite "$@"
