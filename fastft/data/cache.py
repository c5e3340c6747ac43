"""The data cache: ``$FASTFT_CACHE/data/<key>/`` per data section, tokenizer, seed and max length.

An entry holds ``train/`` and ``eval/`` (folders in the layout of ``datasets.save_to_disk``, with
``input_ids`` and ``labels``), ``meta.json`` and, written last, ``manifest.json`` (every file's size
and meta.json's sha256). The key hashes the sources' contents, the tokenizer (tokenizer.json and
chat template), the recipe's data section, ``max_seq_length`` and the seed. An entry is built in a
temporary folder and moved into place whole (``fastft.files.building``); one whose manifest is
missing or does not match is rebuilt, never loaded. A file lock makes concurrent builders (DDP
ranks, a train and an eval at once) wait for the first one and load its result; under torchrun the
other ranks first let the node's rank 0 take the lock, so rank 0 builds and logs.

    key, doc = cache_key(d, tokenizer, seed=3407, max_length=2048)
    entry = cache_dir() / "data" / key
    with locked(entry, log):
        bundle = load(entry, log)        # None: missing or damaged; build it
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from contextlib import contextmanager
from pathlib import Path

from ..files import HASH_CACHE, atomic_write_text, cache_dir
from ..world import World
from .bundle import DataBundle
from .sources import source_digest

VERSION = 1  # bump when the cached layout or the tokenization changes
MANIFEST = "manifest.json"
RANK_0_GRACE_S = 60.0  # how long another rank gives local rank 0 to take the lock before building itself


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
    """(the entry's name, the document it hashes)."""
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


def write_meta(entry: Path, meta: dict) -> None:
    """``meta.json``, then the manifest that makes the entry loadable (written last)."""
    atomic_write_text(entry / "meta.json", json.dumps(meta, ensure_ascii=False))
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


def read_entry(entry: Path) -> tuple[DataBundle, dict]:
    """(the bundle, its meta) of a complete entry."""
    import datasets

    meta = json.loads((entry / "meta.json").read_text())
    train = datasets.load_from_disk(str(entry / "train"))
    ev = datasets.load_from_disk(str(entry / "eval")) if (entry / "eval").is_dir() else None
    bundle = DataBundle(train=train, eval=ev, eval_pairs=[(p, a) for p, a in meta["eval_pairs"]],
                        data_hash=meta["data_hash"], stats=meta["stats"], eval_slices=meta["eval_slices"],
                        info=dict(meta["info"]))
    return bundle, meta


def load(entry: Path, log) -> DataBundle | None:
    """The bundle a complete entry holds, its build's log lines repeated; None when there is no
    entry, or it is damaged (said in the log: it is rebuilt, never trusted)."""
    if not entry.exists():
        return None
    problem = check_entry(entry)
    if problem is None:
        try:
            bundle, meta = read_entry(entry)
        except Exception as e:  # noqa: BLE001 - any unreadable entry is rebuilt, never trusted
            problem = f"cannot be loaded ({type(e).__name__}: {e})"
    if problem is not None:
        log(f"data: cache entry {entry} is damaged ({problem}); rebuilding it")
        return None
    for m in meta["logs"]:
        log(m)
    log(f"data: loaded from the cache ({entry})")
    return bundle


@contextmanager
def locked(entry: Path, log):
    """Hold the entry's file lock (after letting the node's rank 0 take it first, under torchrun)."""
    from filelock import FileLock

    entry.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(entry) + ".lock")
    _wait_for_local_rank_0(entry, lock, log)
    with lock:
        yield


def _wait_for_local_rank_0(entry: Path, lock, log) -> None:
    """Under torchrun, ranks other than the node's rank 0 let it build: they wait until it holds the
    lock (they then wait on the lock, and load what it wrote) or the entry is complete. The lock
    alone would let whichever rank comes first build; this makes it rank 0, whose log the user
    reads. After RANK_0_GRACE_S they go on (a rank 0 that builds elsewhere, or not at all)."""
    from filelock import Timeout

    world = World.from_env()
    if world.local_rank == 0 or world.size == 1:
        return
    end = time.monotonic() + RANK_0_GRACE_S
    while time.monotonic() < end and check_entry(entry) is not None:
        try:
            lock.acquire(timeout=0)
        except Timeout:  # rank 0 holds it
            log(f"data: rank {world.rank} waits for rank 0 to build {entry}")
            return
        lock.release()
        time.sleep(0.1)
