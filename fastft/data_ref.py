"""The per-example data path: reading rows, rows -> chat messages, one example's tokens and labels,
the data hash, mixing, and ``build_reference`` (the original whole-set build, every row in Python
objects, one tokenizer call per rendering). ``fastft.data`` re-exports all of it; its ``build`` is
the batched, cached path (``fastft.data_build``), checked token for token against this one.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FastftError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
IGNORE = -100
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


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


# --- reading -----------------------------------------------------------------------------------

def read_rows(source: str, split: str = "train", skipped: list[str] | None = None) -> list[dict]:
    """Rows of a local .jsonl/.json/.csv/.parquet file, or of a hub dataset id (needs network).
    With a ``skipped`` list, malformed JSONL lines are recorded there instead of raising."""
    path = Path(source)
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise DataError(f"data file not found: {source} (check data.train / data.eval in the recipe; "
                            "relative paths are tried beside the recipe, then in the working directory)")
        kind = LOCAL_SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"{source}: unsupported file type {path.suffix!r}; use .jsonl, .json, .csv or .parquet")
        if path.suffix.lower() == ".jsonl":
            return _read_jsonl(path, skipped)
        if kind == "json":
            return _read_json(path)
        import datasets

        return list(datasets.load_dataset(kind, data_files=str(path), split="train"))
    if "/" not in source:
        raise DataError(f"data file not found: {source} (not a local file, nor a hub id like 'org/name')")
    import datasets

    try:
        return list(datasets.load_dataset(source, split=split))
    except Exception as e:  # network, missing repo, missing split: all end the run the same way
        raise DataError(f"cannot load hub dataset {source!r} (split {split!r}): {type(e).__name__}: {e}") from e


def _read_jsonl(path: Path, skipped: list[str] | None = None) -> list[dict]:
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); re-save the file as UTF-8") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: each line must be a JSON object, got {type(row).__name__}")
        except json.JSONDecodeError as e:
            err = DataError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})")
            if skipped is None:
                raise err from None
            skipped.append(str(err))
            continue
        except DataError as err:
            if skipped is None:
                raise
            skipped.append(str(err))
            continue
        rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid UTF-8 JSON ({e})") from None
    if isinstance(obj, dict):  # {"data": [...]} or {"train": [...]}
        lists = [v for v in obj.values() if isinstance(v, list)]
        obj = lists[0] if len(lists) == 1 else obj
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise DataError(f"{path}: expected a JSON list of objects (or use .jsonl, one object per line)")
    return obj


# --- rows -> messages --------------------------------------------------------------------------

# format: (column, role key, content key, role names -> roles, allowed in the role error, no-assistant error)
_CHAT_FORMATS = {
    "messages": ("messages", "role", "content", {r: r for r in ROLES}, "allowed roles: " + ", ".join(ROLES),
                 "no assistant message"),
    "sharegpt": ("conversations", "from", "value", SHAREGPT_ROLES, "allowed: human, gpt, system (or user, assistant)",
                 "no gpt turn"),
}


def _turns(row: dict, fmt: str, where: str, cols: str) -> list[dict]:
    """A ``messages`` or ``sharegpt`` row: its list of turns -> [{role, content}]."""
    col, role_key, content_key, roles, allowed, no_assistant = _CHAT_FORMATS[fmt]
    turns = row.get(col)
    if turns is None:
        raise DataError(f"{where}: missing column {col!r} (format {fmt} needs a list of {{{role_key}, {content_key}}}; "
                        f"found {cols})")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {col!r} must be a non-empty list of {{{role_key}, {content_key}}}")
    out = []
    for i, m in enumerate(turns):
        if not isinstance(m, dict) or role_key not in m or content_key not in m:
            raise DataError(f"{where}: {col}[{i}] must be an object with {role_key!r} and {content_key!r}")
        role = roles.get(m[role_key]) if isinstance(m[role_key], str) else None
        if role is None:
            raise DataError(f"{where}: {col}[{i}] has {role_key} {m[role_key]!r}; {allowed}")
        if not isinstance(m[content_key], str):
            raise DataError(f"{where}: {col}[{i}].{content_key} must be text, got {type(m[content_key]).__name__}")
        out.append({"role": role, "content": m[content_key]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: {no_assistant} (nothing to learn from this conversation)")
    return out


def to_messages(row: dict, fmt: str, where: str, text_field: str = "text") -> list[dict] | str:
    """One row as chat messages (alpaca, messages) or as plain text (text). ``where`` names the row."""
    cols = ", ".join(sorted(row)) or "none"
    if fmt == "alpaca":
        for col in ("instruction", "output"):
            if col not in row or row[col] is None:
                raise DataError(f"{where}: missing column {col!r} (format alpaca needs instruction, output and "
                                f"optionally input; found {cols})")
            if not isinstance(row[col], str):
                raise DataError(f"{where}: column {col!r} must be text, got {type(row[col]).__name__}")
        if not row["output"].strip():
            raise DataError(f"{where}: empty 'output' (nothing to learn from this row; remove it)")
        prompt = row["instruction"].strip()
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: column 'input' must be text, got {type(extra).__name__}")
        if extra.strip():
            prompt = f"{prompt}\n\n{extra.strip()}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"].strip()}]
    if fmt in _CHAT_FORMATS:
        return _turns(row, fmt, where, cols)
    if fmt == "text":
        text = row.get(text_field)
        if not isinstance(text, str):
            raise DataError(f"{where}: missing text column {text_field!r} (data.text_field; found {cols})")
        if not text.strip():
            raise DataError(f"{where}: empty {text_field!r}")
        return text
    raise DataError(f"unknown data.format {fmt!r}")


# --- tokenization ------------------------------------------------------------------------------

def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize(example: list[dict] | str, tokenizer, responses_only: bool, where: str = "row") -> dict:
    """``{"input_ids", "labels"}`` for one example. For chat examples with ``responses_only``, each
    assistant turn's tokens are found by rendering the conversation up to it (with and without the
    turn) and checking that the shorter rendering is a token prefix of the longer one."""
    if isinstance(example, str):
        ids = _ids(tokenizer, example)
        if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
            ids = [tokenizer.bos_token_id] + ids
        ids = ids + [tokenizer.eos_token_id]
        return {"input_ids": ids, "labels": list(ids)}
    render = tokenizer.apply_chat_template
    ids = _ids(tokenizer, render(example, tokenize=False))
    if not responses_only:
        return {"input_ids": ids, "labels": list(ids)}
    labels = [IGNORE] * len(ids)
    for i, msg in enumerate(example):
        if msg["role"] != "assistant":
            continue
        start = len(_ids(tokenizer, render(example[:i], tokenize=False, add_generation_prompt=True)))
        upto = _ids(tokenizer, render(example[: i + 1], tokenize=False))
        end = len(upto)
        if ids[:end] != upto or start > end:
            raise DataError(f"{where}: the chat template does not render turns as prefixes of the whole "
                            "conversation, so prompt tokens cannot be masked; set "
                            "data.train_on_responses_only: false or use a prefix-stable template")
        labels[start:end] = ids[start:end]
    return {"input_ids": ids, "labels": labels}


def content_hash(rows: list[Any]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return "sha256:" + h.hexdigest()


# --- data mixing -------------------------------------------------------------------------------

def mix_counts(n_task: int, fractions: list[float]) -> list[int]:
    """Rows to take from each ``data.mix`` source. A fraction is a share of the *final* training set
    (task examples + every mixed row), not of data.train: with T task examples and fractions f_i the
    final set has N = T / (1 - sum f) examples, and source i gives round(f_i * N) of them. So
    ``fraction: 0.15`` over 500 task examples adds 88 general rows: 88 of 588 = 15.0%. Only the
    training split is mixed; held-out data is never touched."""
    rest = 1.0 - sum(fractions)
    if not fractions or rest <= 0 or any(not 0 < f < 1 for f in fractions):
        raise ValueError(f"mix fractions must each be in (0, 1) and sum below 1, got {fractions}")
    return [round(f * n_task / rest) for f in fractions]


def mix(d, seed: int, train_examples: list, load) -> tuple[list, list, dict]:
    """Mix the ``d.mix`` sources (``d``: a recipe's data section, each entry's ``path`` resolved) into
    the training examples (``load(src, what, None, fmt)`` reads one source as examples). Rows are drawn
    without replacement from each source, in an order shuffled by ``seed`` (a source smaller than its
    count is repeated, reshuffled each pass); the result is shuffled by the same seed, so one seed
    always gives the same training set and another seed a different one. Returns (training examples,
    the mixed rows, one stats entry per source)."""
    counts = mix_counts(len(train_examples), [float(e["fraction"]) for e in d.mix])
    mixed, stats = [], []
    for i, (entry, n) in enumerate(zip(d.mix, counts)):
        src = entry["path"]
        fmt = entry.get("format") or ("alpaca" if entry.get("name") is not None else d.format)
        rows = load(src, f"data.mix[{i}]", None, fmt)
        rng = random.Random(f"fastft-mix:{seed}:{i}")
        picked: list = []
        while len(picked) < n:
            order = list(range(len(rows)))
            rng.shuffle(order)
            picked += [rows[j] for j in order[: n - len(picked)]]
        mixed += picked
        stats.append({"source": entry.get("name") or entry["path"], "path": src, "format": fmt,
                      "fraction": float(entry["fraction"]), "rows": n, "available": len(rows),
                      "repeated": n > len(rows)})
    out = list(train_examples) + mixed
    random.Random(f"fastft-mix:{seed}:order").shuffle(out)
    for s in stats:
        s["share"] = s["rows"] / len(out)
    stats_all = {"task_examples": len(train_examples), "train_examples": len(out), "sources": stats}
    return out, mixed, stats_all


# --- the whole pipeline ------------------------------------------------------------------------

def build_reference(d, tokenizer, *, seed: int, max_length: int, log=print) -> DataBundle:
    """The original per-example method: every row in memory, one tokenizer call per rendering.
    Slow on large sets; kept as the reference ``build`` is checked against."""
    import datasets

    skipped: list[str] | None = [] if d.skip_bad_rows else None

    def load(src: str, what: str, slices: list | None = None, fmt: str | None = None) -> list:
        fmt = fmt or d.format
        rows = read_rows(src, d.split, skipped)
        if not rows:
            raise DataError(f"{src}: no rows ({what} is empty)")
        if d.max_examples and what == "data.train":
            rows = rows[: d.max_examples]
        out = []
        for i, r in enumerate(rows, 1):
            try:
                out.append(to_messages(r, fmt, f"{src} row {i}", d.text_field))
                if slices is not None:  # the `slice` column, kept beside the example for per-slice scores
                    slices.append(None if r.get("slice") is None else str(r["slice"]))
            except DataError as e:
                if skipped is None:
                    raise
                skipped.append(str(e))
        if not out:
            raise DataError(f"{src}: every row is invalid ({what}); first problem: {skipped[0]}")
        return out

    train_src = d.train
    slices: list[str | None] = []
    examples = load(train_src, "data.train", slices)
    if d.eval:
        eval_src = d.eval
        eval_slices: list[str | None] = []
        eval_examples = load(eval_src, "data.eval", eval_slices)
        train_examples = examples
    elif d.eval_fraction > 0:
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(examples) * d.eval_fraction))
        if n_eval >= len(examples):
            raise DataError(f"{train_src}: {len(examples)} rows leave none for training after holding out "
                            f"data.eval_fraction={d.eval_fraction}; add rows or lower the fraction")
        held = set(order[:n_eval])
        eval_examples = [examples[i] for i in order[:n_eval]]
        eval_slices = [slices[i] for i in order[:n_eval]]
        train_examples = [examples[i] for i in range(len(examples)) if i not in held]
    else:
        train_examples, eval_examples, eval_slices = examples, [], []

    mixed, mix_stats = [], None
    if d.mix:
        train_examples, mixed, mix_stats = mix(d, seed, train_examples, load)
        log(f"data: mixed into training: {mix_stats['task_examples']} task examples + "
            + " + ".join(f"{m['rows']} from {m['source']} ({100 * m['share']:.1f}%, asked {100 * m['fraction']:g}%"
                         + (f"; its {m['available']} rows repeat" if m["repeated"] else "") + ")"
                         for m in mix_stats["sources"])
            + f" = {len(train_examples)} examples")

    max_len = max_length
    responses_only = d.train_on_responses_only and d.format != "text"

    def encode(exs, name):
        out, dropped, truncated = [], 0, 0
        for i, ex in enumerate(exs, 1):
            t = tokenize(ex, tokenizer, responses_only, f"{name} example {i}")
            if len(t["input_ids"]) > max_len:
                truncated += 1
                t = {k: v[:max_len] for k, v in t.items()}
            if all(x == IGNORE for x in t["labels"]):
                dropped += 1
                continue
            out.append(t)
        if truncated:
            log(f"data: {truncated} {name} examples longer than model.max_seq_length={max_len} were truncated")
        if dropped:
            log(f"data: {dropped} {name} examples had no response tokens left after truncation and were skipped")
        if not out:
            raise DataError(f"{name}: no usable examples (all empty after truncation to {max_len} tokens)")
        return out

    if skipped:
        log(f"data: skipped {len(skipped)} bad rows (data.skip_bad_rows: true); first: {skipped[0]}")
    train_tok = encode(train_examples, "train")
    eval_tok = encode(eval_examples, "eval") if eval_examples else []
    keep = [i for i, ex in enumerate(eval_examples) if isinstance(ex, list) and ex[-1]["role"] == "assistant"]
    pairs = [(eval_examples[i][:-1], eval_examples[i][-1]["content"]) for i in keep]
    n_tokens = sum(len(t["input_ids"]) for t in train_tok)
    n_trained = sum(sum(1 for x in t["labels"] if x != IGNORE) for t in train_tok)
    stats = {"train_examples": len(train_tok), "eval_examples": len(eval_tok), "train_tokens": n_tokens,
             "train_label_tokens": n_trained, "format": d.format, "source": train_src,
             "skipped_rows": len(skipped or [])}
    if mix_stats:
        stats["mix"] = mix_stats
    to_ds = lambda toks: datasets.Dataset.from_dict(
        {"input_ids": [t["input_ids"] for t in toks], "labels": [t["labels"] for t in toks]})
    return DataBundle(
        train=to_ds(train_tok),
        eval=to_ds(eval_tok) if eval_tok else None,
        eval_pairs=pairs,
        eval_slices=[eval_slices[i] for i in keep],
        data_hash=content_hash(examples + ([] if not d.eval else eval_examples) + mixed),
        stats=stats,
    )
