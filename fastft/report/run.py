"""One run directory as the report reads it (fastft.json, metrics.jsonl, eval.json, export.json),
and its numbers as text: the headline rows and the recipe rows that the HTML page, the Markdown
summary and the side-by-side tables share."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .. import rundir
from ..errors import FastftError
from ..flat import flatten
from ..fmt import pct

REPORT_HTML = "report.html"
COMPARE_HTML, COMPARE_MD = "compare.html", "compare.md"


class ReportError(FastftError):
    """A folder that is not a finished run, or a file in it that cannot be read."""


@dataclass
class RunData:
    """Everything the report shows of one run directory."""

    path: Path
    info: dict
    metrics: list[dict]
    eval: dict | None
    export: dict | None
    name: str = ""
    steps: list[dict] = field(default_factory=list)  # training log rows (with "loss")
    evals: list[dict] = field(default_factory=list)  # held-out loss rows (with "eval_loss")

    @property
    def train(self) -> dict:
        return (self.info.get("metrics") or {}).get("train") or {}

    def held_out(self) -> list[tuple[float, float]]:
        """(step, held-out loss): before training (step 0), each evaluation during it, and after."""
        m = self.info.get("metrics") or {}
        pts = []
        if "eval_loss" in (m.get("before") or {}):
            pts.append((0, m["before"]["eval_loss"]))
        pts += [(r["step"], r["eval_loss"]) for r in self.evals]
        if "eval_loss" in (m.get("after") or {}):
            pts.append((m.get("steps", pts[-1][0] if pts else 0), m["after"]["eval_loss"]))
        return pts


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e}); the file is damaged, run the step that writes it again") from e


def load(run_dir: str | Path) -> RunData:
    d = rundir.RunDir(run_dir)
    if not d.info.is_file():
        raise ReportError(f"{d.root}: not a finished fastft run (no {rundir.INFO}); give the output.dir of a run")
    info = _read_json(d.info) or {}
    metrics = []
    if d.metrics.is_file():
        for i, line in enumerate(d.metrics.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    metrics.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ReportError(f"{d.metrics} line {i}: not valid JSON ({e})") from e
    ev = _read_json(d.eval)
    if ev is None and info.get("eval"):
        ev = info["eval"]  # the numbers without examples (fastft.json keeps a summary)
    run = RunData(d.root, info, metrics, ev, _read_json(d.export), name=d.root.resolve().name)
    run.steps = [r for r in metrics if "loss" in r and "step" in r]
    run.evals = [r for r in metrics if "eval_loss" in r and "step" in r]
    return run


# --- numbers as text ---------------------------------------------------------------------------

def fnum(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return str(v)


def memory_key(rows: list[dict]) -> tuple[str, str] | None:
    for key, label in (("peak_vram_allocated_gb", "peak VRAM allocated (GB)"), ("peak_rss_gb", "peak RSS (GB)")):
        if any(key in r for r in rows):
            return key, label
    return None


def summary_rows(run: RunData) -> list[tuple[str, str]]:
    """(label, value) pairs of the headline numbers: shared by the HTML, the Markdown and A/B tables."""
    m, t, ev = run.info.get("metrics") or {}, run.train, run.eval or {}
    rows = [("status", run.info.get("status") or "no gates"),
            ("model", (run.info.get("recipe") or {}).get("model", {}).get("name", "-")),
            ("backend", (run.info.get("backend") or {}).get("name", "-")),
            ("steps", fnum(m.get("steps"))),
            ("train tokens", fnum(t.get("train_tokens"))),
            ("tokens/s", fnum(t.get("tokens_per_second"), 1)),
            ]
    if "peak_vram_allocated_gb" in t:
        rows.append(("peak VRAM allocated (GB)", fnum(t["peak_vram_allocated_gb"], 2)))
    if "peak_rss_gb" in t:
        rows.append(("peak RSS (GB)", fnum(t["peak_rss_gb"], 2)))
    rows += [("held-out loss before", fnum((m.get("before") or {}).get("eval_loss"))),
             ("held-out loss after", fnum((m.get("after") or {}).get("eval_loss"))),
             ("wall time (s)", fnum(m.get("wall_seconds"), 1))]
    task = ev.get("task") or {}
    metric = ev.get("metric")
    if task.get("n"):
        rows += [(f"base {metric} (n={task['n']})", pct(task["base"].get(metric))),
                 (f"adapter {metric} (n={task['n']})", pct(task["adapter"].get(metric)))]
    reg = ev.get("regression") or {}
    if reg:
        rows += [("regression forgotten", pct(reg.get("forgotten"))),
                 ("regression loss delta", fnum(reg.get("loss_delta")))]
    return rows


def recipe_rows(d: dict, prefix: str = "") -> list[list]:
    return [[k, json.dumps(v) if isinstance(v, (list, dict)) else fnum(v, 6)]
            for k, v in flatten(d, prefix, keep_empty=True).items()]


def recipe_differences(runs: list[RunData]) -> list[list]:
    flat = [{k: v for k, v in recipe_rows(r.info.get("recipe") or {})} for r in runs]
    keys = dict.fromkeys(k for f in flat for k in f)
    return [[k] + [f.get(k, "-") for f in flat] for k in keys if len({f.get(k, "-") for f in flat}) > 1]
