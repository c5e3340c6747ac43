"""The fast data path behind ``fastft.data.build``: stream rows, tokenize in batches across
processes, split and mix on indices, write Arrow files into an on-disk cache.

    bundle = data_build.build(recipe.data, tokenizer, seed=3407, max_length=2048)
    bundle.info["cache"]   # {"path": ".../data/<key>", "hit": False}

1. Read: a .jsonl file is read line by line (the lines go to the workers, which parse them, so an
   error names the file and the line); .csv / .parquet files and hub datasets are loaded by
   ``datasets`` into memory-mapped Arrow and iterated in batches. Nothing keeps every row in Python
   objects, except a .json list, read whole (about 3x the file's size at the peak; ``datasets``' json
   loader parses such a file whole too; docs/data.md says to convert big ones to .jsonl).
2. Tokenize (``data.num_proc`` processes, default: the cores available): each chunk of rows is
   validated (``fastft.data.to_messages``), rendered once by the chat template, and tokenized with
   the Rust tokenizer in one batch, with character offsets. Each assistant turn's labelled span is
   found in characters from the template's prefix renderings (the conversation up to the turn with
   the generation prompt, and up to the end of the turn); the tokens inside it are labelled. The
   prefixes are rendered once per conversation shape (its roles) with placeholder contents
   (``_shape``); an example uses them when the shape with its contents put back is its own
   rendering, checked each time, and renders its prefixes itself otherwise. That is
   exact when both ends of the span fall on token boundaries of the whole rendering, which is
   checked for every example; an example where it does not hold goes through the per-example
   method (``fastft.data.tokenize``). The template as a whole is checked too: probe conversations
   (system prompts, several turns, non-ASCII, leading spaces) and the first example of every chunk
   are tokenized both ways; any difference sends everything through the per-example method, with
   the reason logged.
3. Split and mix: the held-out split and ``data.mix`` work on row indices into the Arrow files, in
   the same order as ``fastft.data.build_reference``, so the same seed gives the same split, the
   same mix and the same data hash. The splits are written by gathering rows batch by batch from
   the memory-mapped files, dropping the mapped pages from the resident set after each chunk
   (``_Rows``): the process's memory does not grow with the number of rows.
4. Cache: ``$FASTFT_CACHE/data/<key>/`` holds ``train/`` and ``eval/`` (folders in the layout of
   ``datasets.save_to_disk``, with ``input_ids`` and ``labels``), ``meta.json`` and, written last, ``manifest.json``
   (every file's size and meta.json's sha256). The key hashes the sources' contents, the tokenizer
   (tokenizer.json and chat template), the recipe's data section, ``max_seq_length`` and the seed.
   An entry is built in a temporary folder and moved into place whole; one whose manifest is
   missing or does not match is rebuilt, never loaded. A file lock makes concurrent builders (DDP
   ranks, a train and an eval at once) wait for the first one and load its result; under torchrun
   the other ranks first let the node's rank 0 take the lock, so rank 0 builds and logs.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import os
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from . import data_ref as D
from .data_ref import IGNORE, DataBundle, DataError
from .files import atomic_write_text, cache_dir, file_sha256, install_dir
from .progress import progress

VERSION = 1  # bump when the cached layout or the tokenization changes
CHUNK_ROWS = 1024
_W: dict = {}  # worker state, set before the pool forks: tokenizer, responses_only, max_len, fast, verify


# --- reading -----------------------------------------------------------------------------------

def _source(src: str, split: str):
    """(kind, iterator of (number, item), total rows or None). kind "lines": (line number, raw bytes);
    kind "rows": (row number, dict)."""
    path = Path(src)
    if path.suffix.lower() in D.LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise DataError(f"data file not found: {src} (check data.train / data.eval in the recipe; "
                            "relative paths are tried beside the recipe, then in the working directory)")
        kind = D.LOCAL_SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"{src}: unsupported file type {path.suffix!r}; use .jsonl, .json, .csv or .parquet")
        if path.suffix.lower() == ".jsonl":
            return "lines", _lines(path), None
        if kind == "json":
            rows = D._read_json(path)
            return "rows", enumerate(rows, 1), len(rows)
        import datasets

        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    else:
        ds = _hub(src, split)
    return "rows", enumerate(_ds_rows(ds), 1), len(ds)


def _hub(src: str, split: str):
    if "/" not in src:
        raise DataError(f"data file not found: {src} (not a local file, nor a hub id like 'org/name')")
    import datasets

    try:
        return datasets.load_dataset(src, split=split)
    except Exception as e:  # network, missing repo, missing split: all end the run the same way
        raise DataError(f"cannot load hub dataset {src!r} (split {split!r}): {type(e).__name__}: {e}") from e


def _lines(path: Path):
    with open(path, "rb") as f:
        yield from enumerate(f, 1)


def _ds_rows(ds):
    for batch in ds.iter(batch_size=CHUNK_ROWS):
        keys = list(batch)
        for vals in zip(*batch.values()):
            yield dict(zip(keys, vals))


def source_digest(src: str, split: str, hashes: dict) -> str:
    """What identifies a source's content: a local file's sha256, a hub dataset's fingerprint."""
    path = Path(src)
    if path.is_file():
        return "sha256:" + file_sha256(path, hashes)
    if path.suffix.lower() in D.LOCAL_SUFFIXES:
        _source(src, split)  # raises the not-found error
    return f"hub:{src}:{split}:{_hub(src, split)._fingerprint}"


