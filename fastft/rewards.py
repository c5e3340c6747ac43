"""GRPO rewards declared in the recipe: the task's own metric, a format reward, a length penalty.

    from fastft import rewards
    funcs, weights = rewards.from_recipe(recipe, references)    # TRL reward functions + their weights
    rewards.task_score("{\"city\": \"Lyon\"}", "{\"city\": \"Lyon\", \"quantity\": 3}", "json_match")  # 0.5

Each sampled answer gets the weighted sum of:
- the task reward (``train.reward``, default ``eval.metric``) against the row's reference, in [0, 1]:
  ``exact_match`` and ``contains`` score 1 or 0 as fastft.metrics does; ``json_match`` gives
  partial credit, the share of the scored fields (``train.reward_fields``, default
  ``eval.json_fields``, else every field of the reference) whose value equals the reference's; an
  answer that does not parse as JSON scores 0;
- with ``train.reward_format: w``, w x 1 when the answer has the reference's form (JSON that parses
  when the reference is JSON, no more lines than the reference otherwise);
- with ``train.reward_length_penalty: p``, minus p per token beyond the reference's length.
``train.reward: module:function`` replaces the task reward with a Python function called as TRL
calls reward functions: ``fn(prompts, completions, reference=[...], **kwargs) -> list[float]``.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import FastftError
from .gates import METRICS
from .metrics import contains, normalize, parse_json


class RewardError(FastftError, ValueError):
    """A reward the recipe declares that cannot be computed; the message says what to change."""


def text_of(completion) -> str:
    """A TRL completion (text, or a conversational list of messages) as the answer's text."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if isinstance(m, dict))


def task_score(answer: str, reference: str, metric: str, fields: list[str] | None = None) -> float:
    """The task metric of one answer, in [0, 1]; json_match with partial credit per field."""
    if metric == "exact_match":
        return float(normalize(answer) == normalize(reference))
    if metric == "contains":
        return float(contains(answer, reference))
    if metric != "json_match":
        raise RewardError(f"unknown reward metric {metric!r}; use one of {', '.join(METRICS)}")
    ok, got = parse_json(answer)
    _, want = parse_json(reference)
    if not ok:
        return 0.0
    if not isinstance(want, dict):
        return float(got == want)
    keys = fields or list(want)
    if not isinstance(got, dict) or not keys:
        return float(got == want)
    return sum(1.0 for k in keys if k in got and got[k] == want.get(k)) / len(keys)


def form_score(answer: str, reference: str) -> float:
    """1 when the answer has the reference's form: JSON that parses (reference JSON), else no more lines."""
    if parse_json(reference)[0]:
        return float(parse_json(answer)[0])
    return float(len(answer.strip().splitlines()) <= max(1, len(reference.strip().splitlines())))


def _words(text: str) -> int:
    return len(text.split())


def check_references(references: list[str], metric: str, fields: list[str] | None, where: str) -> None:
    """A json_match reward needs JSON references holding every scored field: say which row does not."""
    if metric != "json_match":
        return
    seen: set[str] = set()
    for i, ref in enumerate(references, 1):
        ok, want = parse_json(ref)
        if not ok:
            raise RewardError(f"{where} row {i}: the reference is not JSON, so the json_match reward cannot score "
                              f"it ({ref[:60]!r}); fix the row or set train.reward: exact_match / contains")
        if fields:
            if not isinstance(want, dict):
                raise RewardError(f"{where} row {i}: train.reward_fields names fields but the reference is not a "
                                  "JSON object")
            seen |= set(want)
            missing = [f for f in fields if f not in want]
            if missing:
                raise RewardError(f"train.reward_fields: unknown field {missing[0]!r}: not in the reference of "
                                  f"{where} row {i} (its fields: {', '.join(want) or 'none'}); fix the field name "
                                  "(or eval.json_fields, which the reward defaults to)")


def import_reward(spec: str, search: list[str]) -> Callable:
    """``module:function`` imported with ``search`` folders (the recipe's, the working directory) on sys.path."""
    mod_name, _, fn_name = spec.partition(":")
    added = [p for p in search if p not in sys.path]
    sys.path[:0] = added
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise RewardError(f"train.reward: cannot import module {mod_name!r} ({e}); put {mod_name}.py beside the "
                          "recipe or in the working directory, or install it") from None
    finally:
        for p in added:
            if p in sys.path:
                sys.path.remove(p)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise RewardError(f"train.reward: {mod_name} has no function {fn_name!r}")
    return fn


def from_recipe(recipe, references: list[str], count_tokens: Callable[[str], int] | None = None,
                where: str = "data.train") -> tuple[list[Callable], list[float], dict]:
    """TRL reward functions, their weights, and the reward's description for fastft.json."""
    t = recipe.train
    spec = t.reward or recipe.eval.metric
    fields = t.reward_fields if t.reward_fields is not None else recipe.eval.json_fields
    funcs: list[Callable] = []
    if ":" in spec:
        folders = [str(Path(recipe.source).resolve().parent)] if recipe.source else []
        funcs.append(import_reward(spec, folders + [str(Path.cwd())]))
        described = {"task": spec, "kind": "python"}
    else:
        check_references(references, spec, fields, where)

        def task(prompts, completions, reference, **kw):
            return [task_score(text_of(c), r, spec, fields) for c, r in zip(completions, reference)]

        task.__name__ = spec
        funcs.append(task)
        described = {"task": spec, "kind": "metric",
                     "fields": fields if spec == "json_match" else None,
                     "partial_credit": spec == "json_match"}
    weights = [1.0]
    if t.reward_format > 0:
        def form(prompts, completions, reference, **kw):
            return [form_score(text_of(c), r) for c, r in zip(completions, reference)]

        form.__name__ = "format"
        funcs.append(form)
        weights.append(t.reward_format)
    if t.reward_length_penalty > 0:
        n_tok = count_tokens or _words

        def length(prompts, completions, reference, **kw):
            return [-float(max(0, n_tok(text_of(c)) - n_tok(r))) for c, r in zip(completions, reference)]

        length.__name__ = "length_penalty"
        funcs.append(length)
        weights.append(t.reward_length_penalty)
    described.update(format_weight=t.reward_format, length_penalty=t.reward_length_penalty)
    return funcs, weights, described
