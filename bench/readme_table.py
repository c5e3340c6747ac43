"""Print the README's "Measured" demo rows from the result JSONs, to paste instead of typing numbers.

    python -m bench.readme_table                  # the rows the README shows, from its files
    python -m bench.readme_table bench/results/demo-smollm2-cpu-2core-idle-f2.json \\
        bench/results/demo-smollm2-nomix-f2.json --merged bench/results/export-smollm2-demo-cpu-20261126T123654Z.json

Each row: task metric base -> adapter, forgotten (regression set), tokens/s, peak RSS, wall time of
the whole command and the link to the JSON, all read from the result file that ``python -m
bench.demo`` wrote (older hand-run files with the same ``run``/``process_*`` keys work too). The
"(N% merged)" figure is not in a demo result: it comes from a ``bench.export`` result (``--merged``,
the merged model's score in that export's run). After the rows it prints the figures the prose
around the table quotes (the mixed vs unmixed comparison, the size of one item in points) and, for
a result that kept the run's stdout (``train_stdout``), the lines of the README's `make demo` block.
Nothing is computed beyond rounding.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README_FILES = ["bench/results/demo-smollm2-cpu-2core-idle-f2.json", "bench/results/demo-smollm2-nomix-f2.json",
                "bench/results/demo-gemma3-270m-cpu-2core.json", "bench/results/demo-gemma3-270m-nomix-cpu-2core.json",
                "bench/results/demo-tiny-cpu-2core-idle.json"]
README_MERGED = "bench/results/export-smollm2-demo-cpu-20261126T123654Z.json"
LABELS = {"demo-smollm2": "`make demo`: task + 15% general", "demo-smollm2-nomix": "the same, `--set data.mix=null`",
          "demo-gemma3": "`make demo-gemma` (Gemma 3 270M): task + 15% general",
          "demo-gemma3-nomix": "the same, `--set data.mix=null`", "demo-tiny": "`make demo-tiny`"}
MERGED_ROW = "demo-smollm2"  # the run an export result's merged model stands for
BLOCK_STARTS = ("fastft: backend", "fastft: kernels", "fastft: data: mixed")  # then "...", then the eval on


class TableError(Exception):
    """A result file that is missing or lacks the figures of a row."""


def pct(v: float) -> str:
    """0% and 100% without decimals, one decimal otherwise (the README's style)."""
    if v in (0, 1):
        return f"{round(100 * v)}%"
    return f"{100 * v:.1f}%"


def seconds(v: float) -> str:
    return f"{v:.0f} s" if v >= 100 else f"{v:.1f} s"


def load(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise TableError(f"{p}: no such result file; `python -m bench.demo RECIPE --out {p}` writes it")
    doc = json.loads(p.read_text(encoding="utf-8"))
    if doc.get("kind") != "demo" or not doc.get("run"):
        raise TableError(f"{p}: not a finished demo result (kind {doc.get('kind')!r}, run present: "
                         f"{bool(doc.get('run'))}); run python -m bench.demo again")
    return doc


def _eval(doc: dict) -> dict:
    return doc.get("eval") or doc["run"].get("eval") or {}


def merged_score(export_doc: dict) -> float:
    """The merged model's task metric in a bench.export result (the same for every GGUF type)."""
    scores = {m.get("metric_merged") for m in (export_doc.get("metrics") or {}).values() if isinstance(m, dict)}
    scores.discard(None)
    if len(scores) != 1:
        raise TableError(f"export result: expected one merged-model score, found {sorted(scores)}")
    return scores.pop()


def row(doc: dict, link: str, merged: float | None = None) -> str:
    ev, train = _eval(doc), doc["run"]["metrics"]["train"]
    task, metric = ev.get("task") or {}, ev.get("metric")
    if not task:
        raise TableError(f"{link}: the run has no held-out evaluation (eval.task)")
    acc = f"{pct(task['base'][metric])} -> {pct(task['adapter'][metric])}"
    if merged is not None:
        acc += f" ({pct(merged)} merged)"
    reg = ev.get("regression")
    if reg:
        forgot = f"**{pct(reg['forgotten'])}** ({reg['forgotten_count']} of {reg['base_correct']})"
    else:
        forgot = "-"
        acc += f" (n={task['n']})"  # without a regression column the set size goes here
    rss = train.get("peak_rss_gb")
    if rss is None:
        rss = doc["process_max_rss_kb"] * 1024 / 1e9
    label = LABELS.get(doc["name"], f"`{doc['name']}`")
    return (f"| {label} | {acc} | {forgot} | {train['tokens_per_second']:,.0f} | {rss:.2f} GB | "
            f"{seconds(doc['process_wall_seconds'])} | [json]({link}) |")


def prose(docs: dict[str, dict]) -> list[str]:
    out = []
    for name, doc in docs.items():
        ev = _eval(doc)
        task, reg = ev.get("task") or {}, ev.get("regression") or {}
        sizes = [f"held-out n={task['n']} (one item {100 / task['n']:.1f} pts)"] if task.get("n") else []
        if reg.get("n"):
            sizes.append(f"regression n={reg['n']} (one item {100 / reg['n']:.1f} pts)")
        out.append(f"{name}: the whole command took {seconds(doc['process_wall_seconds'])}; " + ", ".join(sizes)
                   + f"; load average before/after {doc['device'].get('load_average_before', '-')}/"
                   f"{doc['device'].get('load_average_after', '-')}; exit code {doc.get('exit_code', '-')}")
    for model in ("smollm2", "gemma3"):
        mix, nomix = docs.get(f"demo-{model}"), docs.get(f"demo-{model}-nomix")
        if not (mix and nomix):
            continue
        em, en = _eval(mix), _eval(nomix)
        metric = em["metric"]
        out.append(f"{model}: 15% general mix vs none: forgotten {pct(en['regression']['forgotten'])} -> "
                   f"{pct(em['regression']['forgotten'])}; task {metric} {pct(en['task']['adapter'][metric])} -> "
                   f"{pct(em['task']['adapter'][metric])}")
    return out


def block(doc: dict) -> list[str]:
    """The README's `make demo` block: the first lines, "...", then the evaluation table to the end."""
    lines = (doc.get("train_stdout") or "").splitlines()
    if not lines:
        return []
    head = [ln for ln in lines if ln.startswith(BLOCK_STARTS)]
    start = next((i for i, ln in enumerate(lines) if ln.startswith("fastft: eval ")), None)
    tail = lines[start:] if start is not None else []
    while tail and not tail[-1].strip():
        tail.pop()
    return head + ["..."] + tail


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.readme_table", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="*", help="demo result JSONs (default: the ones the README links)")
    p.add_argument("--merged", help="a bench.export result: adds '(N%% merged)' to the demo-smollm2 row "
                                    "(default with no results given: the one the README links)")
    args = p.parse_args(argv)
    files = args.results or README_FILES
    merged_file = args.merged or (None if args.results else README_MERGED)
    try:
        merged = merged_score(json.loads((ROOT / merged_file).read_text())) if merged_file else None
        docs, rows = {}, []
        for f in files:
            path = Path(f) if Path(f).is_absolute() else ROOT / f
            doc = load(path)
            link = os.path.relpath(path, ROOT)
            docs[doc["name"]] = doc
            rows.append(row(doc, link, merged if doc["name"] == MERGED_ROW else None))
    except (TableError, OSError, KeyError, json.JSONDecodeError) as e:
        print(f"bench.readme_table: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(rows))
    print("\nfigures the prose quotes:\n" + "\n".join(prose(docs)))
    for name, doc in docs.items():
        lines = block(doc)
        if lines:
            print(f"\n`{name}` block (its train_stdout):\n```\n" + "\n".join(lines) + "\n```")
    if merged_file:
        print(f"\n(the merged figure is from {merged_file}: its own run, not the demo result)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
