"""Text metrics: one answer scored against its reference (eval's task metrics, GRPO's task reward).

    from fastft import metrics
    metrics.score("  Fruit \n", "fruit", "exact_match")        # True
    metrics.score("It is 14.", "4", "contains")                 # False: whole words only

Answers and references are compared after ``normalize`` (case, surrounding and repeated whitespace):
- ``exact_match``: the answer equals the reference.
- ``contains``: the reference appears in the answer as whole words ("4" is not found in "14").
- ``json_match``: the answer parses as JSON (one surrounding ``` fence allowed) and its
  ``eval.json_fields`` equal the reference's (the whole object when no fields are named); an
  answer that does not parse, or lacks a field, is a miss (and so is a reference that is not JSON).
"""
from __future__ import annotations

import json
import re
from typing import Any

from .gates import METRICS


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def contains(answer: str, reference: str) -> bool:
    """The normalized reference appears in the normalized answer as whole words."""
    ref = normalize(reference)
    if not ref:
        return False
    return re.search(r"(?<!\w)" + re.escape(ref) + r"(?!\w)", normalize(answer)) is not None


_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.S)


def parse_json(text: str) -> tuple[bool, Any]:
    """(parsed, value): the text as JSON, allowing one surrounding ``` fence."""
    text = text.strip()
    m = _FENCE.match(text)
    if m:
        text = m.group(1).strip()
    try:
        return True, json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return False, None


def json_match(answer: str, reference: str, fields: list[str] | None = None) -> bool:
    ok, got = parse_json(answer)
    if not ok:
        return False
    ok_ref, want = parse_json(reference)
    if not ok_ref:  # a data problem, reported by evaluate.compare(); never a reason to lose a finished run
        return False
    if not fields:
        return got == want
    if not isinstance(got, dict) or not isinstance(want, dict):
        return False
    return all(f in got and got[f] == want.get(f) for f in fields)


def score(answer: str, reference: str, metric: str, json_fields: list[str] | None = None) -> bool:
    if metric == "exact_match":
        return normalize(answer) == normalize(reference)
    if metric == "contains":
        return contains(answer, reference)
    if metric == "json_match":
        return json_match(answer, reference, json_fields)
    raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
