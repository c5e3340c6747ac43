"""Eval gates: the grammar a recipe's ``eval.gates`` is written in, and applying it to a result.

    eval:
      gates:
        task.exact_match: ">= 0.8"              # the held-out metric (eval.metric) of the adapter
        task.slice.hard.exact_match: ">= 0.5"   # one slice of the held-out set
        regression.forgotten: "<= 0.05"         # share of general items the base knew and the adapter lost

Parsed when a recipe is validated (``fastft.recipe`` imports this module, and nothing here loads a
model) and applied by ``fastft.evaluate`` after an evaluation. A failed gate marks the run rejected
and the command exits 3 (``EXIT_GATE``) unless ``--no-gate-exit``.
"""
from __future__ import annotations

import math
import operator
import re
import sys
from dataclasses import dataclass
from typing import Any

from .errors import EXIT_GATE, FastftError

METRICS = ("exact_match", "contains", "json_match")

class GateError(FastftError, ValueError):
    """A gate whose metric path or condition cannot be read; the message says what is accepted."""


_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_CONDITION = re.compile(r"^\s*(>=|<=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass
class Gate:
    path: str
    op: str
    threshold: float

    @property
    def condition(self) -> str:
        return f"{self.op} {self.threshold:g}"

    def passes(self, value: float | None) -> bool:
        return value is not None and not math.isnan(value) and _OPS[self.op](value, self.threshold)


def gate_paths(cfg) -> list[str]:
    """The metric paths a gate may name for this eval config (slices: ``task.slice.<name>.<metric>``)."""
    paths = [f"task.{cfg.metric}", "task.gain", "task.loss", "task.perplexity", f"task.slice.<name>.{cfg.metric}"]
    return paths + ["regression.accuracy", "regression.forgotten", "regression.loss_delta"]


def parse_gate(path: str, condition: Any, cfg) -> Gate:
    """Check one gate against the eval config ``cfg`` (recipe.eval); raises GateError."""
    if not isinstance(condition, str):
        raise GateError(f"the condition must be a quoted string such as \">= 0.8\", got {condition!r}")
    m = _CONDITION.match(condition)
    if not m:
        raise GateError(f"cannot read the condition {condition!r}: write an operator (>=, <=, >, <) and a "
                        "number, quoted in YAML, e.g. \">= 0.8\"")
    parts = path.split(".")
    valid = ", ".join(gate_paths(cfg))
    if parts[0] == "task":
        rest = parts[1:]
        ok = (len(rest) == 1 and rest[0] in (cfg.metric, "gain", "loss", "perplexity")) or (
            len(rest) == 3 and rest[0] == "slice" and rest[1] and rest[2] == cfg.metric)
        if not ok:
            last = rest[-1] if rest else ""
            if last in METRICS and last != cfg.metric:
                raise GateError(f"the held-out set is scored with eval.metric {cfg.metric!r}, not {last!r}; "
                                f"gate on task.{cfg.metric} or set eval.metric: {last}")
            raise GateError(f"unknown metric path {path!r}; valid: {valid}")
    elif parts[0] == "regression":
        if len(parts) != 2 or parts[1] not in ("accuracy", "forgotten", "loss_delta"):
            raise GateError(f"unknown metric path {path!r}; valid: {valid}")
        if not cfg.regression:
            raise GateError("a regression gate needs a regression set: set eval.regression (e.g. "
                            "asset:regression/smollm2-135m-instruct.jsonl for smollm2-135m-instruct)")
    else:
        raise GateError(f"unknown metric path {path!r}: it starts with task. or regression.; valid: {valid}")
    return Gate(path, m.group(1), float(m.group(2)))


def measured(result: dict, path: str) -> float | None:
    """The value a gate path names in an ``compare`` result (None: not measured)."""
    parts = path.split(".")
    section = result.get(parts[0])
    if not section:
        return None
    if parts[0] == "regression":
        return section["adapter"]["accuracy"] if parts[1] == "accuracy" else section.get(parts[1])
    if parts[1] == "gain":
        return section.get("gain")
    if parts[1] == "slice":
        return (section["adapter"].get("slices", {}).get(parts[2]) or {}).get(parts[3])
    return section["adapter"].get(parts[1])


def check_gates(gates: dict[str, str], result: dict, cfg) -> dict:
    """``{"passed": bool, "results": [{gate, condition, value, passed}], "failed": [message...]}``."""
    rows, failed = [], []
    for path, condition in gates.items():
        g = parse_gate(path, condition, cfg)
        value = measured(result, path)
        ok = g.passes(value)
        rows.append({"gate": path, "condition": g.condition, "value": value, "passed": ok})
        if not ok:
            if value is None:
                why = "not measured"
                if path.startswith("task.slice."):
                    names = ", ".join((result.get("task") or {}).get("adapter", {}).get("slices", {})) or "none"
                    why += f" (no slice {path.split('.')[2]!r} in the held-out data; slices: {names})"
                elif not result.get(path.split(".")[0]):
                    why += " (no held-out data)" if path.startswith("task") else " (no regression set)"
                elif path == "regression.forgotten":
                    why += " (the base answered no regression item correctly: nothing to forget; check the set)"
            else:
                why = f"measured {value:.4g}"
            failed.append(f"gate {path} {g.condition} failed: {why}")
    return {"passed": not failed, "results": rows, "failed": failed}


def gate_exit(result_or_info: dict, no_gate_exit: bool, err=None) -> int:
    """The exit code after an evaluation: EXIT_GATE when a gate failed (unless only reporting)."""
    err = err or sys.stderr
    gates = result_or_info.get("gates")
    if not gates or gates["passed"]:
        return 0
    for msg in gates["failed"]:
        print(f"fastft: {msg}", file=err)
    if no_gate_exit:
        print("fastft: --no-gate-exit: gates failed, exiting 0 anyway", file=err)
        return 0
    print(f"fastft: gates failed (exit {EXIT_GATE}; --no-gate-exit only reports)", file=err)
    return EXIT_GATE
