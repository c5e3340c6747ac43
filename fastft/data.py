"""Datasets: rows from a file or the hub -> chat messages -> token ids with loss labels.

    from fastft import data
    bundle = data.build(recipe.data, tokenizer, seed=recipe.train.seed, max_length=recipe.model.max_seq_length)
    bundle.train[0]   # {"input_ids": [...], "labels": [... -100 on prompt tokens ...]}

Formats (``data.format``):
- ``alpaca``: columns ``instruction``, ``output`` and optional ``input``; becomes one user turn
  (instruction, a blank line, input) and one assistant turn (output).
- ``messages``: a ``messages`` column holding a list of ``{role, content}`` with roles system / user
  / assistant and at least one assistant turn.
- ``sharegpt``: a ``conversations`` column holding a list of ``{from, value}`` with ``from`` human /
  gpt / system (user / assistant are accepted too); becomes the same turns as ``messages``.
- ``text``: one ``text_field`` column, trained on every token.

The tokenizer's chat template renders the turns. With ``train_on_responses_only`` only the tokens of
assistant turns (their content and the end-of-turn token that follows) carry labels; everything
else is -100. Packing is done by TRL's best-fit packer, which restarts position ids per example so
packed examples do not attend to each other.

``build`` is the fast path (``fastft.data_build``: streaming reads, batched tokenization across
processes, an on-disk cache); ``build_reference`` is the original per-example method, kept as the
reference the fast path is tested against and as its fallback.
"""
from __future__ import annotations

from .data_ref import (  # the per-example path, re-exported: fastft.data is the one import for data
    IGNORE,
    LOCAL_SUFFIXES,
    ROLES,
    SHAREGPT_ROLES,
    DataBundle,
    DataError,
    _ids,
    _read_json,
    _read_jsonl,
    build_reference,
    content_hash,
    mix,
    mix_counts,
    read_rows,
    to_messages,
    tokenize,
)

__all__ = ["IGNORE", "LOCAL_SUFFIXES", "ROLES", "SHAREGPT_ROLES", "DataBundle", "DataError", "_ids", "_read_json",
           "_read_jsonl", "build", "build_reference", "content_hash", "mix", "mix_counts", "read_rows", "to_messages",
           "tokenize"]


def build(d, tokenizer, *, seed: int, max_length: int, log=print) -> DataBundle:
    """Read, validate, split and tokenize a recipe's data section ``d`` (its paths already resolved
    by ``fastft.recipe``); ``seed`` (train.seed) orders the held-out split and the mix, and
    ``max_length`` (model.max_seq_length) truncates each example. The result is cached under
    ``$FASTFT_CACHE/data/`` and loaded from there by the next call with the same data, tokenizer,
    seed and max_length; it is the same, token for token, as ``build_reference``'s."""
    from . import data_build

    return data_build.build(d, tokenizer, seed=seed, max_length=max_length, log=log)