# --- tokenizing (runs in the workers) ----------------------------------------------------------

def _render(ex, gen: bool = False) -> str:
    """The chat template's text for ``ex``: the compiled template called directly, with the
    arguments ``apply_chat_template`` passes it (checked against it by the template check)."""
    compiled = _W.get("compiled")
    if compiled is None:
        return _W["tokenizer"].apply_chat_template(ex, tokenize=False, add_generation_prompt=gen)
    return compiled.render(messages=ex, tools=None, documents=None, add_generation_prompt=gen, **_W["template_kwargs"])


def _compile(tokenizer) -> None:
    _W.pop("compiled", None)
    _W["shapes"] = {}  # _shape's renderings belong to one template
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # another transformers: apply_chat_template, a little slower
        return
    _W["template_kwargs"] = dict(tokenizer.special_tokens_map)
    _W["compiled"] = _compile_jinja_template(template)


def _boundary(offsets, n: int, c: int) -> int | None:
    """The index of the first token at character ``c`` when a token boundary falls exactly there."""
    lo, hi = 0, n
    while lo < hi:  # first token whose start >= c
        mid = (lo + hi) // 2
        if offsets[mid][0] < c:
            lo = mid + 1
        else:
            hi = mid
    if lo < n and offsets[lo][0] != c:
        return None
    if lo > 0 and offsets[lo - 1][1] > c:
        return None
    return lo


def _token_at(enc, n: int, c: int) -> int | None:
    """``_boundary`` of the encoding's offsets without building the offsets list (a list of tuples
    per token costs about a tenth of the tokenization): the token holding character ``c`` and the
    one before it are asked for their spans, which decides the common case; anything else (no
    token holds ``c``, tokens sharing characters) asks ``_boundary``."""
    t = enc.char_to_token(c)
    if t is not None and enc.token_to_chars(t)[0] == c:
        if t == 0:
            return 0
        a, b = enc.token_to_chars(t - 1)
        if a < c and b <= c:  # starts ascend, so token t is the first that starts at or after c
            return t
    return _boundary(enc.offsets, n, c)


_SLOT = "\ue000{}\ue001"  # a placeholder content: private-use characters around the message's index


def _shape(roles: tuple) -> tuple | None:
    """The template's rendering of a conversation with these roles and placeholder contents: (the
    full rendering as pieces, a str for template text and an int for message k's content; per
    assistant turn, the template characters and the contents before the end of its head (the
    conversation before it, with the generation prompt) and of its end (the conversation up to
    it)). None when the template renders the placeholders in a way the pieces cannot describe."""
    import re

    ex = [{"role": r, "content": _SLOT.format(k)} for k, r in enumerate(roles)]

    def pieces(text: str) -> list | None:
        out = []
        for k, part in enumerate(re.split("\ue000(\\d+)\ue001", text)):
            if k % 2:
                out.append(int(part))
            elif "\ue000" in part or "\ue001" in part:
                return None  # a placeholder the template cut or changed
            elif part:
                out.append(part)
        return out

    def prefix(text: str, full: str) -> tuple | None:
        if not full.startswith(text) or (p := pieces(text)) is None:
            return None
        return (sum(len(x) for x in p if isinstance(x, str)), tuple(x for x in p if isinstance(x, int)))

    try:
        full = _render(ex)
        whole = pieces(full)
        turns = []
        for i, r in enumerate(roles):
            if r != "assistant":
                continue
            head_text = _render(ex[:i], gen=True)
            upto_text = full if i == len(ex) - 1 else _render(ex[: i + 1])
            head, upto = prefix(head_text, full), prefix(upto_text, full)
            if head is None or upto is None or len(head_text) > len(upto_text):
                return None  # both are prefixes of full: the shorter one is a prefix of the longer
            turns.append((head, upto))
    except Exception:  # noqa: BLE001 - a shape the template rejects: each row is rendered as it is
        return None
    return None if whole is None else (whole, turns)


