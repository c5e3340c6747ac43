"""What the registry keeps about a run, and how it prints it.

    run_metadata(info, run_dir, pushed)    # the record stored with a version at push
    export_record(entry, gguf, sha256)     # what fastft export wrote about an attached file
    diff(a, b)                             # hyperparameters and metrics that differ
    format_list / format_show / format_diff

Entries and registries are ``fastft.registry``'s ``Entry`` and ``Registry``; this module reads
their fields and methods and imports neither, so the storage module can import it.
"""
from __future__ import annotations

import json
from pathlib import Path

from .flat import differences, flatten
from .rundir import EXPORT, RunDir



def run_metadata(info: dict, run: Path, pushed: str) -> dict:
    """What a registry entry records about a run, taken from its fastft.json (and eval.json)."""
    from .info import source_revision

    recipe = info.get("recipe", {})
    model = recipe.get("model", {})
    backend = info.get("backend", {})
    metrics = {k: v for k, v in (info.get("metrics") or {}).items() if k not in ("losses", "after_examples")}
    eval_path = RunDir(run).eval
    if eval_path.is_file():
        try:
            metrics["eval"] = json.loads(eval_path.read_text(encoding="utf-8"))
        except ValueError:
            metrics["eval"] = "eval.json is not valid JSON"
    meta = {
        "base_model": info.get("base_model") or {"model_id": model.get("name"), "path": backend.get("model_path"),
                                                  "note": "trained before fastft recorded base fingerprints"},
        "quantization": {"load_in_4bit": model.get("load_in_4bit"), "compute_dtype": backend.get("dtype"),
                         "method": "nf4 double-quant" if model.get("load_in_4bit") else None},
        "lora": recipe.get("lora"),
        "data_hash": (info.get("data") or {}).get("hash"),
        "recipe": recipe,
        "metrics": metrics,
        "status": info.get("status"),
        "gates": info.get("gates") or info.get("gate"),
        "versions": info.get("versions"),
        "backend": backend.get("name"),
        "source": info.get("source") or {**source_revision(), "note": "fastft's revision at push time"},
        "pushed": pushed,
    }
    return meta


