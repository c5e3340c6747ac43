"""The GPU suite's runner (bench/gpu.sh calls it), in two calls of the `run` tool, most decisive first.

Each call takes at most --budget seconds, every step under a limit no smaller than its floor.

    bash bench/gpu.sh --dry-run              # on CPU (CI): the plan of call 1 checked against every
    bash bench/gpu.sh --dry-run --call 2     # step's floor, then each step's CPU stand-in, all marked dry run
    python -m bench.suite plan-vs-measured DIR   # the planner's peaks beside bench.train's, from DIR's JSONs

On the GPU machine, through the `run` tool (carry [".whl"]; bash ../shared/gpu/wheelhouse.sh .whl
pytest pluggy iniconfig pytest-xdist execnet pytest-timeout builds it here first):

    call 1, timeout_s 420:  bash bench/gpu.sh --out $OUT
    call 2, timeout_s 360:  bash bench/gpu.sh --call 2 --out $OUT      (if device time is left)

Call 2 is best run while call 1's machine is still warm: the synthetic checkpoint ($FASTFT_CACHE)
and Unsloth's compiled bytecode are still there. On a fresh machine the synthetic-8b step rebuilds
the checkpoint (within its floor) and the rtx4090 run's `import unsloth` compiles its bytecode
first, 5-10 s over that run's import floor.

Call 1 (default --budget 360): install (the carried wheelhouse), env (versions by find_spec:
python -m bench.envcheck versions), imports (each carried package imported:
python -m bench.envcheck imports .whl), nf4 (exactness vs bitsandbytes + dequant benchmark, bf16,
Llama-3-8B shapes, vs bitsandbytes and Unsloth), lora (LoRA layer fwd+bwd, NF4 base on both NF4
paths, r=16, three Llama-3-8B shapes at M=4096, vs Unsloth and PEFT), synthetic-8b (the synthetic
Llama-3-8B checkpoint, once per $FASTFT_CACHE), e2e (bench.train: unsloth:unsloth vs unsloth:fastft,
both in Unsloth's compile regime; seq 2048, batch 2 x 1, 2 + 8 steps each).
Call 2 (default --budget 300): install, env, synthetic-8b (reused when call 1's machine is still
warm), e2e-hf (the plain stack, h100), e2e-rtx4090 (unsloth:fastft under a 24 GB cap), plan (fastft
plan --json, h100 and rtx4090, and the planner vs measured), gpu-tests (pytest -m gpu, pytest-xdist,
a per-test timeout sized from the first compile).

Floors: every step has one (`Step.floor`, with the reason beside it): what it needs to measure
anything (imports, loading, first compiles, its shortest useful work); an e2e step's floor is
bench.train's (import + load + get_peft_model + first-step compile + its steps, per run). The plan
gives install a fixed INSTALL_LIMIT and then each step a share of the rest (less STOP_RESERVE) in
proportion to its floor, assuming every earlier step runs to its limit. `--dry-run` prints that plan
(step, limit, floor) into summary.md / summary.json and fails, naming the step, when a limit is under
its floor, before it runs anything: a plan that cannot measure is found on CPU.

Time on the GPU: when a step starts, its limit is its share of what is really left; a step whose
limit is under its floor is not started and is recorded "cut". A step past its limit gets SIGINT
(pytest writes its report; a benchmark keeps the cases and steps it already wrote), then SIGTERM,
then SIGKILL, and is recorded "timeout"; one that exits bench.common.EXIT_CUT stayed inside its limit
by cutting cases or runs and is recorded "partial". Each benchmark writes every case (bench.train:
every optimizer step) to its JSON as it finishes.

What comes back under $OUT: summary.json (rewritten after every step), summary.md, logs/<step>.log,
results/*.json (FASTFT_BENCH_RESULTS points there), junit-gpu.xml.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import common
from bench import train as bench_train

ROOT = Path(__file__).resolve().parents[1]
# one `run` call is at most 10 minutes and the session has 15 of device time in all, machine starts
# (1-2 minutes each) included: call 1 takes 6 of them, call 2 the 5 left after a start and an idle wait
CALL_BUDGETS = {1: 360.0, 2: 300.0}
STOP_RESERVE = 20.0  # seconds kept back for stopping an overrunning step (SIGINT grace + TERM + KILL)
SIGINT_GRACE = 12.0
TERM_GRACE = 5.0
# install: pip --no-deps --no-index of the carried wheelhouse, under 64 MiB of wheels (the most one
# command may carry): pip starts in ~2 s and unzips ~200 MB into /tmp/site in 5-15 s
INSTALL_LIMIT, INSTALL_FLOOR = 25.0, 15.0
LORA_SHAPES = "4096x4096,4096x14336,14336x4096"  # q/o_proj, gate/up_proj, down_proj (K x N)
E2E_PAIR = ("unsloth:unsloth", "unsloth:fastft")  # the headline: fastft's kernels vs Unsloth's, same regime
E2E_STEPS, E2E_WARMUP = 8, 2  # the first step compiles, the second may recompile for the next shapes
HF_STEPS, HF_WARMUP = 4, 2
CAP_STEPS, CAP_WARMUP = 3, 1  # the 24 GB run measures peak memory (planner vs measured), not speed
# bench.train's --budget is its step's limit less this: the last run's SIGINT grace and the parent's
# final writes (bench.train.WORKER_GRACE_S + PARENT_END_S) happen inside the step's limit
TRAIN_STOP_S = bench_train.WORKER_GRACE_S + bench_train.PARENT_END_S
# what a kernel benchmark aims for (--time-budget): its limit less start-up and the last case's time
BENCH_TAIL_S = 15.0
# pytest-timeout per GPU test. The first test on each xdist worker compiles cold: ~10 LoRA kernel
# specializations (fused base matmul forward and dX, x·Aᵀ, dY·B, dA, dB, per dtype) at 1-1.6 s each
# for sm_90 (bench.kernels static under triton 3.6: 0.6-1.6 s per bf16 specialization) plus the NF4
# dequant autotune (6 launch configs compiled and timed), ~20-25 s alone; 8 workers compiling at
# once on 16 cores take up to twice that. 90 s stops a hung test without failing a cold one.
PER_TEST_TIMEOUT = 90
BUDGET_MIN = 30.0


@dataclass
class Step:
    name: str
    floor: float  # seconds it needs to measure anything; its share of a call is in proportion to it
    why: str  # what the floor is made of
    what: str
    cmd: str  # the real command (bash -c); {budget}, {train_budget}, {per_test} are filled at start
    dry: str  # --dry-run's CPU stand-in
    dry_s: float  # the stand-in's limit on the CPU machine (2 shared cores)


def e2e_step(name: str, py: str, target: str, runs: tuple[str, ...], steps: int, warmup: int, what: str) -> Step:
    """A bench.train step; its floor is bench.train's own for these runs, plus its stopping time."""
    pairs = [tuple((r + ":auto").split(":")[:2]) for r in runs]
    need = bench_train.invocation_floor([target], pairs, warmup + steps)
    args = (f"{py} -m bench.train recipes/bench-llama3-8b.yaml --target {target} "
            + " ".join(f"--run {r}" for r in runs)
            + f" --steps {steps} --warmup {warmup} --set train.grad_accum=1 --budget {{train_budget}}")
    why = f"bench.train: {bench_train.invocation_floor_explained([target], pairs, warmup + steps)}"
    return Step(name, need + TRAIN_STOP_S, f"{why} + stopping {TRAIN_STOP_S:.0f}", what, args + " --no-chart",
                args + " --dry-run", 120)


