"""Tokenizing a source's rows in worker processes: each chunk of rows is parsed, validated, rendered
once by the chat template and tokenized in one batch by the Rust tokenizer, and written to an Arrow
stream file in the main process.

    reason = start(tokenizer, responses_only=True, max_len=2048)   # None: the batched path is exact
    src = SourceStream(d, tmp, num_proc=8, skipped=None, log=print)
    rows = src.tokenize("data.jsonl", "data.train", "alpaca")          # a fastft.data.rows.RowStore

The tokens inside each assistant turn's span (``fastft.data.template.spans``) are labelled. That is
exact when both ends of the span fall on token boundaries of the whole rendering, which is checked
for every example; an example where it does not hold goes through the per-example method
(``fastft.data.tokenize``). The first example of every chunk is tokenized both ways, and so are
the template's probe conversations (``start``); any difference sends the chunk, or everything,
through the per-example method, with the reason logged.
"""
from __future__ import annotations

import collections
import itertools
import json
import os
from pathlib import Path

import numpy as np

from ..progress import progress
from . import template
from .bundle import IGNORE, DataError
from .formats import to_messages
from .per_example import tokenize
from .rows import RowStore
from .sources import CHUNK_ROWS, stream

_W: dict = {}  # worker state, set by start() before the pool forks: tokenizer, responses_only, max_len, fast


def start(tokenizer, responses_only: bool, max_len: int) -> str | None:
    """Set the workers' state (call before the pool forks) and check the batched path on the
    template's probe conversations: why it is not exact for this tokenizer (None: it is, and the
    workers take it)."""
    _W.update(tokenizer=tokenizer, responses_only=responses_only, max_len=max_len, fast=False)
    reason = template.template_check(tokenizer, responses_only, encode_fast)
    _W["fast"] = reason is None
    return reason


def default_num_proc() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# --- one chunk (runs in the workers) -------------------------------------------------------------

def encode_fast(exs: list) -> list[tuple[list, list] | None]:
    """(input_ids, labels) per example, or None where the fast path is not exact for it."""
    tok = _W["tokenizer"]
    backend = tok.backend_tokenizer
    if isinstance(exs[0], str):
        bos, eos = tok.bos_token_id, tok.eos_token_id
        out = []
        for enc in backend.encode_batch(exs, add_special_tokens=False):
            ids = enc.ids
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
            ids = ids + [eos]
            out.append((ids, list(ids)))
        return out
    responses_only = _W["responses_only"]
    texts, spans = [], []
    for ex in exs:
        full = template.render(ex)
        texts.append(full)
        if responses_only:
            spans.append(template.spans(ex, full))
    out = []
    for k, enc in enumerate(backend.encode_batch(texts, add_special_tokens=False)):
        ids = enc.ids
        if not responses_only:
            out.append((ids, list(ids)))
            continue
        sp = spans[k]
        if sp is None:
            out.append(None)
            continue
        n, size = len(ids), len(texts[k])
        labels = [IGNORE] * n
        for a, b in sp:
            s = template.token_at(enc, n, a)
            e = n if b >= size else template.token_at(enc, n, b)
            if s is None or e is None or a > b:
                labels = None
                break
            labels[s:e] = ids[s:e]
        out.append(None if labels is None else (ids, labels))
    return out


def _encode(exs: list, wheres: list[str]) -> tuple[list, int, str | None]:
    """(input_ids, labels) per example, the number that took the per-example method, and why a whole
    chunk did (None when it did not)."""
    ref = lambda ex, where: tokenize(ex, _W["tokenizer"], _W["responses_only"], where)
    if not _W["fast"]:
        return [tuple(ref(ex, w).values()) for ex, w in zip(exs, wheres)], len(exs), None
    fast = encode_fast(exs)
    for k, got in enumerate(fast):  # the template check on live data: the first exact example of the chunk
        if got is not None:
            want = ref(exs[k], wheres[k])
            if (list(got[0]), list(got[1])) != (want["input_ids"], want["labels"]):
                reason = (f"{wheres[k]}: the batched tokenization differs from the per-example one for this "
                          "chat template")
                return [tuple(ref(ex, w).values()) for ex, w in zip(exs, wheres)], len(exs), reason
            break
    out, slow = [], 0
    for got, ex, w in zip(fast, exs, wheres):
        if got is None:
            slow += 1
            got = tuple(ref(ex, w).values())
        out.append(got)
    return out, slow, None


