#!/usr/bin/env bash
# The GPU suite (DESIGN.md, "The GPU suite"): one call of at most 6 minutes on the GPU machine that
# returns, most decisive first: the triton compile of every shipped kernel config, NF4 exactness +
# dequant benchmark, LoRA layer benchmark, the synthetic Llama-3-8B end-to-end comparison, the
# planner vs measured, then the GPU tests (pytest-xdist, per-test timeout, SIGINT at the limit).
# Each step's time limit is derived from what is left; each benchmark writes every case as it ends.
#
#   bash ../shared/gpu/wheelhouse.sh .whl pytest pluggy iniconfig pytest-xdist execnet pytest-timeout  # once, here
#   bash bench/gpu.sh --dry-run      # here, on CPU: every step's CPU stand-in, marked dry run (CI runs it)
#   bash bench/gpu.sh                # on the GPU machine ($OUT set by the `run` tool; carry .whl)
#   bash bench/gpu.sh --only e2e,plan --budget 300   # a subset (install always runs)
#
# What comes back under $OUT (written as each step ends, so a run cut short keeps what it measured):
#   summary.json / summary.md    one record per step: status (ok, failed, timeout, cut, missing), rc, seconds, limit
#   results/*.json               result documents (FASTFT_BENCH_RESULTS points here)
#   junit-gpu.xml, logs/<step>.log
# Afterwards, on the CPU machine: copy $OUT/results/* into bench/results/, then
#   python -m bench.report --charts        # charts + README table
# and commit them. The steps, their budgets and the dry run: bench/suite.py (python -m bench.suite --help).
set -uo pipefail
cd "$(dirname "$0")/.."
case " $* " in
  *" -h "*|*" --help "*) sed -n '2,20p' "$0"; echo; ;;
esac
PY=${PYTHON:-python3}
case " $* " in
  *" --dry-run "*) [ -x .venv/bin/python ] && PY=.venv/bin/python ;;
esac
exec "$PY" -m bench.suite "$@"
