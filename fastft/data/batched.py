"""The batched build behind ``fastft.data.build``: one cache entry's files from a recipe's data
section, the same, token for token, as ``build_reference``'s data.

    meta = build_into(tmp, recipe.data, tokenizer, seed=3407, max_length=2048, log=print, key=key)

1. Read and tokenize each source through the worker pool (``fastft.data.encode``) into a
   memory-mapped Arrow file (``fastft.data.rows``). Nothing keeps every row in Python objects,
   except a .json list, read whole (about 3x the file's size at the peak; ``datasets``' json loader
   parses such a file whole too; docs/data.md says to convert big ones to .jsonl).
2. Split and mix on row indices, in the same order as ``build_reference`` (``fastft.data.split``,
   ``fastft.data.mixing``), so the same seed gives the same split, the same mix and the same data hash.
3. Write ``train/`` and ``eval/`` by gathering rows batch by batch from the mapped files, dropping the
   mapped pages from the resident set after each chunk: memory does not grow with the number of rows.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from ..progress import progress
from . import encode, split
from .bundle import DataError
from .mixing import describe, mix
from .rows import RowStore

GATHER_ROWS = 4096  # rows of example JSON gathered at a time (data hash, eval pairs)


def build_into(entry: Path, d, tokenizer, seed: int, max_length: int, log, key: str = "") -> dict:
    """Build the cache entry's files in ``entry``; returns meta (stats, hash, eval pairs, logs)."""
    logs: list[str] = []

    def say(m: str) -> None:
        logs.append(m)
        log(m)

    responses_only = d.train_on_responses_only and d.format != "text"
    reason = encode.start(tokenizer, responses_only, max_length)
    if reason:
        say(f"data: tokenizing one example at a time (the exact per-example method): {reason}")
    num_proc = getattr(d, "num_proc", None) or encode.default_num_proc()
    skipped: list[str] | None = [] if d.skip_bad_rows else None
    digest = hashlib.sha256()
    work = entry / ".sources"
    work.mkdir(parents=True)
    src = encode.SourceStream(d, work, num_proc, skipped, log)
    try:
        task = src.tokenize(d.train, "data.train", d.format, digest)
        n = len(task)
        ev = None
        if d.eval:
            ev = src.tokenize(d.eval, "data.eval", d.format, digest)
            eval_idx = np.arange(len(ev))
            train_refs = np.arange(n)
        elif d.eval_fraction > 0:
            eval_idx, train_refs = split.held_out_split(n, d.eval_fraction, seed, d.train)
            ev = task
        else:
            eval_idx, train_refs = np.arange(0), np.arange(n)

        parts, mix_stats, mixed = [task], None, []
        if d.mix:
            def load(path, what, _slices, fmt):
                ds = src.tokenize(path, what, fmt)
                start = sum(len(p) for p in parts)
                parts.append(ds)
                return range(start, start + len(ds))

            train_refs, mixed, mix_stats = mix(d, seed, train_refs.tolist(), load)
            say(describe(mix_stats))
        full = sum(parts[1:], parts[0])
        for start in range(0, len(mixed), GATHER_ROWS):  # the data hash covers the mixed rows as drawn
            for e in full.gather(mixed[start:start + GATHER_ROWS], ["ex"]).column("ex").to_pylist():
                digest.update(e.encode())
                digest.update(b"\n")
            full.release()
    finally:
        src.close()
    if skipped:
        say(f"data: skipped {len(skipped)} bad rows (data.skip_bad_rows: true); first: {skipped[0]}")
    if src.reasons:
        say(f"data: {len(src.reasons)} chunks went through the per-example method; first: {src.reasons[0]}")

    def write(ds: RowStore, idx, name: str):
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
            fingerprint = hashlib.sha256(f"{key}/{name}".encode()).hexdigest()[:16]
            split.write_split(ds, idx[keep], entry / name, fingerprint, bar.update)
        return int(keep.sum()), int(ntok[keep].sum()), int(ntrain[keep].sum())

    n_train, n_tokens, n_trained = write(full, train_refs, "train")
    n_eval_ex = write(ev, eval_idx, "eval")[0] if len(eval_idx) else 0
    pairs, eval_slices = [], []
    for start in range(0, len(eval_idx), GATHER_ROWS):
        rows = ev.gather(eval_idx[start:start + GATHER_ROWS], ["ex", "slice"]).to_pylist()
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