def steps(py: str, out: Path, cpus: int, call: int = 1) -> list[Step]:
    res = out / "results"
    q = shlex.quote
    jobs = max(1, cpus - 1)
    env = Step("env", 5, "nvidia-smi and package metadata; nothing imported", "GPU, driver and versions "
               "(python -m bench.envcheck versions: find_spec, no imports)",
               f"nvidia-smi; {py} -m bench.envcheck versions", f"{py} -m bench.envcheck versions", 30)
    imports = Step("imports", 30, "`import unsloth` cold, its bytecode compiled on first import (pip --no-compile): "
                   "15-25 s; the other packages import beside it", "every carried package imports "
                   "(python -m bench.envcheck imports .whl)",
                   f"{py} -m bench.envcheck imports .whl --budget {{budget}} --jobs {jobs}",
                   f"{py} -m bench.envcheck imports .whl --dry-run --budget {{budget}}", 150)
    nf4 = Step("nf4", 30, "torch, bitsandbytes and unsloth imported (~15 s), then per shape the autotune of 6 "
               "launch configs (~1 s each, once) and the timings", "NF4 exactness vs bitsandbytes + dequant "
               "benchmark, bf16, Llama-3-8B shapes, vs bitsandbytes and Unsloth (python -m bench.kernels nf4)",
               f"{py} -m bench.kernels nf4 --dtypes bf16 --no-torch --time-budget {{budget}}",
               f"{py} -m bench.kernels nf4 --cpu-smoke --dtypes bf16 --shapes 64x128 --no-torch "
               f"--time-budget {{budget}} --out {q(str(res))}", 90)
    lora = Step("lora", 40, "unsloth and peft imported (~15 s), the first shape's compiles on both NF4 paths "
                "(~16 specializations at 1-1.6 s), then ~1 s per shape", "LoRA layer fwd+bwd, NF4 base on both "
                "NF4 paths (in_kernel and dequantize), r=16, M=4096, q/o, gate/up, down shapes, vs Unsloth and "
                "PEFT (python -m bench.kernels lora)",
                f"{py} -m bench.kernels lora --bases nf4 --ranks 16 --tokens 4096 --shapes {LORA_SHAPES} "
                f"--time-budget {{budget}}",
                f"{py} -m bench.kernels lora --cpu-smoke --bases nf4 --shapes 64x96 --time-budget {{budget}} "
                f"--out {q(str(res))}", 120)
    synthetic = Step("synthetic-8b", 40, "291 tensors drawn and quantized on the GPU, 5.7 GB to the host, three "
                     "~2 GB shards written: 15-30 s (none when $FASTFT_CACHE has it)",
                     "the synthetic Llama-3-8B NF4 checkpoint (once per FASTFT_CACHE; written to a temporary "
                     "folder and renamed, so a later step's cut keeps it)",
                     f"{py} -c 'import time; from fastft.models import named; t = time.time(); "
                     f"print(named.resolve(\"synthetic:llama-3-8b\"), round(time.time() - t, 1), \"s\")'",
                     f"{py} -c 'from fastft.models import named; print(named.resolve, named.synthetic_names())'", 60)
    if call == 1:
        pair = e2e_step("e2e", py, "h100", E2E_PAIR, E2E_STEPS, E2E_WARMUP,
                        f"Llama-3-8B synthetic QLoRA, seq 2048, batch 2 x 1, r=16 all-linear, {E2E_WARMUP}+"
                        f"{E2E_STEPS} steps: {' vs '.join(E2E_PAIR)} (python -m bench.train, h100)")
        return [env, imports, nf4, lora, synthetic, pair]
    hf = e2e_step("e2e-hf", py, "h100", ("hf",), HF_STEPS, HF_WARMUP,
                  f"the plain stack (transformers + PEFT + TRL), same model and shapes, {HF_WARMUP}+{HF_STEPS} steps")
    capped = e2e_step("e2e-rtx4090", py, "rtx4090", ("unsloth:fastft",), CAP_STEPS, CAP_WARMUP,
                      f"unsloth:fastft with CUDA memory capped to 24 GB (rtx4090), {CAP_WARMUP}+{CAP_STEPS} steps: "
                      "does it fit, and its peak")
    plan_bench = (f"{py} -m fastft plan recipes/bench-llama3-8b.yaml --target {{t}} "
                  f"--set model.name=unsloth/llama-3-8b-bnb-4bit --json > {q(str(res))}/plan-bench-llama3-8b-{{t}}.json")
    plan_one = plan_bench + "; [ $? -le 1 ] || exit 2"  # fastft plan: 0 fits, 1 does not fit, 2 an error
    # the two targets side by side: each `fastft plan` is ~8 s of one core (10 s wall on the CPU machine)
    both = ("(" + plan_one.format(t="h100") + ") & a=$!; (" + plan_one.format(t="rtx4090") + ") & b=$!; "
            "wait $a; ra=$?; wait $b; rb=$?; [ $ra -eq 0 ] && [ $rb -eq 0 ] || exit 2")
    plan = Step("plan", 20, "two `fastft plan` processes side by side (~8 s of one core each; no model is loaded), "
                "then the comparison (imports torch for the result's device record, ~5 s): 25 s on the CPU machine",
                "fastft plan --json (bench recipe, h100 and rtx4090) and the planner vs measured",
                f"{both}; {py} -m bench.suite plan-vs-measured {q(str(res))}",
                f"{plan_one.format(t='rtx4090')}; {py} -m bench.suite plan-vs-measured {q(str(res))}", 60)
    # only the files that hold GPU tests: collecting the whole suite costs more than they take
    tests = (f"files=$(grep -lE 'pytest\\.mark\\.gpu' tests/test_*.py); {py} -m pytest -m gpu -p no:cacheprovider "
             f"-q -rA ${{files:-tests}}")
    gpu_tests = Step("gpu-tests", 52, "xdist workers start (torch + triton, ~10 s), then each one's first test "
                     "compiles cold (~20-25 s alone, up to ~40 s with 8 compiling at once; see PER_TEST_TIMEOUT)",
                     "every GPU test (pytest -m gpu, "
                     f"pytest-xdist, {PER_TEST_TIMEOUT} s per test with SIGALRM; SIGINT at the step limit so the "
                     "report is written)",
                     f"{tests} -n {min(8, jobs)} --timeout {{per_test}} --timeout-method signal "
                     f"--junitxml={q(str(out / 'junit-gpu.xml'))}",
                     f"{tests} --collect-only -n 0 --timeout {{per_test}} --timeout-method signal", 120)
    return [env, synthetic, hf, capped, plan, gpu_tests]


