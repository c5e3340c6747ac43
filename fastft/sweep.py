"""Many adapters from one recipe: a sweep (every combination of some keys' values) or a list of
named adapters (one per task or tenant), each ending as a normal run directory.

    from fastft import sweep
    s = sweep.load("recipes/smollm2-sweep.yaml")     # the base recipe and one Recipe per adapter
    [(a.name, a.overrides) for a in s.adapters]
    result = sweep.run(s)                            # output.dir/<name>/ per adapter, + the set's table

In a recipe file, beside the usual sections, one of:

    sweep:                        # every combination, in order (the last key varies fastest)
      lora.r: [8, 16, 32]
      train.lr: [1.0e-3, 2.0e-3]

    adapters:                     # named adapters, each with its own overrides
      - name: support
        data.train: data/support.jsonl
      - name: billing
        data.train: data/billing.jsonl
        lora: {r: 32}             # nested sections work too

The adapters share one frozen base, so the keys that make the base (``model.*``, ``backend``,
``kernels``, ``distributed.*``) are the set's: an adapter or sweep key there is an error that names
it. ``output.dir`` is the set's folder; adapter ``name`` trains in ``output.dir/name``. Every
adapter's recipe is validated before anything trains.

``run`` trains the adapters one after another, each exactly as ``fastft train`` trains its recipe
(checkpoints, resume, evaluation, report). Run again, it skips the finished adapters and resumes
an unfinished one, so a killed set goes on where it stopped. An adapter that fails is recorded
and the others still train. At the end ``output.dir`` holds ``sweep.json`` and ``sweep.md`` (every
adapter, best first by the recipe's ``eval.metric``, then held-out loss) and ``compare.html`` (the
adapters side by side, fastft.report).
"""
from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import recipe as recipe_mod
from .errors import FastftError
from .files import atomic_write_text
from .flat import flatten
from .fmt import pct

SET_KEYS = ("sweep", "adapters")
SHARED_SECTIONS = ("model", "distributed")
SHARED_KEYS = ("backend", "kernels", "output.dir")
SWEEP_JSON, SWEEP_MD = "sweep.json", "sweep.md"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class SweepError(FastftError, ValueError):
    """A set of adapters that cannot run; the message names the adapter and the key."""


@dataclass
class Adapter:
    name: str
    overrides: dict[str, Any]  # dotted key -> value, what differs from the base recipe
    recipe: recipe_mod.Recipe


@dataclass
class AdapterSet:
    base: recipe_mod.Recipe
    kind: str  # "sweep" or "adapters"
    adapters: list[Adapter] = field(default_factory=list)

    @property
    def out_dir(self) -> Path:
        return Path(self.base.output.dir)


def is_set(path: str | Path) -> bool:
    """Whether a recipe file holds ``sweep:`` or ``adapters:`` (a set, not one run)."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and any(k in raw for k in SET_KEYS)


def load(path: str | Path, overrides: list[str] | None = None) -> AdapterSet:
    """Read a set recipe; ``overrides`` (``--set``) apply to the base, before the set's own."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {path} (give the path of a .yaml file; see recipes/)")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    return from_dict(raw, overrides, source=str(path))


def from_dict(raw: Any, overrides: list[str] | None = None, source: str | None = None) -> AdapterSet:
    if not isinstance(raw, dict) or not any(k in raw for k in SET_KEYS):
        raise SweepError(f"{source or 'recipe'}: no sweep: or adapters: section; `fastft train` runs it as one recipe")
    if all(k in raw for k in SET_KEYS):
        raise SweepError(f"{source}: sweep: and adapters: together; give one (a sweep is the product of its keys' "
                         "values, adapters a list of named overrides)")
    kind = "sweep" if "sweep" in raw else "adapters"
    spec = raw[kind]
    base_raw = {k: v for k, v in raw.items() if k not in SET_KEYS}
    base = recipe_mod.from_dict(base_raw, overrides, source=source)
    base_raw = base.to_dict()  # overrides applied, paths resolved: what every adapter starts from
    named = _sweep(spec, source) if kind == "sweep" else _adapters(spec, source)
    problems, out = [], AdapterSet(base, kind)
    for name, changes in named:
        child = json.loads(json.dumps(base_raw))
        for key, value in changes.items():
            _set(child, key, value)
        child["output"]["dir"] = str(Path(base.output.dir) / name)
        try:
            r = recipe_mod.from_dict(child, source=source)
        except recipe_mod.RecipeError as e:
            problems += [f"adapter {name}: {p}" for p in e.problems]
            continue
        out.adapters.append(Adapter(name, changes, r))
    if problems:
        raise recipe_mod.RecipeError(problems, source)
    return out


