"""A run's report: one self-contained HTML page (report.html) and a Markdown summary (report.md).

    fastft report outputs/run                     # -> outputs/run/report.html + report.md
    fastft report outputs/a outputs/b             # A/B: curves overlaid, a side-by-side table
                                                  #   -> outputs/a/compare.html + compare.md (or --out DIR)
    from fastft import report
    html_path, md_path = report.write([Path("outputs/run")])

Read from the run directory: fastft.json (recipe, versions, training summary, gates), metrics.jsonl
(loss, learning rate, tokens/s and peak memory per logged step, held-out loss at each evaluation),
eval.json (base vs adapter by slice, the regression set with the forgotten items) and export.json
(GGUF files and their verification). The figures are SVG drawn here and inlined: the page needs no
network, no JavaScript and no other file. Every plotted series is also listed, value by value, in a
collapsed table under its figure. ``fastft train`` writes both files at the end of every run.
"""
from __future__ import annotations

import html
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import rundir
from .errors import FastftError
from .files import atomic_write_text

REPORT_HTML = "report.html"
COMPARE_HTML, COMPARE_MD = "compare.html", "compare.md"
COLORS = ["#1f6feb", "#d1242f", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#0a7ea4", "#57606a"]
SECTIONS = ("summary", "loss", "learning-rate", "throughput", "memory", "eval", "regression", "gates", "exports",
            "recipe", "versions")


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


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def memory_key(rows: list[dict]) -> tuple[str, str] | None:
    for key, label in (("peak_vram_allocated_gb", "peak VRAM allocated (GB)"), ("peak_rss_gb", "peak RSS (GB)")):
        if any(key in r for r in rows):
            return key, label
    return None


# --- SVG ---------------------------------------------------------------------------------------

def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    out, v = [], start
    while v <= hi + step * 1e-9:
        out.append(round(v, 12))
        v += step
    return out


def _tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:g}" if abs(v) >= 1 else f"{v:.3g}"