def _spans_by_shape(ex: list, full: str) -> list | None:
    """Each assistant turn's (start, end) characters in ``full`` from the rendering of the
    conversation's shape (``_shape``, rendered once per shape): exact when the shape's pieces with
    this conversation's contents put back are ``full`` itself, which is checked; None otherwise."""
    shapes = _W.setdefault("shapes", {})
    roles = tuple(m["role"] for m in ex)
    shape = shapes.get(roles, False)
    if shape is False:
        shape = shapes[roles] = _shape(roles)
    if shape is None:
        return None
    whole, turns = shape
    contents = [m["content"] for m in ex]
    if "".join(x if isinstance(x, str) else contents[x] for x in whole) != full:
        return None  # the template changes a content (trims it, branches on it): render the prefixes
    size = lambda part: part[0] + sum(len(contents[k]) for k in part[1])
    return [(size(head), size(upto)) for head, upto in turns]


def _spans_rendered(ex: list, full: str) -> list | None:
    """Each assistant turn's (start, end) characters in ``full`` by rendering the conversation up to
    it with the generation prompt (start) and up to its end (end); None when those renderings are
    not prefixes of ``full``."""
    sp = []
    for i, msg in enumerate(ex):
        if msg["role"] != "assistant":
            continue
        head = _render(ex[:i], gen=True)
        upto = full if i == len(ex) - 1 else _render(ex[: i + 1])
        if not (full.startswith(upto) and upto.startswith(head)):
            return None
        sp.append((len(head), len(upto)))
    return sp


def _encode_fast(exs: list) -> list[tuple[list, list] | None]:
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
        full = _render(ex)
        texts.append(full)
        if responses_only:
            sp = _spans_by_shape(ex, full)
            spans.append(sp if sp is not None else _spans_rendered(ex, full))
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
            s = _token_at(enc, n, a)
            e = n if b >= size else _token_at(enc, n, b)
            if s is None or e is None or a > b:
                labels = None
                break
            labels[s:e] = ids[s:e]
        out.append(None if labels is None else (ids, labels))
    return out


def _encode(exs: list, wheres: list[str]) -> tuple[list, int, str | None]:
    """(input_ids, labels) per example, the number that took the per-example method, and why a whole
    chunk did (None when it did not)."""
    ref = lambda ex, where: D.tokenize(ex, _W["tokenizer"], _W["responses_only"], where)
    if not _W["fast"]:
        return [tuple(ref(ex, w).values()) for ex, w in zip(exs, wheres)], len(exs), None
    fast = _encode_fast(exs)
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
            ex = D.to_messages(row, fmt, where, text_field)
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


# --- the template check ------------------------------------------------------------------------

def _probes() -> list:
    sys_ = {"role": "system", "content": "You answer briefly. Réponds en français si on te parle français."}
    u = lambda c: {"role": "user", "content": c}
    a = lambda c: {"role": "assistant", "content": c}
    return [
        [u("Classify: red, blue."), a("color")],
        [sys_, u("Wie heißt die Hauptstadt von Frankreich?"), a("Paris."), u("Und von Japan? 日本"), a("東京 (Tokyo).")],
        [u("two\n\nlines  with   spaces"), a(" leading space and trailing newline\n"), u("ok?"), a("yes")],
        [sys_, u("numbers 12345 and emoji 🙂"), a("1 2 3 4 5 🙂"), u("more"), a("done."), u("again"), a("x")],
        [u("code:\n```py\nprint('hi')\n```"), a("```py\nprint('hi')  # prints hi\n```")],
    ]


