"""Nested dicts (recipes, metrics) as dotted keys: ``{"lora": {"r": 16}}`` <-> ``lora.r``, and the
keys whose values differ between two of them. One rule for every place that compares recipes:
resume checks, the registry's diff and the report's side-by-side runs."""
from __future__ import annotations


def flatten(d, prefix: str = "", keep_empty: bool = False) -> dict:
    """``{"a": {"b": 1}, "c": [2]}`` -> ``{"a.b": 1, "c": [2]}``: lists stay values; an empty dict
    disappears, or stays a value with ``keep_empty`` (a table that should still show the key)."""
    out = {}
    if isinstance(d, dict) and (d or not keep_empty or not prefix):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}.", keep_empty))
    else:
        out[prefix.rstrip(".")] = d
    return out


def differences(a: dict, b: dict, skip=()) -> dict[str, tuple]:
    """``{key: (value in a, value in b)}`` for the dotted keys whose values differ (None: absent on
    that side), in sorted key order; ``skip`` names keys not to compare."""
    fa, fb = flatten(a), flatten(b)
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb))
            if k not in skip and fa.get(k) != fb.get(k)}
