"""Compare a training benchmark result with a baseline; exit 1 on a regression beyond tolerance.

    python -m bench.compare bench/results/train-bench-llama3-8b-h100-<time>.json \\
        --baseline bench/baselines/h100.json --tolerance 5%
    python -m bench.compare NEW.json --baseline bench/baselines/h100.json --write-baseline  # adopt NEW

Runs are matched by (benchmark name, target, backend, kernels). For each match it prints the change
of tokens/sec (a fall beyond the tolerance fails) and of peak memory (peak VRAM allocated and
reserved on a GPU, peak RSS on CPU: a rise beyond the tolerance fails); a run that fit in the
baseline and no longer does fails. Unmatched runs are reported: a baseline run missing from the new
results fails unless --allow-missing; a new run without a baseline is listed and passes. Config
differences between matched runs (sequence length, batch, GPU) are printed as warnings.

A baseline file is a result document of bench.train (or several merged: ``{"runs": [...]}`` with
each run carrying its name and target). Exit codes: 0 pass, 1 regression or missing run, 2 usage.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HIGHER_BETTER = ("tokens_per_second",)
LOWER_BETTER = ("peak_vram_allocated_gb", "peak_vram_reserved_gb", "peak_rss_gb")
CONFIG_KEYS = ("model", "max_seq_length", "batch_size", "grad_accum", "lora_r", "load_in_4bit", "gradient_checkpointing")


def parse_tolerance(text: str) -> float:
    """'5%' -> 0.05; '0.05' -> 0.05; '5' -> 0.05 (a bare number above 1 is a percentage)."""
    t = str(text).strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"tolerance {text!r}: give a percentage like 5% or a fraction like 0.05") from None
    if v > 1 and not t.endswith("%"):
        v /= 100
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"tolerance {text!r} must be between 0% and 100%")
    return v


def flatten(doc: dict) -> list[dict]:
    """Runs of a result document (or a merged baseline), each with name, target, device, config."""
    if isinstance(doc.get("runs"), list):  # a baseline file
        return list(doc["runs"])
    if doc.get("kind") == "train":
        out = []
        for r in doc.get("metrics", {}).get("runs", []):
            out.append({**r, "name": doc["name"], "target": doc["target"], "device": doc.get("device", {}),
                        "config": doc.get("config", {}), "command": doc.get("command"),
                        "created_utc": doc.get("created_utc")})
        return out
    raise ValueError("not a bench.train result document nor a baseline ({\"runs\": [...]})")


def key(run: dict) -> tuple:
    return (run["name"], run["target"], run["backend"], run["kernels"])


def label(k: tuple) -> str:
    name, target, backend, kernels = k
    return f"{name} [{target}] {backend}:{kernels}"


def load(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return flatten(json.loads(p.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None


def compare(new: list[dict], base: list[dict], tolerance: float, allow_missing: bool = False) -> tuple[int, list[str]]:
    """(exit code, report lines)."""
    lines: list[str] = []
    failed = False
    new_by = {key(r): r for r in new}
    base_by = {key(r): r for r in base}
    for k, b in base_by.items():
        n = new_by.get(k)
        if n is None:
            lines.append(f"MISSING {label(k)}: in the baseline, not in the new results"
                         + (" (allowed)" if allow_missing else ""))
            failed |= not allow_missing
            continue
        lines.append(f"{label(k)}:")
        for w in config_warnings(n, b):
            lines.append(f"  warning: {w}")
        if b.get("status") != "ok":
            lines.append(f"  baseline status {b.get('status')!r}, new {n.get('status')!r}: nothing to compare")
            continue
        if n.get("status") != "ok":
            lines.append(f"  FAIL status {n.get('status')!r} (baseline ok): {n.get('message', '')[:200]}")
            failed = True
            continue
        nm, bm = n["metrics"], b["metrics"]
        for metric in HIGHER_BETTER + LOWER_BETTER:
            if metric not in bm or metric not in nm or not bm[metric]:
                continue
            change = nm[metric] / bm[metric] - 1
            worse = -change if metric in HIGHER_BETTER else change
            bad = worse > tolerance
            failed |= bad
            lines.append(f"  {'FAIL' if bad else 'ok  '} {metric:<24} {bm[metric]:>12,.2f} -> {nm[metric]:>12,.2f} "
                         f"({100 * change:+.1f}%, tolerance {100 * tolerance:.1f}%)")
    for k in new_by:
        if k not in base_by:
            lines.append(f"NEW {label(k)}: no baseline for this run (not compared)")
    if not base_by:
        lines.append("the baseline holds no runs")
    lines.append("FAIL" if failed else "PASS")
    return (1 if failed else 0), lines


def config_warnings(n: dict, b: dict) -> list[str]:
    out = []
    for k in CONFIG_KEYS:
        nv, bv = n.get("config", {}).get(k), b.get("config", {}).get(k)
        if nv != bv:
            out.append(f"config {k}: baseline {bv!r}, new {nv!r}")
    nd, bd = n.get("device", {}).get("name"), b.get("device", {}).get("name")
    if nd != bd:
        out.append(f"ran on {nd!r}, the baseline on {bd!r}: absolute numbers differ between GPUs")
    return out


def write_baseline(new: list[dict], path: Path) -> Path:
    """Merge the new runs into the baseline file (replacing runs with the same key), atomically."""
    runs = load(str(path)) if path.is_file() else []
    by = {key(r): r for r in runs}
    for r in new:
        by[key(r)] = r
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump({"schema_version": 1, "kind": "train-baseline", "runs": list(by.values())}, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("new", nargs="+", help="result JSON file(s) from bench.train")
    p.add_argument("--baseline", required=True, help="bench/baselines/<target>.json")
    p.add_argument("--tolerance", type=parse_tolerance, default=0.05, help="e.g. 5%% (default) or 0.05")
    p.add_argument("--allow-missing", action="store_true", help="baseline runs absent from NEW do not fail")
    p.add_argument("--write-baseline", action="store_true", help="merge NEW's runs into the baseline file and exit")
    args = p.parse_args(argv)
    try:
        new = [r for path in args.new for r in load(path)]
        if args.write_baseline:
            ok = [r for r in new if r.get("status") == "ok"]
            path = write_baseline(ok, Path(args.baseline))
            print(f"bench.compare: {len(ok)} runs written to {path}")
            return 0
        base = load(args.baseline)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"bench.compare: error: {e}", file=sys.stderr)
        return 2
    code, lines = compare(new, base, args.tolerance, args.allow_missing)
    print("\n".join(lines))
    return code


if __name__ == "__main__":
    sys.exit(main())