def export_record(entry, src: Path, digest: str) -> dict:
    """What fastft export recorded about this file (matched by sha256 in export.json beside the file's
    run, or in the version's source run); otherwise only its GGUF type."""
    candidates = [src.parent.parent / EXPORT, src.parent / EXPORT]
    if entry.source:
        candidates.append(RunDir(entry.source).export)
    for c in candidates:
        try:
            doc = json.loads(c.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for e in doc.get("exports", []):
            if e.get("sha256") == digest:
                v = e.get("verification") or {}
                return {"quant": e.get("quant"), "converter": e.get("converter"), "export_json": str(c),
                        "verification": {k: v.get(k) for k in ("engine", "passed", "gated", "checks", "same_answer",
                                                                 "stops_kept", "metric", "metric_merged",
                                                                 "metric_gguf", "argmax_agreement",
                                                                 "relative_to_scale") if k in v} or None}
    return {"quant": None, "verification": None, "note": "no export.json records this file: not verified by fastft"}


def gate_summary(gates) -> str:
    if isinstance(gates, dict):
        failed = gates.get("failed") or [k for k, v in gates.items() if isinstance(v, dict) and v.get("passed") is False]
        if failed:
            return "failed: " + ", ".join(map(str, failed)) if isinstance(failed, list) else str(failed)
    return json.dumps(gates, default=str)[:200]


def diff(a, b) -> dict:
    """{"hyperparameters": {key: (a, b)}, "metrics": {key: (a, b)}, "base_model": ..., "data_hash": ...}
    for the keys that differ (hyperparameters: the recipe less output.dir; metrics: numbers)."""
    hyper = differences(a.meta.get("recipe") or {}, b.meta.get("recipe") or {}, skip=("output.dir",))
    ma, mb = flatten(a.meta.get("metrics") or {}), flatten(b.meta.get("metrics") or {})
    num = (int, float)
    metrics = {k: (ma.get(k), mb.get(k)) for k in sorted(set(ma) | set(mb))
               if (isinstance(ma.get(k), num) or isinstance(mb.get(k), num)) and ma.get(k) != mb.get(k)
               and not isinstance(ma.get(k), bool)}
    out = {"hyperparameters": hyper, "metrics": metrics}
    for key in ("data_hash", "status"):
        if a.meta.get(key) != b.meta.get(key):
            out[key] = (a.meta.get(key), b.meta.get(key))
    ba, bb = a.meta.get("base_model") or {}, b.meta.get("base_model") or {}
    if any(ba.get(k) != bb.get(k) for k in ("model_id", "weights_sha256", "tokenizer_sha256", "architecture")):
        out["base_model"] = ({k: ba.get(k) for k in ("model_id", "weights_sha256")},
                             {k: bb.get(k) for k in ("model_id", "weights_sha256")})
    return out


# --- printing ---------------------------------------------------------------------------------------

def _metric(meta: dict, *path):
    node = meta.get("metrics") or {}
    for p in path:
        node = node.get(p) if isinstance(node, dict) else None
    return node


def format_list(reg, name: str | None = None) -> str:
    entries = reg.versions(name)
    if not entries:
        return f"registry {reg.root}: " + (f"no versions of {name!r}" if name else "empty")
    stages = {n: reg.stages(n) for n in {e.name for e in entries}}
    rows = [("REF", "CREATED", "STATUS", "STAGE", "BASE", "QUANT", "LORA", "EVAL LOSS")]
    for e in entries:
        st = ",".join(s for s, v in stages[e.name].items() if v == e.version) or "-"
        lora = e.meta.get("lora") or {}
        loss = _metric(e.meta, "after", "eval_loss")
        rows.append((e.ref, e.created, e.status or "-", st, str((e.meta.get("base_model") or {}).get("model_id")),
                     "nf4" if (e.meta.get("quantization") or {}).get("load_in_4bit") else "16-bit",
                     f"{'dora' if lora.get('use_dora') else 'lora'} r={lora.get('r')}",
                     f"{loss:.4f}" if isinstance(loss, (int, float)) else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def format_show(reg, entry) -> str:
    m = entry.meta
    base = m.get("base_model") or {}
    problems = reg.verify(entry)
    stages = [s for s, v in reg.stages(entry.name).items() if v == entry.version]
    lines = [f"{entry.ref}   pushed {entry.created} from {entry.source}",
             f"  status       {entry.status or '-'}" + (f"   gates: {json.dumps(m.get('gates'), default=str)}"
                                                        if m.get("gates") else ""),
             f"  stage        {', '.join(stages) or '-'}",
             f"  base model   {base.get('model_id')}  ({(base.get('architecture') or {}).get('class')})",
             f"  weights      {base.get('weights_sha256')}",
             f"  tokenizer    {base.get('tokenizer_sha256')}",
             f"  quantization {json.dumps(m.get('quantization'))}",
             f"  lora         {json.dumps(m.get('lora'))}",
             f"  data         {m.get('data_hash')}",
             f"  backend      {m.get('backend')}   fastft {((m.get('versions') or {}).get('fastft'))}, "
             f"torch {((m.get('versions') or {}).get('torch'))}, transformers "
             f"{((m.get('versions') or {}).get('transformers'))}, peft {((m.get('versions') or {}).get('peft'))}",
             f"  source       {json.dumps(m.get('source'))}"]
    flat = {k: v for k, v in flatten(m.get("metrics") or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if flat:
        lines.append("  metrics")
        lines += [f"    {k:<40} {v:.6g}" for k, v in flat.items()]
    lines.append(f"  files        {len(entry.manifest)}, "
                 + ("all match their sha256" if not problems else "DAMAGED: " + "; ".join(problems)))
    for rel in ("report.html", "report.md"):  # fastft report's files, stored with the version
        if rel in entry.manifest:
            what = "report" if rel.endswith("html") else "summary"
            lines.append(f"  {what:<12} {rel}: {reg._object(entry.manifest[rel])}")
    for x in reg.exports(entry):
        v = x.get("verification") or {}
        verdict = "not verified" if not v else ("verified: " + ("pass" if v.get("passed") else "FAIL")
                                                if v.get("gated") else "verified: reported, not gated")
        lines.append(f"  export       {x['file']}  {x.get('quant') or '?'}  {x['bytes'] / 1e6:.1f} MB  {verdict}  "
                     + (x["object"] if x["intact"] else "MISSING: " + x["object"]))
    return "\n".join(lines)


def format_diff(a, b, d: dict) -> str:
    lines = [f"{a.ref} -> {b.ref}"]
    for section in ("hyperparameters", "metrics"):
        items = d.get(section) or {}
        lines.append(f"  {section}" + ("" if items else ": identical"))
        for k, (va, vb) in items.items():
            delta = (f"   ({vb - va:+.4g})" if isinstance(va, (int, float)) and isinstance(vb, (int, float))
                     and not isinstance(va, bool) else "")
            lines.append(f"    {k:<40} {va!s:>14} -> {vb!s}{delta}")
    for key in ("data_hash", "status", "base_model"):
        if key in d:
            lines.append(f"  {key}: {d[key][0]} -> {d[key][1]}")
    return "\n".join(lines)
