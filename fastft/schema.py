"""Type and range checks for the recipe schema: each answers with the text a ``RecipeError`` lists.

    check_type(16, int)                      # (True, 16, "")
    check_type("16", int)                    # (False, None, "expected an integer, got a string '16'")
    range_problem(0.0, 0.0, 1.0, True, False)  # "must be > 0.0, got 0.0"
"""
from __future__ import annotations

import difflib
import types
import typing
from typing import Any, Literal, Union


def type_name(v) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def check_type(value, tp) -> tuple[bool, Any, str]:
    """(ok, coerced value, problem). The problem reads "expected <what>, got <value>"."""
    ok, coerced, want = match_type(value, tp)
    if ok:
        return True, coerced, ""
    if typing.get_origin(tp) is Literal:
        close = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close and isinstance(value, str) else ""
        return False, None, f"must be one of {want}, got {value!r}{hint}"
    return False, None, f"expected {want}, got {type_name(value)} {value!r}"


def match_type(value, tp) -> tuple[bool, Any, str]:
    """(ok, coerced value, description of what tp accepts)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        wants = []
        for arg in typing.get_args(tp):
            ok, v, want = match_type(value, arg)
            if ok:
                return True, v, ""
            wants.append(want)
        return False, None, " or ".join(wants)
    if origin is Literal:
        allowed = typing.get_args(tp)
        ok = any(value == a and type(value) is type(a) for a in allowed)
        return ok, value, ", ".join(repr(a) for a in allowed)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        ok = isinstance(value, list) and bool(value) and all(isinstance(v, item_tp) for v in value)
        return ok, list(value) if ok else None, f"a non-empty list of {type_name(item_tp()).split()[-1]}s"
    if tp is type(None):
        return value is None, None, "null"
    if tp is bool:
        return isinstance(value, bool), value, "true or false"
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value, "an integer"
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else None, "a number"
    if tp is str:
        return isinstance(value, str), value, "a string"
    raise TypeError(f"unsupported schema type {tp}")  # a bug in the schema, not in the recipe


def range_problem(v, lo, hi, lo_open, hi_open) -> str | None:
    if lo is not None and (v < lo or (lo_open and v == lo)):
        return f"must be {'>' if lo_open else '>='} {lo}, got {v}"
    if hi is not None and (v > hi or (hi_open and v == hi)):
        return f"must be {'<' if hi_open else '<='} {hi}, got {v}"
    return None
