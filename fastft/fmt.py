"""Small text formatting shared by messages, tables and reports: percentages and did-you-mean hints.

    from fastft.fmt import did_you_mean, pct
    pct(0.8125)                                   # "81.2%"; None -> "-"
    did_you_mean("unsloht", ["unsloth", "hf"])    # " (did you mean 'unsloth'?)"
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


def pct(v: float | None) -> str:
    """A fraction as a percentage with one decimal; "-" when it was not measured."""
    return "-" if v is None else f"{100 * v:.1f}%"


def closest(word, choices: Iterable, prefixes: bool = False) -> str | None:
    """The choice nearest to ``word`` (difflib ratio >= 0.6), or None. With ``prefixes``, a choice
    that ``word`` starts with, or that starts with ``word``, also counts when nothing is that near."""
    word, choices = str(word), [str(c) for c in choices]
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return close[0]
    if prefixes:
        return next((c for c in choices if word.startswith(c) or c.startswith(word)), None)
    return None


def did_you_mean(word, choices: Iterable) -> str:
    """" (did you mean 'x'?)" naming the choice nearest to ``word``; "" when none is near."""
    close = closest(word, choices)
    return f" (did you mean {close!r}?)" if close is not None else ""
