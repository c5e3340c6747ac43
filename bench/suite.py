"""The GPU suite's runner (bench/gpu.sh calls it): every step in one call of at most --budget seconds
(default 360), most decisive first, each under a time budget derived from what is left.

    bash bench/gpu.sh                 # on the GPU machine ($OUT set by the `run` tool; carry .whl)
    bash bench/gpu.sh --dry-run       # on CPU (CI): the same steps with tiny shapes / the interpreter /
                                      # checks, every record and result marked dry run
    bash bench/gpu.sh --only nf4,lora # a subset (install always runs)
    python -m bench.suite plan-vs-measured DIR   # the planner's peaks beside bench.train's, from DIR's JSONs

Steps, in order: install (the carried wheelhouse .whl), env, compile (every shipped kernel config
with the machine's triton, 3.6 on the GPU machine: python -m bench.kernels static --check), nf4
(exactness vs bitsandbytes + dequant benchmark, bf16, Llama-3-8B shapes, vs bitsandbytes and
Unsloth), lora (LoRA layer fwd+bwd, NF4 base, r=16, three Llama-3-8B shapes at M=4096, vs Unsloth
and PEFT), synthetic-8b (the synthetic Llama-3-8B checkpoint, once per $FASTFT_CACHE), e2e
(bench.train: unsloth, unsloth+fastft, hf; seq 2048, batch 2 x 1, 20 steps each), plan (fastft plan --json and
the planner vs measured), gpu-tests (pytest -m gpu with pytest-xdist and a per-test timeout).

Time: when a step starts, its limit is what is left of the budget (less a reserve for stopping the
last step) times its weight over the weights of the steps still to run; a step whose limit is below
its minimum is not started and is recorded "cut". A step past its limit gets SIGINT (pytest writes
its report; a benchmark keeps the cases it already wrote), then SIGTERM, then SIGKILL, and is
recorded "timeout". Each benchmark writes every case to its JSON as it finishes.

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

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET = 360.0
# --dry-run's default: the same shares and cuts, over a total that fits the CPU stand-ins on 2 shared
# cores (interpreter kernels, whole-package imports), which take longer than the GPU's steps
DRY_BUDGET = 600.0
STOP_RESERVE = 20.0  # seconds kept back for stopping an overrunning step (SIGINT grace + TERM + KILL)
SIGINT_GRACE = 12.0
TERM_GRACE = 5.0
LORA_SHAPES = "4096x4096,4096x14336,14336x4096"  # q/o_proj, gate/up_proj, down_proj (K x N)
E2E_RUNS = ("unsloth:unsloth", "unsloth:fastft", "hf")  # the kernels comparison first, then the baseline
E2E_STEPS, E2E_WARMUP = 17, 3


@dataclass
class Step:
    name: str
    weight: float  # share of what is left when the step starts
    minimum: float  # below this limit the step is not started ("cut")
    what: str
    cmd: str  # the real command (bash -c); {limit} is replaced by the step's limit in seconds
    dry: str  # --dry-run's command


def steps(py: str, out: Path, cpus: int) -> list[Step]:
    res = out / "results"
    q = shlex.quote
    jobs = max(1, cpus - 1)
    e2e = " ".join(f"--run {r}" for r in E2E_RUNS)
    plan_bench = (f"{py} -m fastft plan recipes/bench-llama3-8b.yaml --target {{t}} "
                  f"--set model.name=unsloth/llama-3-8b-bnb-4bit --json > {q(str(res))}/plan-bench-llama3-8b-{{t}}.json")
    plan_one = plan_bench + "; [ $? -le 1 ] || exit 2"  # fastft plan: 0 fits, 1 does not fit, 2 an error
    plan = "; ".join(plan_one.format(t=t) for t in ("h100", "rtx4090"))
    # only the files that hold GPU tests: collecting the whole suite costs more than they take
    tests = (f"files=$(grep -l '@pytest.mark.gpu' tests/test_*.py); {py} -m pytest -m gpu -p no:cacheprovider "
             f"-q -rA ${{files:-tests}}")
    return [
        Step("env", 12, 3, "GPU, driver and versions",
             f"nvidia-smi; {py} -m fastft info", f"{py} -m fastft info"),
        Step("compile", 45, 20, "every shipped kernel config compiled with this machine's triton for "
             "sm_80/89/90 (python -m bench.kernels static --check)",
             f"{py} -m bench.kernels static --check --jobs {jobs} --timeout 120 --name gpu-machine --out {q(str(res))}",
             # dry: the side triton 3.6 when present (what the GPU machine has), one NF4 config, sm_90
             f"PYTHONPATH={q(str(ROOT / '.venv' / 'triton36'))}${{PYTHONPATH:+:$PYTHONPATH}} {py} -m bench.kernels "
             f"static --check --modules fastft.kernels.nf4 --first 1 --caps 90 --jobs 1 --name dry-run "
             f"--out {q(str(res))}"),
        Step("nf4", 40, 15, "NF4 exactness vs bitsandbytes + dequant benchmark, bf16, Llama-3-8B shapes, "
             "vs bitsandbytes and Unsloth (python -m bench.kernels nf4)",
             f"{py} -m bench.kernels nf4 --dtypes bf16 --no-torch --time-budget {{budget}}",
             f"{py} -m bench.kernels nf4 --cpu-smoke --dtypes bf16 --shapes 64x128 --no-torch --time-budget {{budget}} "
             f"--out {q(str(res))}"),
        Step("lora", 60, 20, "LoRA layer fwd+bwd, NF4 base, r=16, M=4096, q/o, gate/up, down shapes, vs "
             "Unsloth and PEFT (python -m bench.kernels lora)",
             f"{py} -m bench.kernels lora --bases nf4 --ranks 16 --tokens 4096 --shapes {LORA_SHAPES} "
             f"--time-budget {{budget}}",
             f"{py} -m bench.kernels lora --cpu-smoke --bases nf4 --shapes 64x96 --time-budget {{budget}} "
             f"--out {q(str(res))}"),
        Step("synthetic-8b", 30, 15, "the synthetic Llama-3-8B NF4 checkpoint (once per FASTFT_CACHE)",
             f"{py} -c 'import time; from fastft import models; t = time.time(); "
             f"print(models.resolve(\"synthetic:llama-3-8b\"), round(time.time() - t, 1), \"s\")'",
             f"{py} -c 'from fastft import models; print(models.resolve, models.synthetic_names())'"),
        # batch 2 x grad accum 1 (4,096 tokens a step, not the recipe's 4): three runs of 20 steps must fit
        # beside everything else in the 6 minutes
        Step("e2e", 130, 45, f"Llama-3-8B synthetic QLoRA, seq 2048, batch 2 x 1, r=16 all-linear, "
             f"{E2E_WARMUP}+{E2E_STEPS} steps: {', '.join(E2E_RUNS)} (python -m bench.train, h100 cap)",
             f"{py} -m bench.train recipes/bench-llama3-8b.yaml --target h100 {e2e} --steps {E2E_STEPS} "
             f"--warmup {E2E_WARMUP} --set train.grad_accum=1 --timeout {{per_run}} --no-chart",
             f"{py} -m bench.train recipes/bench-llama3-8b.yaml --target h100 {e2e} --steps {E2E_STEPS} "
             f"--warmup {E2E_WARMUP} --set train.grad_accum=1 --dry-run"),
        Step("plan", 12, 8, "fastft plan --json (bench recipe, h100 and rtx4090) and the planner vs measured",
             f"{plan}; {py} -m bench.suite plan-vs-measured {q(str(res))}",
             f"{plan_one.format(t='rtx4090')}; {py} -m bench.suite plan-vs-measured {q(str(res))}"),
        Step("gpu-tests", 45, 15, "every GPU test (pytest -m gpu, pytest-xdist, per-test timeout with SIGALRM; "
             "SIGINT at the step limit so the report is written)",
             f"{tests} -n {min(8, jobs)} --timeout {{per_test}} --timeout-method signal "
             f"--junitxml={q(str(out / 'junit-gpu.xml'))}",
             f"{tests} --collect-only -n 0 --timeout {{per_test}} --timeout-method signal"),
    ]


# -- the budget ------------------------------------------------------------------------------------

def step_limit(left: float, weight: float, weights_after: float) -> float:
    """A starting step's limit: what is left (less the stop reserve) times its share of the weights
    still to run (this step's and the later ones')."""
    usable = max(0.0, left - STOP_RESERVE)
    return usable * weight / (weight + weights_after)


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


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def summary_md(doc: dict) -> str:
    lines = [f"# fastft GPU suite{' (DRY RUN on CPU: nothing here is a measurement)' if doc['dry_run'] else ''}",
             "", (f"started {doc['started_utc']}, git {doc['git_sha']}, budget {doc['budget_s']:.0f} s, "
                  f"elapsed {doc['elapsed_s']:.0f} s"), "",
             "| step | status | rc | seconds | limit | what |", "| --- | --- | --- | --- | --- | --- |"]
    for s in doc["steps"]:
        lines.append(f"| {s['step']} | {s['status']} | {s['rc']} | {s['seconds']:.0f} | {s['limit_s']:.0f} | "
                     f"{s['what']} |")
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
    doc = {"schema_version": 1, "kind": "gpu-suite", "dry_run": args.dry_run, "budget_s": args.budget,
           "git_sha": git_sha(), "command": shlex.join(["bash", "bench/gpu.sh", *args.argv]),
           "started_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "elapsed_s": 0.0, "steps": [], "complete": False}
    if args.dry_run:
        doc["notes"] = [("dry run on CPU: every step runs its CPU stand-in (tiny shapes, the Triton interpreter, "
                         "--dry-run checks); timings and results are harness checks, not measurements")]
    stub = os.environ.get("FASTFT_SUITE_STUB_SLEEP")  # tests: every step sleeps this long (dry run only)
    if stub and not args.dry_run:
        print("bench.suite: FASTFT_SUITE_STUB_SLEEP is for --dry-run only", file=sys.stderr)
        return 2

    def save():
        doc["elapsed_s"] = round(time.monotonic() - t_start, 1)
        doc["results"] = sorted(os.path.basename(p) for p in glob.glob(str(out / "results" / "*.json")))
        write_atomic(out / "summary.json", json.dumps(doc, indent=1) + "\n")
        write_atomic(out / "summary.md", summary_md(doc))

    def record(name, status, rc, seconds, limit, what, **extra):
        doc["steps"].append(dict(step=name, status=status, rc=rc, seconds=round(seconds, 1), limit_s=round(limit, 1),
                                 what=what, log=f"logs/{name}.log", dry_run=args.dry_run,
                                 elapsed_s=round(time.monotonic() - t_start, 1), **extra))
        save()
        print(f"bench/gpu.sh: {name}: {status} (rc {rc}, {seconds:.0f} s of {limit:.0f} s)", flush=True)

    # -- install: the carried wheelhouse (not part of the step shares: it is what the rest needs)
    whl = sorted(glob.glob(str(ROOT / ".whl" / "*.whl")))
    if args.dry_run:
        record("install", "ok" if whl else "missing", None, 0, 0,
               f"dry run: .whl/ holds {len(whl)} wheels; carry .whl" if whl else
               "no .whl/: bash ../shared/gpu/wheelhouse.sh .whl pytest pluggy iniconfig pytest-xdist execnet "
               "pytest-timeout")
    elif whl:
        site = "/tmp/site"
        cmd = (f"{py} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target {site} "
               + " ".join(shlex.quote(w) for w in whl))
        limit = min(120.0, max(10.0, args.budget - (time.monotonic() - t_start) - STOP_RESERVE))
        t0 = time.monotonic()
        rc, stopped = run_step(cmd, limit, out / "logs" / "install.log", env)
        record("install", "timeout" if stopped else ("ok" if rc == 0 else "failed"), rc, time.monotonic() - t0, limit,
               "install the carried wheelhouse (.whl) into /tmp/site")
        env["PYTHONPATH"] = os.pathsep.join([site, str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    else:
        record("install", "missing", None, 0, 0, "no .whl/ carried: bash ../shared/gpu/wheelhouse.sh .whl pytest "
               "pluggy iniconfig pytest-xdist execnet pytest-timeout")
    if not args.dry_run and subprocess.run([py, "-c", "import fastft.kernels"], env=env, cwd=ROOT,
                                           capture_output=True, check=False).returncode != 0:
        # fastft.kernels is kernels/ (a package-dir mapping): an editable install gives it; a link is the fallback
        r = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."],
                           cwd=ROOT, env=env, capture_output=True, check=False)
        if r.returncode != 0 and not (ROOT / "fastft" / "kernels").exists():
            (ROOT / "fastft" / "kernels").symlink_to("../kernels")

    plan = steps(py, out, os.cpu_count() or 2)
    only = set(args.only.split(",")) if args.only else None
    if only and only - {s.name for s in plan}:
        print(f"bench.suite: unknown step(s) {sorted(only - {s.name for s in plan})}; "
              f"steps: {', '.join(s.name for s in plan)}", file=sys.stderr)
        return 2
    todo = [s for s in plan if not only or s.name in only]
    failed = False
    for i, s in enumerate(todo):
        left = args.budget - (time.monotonic() - t_start)
        limit = step_limit(left, s.weight, sum(t.weight for t in todo[i + 1:]))
        if limit < s.minimum:
            record(s.name, "cut", None, 0, limit, f"{s.what} (not started: its share of the {left:.0f} s left is "
                   f"{limit:.0f} s, under its minimum {s.minimum:.0f} s)")
            continue
        cmd = s.dry if args.dry_run else s.cmd
        # what the step's own program should aim for: its limit less start-up and stopping time
        fill = {"limit": f"{limit:.0f}", "budget": f"{max(5.0, limit - 15):.0f}",
                "per_run": f"{max(30.0, limit / 3 - 5):.0f}", "per_test": f"{max(20.0, min(90.0, limit / 4)):.0f}"}
        for k, v in fill.items():
            cmd = cmd.replace("{" + k + "}", v)
        if stub:
            cmd = (f"{shlex.quote(sys.executable)} -c 'import signal, sys, time; signal.signal(signal.SIGINT, "
                   f"lambda *a: (print(\"stub: SIGINT\", flush=True), sys.exit(130))); print(\"stub: {s.name}\"); "
                   f"time.sleep({float(stub)})'")
        print(f"bench/gpu.sh: {s.name} (limit {limit:.0f} s): {cmd}", flush=True)
        t0 = time.monotonic()
        rc, stopped = run_step(cmd, limit, out / "logs" / f"{s.name}.log", env)
        status = "timeout" if stopped else "ok" if rc == 0 else "none" if rc == 5 and "pytest" in cmd else "failed"
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
    from bench import common

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
    p.add_argument("--dry-run", action="store_true", help="CPU rehearsal: the same steps, their CPU stand-ins")
    p.add_argument("--budget", type=float, help=f"seconds for the whole call (default {DEFAULT_BUDGET:.0f}; "
                                                 f"{DRY_BUDGET:.0f} with --dry-run)")
    p.add_argument("--only", help="comma-separated steps to run (install always runs)")
    p.add_argument("--out", help="output folder (default $OUT; gpu-out/, or a temporary folder with --dry-run)")
    p.add_argument("--python", help="interpreter for the steps (default this one)")
    args = p.parse_args(argv)
    args.argv = argv
    if args.budget is None:
        args.budget = DRY_BUDGET if args.dry_run else DEFAULT_BUDGET
    if args.budget < 30:
        p.error(f"--budget {args.budget:g} is too small to start anything (at least 30 s)")
    return run_suite(args)


if __name__ == "__main__":
    sys.exit(main())
