"""Datasets for the methods past SFT: preference pairs (dpo, orpo) and prompts with references (grpo).

    from fastft.data import preference
    md = preference.build(recipe, tokenizer)
    md.train[0]            # dpo/orpo: {"prompt": [messages], "chosen": [assistant turn], "rejected": [...]}
                           # grpo:     {"prompt": [messages], "reference": "...", "slice": ...}
    md.held_out            # a fastft.data.DataBundle for the evaluation at the end (prompt + reference rows)
    preference.eval_file(recipe, tokenizer, "held.jsonl")   # fastft eval RUN --data FILE: the same, from a file

``data.format: preference`` rows (.jsonl/.json/.csv/.parquet, read by ``fastft.data.read_rows``):
- ``prompt``: text (one user turn) or a list of ``{role, content}`` messages ending with a user turn;
- ``chosen`` / ``rejected``: the preferred and the dispreferred answer, text (or one assistant message);
- optional ``slice`` (per-slice scores in the evaluation), other columns are ignored.
GRPO takes the task's usual alpaca / messages rows: the prompt is every turn before the last, the
reference is the last (assistant) turn, which the reward compares the sampled answers with.

The held-out rows (``data.eval`` or ``data.eval_fraction`` of the training file, split by
``train.seed`` as SFT splits) are scored after training by fastft.evaluate as an SFT run's are:
the prompt, and the chosen answer (preference) or the reference (grpo) as the reference answer.
For dpo / orpo, ``data.eval`` may also be the task's usual alpaca / messages file: its rows are
evaluated the same way, and only preference rows add a held-out DPO / ORPO loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .bundle import DataBundle, DataError
from .formats import to_messages
from .per_example import content_hash, tokenize
from .sources import read_rows
from .split import held_out_split

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


@dataclass
class MethodData:
    """What a dpo / orpo / grpo run trains and evaluates on."""

    train: Any  # datasets.Dataset in TRL's conversational form
    trl_eval: Any | None  # the held-out rows in the same form (dpo/orpo: held-out DPO/ORPO loss), or None
    held_out: Any  # fastft.data.DataBundle: eval rows with labels + (prompt, reference) pairs for evaluate
    stats: dict = field(default_factory=dict)

    @property
    def data_hash(self) -> str:
        return self.held_out.data_hash


# --- one row -----------------------------------------------------------------------------------

def _answer(value, col: str, where: str) -> str:
    """chosen / rejected as text: a string, or one assistant message (as a dict or a one-item list)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get("role") != "assistant" or not isinstance(value.get("content"), str):
            raise DataError(f"{where}: column {col!r} as a message must be {{role: assistant, content: text}}")
        value = value["content"]
    if not isinstance(value, str):
        raise DataError(f"{where}: column {col!r} must be text (the answer), got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: empty {col!r} answer")
    return value.strip()


def _prompt(value, where: str) -> list[dict]:
    """The prompt as messages: text (one user turn) or a list of messages ending with a user turn,
    each message checked as ``to_messages`` checks a messages row."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: empty 'prompt'")
        return [{"role": "user", "content": value.strip()}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: 'prompt' must be text or a non-empty list of {{role, content}} messages, "
                        f"got {type(value).__name__}")
    # to_messages wants a conversation with an answer: check the prompt as one, then drop the answer
    answered = value + [{"role": "assistant", "content": ""}]
    msgs = to_messages({"messages": answered}, "messages", f"{where} (prompt)")[:-1]
    if msgs[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt's last message must be the user's (the answers follow it), "
                        f"got {msgs[-1]['role']!r}")
    return msgs


def preference_row(row: dict, where: str) -> dict:
    """One ``data.format: preference`` row as TRL's conversational preference example (+ its slice)."""
    missing = [c for c in PREFERENCE_COLUMNS if row.get(c) is None]
    if missing:
        found = ", ".join(sorted(row)) or "none"
        raise DataError(f"{where}: missing column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                        f"(data.format preference needs prompt, chosen and rejected; found {found})")
    prompt = _prompt(row["prompt"], where)
    chosen, rejected = _answer(row["chosen"], "chosen", where), _answer(row["rejected"], "rejected", where)
    if " ".join(chosen.split()) == " ".join(rejected.split()):
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same answer (nothing to prefer); fix or remove the row")
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "slice": None if row.get("slice") is None else str(row["slice"])}


def reference_row(row: dict, fmt: str, where: str, text_field: str = "text") -> dict:
    """One alpaca / messages row as a GRPO prompt with its reference answer (+ its slice)."""
    if fmt == "alpaca" and (row.get("output") is None or (isinstance(row["output"], str) and not row["output"].strip())):
        raise DataError(f"{where}: no reference answer ('output' is missing or empty): train.method grpo scores "
                        "sampled answers against each row's reference; give every row an output")
    msgs = to_messages(row, fmt, where, text_field)
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's reference answer: train.method grpo "
                        "scores sampled answers against it")
    if msgs[-2:-1] == [] or msgs[-2]["role"] != "user":
        raise DataError(f"{where}: the reference answer must follow a user turn (the prompt)")
    return {"prompt": msgs[:-1], "reference": msgs[-1]["content"],
            "slice": None if row.get("slice") is None else str(row["slice"])}


