"""The per-example path: one example's tokens and labels (``tokenize``), the data hash of a list of
examples (``content_hash``), and ``build_reference``, the whole set with every row in Python objects
and one tokenizer call per rendering. It is the reference the batched ``fastft.data.build`` is
tested against, token for token, and the method the batched path falls back to.

    bundle = build_reference(recipe.data, tokenizer, seed=3407, max_length=2048)
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from .bundle import IGNORE, DataBundle, DataError
from .formats import END_OF_TURN, to_messages
from .mixing import describe, mix
from .sources import read_rows
from .split import held_out_split


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


SLOT = "\ue000{}\ue001"  # a placeholder content: private-use characters around the message's index


def slot_pieces(text: str) -> list | None:
    """A rendering of placeholder contents as pieces: a str for template text, an int for message
    k's content; None when the template cut or changed a placeholder."""
    out = []
    for k, part in enumerate(re.split("\ue000(\\d+)\ue001", text)):
        if k % 2:
            out.append(int(part))
        elif "\ue000" in part or "\ue001" in part:
            return None
        elif part:
            out.append(part)
    return out


def turns_in_place(example: list[dict], tokenizer, full: str) -> list[tuple[int, int]] | None:
    """Each assistant turn's characters found in the whole rendering ``full`` itself, for templates
    that render the history differently from a conversation that ends at that turn (Qwen3 writes an
    empty thinking block into the last assistant turn only). A turn is its content, located by
    rendering the conversation with placeholder contents, from the end of the generation prompt
    before it to the end-of-turn token right after it and the newlines that follow. None when that
    does not describe ``full``."""
    holders = [{**m, "content": SLOT.format(k)} for k, m in enumerate(example)]
    try:
        text = tokenizer.apply_chat_template(holders, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that rejects the placeholders
        return None
    pieces = slot_pieces(text)
    if pieces is None:
        return None
    found, pos, rebuilt = {}, 0, []
    for part in pieces:
        if isinstance(part, int):
            if part in found or part >= len(example):
                return None
            content = example[part]["content"]
            found[part] = (pos, pos + len(content))
            part = content
        rebuilt.append(part)
        pos += len(part)
    if "".join(rebuilt) != full:
        return None  # the template changes contents: their characters cannot be placed
    markers = [m for m in (*END_OF_TURN, tokenizer.eos_token) if m]
    out, prev = [], 0
    for i, msg in enumerate(example):
        if msg["role"] != "assistant":
            continue
        if i not in found:
            return None
        start, end = found[i]
        # the turn starts where the generation prompt ends, as in a conversation that ends here:
        # what the template writes between it and the content (Qwen3's thinking block) is the turn's
        before = tokenizer.apply_chat_template(example[:i], tokenize=False)
        prompt = tokenizer.apply_chat_template(example[:i], tokenize=False, add_generation_prompt=True)
        head = prompt[len(before):] if prompt.startswith(before) else ""
        at = full.rfind(head, prev, start) if head else -1
        if at >= 0:
            start = at + len(head)
        marker = next((m for m in markers if full.startswith(m, end)), None)
        if marker is None:
            return None
        end += len(marker)
        while end < len(full) and full[end] == "\n":
            end += 1
        out.append((start, end))
        prev = end
    return out


def _labels_in_place(example: list[dict], tokenizer, full: str, ids: list[int]) -> list[int] | None:
    """``ids``' labels from ``turns_in_place``, when every turn starts and ends on a token boundary."""
    turns = turns_in_place(example, tokenizer, full)
    if turns is None:
        return None
    offsets = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    labels = [IGNORE] * len(ids)
    for start, end in turns:
        first = next((t for t, (a, _) in enumerate(offsets) if a >= start), None)
        last = next((t for t, (_, b) in enumerate(offsets) if b >= end), None)
        if first is None or last is None or offsets[first][0] != start or offsets[last][1] != end:
            return None
        if first and offsets[first - 1][1] > start:
            return None
        labels[first:last + 1] = ids[first:last + 1]
    return labels


def tokenize(example: list[dict] | str, tokenizer, responses_only: bool, where: str = "row") -> dict:
    """``{"input_ids", "labels"}`` for one example. For chat examples with ``responses_only``, each
    assistant turn's tokens are found by rendering the conversation up to it (with and without the
    turn) and checking that the shorter rendering is a token prefix of the longer one; a template
    whose renderings are not prefixes has its turns found in the whole rendering (``turns_in_place``)."""
    if isinstance(example, str):
        ids = _ids(tokenizer, example)
        if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
            ids = [tokenizer.bos_token_id] + ids
        ids = ids + [tokenizer.eos_token_id]
        return {"input_ids": ids, "labels": list(ids)}
    render = tokenizer.apply_chat_template
    full = render(example, tokenize=False)
    ids = _ids(tokenizer, full)
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
            in_place = _labels_in_place(example, tokenizer, full, ids)
            if in_place is None:
                raise DataError(f"{where}: the chat template does not render turns as prefixes of the whole "
                                "conversation, so prompt tokens cannot be masked; set "
                                "data.train_on_responses_only: false or use a prefix-stable template")
            return {"input_ids": ids, "labels": in_place}
        labels[start:end] = ids[start:end]
    return {"input_ids": ids, "labels": labels}


def content_hash(rows: list[Any]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return "sha256:" + h.hexdigest()


def build_reference(d, tokenizer, *, seed: int, max_length: int, log=print) -> DataBundle:
    """The per-example method: every row in memory, one tokenizer call per rendering. Slow on large
    sets; kept as the reference ``build`` is checked against."""
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
        held, kept = held_out_split(len(examples), d.eval_fraction, seed, train_src)
        eval_examples = [examples[i] for i in held]
        eval_slices = [slices[i] for i in held]
        train_examples = [examples[i] for i in kept]
    else:
        train_examples, eval_examples, eval_slices = examples, [], []

    mixed, mix_stats = [], None
    if d.mix:
        train_examples, mixed, mix_stats = mix(d, seed, train_examples, load)
        log(describe(mix_stats))

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