def svg_chart(series: list[tuple[str, list[tuple[float, float]]]], title: str, xlabel: str = "step",
              ylabel: str = "", width: int = 560, height: int = 240) -> str:
    """Line chart (points marked) of ``[(label, [(x, y), ...]), ...]``, one color per series."""
    pts = [(x, y) for _, s in series for x, y in s if y is not None and math.isfinite(y)]
    esc = html.escape
    if not pts:
        return (f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="60" role="img">'
                f'<title>{esc(title)}</title><text x="10" y="35" font-size="13" fill="#57606a">{esc(title)}: '
                'nothing logged</text></svg>')
    left, right, top, bottom = 64, 16, 28, 40
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x1 = x0 + 1
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.08 or abs(y1) * 0.1 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    if min(ys) >= 0 > y0:
        y0 = 0.0
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    out = [(f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img"><title>{esc(title)}</title>'),
           f'<text x="{left}" y="16" font-size="13" font-weight="600">{esc(title)}</text>']
    for t in _ticks(y0, y1):
        if y0 <= t <= y1:
            y = sy(t)
            out.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#d0d7de" '
                       'stroke-width="0.6"/>')
            out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end">'
                       f'{_tick_label(t)}</text>')
    for t in _ticks(x0, x1, 6):
        if x0 <= t <= x1:
            x = sx(t)
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#57606a"/>')
            out.append(f'<text x="{x:.1f}" y="{top + ph + 16}" font-size="10" text-anchor="middle">'
                       f'{_tick_label(t)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#57606a" '
               'stroke-width="0.8"/>')
    out.append(f'<text x="{left + pw / 2:.0f}" y="{height - 6}" font-size="11" text-anchor="middle">'
               f'{esc(xlabel)}</text>')
    if ylabel:
        out.append(f'<text x="12" y="{top + ph / 2:.0f}" font-size="11" text-anchor="middle" '
                   f'transform="rotate(-90 12 {top + ph / 2:.0f})">{esc(ylabel)}</text>')
    for i, (label, s) in enumerate(series):
        s = [(x, y) for x, y in s if y is not None and math.isfinite(y)]
        color = COLORS[i % len(COLORS)]
        if len(s) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{path}"/>')
        for x, y in s if len(s) <= 60 else []:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.6" fill="{color}">'
                       f'<title>{esc(label)}: step {_tick_label(x)}, {y:.6g}</title></circle>')
        if len(series) > 1 or label:
            room = max(80, (pw - 8) // len(series))  # legend: one slot per series across the plot
            lx = left + 8 + room * i
            out.append(f'<rect x="{lx}" y="{top + 6}" width="10" height="10" fill="{color}"/>'
                       f'<text x="{lx + 14}" y="{top + 15}" font-size="10">{esc(label[:(room - 18) // 6])}</text>')
    out.append("</svg>")
    return "".join(out)


# --- HTML --------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 -apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#1f2328;margin:24px auto;
max-width:1180px;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;border-bottom:1px solid #d0d7de;padding-bottom:4px;
margin-top:28px}h3{font-size:14px}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #d0d7de;padding:3px 8px;text-align:right}
th{background:#f6f8fa}td:first-child,th:first-child{text-align:left}.muted{color:#57606a}
.pass{color:#1a7f37;font-weight:600}.fail{color:#d1242f;font-weight:600}
.figs{display:flex;flex-wrap:wrap;gap:12px}.grid{display:flex;flex-wrap:wrap;column-gap:24px}
.grid>section{flex:0 0 570px}.chart{background:#fff;border:1px solid #d0d7de;border-radius:6px}
pre{background:#f6f8fa;padding:8px;overflow:auto;font-size:12px;max-height:420px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-size:12px}
.examples td,.examples th,.forgotten td,.forgotten th{text-align:left}.ok{background:#1a7f37}.bad{background:#d1242f}.none{background:#57606a}
"""


def _e(v) -> str:
    return html.escape(str(v))


def _table(rows: list[list], header: list | None = None, cls: str = "") -> str:
    out = [f'<table class="{cls}">' if cls else "<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else _e(c)}</td>" for c in r) + "</tr>")
    out.append("</table>")
    return "".join(out)


class _Raw(str):
    """Table cell HTML that is not escaped."""


def _verdict(passed) -> _Raw:
    if passed is None:
        return _Raw('<span class="muted">-</span>')
    return _Raw('<span class="pass">pass</span>' if passed else '<span class="fail">FAIL</span>')


def _status(run: RunData) -> str:
    s = run.info.get("status")
    if s is None:
        return '<span class="badge none">no gates</span>'
    return f'<span class="badge {"ok" if s == "accepted" else "bad"}">{_e(s)}</span>'


def _data_table(name: str, cols: list[str], rows: list[list]) -> str:
    """The values behind a figure, collapsed (class ``values-<series>``: a test or a script reads them)."""
    cls = "values-" + "-".join(re.findall(r"[a-z0-9]+", cols[-1].lower()))
    return (f'<details><summary class="muted">{_e(name)}: the values plotted</summary>'
            + _table(rows, cols, cls=cls) + "</details>")


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


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{_e(title)}</h2>{body}</section>'


def _curves(runs: list[RunData]) -> dict[str, str]:
    """The figure sections (id -> HTML), each with its values table."""
    multi = len(runs) > 1

    def lab(r: RunData, what: str) -> str:
        return (r.name + (f" {what}" if what else "")) if multi else what

    out = {}
    loss_series, cols, rows = [], ["run", "step", "training loss"], []
    for r in runs:
        loss_series.append((lab(r, "train"), [(s["step"], s["loss"]) for s in r.steps]))
        rows += [[r.name, s["step"], fnum(s["loss"])] for s in r.steps]
        held = r.held_out()
        if held:
            loss_series.append((lab(r, "held-out"), held))
    held_rows = [[r.name, s, fnum(v)] for r in runs for s, v in r.held_out()]
    out["loss"] = _section("loss", "Loss", '<div class="figs">'
                           + svg_chart(loss_series, "training and held-out loss", ylabel="loss")
                           + "</div>" + _data_table("training loss", cols, rows)
                           + _data_table("held-out loss", ["run", "step", "held-out loss"], held_rows))
    lr = [(r.name if multi else "", [(s["step"], s.get("learning_rate")) for s in r.steps]) for r in runs]
    out["learning-rate"] = _section("learning-rate", "Learning rate", svg_chart(lr, "learning rate", ylabel="lr")
                                    + _data_table("learning rate", ["run", "step", "learning rate"],
                                                  [[r.name, s["step"], f"{s['learning_rate']:.4g}"]
                                                   for r in runs for s in r.steps if "learning_rate" in s]))
    tps = [(r.name if multi else "", [(s["step"], s.get("tokens_per_second")) for s in r.steps]) for r in runs]
    out["throughput"] = _section("throughput", "Throughput", svg_chart(tps, "tokens/s (real tokens, steps only)",
                                                                       ylabel="tokens/s")
                                 + _data_table("tokens/s", ["run", "step", "tokens/s"],
                                               [[r.name, s["step"], fnum(s["tokens_per_second"], 1)]
                                                for r in runs for s in r.steps if "tokens_per_second" in s]))
    mk = memory_key([s for r in runs for s in r.steps])
    if mk:
        key, label = mk
        mem = [(r.name if multi else "", [(s["step"], s.get(key)) for s in r.steps]) for r in runs]
        body = svg_chart(mem, label, ylabel="GB") + _data_table(label, ["run", "step", label], [
            [r.name, s["step"], fnum(s[key], 3)] for r in runs for s in r.steps if key in s])
    else:
        body = '<p class="muted">no memory figures logged</p>'
    out["memory"] = _section("memory", "Peak memory", body)
    return out


def _figures(runs: list[RunData]) -> str:
    """The four figure sections, two abreast on a wide page."""
    return '<div class="grid">' + "".join(_curves(runs).values()) + "</div>"


def _eval_html(run: RunData) -> str:
    ev = run.eval or {}
    task = ev.get("task")
    if not task:
        return '<p class="muted">no held-out evaluation (eval.json absent or no held-out data)</p>'
    metric = ev["metric"]
    rows = [["overall", task["n"], pct(task["base"].get(metric)), pct(task["adapter"].get(metric)),
             pct(task.get("gain")), fnum(task["base"].get("loss")), fnum(task["adapter"].get("loss"))]]
    for name, s in (task["adapter"].get("slices") or {}).items():
        b = (task["base"].get("slices") or {}).get(name, {})
        gain = s[metric] - b[metric] if b.get(metric) is not None else None
        rows.append([f"slice {name}", s["n"], pct(b.get(metric)), pct(s[metric]), pct(gain), "", ""])
    body = (f'<p>{_e(task.get("source", ""))}: {task["n"]} prompts, metric <b>{_e(metric)}</b>, greedy.</p>'
            + _table(rows, ["", "n", f"base {metric}", f"adapter {metric}", "gain", "base loss", "adapter loss"],
                     cls="eval"))
    ex = task.get("examples") or []
    if ex:
        body += "<h3>Examples</h3>" + _table([[x["prompt"][:160], x["reference"][:80], x["base"][:80], x["adapter"][:80]]
                                              for x in ex], ["prompt", "reference", "base", "adapter"], cls="examples")
    return body


def _regression_html(run: RunData) -> str:
    reg = (run.eval or {}).get("regression")
    if not reg:
        return '<p class="muted">no regression set (eval.regression)</p>'
    rows = [["accuracy", pct(reg["base"]["accuracy"]), pct(reg["adapter"]["accuracy"])],
            ["loss on the answers", fnum(reg["base"].get("loss")), fnum(reg["adapter"].get("loss"))]]
    body = (f'<p>{_e(reg["source"])}: {reg["n"]} general prompts ({_e(reg["metric"])}). Forgotten: '
            f'<b>{pct(reg.get("forgotten"))}</b> ({reg["forgotten_count"]} of the {reg["base_correct"]} the base '
            f'answered right); loss delta (adapter - base) <b>{fnum(reg.get("loss_delta"))}</b>.</p>'
            + _table(rows, ["", "base", "adapter"], cls="regression"))
    items = reg.get("forgotten_items") or []
    if items:
        body += "<h3>Forgotten items</h3>" + _table(
            [[x["prompt"][:160], x["reference"][:80], x["base"][:80], x["adapter"][:80]] for x in items],
            ["prompt", "reference", "base", "adapter"], cls="forgotten")
    elif reg.get("forgotten_count"):
        body += '<p class="muted">the items are in eval.json (not found beside this report)</p>'
    return body


def _gates_html(run: RunData) -> str:
    gates = run.info.get("gates") or (run.eval or {}).get("gates")
    head = f"<p>status: {_status(run)}</p>"
    if not gates:
        return head + '<p class="muted">no gates (eval.gates in the recipe)</p>'
    rows = [[g["gate"], g["condition"], fnum(g["value"]) if g["value"] is not None else "not measured",
             _verdict(g["passed"])] for g in gates["results"]]
    return head + _table(rows, ["gate", "condition", "measured", "result"], cls="gates")


def _exports_html(run: RunData) -> str:
    exp = (run.export or {}).get("exports") or []
    if not exp:
        return '<p class="muted">no exports (fastft export RUN --gguf TYPE)</p>'
    rows = []
    for e in exp:
        v = e.get("verification")
        if v is None:
            res, verdict = "not verified", _verdict(None)
        elif "same_answer" in v:
            res, verdict = f"llama.cpp: same answer {pct(v['same_answer'])}", _verdict(v["passed"])
        else:
            res = (f"transformers: logits max diff {v.get('relative_to_scale', 0):.2g} of scale, argmax agree "
                   f"{pct(v.get('argmax_agreement'))}")
            verdict = _verdict(v["passed"])
        rows.append([e["quant"], Path(e["file"]).name, f"{e['bytes'] / 1e6:.1f} MB", res, verdict])
    return _table(rows, ["type", "file", "size", "verification", "result"], cls="exports")


def _kv(d: dict, prefix: str = "") -> list[list]:
    rows = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            rows += _kv(v, f"{prefix}{k}.")
        else:
            rows.append([f"{prefix}{k}", json.dumps(v) if isinstance(v, (list, dict)) else fnum(v, 6)])
    return rows


def _run_sections(run: RunData) -> dict[str, str]:
    rec = run.info.get("recipe") or {}
    return {
        "eval": _section("eval", "Base vs adapter", _eval_html(run)),
        "regression": _section("regression", "Regression / forgetting", _regression_html(run)),
        "gates": _section("gates", "Gates", _gates_html(run)),
        "exports": _section("exports", "Exports", _exports_html(run)),
        "recipe": _section("recipe", "Recipe", f'<p class="muted">{_e(run.info.get("recipe_source") or "")}</p>'
                           + _table(_kv(rec), ["key", "value"], cls="recipe")),
        "versions": _section("versions", "Versions", _table(
            [[k, v or "-"] for k, v in (run.info.get("versions") or {}).items()]
            + [["fastft commit", (run.info.get("source") or {}).get("git_commit", "-")
                + (" (uncommitted changes)" if (run.info.get("source") or {}).get("git_dirty") else "")]],
            ["package", "version"], cls="versions")),
    }


def html_report(runs: list[RunData]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if len(runs) == 1:
        run = runs[0]
        title = f"fastft run {run.name}"
        head = (f"<h1>{_e(title)} {_status(run)}</h1><p class=\"muted\">{_e(run.path)} &middot; report written {when}"
                f" &middot; command: <code>{_e(run.info.get('command', '-'))}</code></p>")
        summary = _section("summary", "Summary", _table([list(r) for r in summary_rows(run)], ["", "value"],
                                                        cls="summary"))
        parts = [head, summary, _figures(runs), *_run_sections(run).values()]
    else:
        title = "fastft runs " + " vs ".join(r.name for r in runs)
        head = f"<h1>{_e(title)}</h1><p class=\"muted\">report written {when}</p>"
        table = [[label] + [dict(summary_rows(r)).get(label, "-") for r in runs]
                 for label in dict.fromkeys(lbl for r in runs for lbl, _ in summary_rows(r))]
        diff = recipe_differences(runs)
        body = _table(table, [""] + [r.name for r in runs], cls="summary")
        body += ("<h3>Recipe differences</h3>" + _table(diff, ["key"] + [r.name for r in runs], cls="recipe-diff")
                 if diff else '<p class="muted">the recipes are the same</p>')
        parts = [head, _section("summary", "Side by side", body), _figures(runs)]
        per = [_run_sections(r) for r in runs]
        for sid in ("eval", "regression", "gates", "exports", "recipe", "versions"):
            title_ = {"eval": "Base vs adapter", "regression": "Regression / forgetting", "gates": "Gates",
                      "exports": "Exports", "recipe": "Recipe", "versions": "Versions"}[sid]
            inner = "".join(f"<h3>{_e(r.name)}</h3>" + p[sid].split("</h2>", 1)[1].rsplit("</section>", 1)[0]
                            for r, p in zip(runs, per))
            parts.append(_section(sid, title_, inner))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{CSS}</style></head><body>" + "\n".join(parts) + "</body></html>\n")


def recipe_differences(runs: list[RunData]) -> list[list]:
    flat = [{k: v for k, v in _kv(r.info.get("recipe") or {})} for r in runs]
    keys = dict.fromkeys(k for f in flat for k in f)
    return [[k] + [f.get(k, "-") for f in flat] for k in keys if len({f.get(k, "-") for f in flat}) > 1]


# --- Markdown ----------------------------------------------------------------------------------

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


# --- writing -----------------------------------------------------------------------------------

def write(run_dirs: list[str | Path], out: str | Path | None = None) -> tuple[Path, Path]:
    """Write the report of one run (RUN/report.html + report.md) or the comparison of several
    (``out``/compare.html + compare.md; default ``out``: the first run). Returns both paths."""
    if not run_dirs:
        raise ReportError("give at least one run directory")
    runs = [load(d) for d in run_dirs]
    names = [r.name for r in runs]
    for i, r in enumerate(runs):  # two runs with the same folder name: tell them apart
        if names.count(r.name) > 1:
            r.name = f"{r.name} ({i + 1})"
    folder = Path(out) if out is not None else runs[0].path
    folder.mkdir(parents=True, exist_ok=True)
    if len(runs) == 1:
        html_path, md_path = folder / REPORT_HTML, folder / rundir.REPORT_MD
    else:
        html_path, md_path = folder / COMPARE_HTML, folder / COMPARE_MD
    atomic_write_text(html_path, html_report(runs))
    atomic_write_text(md_path, markdown_report(runs))
    return html_path, md_path


def refresh(run_dir: str | Path, log=print) -> None:
    """Rewrite RUN/report.html + report.md when the run has them (after ``fastft eval`` or
    ``fastft export`` changed eval.json / export.json); a failure is a warning, never an error."""
    run_dir = Path(run_dir)
    if not (run_dir / REPORT_HTML).is_file():
        return
    try:
        write([run_dir])
        log(f"fastft: report updated: {run_dir / REPORT_HTML}")
    except (OSError, ReportError) as e:
        log(f"fastft: warning: the report was not updated ({e}); `fastft report {run_dir}` writes it again")