def _check_key(key: str, where: str) -> None:
    if key.split(".")[0] in SHARED_SECTIONS or key in SHARED_KEYS or key in SET_KEYS:
        raise SweepError(f"{where}: {key}: the adapters share one frozen base, so model.*, backend, kernels and "
                         "distributed.* are the set's, and output.dir is the set's folder: set them once at the top "
                         "of the recipe, not per adapter")


def _sweep(spec, source) -> list[tuple[str, dict]]:
    if not isinstance(spec, dict) or not spec:
        raise SweepError(f"{source}: sweep: must map dotted keys to lists of values, e.g. lora.r: [8, 16, 32]")
    keys = list(flatten(spec))
    values = flatten(spec)
    for key in keys:
        _check_key(key, f"{source}: sweep")
        v = values[key]
        if not isinstance(v, list) or not v:
            raise SweepError(f"{source}: sweep: {key}: give a non-empty list of values (got {v!r}); a key with "
                             "one value belongs in the recipe itself")
        if len({json.dumps(x, sort_keys=True) for x in v}) != len(v):
            raise SweepError(f"{source}: sweep: {key}: the same value twice in {v}")
    out, seen = [], {}
    for combo in itertools.product(*(values[k] for k in keys)):
        changes = dict(zip(keys, combo))
        name = "-".join(f"{k.rsplit('.', 1)[-1]}{_value_name(v)}" for k, v in changes.items())
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:64]
        if name in seen:
            raise SweepError(f"{source}: sweep: two combinations would share the folder {name!r} "
                             f"({seen[name]} and {changes}); use adapters: with explicit names")
        seen[name] = changes
        out.append((name, changes))
    return out


def _value_name(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, dict)):
        return "x".join(map(str, v)) if isinstance(v, list) else "_".join(f"{k}{x}" for k, x in v.items())
    return str(v)


def _adapters(spec, source) -> list[tuple[str, dict]]:
    if not isinstance(spec, list) or not spec:
        raise SweepError(f"{source}: adapters: must be a list of mappings, each with a name and its overrides")
    out, names = [], set()
    for i, item in enumerate(spec, 1):
        where = f"{source}: adapters[{i}]"
        if not isinstance(item, dict) or "name" not in item:
            raise SweepError(f"{where}: each adapter is a mapping with a name: (got {item!r})")
        name = str(item["name"])
        if not NAME.match(name):
            raise SweepError(f"{where}: name {name!r}: letters, digits, '.', '_' and '-' only (it names a folder), "
                             "at most 64 characters")
        if name in names:
            raise SweepError(f"{where}: name {name!r} twice; every adapter needs its own")
        names.add(name)
        changes = flatten({k: v for k, v in item.items() if k != "name"})
        for key in changes:
            _check_key(key, f"{where} ({name})")
        out.append((name, changes))
    return out


def _set(raw: dict, key: str, value) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = node[p] = {}
        node = nxt
    node[parts[-1]] = value


# --- running ---------------------------------------------------------------------------------------

