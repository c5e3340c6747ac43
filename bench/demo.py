"""Run a recipe end to end and record what it measured: the result JSON of a demo.

    python -m bench.demo recipes/smollm2-demo.yaml --name demo-smollm2 --run-dir /tmp/demo-smollm2 \\
        --out bench/results/demo-smollm2-cpu-2core-idle-f2.json
    python -m bench.demo recipes/smollm2-demo.yaml --set data.mix=null --name demo-smollm2-nomix \\
        --run-dir /tmp/demo-smollm2-nomix --out bench/results/demo-smollm2-nomix-f2.json
    python -m bench.screenshot /tmp/demo-smollm2 --out docs/img/report-smollm2.png   # its report.html
    python -m bench.readme_table      # the README's measured rows, from the result files

It runs ``fastft train RECIPE --set output.dir=... --overwrite [--set ...]`` as a child process and
writes, from that process and that run only: the run's own fastft.json and eval.json, its stdout
(shown live too), the child's wall time and peak resident set (getrusage of the finished child),
the CPU model, the cores, the load average before and after (other work on the machine slows a
run: the numbers say how busy it was), the exact commands, the git commit of the checkout and the
time. Default output: bench/results/demo-<name>-<target>-<UTC time>.json. Exit status: the
training command's.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common
from fastft.files import atomic_write_text


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override passed to fastft train (repeatable)")
    p.add_argument("--name", help="result name (default: demo-<recipe file stem>)")
    p.add_argument("--run-dir", help="output.dir for the run (default: a fresh temporary folder, kept)")
    p.add_argument("--out", help="result file (default: bench/results/demo-<name>-<target>-<time>.json)")
    p.add_argument("--note", action="append", default=[], help="a note stored in the result (repeatable)")
    return p.parse_args(argv)


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    name = args.name or f"demo-{Path(args.recipe).stem}"
    run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix=f"{name}-"))
    fastft = Path(sys.executable).with_name("fastft")
    cmd = [str(fastft) if fastft.is_file() else sys.executable, *([] if fastft.is_file() else ["-m", "fastft"]),
           "train", args.recipe, "--set", f"output.dir={run_dir}", "--overwrite"]
    for o in args.overrides:
        cmd += ["--set", o]
    env = dict(os.environ, FASTFT_PROGRESS_EVERY=os.environ.get("FASTFT_PROGRESS_EVERY", "60"), PYTHONUNBUFFERED="1")
    load_before = _load()
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    print(f"bench.demo: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    # the child's stdout (the run's log and tables) is shown live and kept in the result; stderr
    # (progress) goes straight through
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, bufsize=1)
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line)
    returncode = proc.wait()
    wall = time.perf_counter() - t0
    load_after = _load()
    rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kilobytes on Linux: the largest child
    info_path, eval_path = run_dir / "fastft.json", run_dir / "eval.json"
    run = json.loads(info_path.read_text()) if info_path.is_file() else None
    ev = json.loads(eval_path.read_text()) if eval_path.is_file() else None
    dev = common.device()
    target = dev["type"] if dev["type"] == "cpu" else dev["name"].lower().replace(" ", "-")
    doc = {
        "schema_version": common.SCHEMA_VERSION,
        "kind": "demo",
        "name": name,
        "target": target,
        "device": {**dev, "load_average_before": load_before, "load_average_after": load_after},
        "command": shlex.join([sys.executable, "-m", "bench.demo", *(argv if argv is not None else sys.argv[1:])]),
        "train_command": shlex.join(cmd),
        "exit_code": returncode,
        "process_wall_seconds": round(wall, 2),
        "process_max_rss_kb": rss_kb,
        "git_commit": common.git_sha(),
        "started_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "created_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "run_dir": str(run_dir),
        "notes": args.note,
        "summary": summary(run, ev),
        "train_stdout": "".join(lines),
        "run": run,
        "eval": ev,
    }
    out = Path(args.out) if args.out else common.RESULTS / (
        f"{name}-{target}-{doc['created_utc'].replace(':', '').replace('-', '')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(doc, indent=2, default=str) + "\n")
    print(json.dumps({"result": str(out), **doc["summary"], "wall_s": doc["process_wall_seconds"],
                      "load_before": load_before, "exit_code": returncode}))
    return returncode


def summary(run: dict | None, ev: dict | None) -> dict:
    """The headline figures, copied from the run's own files (nothing computed here)."""
    if run is None:
        return {"finished": False}
    m = run.get("metrics") or {}
    t = m.get("train") or {}
    out = {"finished": True, "steps": m.get("steps"), "tokens_per_second": t.get("tokens_per_second"),
           "peak_rss_gb": t.get("peak_rss_gb"), "peak_vram_allocated_gb": t.get("peak_vram_allocated_gb"),
           "heldout_loss_before": (m.get("before") or {}).get("eval_loss"),
           "heldout_loss_after": (m.get("after") or {}).get("eval_loss"), "run_wall_seconds": m.get("wall_seconds"),
           "status": run.get("status")}
    if ev:
        task, metric = ev.get("task") or {}, ev.get("metric")
        if task:
            out[f"base_{metric}"] = task["base"].get(metric)
            out[f"adapter_{metric}"] = task["adapter"].get(metric)
            out["eval_n"] = task.get("n")
        reg = ev.get("regression") or {}
        if reg:
            out["regression_forgotten"] = reg.get("forgotten")
            out["regression_loss_delta"] = reg.get("loss_delta")
        out["eval_seconds"] = ev.get("seconds")
    return {k: v for k, v in out.items() if v is not None}


if __name__ == "__main__":
    sys.exit(main())