def template_check(tokenizer, responses_only: bool) -> str | None:
    """Why the batched path is not exact for this tokenizer and template (None: it is), by tokenizing
    probe conversations both ways."""
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        return "the tokenizer has no Rust backend (a slow tokenizer)"
    _W.update(tokenizer=tokenizer, responses_only=responses_only)
    _compile(tokenizer)
    texts = ["plain text, with numbers 12345 and ünïcödé 日本語", "  leading spaces\nand\n\nnewlines "]
    for t in texts:
        if tokenizer.backend_tokenizer.encode(t, add_special_tokens=False).ids != D._ids(tokenizer, t):
            return "the Rust tokenizer and the transformers tokenizer disagree on a probe text"
    if not getattr(tokenizer, "chat_template", None):
        return None
    for k, ex in enumerate(_probes()):
        try:
            if _W.get("compiled") is not None and any(
                    _render(ex[:j], gen) != tokenizer.apply_chat_template(ex[:j], tokenize=False, add_generation_prompt=gen)
                    for j in (len(ex) - 1, len(ex)) for gen in (False, True)):
                _W.pop("compiled")  # the direct call renders differently: use apply_chat_template
                _W["shapes"] = {}
            want = D.tokenize(ex, tokenizer, responses_only)
            got = _encode_fast([ex])[0]
        except Exception:  # noqa: BLE001 - a template that rejects a probe (no system role, ...) says nothing
            got = None
        if got is not None and (list(got[0]), list(got[1])) != (want["input_ids"], want["labels"]):
            return f"probe conversation {k} tokenizes differently when batched than one turn at a time"
    return None


# --- the pipeline ------------------------------------------------------------------------------

class _Sources:
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

    def tokenize(self, src: str, what: str, fmt: str, digest=None) -> "_Rows":
        """``src``'s valid rows (input_ids, labels, ex, slice, ntok, ntrain, trunc), written to an Arrow
        file and memory-mapped; ``digest`` (a hashlib object) is fed each example's JSON in order."""
        import pyarrow as pa

        kind, items, total = _source(src, self.d.split)
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
        return _Rows.open(out)


class _Rows:
    """The rows of tokenized Arrow stream files, memory-mapped read-only, as their record batches.

    Two things keep the resident memory from growing with the number of rows. ``gather`` takes rows
    in any order batch by batch (pyarrow's ``Table.take`` on a table of many batches first joins a
    whole column into one buffer in memory: the 500 MB of example JSON of a million rows for each
    chunk of held-out rows), and drops each batch's mapped pages from this process's resident set once
    it has taken its rows (they stay in the page cache; a later read maps them again without disk
    I/O): 10,000 held-out rows scattered over a million would otherwise fault in most of the file.
    ``release`` drops every mapped page (after reading whole columns).
    """

    def __init__(self, batches: list, maps: list, spans: list):
        self.batches, self.maps, self.spans = batches, maps, spans  # spans[j]: (map, first byte, end) of batch j
        self.starts = np.cumsum([0] + [b.num_rows for b in batches], dtype=np.int64)

    @classmethod
    def open(cls, path: Path) -> "_Rows":
        import mmap

        import pyarrow as pa

        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        whole = pa.py_buffer(m)
        batches = list(pa.ipc.open_stream(pa.BufferReader(whole)))
        spans = []
        for b in batches:  # where each batch's buffers lie in the mapping (zero-copy: inside it)
            bufs = [x for col in b.columns for x in col.buffers() if x is not None and x.size]
            lo = min((x.address for x in bufs), default=whole.address)
            hi = max((x.address + x.size for x in bufs), default=whole.address)
            spans.append((0, lo - whole.address, hi - whole.address))
        return cls(batches, [m], spans)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __add__(self, other: "_Rows") -> "_Rows":
        k = len(self.maps)
        return _Rows(self.batches + other.batches, self.maps + other.maps,
                     self.spans + [(i + k, lo, hi) for i, lo, hi in other.spans])

    def column(self, name: str) -> np.ndarray:
        """A fixed-width column (ntok, ntrain, trunc) as one numpy array."""
        return np.concatenate([b.column(name).to_numpy(zero_copy_only=False) for b in self.batches])

    def gather(self, idx, columns: list):
        """Rows ``idx`` (in that order) of ``columns`` as one pyarrow Table with a single chunk."""
        import pyarrow as pa

        idx = np.asarray(idx, dtype=np.int64)
        if not len(idx):
            return pa.Table.from_batches([self.batches[0].select(columns).slice(0, 0)])
        if idx.min() < 0 or idx.max() >= len(self):
            raise IndexError(f"row index out of range (0..{len(self) - 1})")
        which = np.searchsorted(self.starts, idx, side="right") - 1
        order = np.argsort(which, kind="stable")
        cuts = np.flatnonzero(np.diff(which[order])) + 1
        pieces = []
        for g in np.split(order, cuts):
            j = which[g[0]]
            pieces.append(self.batches[j].select(columns).take(pa.array(idx[g] - self.starts[j])))
            self._release_batch(j)  # scattered rows fault in pages all over the file: drop them as we go
        grouped = pa.Table.from_batches(pieces).combine_chunks()
        if np.all(np.diff(idx) >= 0):  # already in order (a training split without data.mix)
            return grouped
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return grouped.take(pa.array(back))

    def _release_batch(self, j: int) -> None:
        import mmap

        advice = getattr(mmap, "MADV_DONTNEED", None)
        i, lo, hi = self.spans[j]
        if advice is None or hi <= lo:
            return
        start = lo - lo % mmap.PAGESIZE
        try:
            self.maps[i].madvise(advice, start, hi - start)
        except (OSError, ValueError):  # pragma: no cover - a platform that refuses it: only memory
            pass

    def release(self) -> None:
        """Drop the mapped pages read so far from this process's resident set (a no-op where the
        platform has no MADV_DONTNEED)."""
        import mmap

        advice = getattr(mmap, "MADV_DONTNEED", None)
        if advice is None:
            return
        for m in self.maps:
            try:
                m.madvise(advice)
            except (OSError, ValueError):  # pragma: no cover - a platform that refuses it: only memory
                pass


