"""report.html: the page, its sections, tables and figures (inline SVG), for one run or several."""
from __future__ import annotations

import html
import re
import time
from pathlib import Path

from ..fmt import pct
from .run import RunData, fnum, memory_key, recipe_differences, recipe_rows, summary_rows
from .svg import svg_chart

SECTIONS = ("summary", "loss", "learning-rate", "throughput", "memory", "eval", "regression", "gates", "exports",
            "recipe", "versions")




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


def _run_sections(run: RunData) -> dict[str, str]:
    rec = run.info.get("recipe") or {}
    return {
        "eval": _section("eval", "Base vs adapter", _eval_html(run)),
        "regression": _section("regression", "Regression / forgetting", _regression_html(run)),
        "gates": _section("gates", "Gates", _gates_html(run)),
        "exports": _section("exports", "Exports", _exports_html(run)),
        "recipe": _section("recipe", "Recipe", f'<p class="muted">{_e(run.info.get("recipe_source") or "")}</p>'
                           + _table(recipe_rows(rec), ["key", "value"], cls="recipe")),
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
