"""Result documents and the timer shared by every benchmark.

    from bench import common
    measure = common.timer(cpu=False, warmup_ms=10, rep_ms=50, unit="us")
    us, p20, p80 = measure(lambda: fn(x))
    doc = common.result(kind="kernel", name="nf4-dequant", target="h100", config={...}, metrics={...})
    path = common.write(doc)            # bench/results/<kind>-<name>-<target>-<utc time>.json
    print(common.dumps_line(doc))       # one compact JSON line, the last line of stdout

A result carries: schema_version, kind, name, target, device (name, capability, memory), versions
(torch, triton, transformers, peft, bitsandbytes, unsloth, fastft, git sha), config, metrics,
the command line and the time it was made.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCHEMA_VERSION = 1
# Exit status of a benchmark that finished inside its time budget but cut cases or runs to stay
# there (what it measured is written; the cut ones are listed): bench/gpu.sh records the step "partial".
EXIT_CUT = 3
RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def device() -> dict:
    import torch

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return {"type": "cuda", "name": p.name, "capability": f"{p.major}.{p.minor}",
                "memory_bytes": p.total_memory, "multiprocessors": p.multi_processor_count}
    return {"type": "cpu", "name": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, e.g. "AMD EPYC 7B13"), else what platform knows."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timer(cpu: bool, warmup_ms: int, rep_ms: int, unit: str = "ms"):
    """A function fn -> (median, p20, p80) of fn's run time, in `unit` ("ms" or "us").

    On a GPU: triton.testing.do_bench, `warmup_ms` of warm-up outside the timed region, then
    `rep_ms` of runs with L2 flushed before each. On CPU (--cpu-smoke): one untimed call, then
    three perf_counter runs reported as (median, min, max): a harness check, not a measurement.
    """
    per_second = {"ms": 1e3, "us": 1e6}[unit]
    if cpu:
        def run(fn):
            fn()
            ts = []
            for _ in range(3):
                t = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t) * per_second)
            ts.sort()
            return ts[1], ts[0], ts[-1]
        return run
    from triton.testing import do_bench

    per_ms = per_second / 1e3  # do_bench answers in milliseconds

    def run(fn):
        med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return med * per_ms, p20 * per_ms, p80 * per_ms
    return run


def add_output_args(p) -> None:
    """The flags every kernel benchmark shares: the CPU smoke run and where the result goes."""
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run on CPU under TRITON_INTERPRET=1 with tiny shapes (harness check, not a measurement)")
    p.add_argument("--out", help="folder for the result JSON")
    p.add_argument("--no-write", action="store_true", help="print the result, write no file")


def versions() -> dict:
    from fastft.info import versions as stack_versions

    return {**stack_versions(), "git_sha": git_sha()}


def result(kind: str, name: str, target: str, config: dict, metrics: dict, command: list[str] | None = None,
           notes: list[str] | None = None) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "name": name,
        "target": target,
        "device": device(),
        "versions": versions(),
        "config": config,
        "metrics": metrics,
        "notes": notes or [],
        "command": shlex.join(command if command is not None else [sys.executable, *sys.argv]),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def result_path(doc: dict, out_dir: str | Path | None = None, stem: str | None = None) -> Path:
    """Where ``write`` puts ``doc``: <out>/<kind>-<name>-<target>-<created_utc>.json, out being
    ``out_dir``, else $FASTFT_BENCH_RESULTS, else bench/results/ (created)."""
    out = Path(out_dir or os.environ.get("FASTFT_BENCH_RESULTS") or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    stamp = doc["created_utc"].replace(":", "").replace("-", "")
    return out / f"{stem or '-'.join([doc['kind'], doc['name'], doc['target']])}-{stamp}.json"


def write(doc: dict, out_dir: str | Path | None = None, stem: str | None = None) -> Path:
    """Write atomically (temp file + rename) and return the path."""
    path = result_path(doc, out_dir, stem)
    write_json(path, doc)
    return path


def write_json(path: str | Path, doc: dict) -> None:
    """Atomically: a reader (or a process killed mid-write) sees the old document or the new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def dumps_line(doc: dict) -> str:
    return json.dumps(doc, separators=(",", ":"), default=str)