def _batched(it, n: int):
    it = iter(it)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def default_num_proc() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


SPLIT_ROWS = 16384  # rows gathered and written at a time into a split


def write_split(rows: _Rows, idx, folder: Path, fingerprint: str, update=lambda n: None) -> None:
    """Rows ``idx`` of ``rows`` (input_ids, labels) into ``folder`` in the layout
    ``datasets.Dataset.save_to_disk`` writes and ``datasets.load_from_disk`` reads (one Arrow stream
    file ``data-00000-of-00001.arrow`` with the features in its schema metadata, ``state.json``,
    ``dataset_info.json``), ``SPLIT_ROWS`` rows at a time, dropping the source's mapped pages from
    the resident set after each: memory stays flat however long the split is."""
    import datasets
    import pyarrow as pa

    features = datasets.Features({c: datasets.List(datasets.Value("int32")) for c in ("input_ids", "labels")})
    schema = features.arrow_schema
    folder.mkdir(parents=True)
    data_file = "data-00000-of-00001.arrow"
    idx = np.asarray(idx, dtype=np.int64)
    with pa.OSFile(str(folder / data_file), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for start in range(0, len(idx), SPLIT_ROWS):
            part = rows.gather(idx[start:start + SPLIT_ROWS], ["input_ids", "labels"])
            writer.write_table(part.replace_schema_metadata(schema.metadata))
            rows.release()
            update(part.num_rows)
    datasets.DatasetInfo(features=features).write_to_directory(str(folder))
    state = {"_data_files": [{"filename": data_file}], "_fingerprint": fingerprint, "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))


def _build_into(entry: Path, d, tokenizer, seed: int, max_length: int, log, key: str = "") -> dict:
    """Build the cache entry's files in ``entry``; returns meta (stats, hash, eval pairs, logs)."""
    logs: list[str] = []

    def say(m: str) -> None:
        logs.append(m)
        log(m)

    responses_only = d.train_on_responses_only and d.format != "text"
    reason = template_check(tokenizer, responses_only)
    if reason:
        say(f"data: tokenizing one example at a time (the exact per-example method): {reason}")
    num_proc = getattr(d, "num_proc", None) or default_num_proc()
    _W.update(tokenizer=tokenizer, responses_only=responses_only, max_len=max_length, fast=reason is None)
    skipped: list[str] | None = [] if d.skip_bad_rows else None
    digest = hashlib.sha256()
    work = entry / ".sources"
    work.mkdir(parents=True)
    src = _Sources(d, work, num_proc, skipped, log)
    try:
        task = src.tokenize(d.train, "data.train", d.format, digest)
        n = len(task)
        ev = None
        if d.eval:
            ev = src.tokenize(d.eval, "data.eval", d.format, digest)
            eval_idx = np.arange(len(ev))
            train_refs = np.arange(n)
        elif d.eval_fraction > 0:
            order = np.arange(n)  # shuffled as build_reference shuffles its list: the same permutation
            random.Random(seed).shuffle(order)
            n_eval = max(1, round(n * d.eval_fraction))
            if n_eval >= n:
                raise DataError(f"{d.train}: {n} rows leave none for training after holding out "
                                f"data.eval_fraction={d.eval_fraction}; add rows or lower the fraction")
            eval_idx = order[:n_eval].copy()
            del order
            mask = np.ones(n, dtype=bool)
            mask[eval_idx] = False
            ev = task
            train_refs = np.flatnonzero(mask)
        else:
            eval_idx, train_refs = np.arange(0), np.arange(n)

        parts, mix_stats, mixed = [task], None, []
        if d.mix:
            def load(path, what, _slices, fmt):
                ds = src.tokenize(path, what, fmt)
                start = sum(len(p) for p in parts)
                parts.append(ds)
                return range(start, start + len(ds))

            train_refs, mixed, mix_stats = D.mix(d, seed, train_refs.tolist(), load)
            say(f"data: mixed into training: {mix_stats['task_examples']} task examples + "
                + " + ".join(f"{m['rows']} from {m['source']} ({100 * m['share']:.1f}%, asked {100 * m['fraction']:g}%"
                             + (f"; its {m['available']} rows repeat" if m["repeated"] else "") + ")"
                             for m in mix_stats["sources"])
                + f" = {len(train_refs)} examples")
        full = sum(parts[1:], parts[0])
        if mixed:  # the data hash covers the mixed rows in the order they were drawn
            for chunk in _batched(mixed, 4096):
                for e in full.gather(chunk, ["ex"]).column("ex").to_pylist():
                    digest.update(e.encode())
                    digest.update(b"\n")
                full.release()
    finally:
        src.close()
    if skipped:
        say(f"data: skipped {len(skipped)} bad rows (data.skip_bad_rows: true); first: {skipped[0]}")
    if src.reasons:
        say(f"data: {len(src.reasons)} chunks went through the per-example method; first: {src.reasons[0]}")

    def split(ds: _Rows, idx, name: str):
        idx = np.asarray(idx, dtype=np.int64)
        ntrain, trunc, ntok = ds.column("ntrain")[idx], ds.column("trunc")[idx], ds.column("ntok")[idx]
        if trunc.any():
            say(f"data: {int(trunc.sum())} {name} examples longer than model.max_seq_length={max_length} were truncated")
        keep = ntrain > 0
        if not keep.all():
            say(f"data: {int((~keep).sum())} {name} examples had no response tokens left after truncation and "
                "were skipped")
        if not keep.any():
            raise DataError(f"{name}: no usable examples (all empty after truncation to {max_length} tokens)")
        with progress(total=int(keep.sum()), desc=f"data: write {name} split", unit="rows") as bar:
            write_split(ds, idx[keep], entry / name, hashlib.sha256(f"{key}/{name}".encode()).hexdigest()[:16],
                        bar.update)
        return int(keep.sum()), int(ntok[keep].sum()), int(ntrain[keep].sum())

    n_train, n_tokens, n_trained = split(full, train_refs, "train")
    n_eval_ex = split(ev, eval_idx, "eval")[0] if len(eval_idx) else 0
    pairs, eval_slices = [], []
    if len(eval_idx):
        for chunk in _batched(eval_idx, 4096):
            rows = ev.gather(chunk, ["ex", "slice"]).to_pylist()
            ev.release()
            for r in rows:
                ex = json.loads(r["ex"])
                if isinstance(ex, list) and ex[-1]["role"] == "assistant":
                    pairs.append(([{"role": m["role"], "content": m["content"]} for m in ex[:-1]], ex[-1]["content"]))
                    eval_slices.append(r["slice"])
    stats = {"train_examples": n_train, "eval_examples": n_eval_ex, "train_tokens": n_tokens,
             "train_label_tokens": n_trained, "format": d.format, "source": d.train,
             "skipped_rows": len(skipped or [])}
    if mix_stats:
        stats["mix"] = mix_stats
    del full, task, ev
    shutil.rmtree(work, ignore_errors=True)
    return {"stats": stats, "data_hash": "sha256:" + digest.hexdigest(), "eval_pairs": pairs,
            "eval_slices": eval_slices, "logs": logs,
            "info": {"rows": n, "num_proc": num_proc, "tokenizer_path": "per-example" if reason else "batched",
                     "per_example_rows": src.slow, "per_example_reason": reason or (src.reasons or [None])[0]}}


# --- the cache ---------------------------------------------------------------------------------

def tokenizer_digest(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = backend.to_str()  # {"version", "truncation", "padding", "added_tokens", ...}: runtime settings first
        cut = spec.find('"added_tokens":')
        h.update(spec[max(cut, 0):].encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([type(tokenizer).__name__, getattr(tokenizer, "chat_template", None),
                         tokenizer.bos_token_id, tokenizer.eos_token_id]).encode())
    return "sha256:" + h.hexdigest()


def cache_key(d, tokenizer, seed: int, max_length: int) -> tuple[str, dict]:
    from .provenance import HASH_CACHE

    hash_file = cache_dir() / HASH_CACHE
    try:
        hashes = json.loads(hash_file.read_text())
    except (OSError, ValueError):
        hashes = {}
    section = {k: v for k, v in dataclasses.asdict(d).items() if k not in ("num_proc", "packing")}  # no effect on tokens
    paths = [d.train] + ([d.eval] if d.eval else []) + [e["path"] for e in (d.mix or [])]
    doc = {"version": VERSION, "data": section, "max_length": max_length, "seed": seed,
           "sources": {p: source_digest(p, d.split, hashes) for p in paths},
           "tokenizer": tokenizer_digest(tokenizer)}
    try:
        atomic_write_text(hash_file, json.dumps(hashes))
    except OSError:
        pass  # a read-only cache: the hashes are recomputed next time
    key = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return key, doc


MANIFEST = "manifest.json"


def _write_manifest(entry: Path) -> None:
    files = {p.relative_to(entry).as_posix(): p.stat().st_size
             for p in sorted(entry.rglob("*")) if p.is_file() and p.name != MANIFEST}
    meta_sha = hashlib.sha256((entry / "meta.json").read_bytes()).hexdigest()
    atomic_write_text(entry / MANIFEST, json.dumps({"version": VERSION, "files": files, "meta_sha256": meta_sha}))


def check_entry(entry: Path) -> str | None:
    """Why the cache entry cannot be loaded (None: it is complete and matches its manifest)."""
    try:
        man = json.loads((entry / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest (an interrupted build)"
    except (OSError, ValueError) as e:
        return f"unreadable manifest ({e})"
    if man.get("version") != VERSION:
        return f"written by another version ({man.get('version')})"
    for rel, size in man["files"].items():
        p = entry / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != size:
            return f"{rel} has {p.stat().st_size} bytes, the manifest says {size}"
    if hashlib.sha256((entry / "meta.json").read_bytes()).hexdigest() != man["meta_sha256"]:
        return "meta.json does not match the manifest"
    return None


def _load(entry: Path) -> tuple[DataBundle, dict]:
    import datasets

    meta = json.loads((entry / "meta.json").read_text())
    train = datasets.load_from_disk(str(entry / "train"))
    ev = datasets.load_from_disk(str(entry / "eval")) if (entry / "eval").is_dir() else None
    bundle = DataBundle(train=train, eval=ev, eval_pairs=[(p, a) for p, a in meta["eval_pairs"]],
                        data_hash=meta["data_hash"], stats=meta["stats"], eval_slices=meta["eval_slices"],
                        info=dict(meta["info"]))
    return bundle, meta


RANK_0_GRACE_S = 60.0  # how long another rank gives local rank 0 to take the lock before building itself


def _wait_for_local_rank_0(entry: Path, lock, log) -> None:
    """Under torchrun, ranks other than the node's rank 0 let it build: they wait until it holds the
    lock (they then wait on the lock, and load what it wrote) or the entry is complete. The lock
    alone would let whichever rank comes first build; this makes it rank 0, whose log the user
    reads. After RANK_0_GRACE_S they go on (a rank 0 that builds elsewhere, or not at all)."""
    from filelock import Timeout

    if os.environ.get("LOCAL_RANK", "0") == "0" or not os.environ.get("WORLD_SIZE"):
        return
    end = time.monotonic() + RANK_0_GRACE_S
    while time.monotonic() < end and check_entry(entry) is not None:
        try:
            lock.acquire(timeout=0)
        except Timeout:  # rank 0 holds it
            log(f"data: rank {os.environ.get('RANK', '?')} waits for rank 0 to build {entry}")
            return
        lock.release()
        time.sleep(0.1)


def build(d, tokenizer, *, seed: int, max_length: int, log=print) -> DataBundle:
    """``fastft.data.build``: the cached entry for this data, tokenizer and seed, built first when
    there is none (or it is damaged)."""
    from filelock import FileLock

    t0 = time.perf_counter()
    key, doc = cache_key(d, tokenizer, seed, max_length)
    root = cache_dir() / "data"
    root.mkdir(parents=True, exist_ok=True)
    entry = root / key
    lock = FileLock(str(entry) + ".lock")
    _wait_for_local_rank_0(entry, lock, log)
    with lock:
        hit = False
        if entry.exists():
            problem = check_entry(entry)
            if problem is None:
                try:
                    bundle, meta = _load(entry)
                    hit = True
                except Exception as e:  # noqa: BLE001 - any unreadable entry is rebuilt, never trusted
                    problem = f"cannot be loaded ({type(e).__name__}: {e})"
            if not hit:
                log(f"data: cache entry {entry} is damaged ({problem}); rebuilding it")
        if hit:
            for m in meta["logs"]:
                log(m)
            log(f"data: loaded from the cache ({entry})")
        else:
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=root))
            try:
                meta = _build_into(tmp, d, tokenizer, seed, max_length, log, key)
                meta["key"] = doc
                meta["info"]["build_seconds"] = round(time.perf_counter() - t0, 3)
                atomic_write_text(tmp / "meta.json", json.dumps(meta, ensure_ascii=False))
                _write_manifest(tmp)
                install_dir(tmp, entry)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            bundle, _ = _load(entry)
    ru = resource.getrusage
    bundle.info.update(seconds=round(time.perf_counter() - t0, 3), cache={"path": str(entry), "hit": hit},
                       peak_rss_gb=round(ru(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
                       worker_peak_rss_gb=round(ru(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 3))
    return bundle


# --- fastft data -------------------------------------------------------------------------------

def load_tokenizer(model_name: str):
    """The tokenizer ``fastft train`` would use for ``model.name``, without loading the weights
    (the shipped tiny model's tokenizer from its asset folder)."""
    from transformers import AutoTokenizer

    from . import models

    src = models.EMBEDDED.get(model_name)
    tok = AutoTokenizer.from_pretrained(str(src) if src is not None else models.resolve(model_name))
    if tok.pad_token is None:  # as fastft.backends.load does
        tok.pad_token = tok.eos_token
    return tok


def prepare(r, log=print) -> dict:
    """``fastft data``: build (or load) the recipe's data; the report as a dict."""
    t0 = time.perf_counter()
    tok = load_tokenizer(r.model.name)
    b = build(r.data, tok, seed=r.train.seed, max_length=r.model.max_seq_length, log=log)
    eval_tokens = sum(len(x) for x in b.eval.data.column("input_ids").to_pylist()) if b.eval is not None else 0
    return {"rows": b.info.get("rows"), "train_examples": b.stats["train_examples"],
            "eval_examples": b.stats["eval_examples"], "tokens": b.stats["train_tokens"] + eval_tokens,
            "train_tokens": b.stats["train_tokens"], "train_label_tokens": b.stats["train_label_tokens"],
            "skipped_rows": b.stats["skipped_rows"], "data_hash": b.data_hash,
            "seconds": round(time.perf_counter() - t0, 3), "build_seconds": b.info.get("build_seconds"),
            "peak_rss_gb": b.info["peak_rss_gb"], "worker_peak_rss_gb": b.info["worker_peak_rss_gb"],
            "num_proc": b.info.get("num_proc"), "tokenizer_path": b.info.get("tokenizer_path"),
            "per_example_rows": b.info.get("per_example_rows"), "cache": b.info["cache"]}


def format_report(out: dict) -> str:
    c = out["cache"]
    return "\n".join([
        f"rows            {out['rows']:,} ({out['skipped_rows']} skipped)",
        f"examples        {out['train_examples']:,} train / {out['eval_examples']:,} eval",
        f"tokens          {out['tokens']:,} ({out['train_label_tokens']:,} trained)",
        (f"tokenization    {out['tokenizer_path']} ({out['per_example_rows']} rows one at a time, "
         f"{out['num_proc']} processes)"),
        (f"time            {out['seconds']:.1f} s, peak RSS {out['peak_rss_gb']:.2f} GB "
         f"(workers {out['worker_peak_rss_gb']:.2f} GB)"),
        f"cache           {'hit' if c['hit'] else 'built'}: {c['path']}",
        f"data hash       {out['data_hash']}"])