def _work(task: tuple) -> dict:
    """One chunk: parse, validate, tokenize, truncate. Never raises for a bad row: row problems come
    back as events (position among the chunk's parsed rows, message, fatal) so the main process can
    apply data.max_examples and data.skip_bad_rows in file order."""
    kind, items, src, fmt, text_field, want_slices = task
    events, exs, wheres, pos, slices = [], [], [], [], []
    parsed = 0
    for n, item in items:
        if kind == "lines":
            if not item.strip():
                continue
            try:
                line = item.decode("utf-8")
            except UnicodeDecodeError as e:
                events.append((parsed, f"{src}: not UTF-8 text (line {n}: {e}); re-save the file as UTF-8", True))
                break
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                events.append((parsed, f"{src}:{n}: malformed JSON ({e.msg} at column {e.colno})", False))
                continue
            if not isinstance(row, dict):
                events.append((parsed, f"{src}:{n}: each line must be a JSON object, got {type(row).__name__}",
                               False))
                continue
            where = f"{src} line {n}"
        else:
            row, where = item, f"{src} row {n}"
        parsed += 1
        try:
            ex = to_messages(row, fmt, where, text_field)
        except DataError as e:
            events.append((parsed, str(e), False))
            continue
        exs.append(ex)
        wheres.append(where)
        pos.append(parsed)
        if want_slices:
            slices.append(None if row.get("slice") is None else str(row["slice"]))
    res = {"parsed": parsed, "events": events, "pos": pos, "ex": [], "slice": slices, "slow": 0, "reason": None}
    if not exs:
        return res
    try:
        toks, res["slow"], res["reason"] = _encode(exs, wheres)
    except DataError as e:  # a template that is not prefix-stable: ends the run, as the per-example method does
        res["events"] = events + [(0, str(e), True)]
        res["pos"] = []
        return res
    max_len = _W["max_len"]
    ids_all, lab_all, lens, trunc, ntrain = [], [], [], [], []
    for ids, labels in toks:
        t = len(ids) > max_len
        if t:
            ids, labels = ids[:max_len], labels[:max_len]
        ids_all.append(ids)
        lab_all.append(labels)
        lens.append(len(ids))
        trunc.append(t)
        ntrain.append(len(labels) - labels.count(IGNORE))
    total = sum(lens)
    res["ids"] = np.fromiter(itertools.chain.from_iterable(ids_all), dtype=np.int32, count=total)
    res["labels"] = np.fromiter(itertools.chain.from_iterable(lab_all), dtype=np.int32, count=total)
    res["lens"] = np.asarray(lens, dtype=np.int32)
    res["trunc"] = np.asarray(trunc, dtype=bool)
    res["ntrain"] = np.asarray(ntrain, dtype=np.int32)
    res["ex"] = [json.dumps(ex, sort_keys=True, ensure_ascii=False, default=str) for ex in exs]
    return res


def _init_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism


def _batched(it, n: int):
    it = iter(it)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


# --- a whole source (the main process) -----------------------------------------------------------

class SourceStream:
    """Tokenizes sources into Arrow files in ``tmp``, one after another, through one worker pool."""

    def __init__(self, d, tmp: Path, num_proc: int, skipped: list | None, log):
        self.d, self.tmp, self.num_proc, self.skipped, self.log = d, tmp, num_proc, skipped, log
        self.pool = None
        if num_proc > 1:
            import multiprocessing

            self.pool = multiprocessing.get_context("fork").Pool(num_proc, initializer=_init_worker)
        self.slow, self.reasons, self.rows, self.count = 0, [], 0, 0

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def _results(self, tasks):
        if self.pool is None:
            yield from map(_work, tasks)
            return
        window = collections.deque()
        for t in tasks:  # a bounded window of chunks in flight: reading never runs ahead of tokenizing
            window.append(self.pool.apply_async(_work, (t,)))
            if len(window) >= 2 * self.num_proc:
                yield window.popleft().get()
        while window:
            yield window.popleft().get()

    def tokenize(self, src: str, what: str, fmt: str, digest=None) -> RowStore:
        """``src``'s valid rows (input_ids, labels, ex, slice, ntok, ntrain, trunc), written to an Arrow
        file and memory-mapped; ``digest`` (a hashlib object) is fed each example's JSON in order."""
        import pyarrow as pa

        kind, items, total = stream(src, self.d.split)
        limit = self.d.max_examples if what == "data.train" else None
        if limit and total:
            total = min(total, limit)
        out = self.tmp / f"source-{self.count}.arrow"
        self.count += 1
        schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                            ("ex", pa.string()), ("slice", pa.string()), ("ntok", pa.int32()),
                            ("ntrain", pa.int32()), ("trunc", pa.bool_())])
        fields = (src, fmt, self.d.text_field, what in ("data.train", "data.eval"))
        tasks = ((kind, chunk, *fields) for chunk in _batched(items, CHUNK_ROWS))
        seen = rows = 0
        first_problem = None
        bar = progress(total=total, desc=f"data: read + tokenize {Path(src).name}", unit="rows")
        with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer, bar:
            for res in self._results(tasks):
                keep = len(res["pos"])
                if limit is not None:
                    keep = sum(1 for p in res["pos"] if seen + p <= limit)
                for p, msg, fatal in res["events"]:
                    if limit is not None and seen + p > limit:
                        continue
                    if fatal or self.skipped is None:
                        raise DataError(msg)
                    self.skipped.append(msg)
                    first_problem = first_problem or msg
                if res["reason"]:
                    self.reasons.append(res["reason"])
                self.slow += res["slow"]
                if keep:
                    lens = res["lens"][:keep]
                    n_tok = int(lens.sum())
                    offsets = pa.array(np.concatenate([[0], np.cumsum(lens, dtype=np.int64)]).astype(np.int32))
                    slices = res["slice"][:keep] if res["slice"] else [None] * keep
                    writer.write_batch(pa.record_batch([
                        pa.ListArray.from_arrays(offsets, pa.array(res["ids"][:n_tok])),
                        pa.ListArray.from_arrays(offsets, pa.array(res["labels"][:n_tok])),
                        pa.array(res["ex"][:keep], pa.string()), pa.array(slices, pa.string()),
                        pa.array(lens), pa.array(res["ntrain"][:keep]), pa.array(res["trunc"][:keep])],
                        schema=schema))
                    if digest is not None:
                        for e in res["ex"][:keep]:
                            digest.update(e.encode())
                            digest.update(b"\n")
                rows += keep
                seen += res["parsed"]
                bar.update(res["parsed"])
                if limit is not None and seen >= limit:
                    break
        if seen == 0:
            raise DataError(f"{src}: no rows ({what} is empty)")
        if rows == 0:
            raise DataError(f"{src}: every row is invalid ({what}); first problem: {first_problem}")
        self.rows += rows
        return RowStore.open(out)