def run(s: AdapterSet, log=print, overwrite: bool = False) -> dict:
    """Train every adapter in turn (finished ones skipped, unless ``overwrite``), then write the
    set's table and comparison. Returns the table (also ``output.dir/sweep.json``)."""
    from . import checkpoints, train

    s.out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, a in enumerate(s.adapters, 1):
        out = Path(a.recipe.output.dir)
        change = ", ".join(f"{k}={v}" for k, v in a.overrides.items()) or "the base recipe"
        state = checkpoints.inspect(out) if out.is_dir() else None
        if state is not None and state.kind == "finished" and not overwrite:
            log(f"fastft: sweep: adapter {i}/{len(s.adapters)} {a.name} ({change}): finished earlier, kept")
            rows.append(_row(a, "finished earlier"))
            continue
        log(f"fastft: sweep: adapter {i}/{len(s.adapters)} {a.name} ({change}) -> {out}")
        try:
            train.run(a.recipe, log=log, overwrite=overwrite)
            rows.append(_row(a, "trained"))
        except train.TrainInterrupted:
            _write(s, rows + [_row(a, "interrupted")] + [_row(b, "not run") for b in s.adapters[i:]], log)
            raise
        except FastftError as e:
            log(f"fastft: sweep: adapter {a.name} failed: {e}")
            rows.append(_row(a, f"failed: {str(e).splitlines()[0]}"))
    return _write(s, rows, log)


def _row(a: Adapter, status: str) -> dict:
    info_path = Path(a.recipe.output.dir) / "fastft.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    metrics = info.get("metrics") or {}
    ev = info.get("eval") or {}
    metric = a.recipe.eval.metric
    task = (ev.get("task") or {}).get("adapter") or {}
    reg = ev.get("regression") or {}
    return {"name": a.name, "overrides": a.overrides, "status": status, "run_dir": a.recipe.output.dir,
            "metric": metric, "score": task.get(metric), "heldout_loss": (metrics.get("after") or {}).get("eval_loss"),
            "forgotten": reg.get("forgotten"), "tokens_per_second": (metrics.get("train") or {}).get("tokens_per_second"),
            "gates": (info.get("gates") or {}).get("passed")}


def _rank(row: dict):
    score = row["score"]
    loss = row["heldout_loss"]
    return (score is None, -(score or 0.0), loss is None, loss or 0.0)


def _write(s: AdapterSet, rows: list[dict], log) -> dict:
    from . import report

    rows = sorted(rows, key=_rank)
    table = {"kind": s.kind, "recipe": s.base.source, "out_dir": str(s.out_dir), "adapters": rows,
             "best": next((r["name"] for r in rows if r["score"] is not None or r["heldout_loss"] is not None), None)}
    atomic_write_text(s.out_dir / SWEEP_JSON, json.dumps(table, indent=2, default=str) + "\n")
    md = format_table(table)
    atomic_write_text(s.out_dir / SWEEP_MD, md + "\n")
    log(md)
    done = [r["run_dir"] for r in rows if (Path(r["run_dir"]) / "fastft.json").is_file()]
    if len(done) > 1:
        html, _ = report.write(done, out=s.out_dir)
        log(f"fastft: sweep: the adapters side by side: {html}")
    return table


def format_table(table: dict) -> str:
    rows = table["adapters"]
    metric = rows[0]["metric"] if rows else "metric"
    keys = sorted({k for r in rows for k in r["overrides"]})
    head = ["adapter", *keys, metric, "held-out loss", "forgotten", "tokens/s", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["name"], *(str(r["overrides"].get(k, "")) for k in keys),
                 "-" if r["score"] is None else pct(r["score"]),
                 "-" if r["heldout_loss"] is None else f"{r['heldout_loss']:.4f}",
                 "-" if r["forgotten"] is None else pct(r["forgotten"]),
                 "-" if r["tokens_per_second"] is None else f"{r['tokens_per_second']:,.0f}", r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    best = f"best: {table['best']} (by {metric}, then held-out loss)" if table["best"] else "no adapter finished"
    return f"fastft: sweep of {len(rows)} adapters in {table['out_dir']}; {best}\n" + "\n".join(lines)


def exit_code(table: dict) -> int:
    """1 when an adapter failed, 3 (the gate exit) when one was rejected by a gate, else 0."""
    from .gates import EXIT_GATE

    if any(r["status"].startswith("failed") for r in table["adapters"]):
        return 1
    if any(r["gates"] is False for r in table["adapters"]):
        return EXIT_GATE
    return 0