# -- the budget ------------------------------------------------------------------------------------

def step_limit(left: float, weight: float, weights_after: float) -> float:
    """A starting step's limit: what is left (less the stop reserve) times its share of the weights
    still to run (this step's and the later ones'); a step's weight is its floor."""
    return bench_train.share_of(max(0.0, left - STOP_RESERVE), [weight, weights_after])


def start_or_cut(left: float, step: Step, after: list[Step]) -> tuple[float, str | None]:
    """At run time: the step's limit from what is really left, and why it is not started (its limit
    is under its floor), or None."""
    limit = step_limit(left, step.floor, sum(t.floor for t in after))
    if limit < step.floor:
        return limit, (f"not started: its share of the {left:.0f} s left is {limit:.0f} s, under its floor "
                       f"{step.floor:.0f} s: {step.why}")
    return limit, None


def plan_call(todo: list[Step], budget: float) -> list[dict]:
    """The call's plan: install's fixed limit, then each step's limit when every step before it runs
    to its own (the least a step can be given), beside its floor."""
    rows = [{"step": "install", "limit_s": round(min(INSTALL_LIMIT, budget), 1), "floor_s": INSTALL_FLOOR,
             "why": "pip --no-deps --no-index of the carried wheels into /tmp/site"}]
    left = budget - min(INSTALL_LIMIT, budget)
    for i, s in enumerate(todo):
        limit = step_limit(left, s.floor, sum(t.floor for t in todo[i + 1:]))
        rows.append({"step": s.name, "limit_s": round(limit, 1), "floor_s": round(s.floor, 1), "why": s.why})
        left -= limit
    for r in rows:
        r["plan"] = "ok" if r["limit_s"] >= r["floor_s"] else "BELOW FLOOR"
    return rows


