"""report.md: the run's numbers as Markdown tables (one run, or several side by side)."""
from __future__ import annotations

from pathlib import Path

from ..fmt import pct
from .run import REPORT_HTML, RunData, fnum, recipe_differences, summary_rows

def _md_table(rows: list[list], header: list) -> str:

    def cell(c) -> str:
        return str(c).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown_report(runs: list[RunData]) -> str:
    out = []
    if len(runs) > 1:
        out.append("# fastft runs " + " vs ".join(runs_names := [r.name for r in runs]))
        labels = dict.fromkeys(lbl for r in runs for lbl, _ in summary_rows(r))
        out.append(_md_table([[lbl] + [dict(summary_rows(r)).get(lbl, "-") for r in runs] for lbl in labels],
                             [""] + runs_names))
        diff = recipe_differences(runs)
        if diff:
            out += ["", "Recipe differences:", "", _md_table(diff, ["key"] + runs_names)]
        return "\n".join(out) + "\n"
    run = runs[0]
    ev = run.eval or {}
    out += [f"# fastft run {run.name}", "", f"`{run.info.get('command', '-')}`", "",
            _md_table([list(r) for r in summary_rows(run)], ["", "value"])]
    task = ev.get("task")
    if task and task.get("n"):
        metric = ev["metric"]
        rows = [["overall", task["n"], pct(task["base"].get(metric)), pct(task["adapter"].get(metric))]]
        for name, s in (task["adapter"].get("slices") or {}).items():
            b = (task["base"].get("slices") or {}).get(name, {})
            rows.append([f"slice {name}", s["n"], pct(b.get(metric)), pct(s[metric])])
        out += ["", "## Base vs adapter", "", _md_table(rows, ["", "n", f"base {metric}", f"adapter {metric}"])]
    reg = ev.get("regression")
    if reg:
        out += ["", "## Regression / forgetting", "",
                (f"{reg['source']}: accuracy base {pct(reg['base']['accuracy'])}, adapter "
                 f"{pct(reg['adapter']['accuracy'])}; forgotten {pct(reg.get('forgotten'))} "
                 f"({reg['forgotten_count']} of {reg['base_correct']}); loss delta {fnum(reg.get('loss_delta'))}")]
        for x in reg.get("forgotten_items") or []:
            out.append(f"- {x['prompt'][:100]!r}: reference {x['reference'][:40]!r}, adapter {x['adapter'][:40]!r}")
    gates = run.info.get("gates") or ev.get("gates")
    if gates:
        out += ["", f"## Gates: {run.info.get('status', '-')}", "",
                _md_table([[g["gate"], g["condition"], fnum(g["value"]), "pass" if g["passed"] else "FAIL"]
                           for g in gates["results"]], ["gate", "condition", "measured", "result"])]
    exp = (run.export or {}).get("exports") or []
    if exp:
        out += ["", "## Exports", "", _md_table(
            [[e["quant"], Path(e["file"]).name, f"{e['bytes'] / 1e6:.1f} MB",
              "-" if e.get("verification") is None else ("pass" if e["verification"]["passed"] else "FAIL")]
             for e in exp], ["type", "file", "size", "verification"])]
    versions = run.info.get("versions") or {}
    if versions:
        out += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v)]
    out += ["", f"Figures: {REPORT_HTML}"]
    return "\n".join(out) + "\n"