# --- the whole set -----------------------------------------------------------------------------

def _example(r: dict, method: str, d, what: str, where: str) -> dict:
    if method == "grpo":
        return reference_row(r, d.format, where, d.text_field)
    if what == "data.eval" and r.get("chosen") is None and ("instruction" in r or "messages" in r):
        # a held-out file of the task's usual rows: evaluated (prompt vs reference), no pair loss
        ex = reference_row(r, "messages" if "messages" in r else "alpaca", where, d.text_field)
        return {"prompt": ex["prompt"], "chosen": [{"role": "assistant", "content": ex["reference"]}],
                "rejected": None, "slice": ex["slice"]}
    return preference_row(r, where)


def _or_skipped(make, skipped: list[str] | None):
    """``make()``, or None with its DataError kept in ``skipped`` (data.skip_bad_rows)."""
    try:
        return make()
    except DataError as e:
        if skipped is None:
            raise
        skipped.append(str(e))
        return None


def read(d, method: str, source: str, what: str, skipped: list[str] | None) -> list[dict]:
    """Every row of ``source`` as an example for ``method``; bad rows raise (or go to ``skipped``)."""
    rows = read_rows(source, d.split, skipped)
    if d.max_examples and what == "data.train":
        rows = rows[: d.max_examples]
    made = (_or_skipped(lambda: _example(r, method, d, what, f"{source} row {i}"), skipped)
            for i, r in enumerate(rows, 1))
    out = [ex for ex in made if ex is not None]
    if not out:
        raise DataError(f"{source}: every row is invalid ({what}); first problem: {skipped[0]}" if rows else
                        f"{source}: no rows ({what} is empty)")
    return out


def _held_out(method: str, eval_ex: list[dict], tokenizer, max_len: int, data_hash: str, stats: dict):
    """The held-out examples as a fastft.data.DataBundle for fastft.evaluate: (prompt, reference)
    pairs, their slices, and tokenized rows (the reference as the labelled answer) for the loss."""
    import datasets

    pairs = [(ex["prompt"], ex["reference"] if method == "grpo" else ex["chosen"][0]["content"]) for ex in eval_ex]
    rows = []
    for i, (prompt, answer) in enumerate(pairs, 1):
        t = tokenize(prompt + [{"role": "assistant", "content": answer}], tokenizer, True, f"eval example {i}")
        rows.append({k: v[:max_len] for k, v in t.items()})
    return DataBundle(train=None, eval=datasets.Dataset.from_list(rows) if rows else None, eval_pairs=pairs,
                           data_hash=data_hash, stats=stats, eval_slices=[ex["slice"] for ex in eval_ex])


def eval_file(recipe, tokenizer, source: str):
    """A held-out file for a dpo / orpo / grpo run (``fastft eval RUN --data FILE``): preference rows
    (prompt vs chosen) or the task's alpaca / messages rows (prompt vs reference), as a DataBundle."""
    method = "grpo" if recipe.train.method == "grpo" else "dpo"
    examples = read(recipe.data, method, source, "data.eval", None)
    return _held_out(method, examples, tokenizer, recipe.model.max_seq_length, content_hash(examples),
                     {"eval_examples": len(examples), "source": source})


def build(recipe, tokenizer, log=print) -> MethodData:
    """Read, validate and split the recipe's data for ``train.method`` dpo / orpo / grpo."""
    import datasets

    d, method = recipe.data, recipe.train.method
    if method not in ("dpo", "orpo", "grpo"):
        raise ValueError(f"fastft.data.preference.build is for dpo / orpo / grpo, not {method}")
    skipped: list[str] | None = [] if d.skip_bad_rows else None
    examples = read(d, method, d.train, "data.train", skipped)
    if d.eval:
        train_ex, eval_ex = examples, read(d, method, d.eval, "data.eval", skipped)
    elif d.eval_fraction > 0:
        held, kept = held_out_split(len(examples), d.eval_fraction, recipe.train.seed, d.train)
        eval_ex, train_ex = [examples[i] for i in held], [examples[i] for i in kept]
    else:
        train_ex, eval_ex = examples, []
    if skipped:
        log(f"data: skipped {len(skipped)} bad rows (data.skip_bad_rows: true); first: {skipped[0]}")

    columns = ("prompt", "chosen", "rejected") if method != "grpo" else ("prompt", "reference")

    def to_ds(exs):
        return datasets.Dataset.from_list([{c: ex[c] for c in columns} for ex in exs])

    stats = {"train_examples": len(train_ex), "eval_examples": len(eval_ex), "format": d.format,
             "method": method, "source": d.train, "skipped_rows": len(skipped or [])}
    # (train tokens: counted by the trainer's meter, real tokens per step, in metrics.train)
    held_out = _held_out(method, eval_ex, tokenizer, recipe.model.max_seq_length,
                         content_hash(examples + (eval_ex if d.eval else [])), stats)
    pairs_held_out = [ex for ex in eval_ex if method != "grpo" and ex["rejected"] is not None]
    return MethodData(train=to_ds(train_ex), trl_eval=to_ds(pairs_held_out) if pairs_held_out else None,
                      held_out=held_out, stats=stats)