def run_step(cmd: str, limit: float, log: Path, env: dict) -> tuple[int | None, bool]:
    """Run cmd in its own process group; past `limit` send SIGINT, then TERM, then KILL.
    Returns (exit code or None, whether it was stopped)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(["bash", "-c", cmd], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=limit), False
        except subprocess.TimeoutExpired:
            pass
        for sig, grace in ((signal.SIGINT, SIGINT_GRACE), (signal.SIGTERM, TERM_GRACE), (signal.SIGKILL, 5.0)):
            f.write(f"\nbench.suite: limit {limit:.0f} s reached: sending {sig.name}\n")
            f.flush()
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        return proc.poll(), True


def step_status(rc: int | None, stopped: bool, cmd: str) -> str:
    if stopped:
        return "timeout"
    if rc == 0:
        return "ok"
    if rc == common.EXIT_CUT:
        return "partial"
    return "none" if rc == 5 and "pytest" in cmd else "failed"


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def plan_table(plan: list[dict], steps_done: list[dict], budget: float, call: int, dry: bool) -> list[str]:
    """The per-step plan beside what each step did: step, limit, floor, status, seconds."""
    done = {s["step"]: s for s in steps_done}
    lines = [f"plan of call {call}, budget {budget:.0f} s (install {INSTALL_LIMIT:.0f} s, then shares in proportion "
             f"to the floors, {STOP_RESERVE:.0f} s kept for stopping; each limit assumes the steps before it used "
             "all of theirs)", "",
             "| step | limit s | floor s | plan | status | seconds |" + (" CPU stand-in limit s |" if dry else ""),
             "| --- | --- | --- | --- | --- | --- |" + (" --- |" if dry else "")]
    for r in plan:
        s = done.get(r["step"], {})
        secs = f"{s['seconds']:.0f}" if "seconds" in s else "-"
        lines.append(f"| {r['step']} | {r['limit_s']:.0f} | {r['floor_s']:.0f} | {r['plan']} | {s.get('status', '-')} | "
                     f"{secs} |" + (f" {s['limit_s']:.0f} |" if dry and "limit_s" in s else " - |" if dry else ""))
    return lines


def summary_md(doc: dict) -> str:
    lines = [f"# fastft GPU suite, call {doc['call']}"
             f"{' (DRY RUN on CPU: nothing here is a measurement)' if doc['dry_run'] else ''}",
             "", (f"started {doc['started_utc']}, git {doc['git_sha']}, budget {doc['budget_s']:.0f} s, "
                  f"elapsed {doc['elapsed_s']:.0f} s"), ""]
    lines += plan_table(doc["plan"], doc["steps"], doc["budget_s"], doc["call"], doc["dry_run"])
    limit = "limit (CPU stand-in)" if doc["dry_run"] else "limit"
    lines += ["", f"| step | status | rc | seconds | {limit} | floor | what |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in doc["steps"]:
        lines.append(f"| {s['step']} | {s['status']} | {s['rc']} | {s['seconds']:.0f} | {s['limit_s']:.0f} | "
                     f"{s['floor_s']:.0f} | {s['what']} |")
    lines += ["", "floors:"] + [f"- {r['step']}: {r['why']}" for r in doc["plan"]]
    results = doc.get("results") or []
    lines += ["", f"results: {len(results)} JSON files" + (": " + ", ".join(results) if results else "")]
    return "\n".join(lines) + "\n"


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def run_suite(args) -> int:
    t_start = time.monotonic()
    out = Path(args.out or os.environ.get("OUT") or (tempfile.mkdtemp(prefix="fastft-gpu-dry.") if args.dry_run
                                                      else ROOT / "gpu-out"))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "results").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, FASTFT_BENCH_RESULTS=str(out / "results"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.setdefault("FASTFT_CACHE", "/tmp/fastft-cache")
    py = args.python or sys.executable
    every = steps(py, out, os.cpu_count() or 2, args.call)
    only = set(args.only.split(",")) if args.only else None
    if only and only - {s.name for s in every}:
        print(f"bench.suite: unknown step(s) {sorted(only - {s.name for s in every})} in call {args.call}; its "
              f"steps: {', '.join(s.name for s in every)} (call {3 - args.call}: "
              f"{', '.join(s.name for s in steps(py, out, 2, 3 - args.call))})", file=sys.stderr)
        return 2
    todo = [s for s in every if not only or s.name in only]
    plan = plan_call(todo, args.budget)
    doc = {"schema_version": 2, "kind": "gpu-suite", "call": args.call, "dry_run": args.dry_run,
           "budget_s": args.budget, "git_sha": git_sha(), "command": shlex.join(["bash", "bench/gpu.sh", *args.argv]),
           "started_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "elapsed_s": 0.0, "plan": plan, "steps": [], "complete": False}
    if args.dry_run:
        doc["notes"] = [("dry run on CPU: the plan is the GPU call's; every step then runs its CPU stand-in "
                         "(tiny shapes, the Triton interpreter, --dry-run checks); timings and results are harness "
                         "checks, not measurements")]

    def save():
        doc["elapsed_s"] = round(time.monotonic() - t_start, 1)
        doc["results"] = sorted(os.path.basename(p) for p in glob.glob(str(out / "results" / "*.json")))
        write_atomic(out / "summary.json", json.dumps(doc, indent=1) + "\n")
        write_atomic(out / "summary.md", summary_md(doc))

    floors = {r["step"]: r["floor_s"] for r in plan}

    def record(name, status, rc, seconds, limit, what, **extra):
        doc["steps"].append(dict(step=name, status=status, rc=rc, seconds=round(seconds, 1), limit_s=round(limit, 1),
                                 floor_s=floors.get(name, 0.0), what=what, log=f"logs/{name}.log",
                                 dry_run=args.dry_run, elapsed_s=round(time.monotonic() - t_start, 1), **extra))
        save()
        print(f"bench/gpu.sh: {name}: {status} (rc {rc}, {seconds:.0f} s of {limit:.0f} s)", flush=True)

    print("\n".join(plan_table(plan, [], args.budget, args.call, False)), flush=True)
    below = [r for r in plan if r["plan"] != "ok"]
    if below:
        save()
        for r in below:
            print(f"bench.suite: call {args.call}, step {r['step']}: its planned limit {r['limit_s']:.0f} s of the "
                  f"{args.budget:.0f} s budget is below its floor {r['floor_s']:.0f} s ({r['why']}): raise --budget, "
                  "drop steps with --only, or shorten the step", file=sys.stderr)
        return 1

    # -- install: the carried wheelhouse (a fixed slot before the shares: it is what the rest needs)
    whl = sorted(glob.glob(str(ROOT / ".whl" / "*.whl")))
    missing = ("no .whl/ carried: bash ../shared/gpu/wheelhouse.sh .whl pytest pluggy iniconfig pytest-xdist "
               "execnet pytest-timeout, then carry .whl")
    if args.dry_run:
        record("install", "ok" if whl else "missing", None, 0, 0,
               f"dry run: .whl/ holds {len(whl)} wheels; carry .whl" if whl else missing)
    elif whl:
        site = "/tmp/site"
        cmd = (f"{py} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target {site} "
               + " ".join(shlex.quote(w) for w in whl))
        limit = min(INSTALL_LIMIT, max(10.0, args.budget - (time.monotonic() - t_start) - STOP_RESERVE))
        t0 = time.monotonic()
        rc, stopped = run_step(cmd, limit, out / "logs" / "install.log", env)
        record("install", "timeout" if stopped else ("ok" if rc == 0 else "failed"), rc, time.monotonic() - t0, limit,
               "install the carried wheelhouse (.whl) into /tmp/site")
        env["PYTHONPATH"] = os.pathsep.join([site, str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    else:
        record("install", "missing", None, 0, 0, missing)
    if not args.dry_run and subprocess.run([py, "-c", "import fastft.kernels"], env=env, cwd=ROOT,
                                           capture_output=True, check=False).returncode != 0:
        # fastft.kernels is kernels/ (a package-dir mapping): an editable install gives it; a link is the fallback
        r = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."],
                           cwd=ROOT, env=env, capture_output=True, check=False)
        if r.returncode != 0 and not (ROOT / "fastft" / "kernels").exists():
            (ROOT / "fastft" / "kernels").symlink_to("../kernels")

    planned = {r["step"]: r["limit_s"] for r in plan}
    failed = False
    for i, s in enumerate(todo):
        if args.dry_run:
            # the stand-in's own CPU limit; what it checks against (bench.train's --budget) is the plan's
            limit, sized = s.dry_s, planned[s.name]
        else:
            left = args.budget - (time.monotonic() - t_start)
            limit, why_cut = start_or_cut(left, s, todo[i + 1:])
            sized = limit
            if why_cut:
                record(s.name, "cut", None, 0, limit, f"{s.what} ({why_cut})")
                continue
        cmd = s.dry if args.dry_run else s.cmd
        fill = {"budget": f"{max(5.0, limit - BENCH_TAIL_S):.0f}", "train_budget": f"{sized - TRAIN_STOP_S:.0f}",
                "per_test": f"{PER_TEST_TIMEOUT}"}
        for k, v in fill.items():
            cmd = cmd.replace("{" + k + "}", v)
        print(f"bench/gpu.sh: {s.name} (limit {limit:.0f} s, floor {s.floor:.0f} s): {cmd}", flush=True)
        t0 = time.monotonic()
        rc, stopped = run_step(cmd, limit, out / "logs" / f"{s.name}.log", env)
        status = step_status(rc, stopped, cmd)
        failed |= status in ("failed", "timeout")
        record(s.name, status, rc, time.monotonic() - t0, limit, s.what)
        if status != "ok":
            tail = (out / "logs" / f"{s.name}.log").read_text(errors="replace").splitlines()[-12:]
            print("\n".join("    " + line for line in tail))
    doc["complete"] = True
    save()
    print()
    print(summary_md(doc))
    return 1 if failed else 0


# -- the planner vs measured ----------------------------------------------------------------------------

def plan_vs_measured(folder: Path) -> int:
    """Set each plan-*.json's predicted peak beside the peaks bench.train measured for the same target."""
    rows = []
    plans = {}
    for p in sorted(folder.glob("plan-bench-llama3-8b-*.json")):
        try:
            plans[p.stem.rsplit("-", 1)[-1]] = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"bench.suite: {p.name}: not a plan ({e})", file=sys.stderr)
    for p in sorted(folder.glob("train-bench-llama3-8b-*.json")):
        doc = json.loads(p.read_text())
        plan = plans.get(doc.get("target"))
        for run in doc.get("metrics", {}).get("runs", []):
            m = run.get("metrics") or {}
            row = {"result": p.name, "target": doc.get("target"), "backend": run.get("backend"),
                   "kernels": run.get("kernels"), "status": run.get("status"),
                   "measured_reserved_gb": m.get("peak_vram_reserved_gb"),
                   "measured_allocated_gb": m.get("peak_vram_allocated_gb")}
            if plan:
                row["planned_gb"] = round(plan["total_bytes"] / 1e9, 2)
                row["planned_backend"] = plan.get("backend")
                if row["measured_reserved_gb"]:
                    row["planned_over_measured"] = round(row["planned_gb"] / row["measured_reserved_gb"], 3)
            rows.append(row)
    if not plans and not rows:
        print(f"bench.suite: plan-vs-measured: no plan-bench-llama3-8b-*.json or train-bench-llama3-8b-*.json in "
              f"{folder}", file=sys.stderr)
        return 1
    doc = common.result(kind="plan", name="plan-vs-measured", target=",".join(sorted(plans)) or "none",
                        config={"folder": str(folder), "plans": sorted(plans)}, metrics={"rows": rows},
                        notes=[] if rows else ["no bench.train result in the folder: planned peaks only"])
    doc["metrics"]["planned_gb"] = {t: round(p["total_bytes"] / 1e9, 2) for t, p in plans.items()}
    path = common.write(doc, folder)
    for r in rows:
        print(f"  {r['target']} {r['backend']}:{r['kernels']}: planned {r.get('planned_gb')} GB, measured "
              f"reserved {r['measured_reserved_gb']} GB ({r['status']})")
    print(f"bench.suite: planned {doc['metrics']['planned_gb']}; wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan-vs-measured"]:
        if len(argv) != 2:
            print("usage: python -m bench.suite plan-vs-measured DIR", file=sys.stderr)
            return 2
        return plan_vs_measured(Path(argv[1]))
    p = argparse.ArgumentParser(prog="bash bench/gpu.sh", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--dry-run", action="store_true", help="CPU rehearsal: the call's plan checked against every "
                                                          "step's floor, then each step's CPU stand-in")
    p.add_argument("--call", type=int, choices=sorted(CALL_BUDGETS), default=1,
                   help="which GPU call: 1 (install, env, imports, nf4, lora, synthetic-8b, e2e pair; default) or 2 "
                        "(install, env, synthetic-8b, e2e-hf, e2e-rtx4090, plan, gpu-tests)")
    p.add_argument("--budget", type=float, help="seconds for the whole call (default "
                   + ", ".join(f"{b:.0f} for call {c}" for c, b in CALL_BUDGETS.items())
                   + "); with --dry-run, the GPU budget the plan is checked against")
    p.add_argument("--only", help="comma-separated steps of the call to run (install always runs)")
    p.add_argument("--out", help="output folder (default $OUT; gpu-out/, or a temporary folder with --dry-run)")
    p.add_argument("--python", help="interpreter for the steps (default this one)")
    args = p.parse_args(argv)
    args.argv = argv
    if args.budget is None:
        args.budget = CALL_BUDGETS[args.call]
    if args.budget < BUDGET_MIN:
        p.error(f"--budget {args.budget:g} is too small to start anything (at least {BUDGET_MIN:.0f} s)")
    return run_suite(args)


if __name__ == "__main__":
    sys.exit(main())
