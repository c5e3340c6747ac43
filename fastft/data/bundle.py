"""What every data module shares: the built data (``DataBundle``), the label of a token outside the
loss (``IGNORE``) and the error bad data raises (``DataError``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import FastftError

IGNORE = -100


class DataError(FastftError, ValueError):
    """Bad data: the message names the file, the row (1-based) and the column."""


@dataclass
class DataBundle:
    train: Any  # datasets.Dataset with input_ids, labels
    eval: Any | None
    eval_pairs: list[tuple[list[dict], str]]  # (prompt messages, reference answer) for exact match
    data_hash: str
    stats: dict = field(default_factory=dict)
    eval_slices: list[str | None] = field(default_factory=list)  # each eval pair's `slice` column (None: none)
    info: dict = field(default_factory=dict)  # how it was built: rows, seconds, cache {path, hit}, tokenizer path
