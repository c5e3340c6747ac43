"""An evaluation (``fastft.evaluate``'s result) as a terminal table: base and adapter side by side,
per slice, the regression set, then the gates.

    from fastft import eval_table
    print(eval_table.format_table(json.load(open("outputs/run/eval.json")), "outputs/run"))
"""
from __future__ import annotations

from .fmt import pct


def _num(v) -> str:
    return "-" if v is None else (f"{v:.4f}" if abs(v) < 1e4 else f"{v:.3g}")


def _delta(a, b, points: bool) -> str:
    if a is None or b is None:
        return ""
    d = a - b
    return f"{100 * d:+.1f} pts" if points else f"{d:+.4f}"


def format_table(result: dict, where: str = "") -> str:
    """Base and adapter side by side, then the gates."""
    rows: list[tuple[str, str, str, str]] = [("", "base", "adapter", "change")]
    t, r, metric = result.get("task"), result.get("regression"), result["metric"]
    if t:
        b, a = t["base"], t["adapter"]
        if t["n"]:
            rows.append((f"task {metric} (n={t['n']})", pct(b[metric]), pct(a[metric]), _delta(a[metric], b[metric], True)))
            for name, sa in a["slices"].items():
                sb = b["slices"].get(name, {})
                rows.append((f"  slice {name} (n={sa['n']})", pct(sb.get(metric)), pct(sa[metric]),
                             _delta(sa[metric], sb.get(metric), True)))
        rows.append(("task loss", _num(b["loss"]), _num(a["loss"]), _delta(a["loss"], b["loss"], False)))
        rows.append(("task perplexity", _num(b["perplexity"]), _num(a["perplexity"]), ""))
    if r:
        rows.append((f"regression {r['metric']} (n={r['n']})", pct(r["base"]["accuracy"]), pct(r["adapter"]["accuracy"]),
                     _delta(r["adapter"]["accuracy"], r["base"]["accuracy"], True)))
        rows.append(("regression forgotten", "", pct(r["forgotten"]),
                     f"{r['forgotten_count']} of {r['base_correct']}" if r["base_correct"] else ""))
        rows.append(("regression loss", _num(r["base"]["loss"]), _num(r["adapter"]["loss"]),
                     _delta(r["adapter"]["loss"], r["base"]["loss"], False)))
    width = max(len(x[0]) for x in rows)
    lines = ["", f"fastft: eval{' ' + where if where else ''} (base = the same model with the adapter disabled)"]
    if len(rows) == 1:
        lines.append("  nothing to evaluate: no held-out data and no regression set")
    else:
        lines += [f"  {x[0]:<{width}}  {x[1]:>10}  {x[2]:>10}  {x[3]:>12}".rstrip() for x in rows]
    for ex in (r or {}).get("forgotten_items", [])[:3]:
        lines.append(f"  forgotten: {ex['prompt'][:60]!r}: base {ex['base'][:40]!r}, adapter {ex['adapter'][:40]!r}")
    g = result.get("gates")
    if g:
        lines.append("  gates: " + ("all passed" if g["passed"] else "FAILED"))
        for row in g["results"]:
            v = "not measured" if row["value"] is None else f"{row['value']:.4g}"
            lines.append(f"    {'pass' if row['passed'] else 'FAIL'}  {row['gate']} {row['condition']}  (measured {v})")
    return "\n".join(lines)
