"""Reading rows: local .jsonl / .json / .csv / .parquet files and hub datasets, whole (``read_rows``)
or streamed (``stream``), and what identifies a source's content (``source_digest``).

    read_rows("data.jsonl")                     # [{"instruction": ..., "output": ...}, ...]
    kind, items, total = stream("data.jsonl", "train")   # "lines": (line number, raw bytes)
"""
from __future__ import annotations

import json
from pathlib import Path

from ..files import file_sha256
from .bundle import DataError

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
CHUNK_ROWS = 1024  # rows per batch read from an Arrow source, and per chunk a worker tokenizes


def _local(src: str) -> Path | None:
    """The local file ``src`` names, None for a hub dataset id; a missing file or an unsupported
    type raises."""
    path = Path(src)
    if not (path.suffix.lower() in LOCAL_SUFFIXES or path.exists()):
        return None
    if not path.is_file():
        raise DataError(f"data file not found: {src} (check data.train / data.eval in the recipe; "
                        "relative paths are tried beside the recipe, then in the working directory)")
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise DataError(f"{src}: unsupported file type {path.suffix!r}; use .jsonl, .json, .csv or .parquet")
    return path


def _hub(src: str, split: str):
    if "/" not in src:
        raise DataError(f"data file not found: {src} (not a local file, nor a hub id like 'org/name')")
    import datasets

    try:
        return datasets.load_dataset(src, split=split)
    except Exception as e:  # network, missing repo, missing split: all end the run the same way
        raise DataError(f"cannot load hub dataset {src!r} (split {split!r}): {type(e).__name__}: {e}") from e


def _load_arrow(path: Path):
    """A .csv / .parquet file as a memory-mapped ``datasets.Dataset``."""
    import datasets

    return datasets.load_dataset(LOCAL_SUFFIXES[path.suffix.lower()], data_files=str(path), split="train")


# --- whole ----------------------------------------------------------------------------------------

def read_rows(source: str, split: str = "train", skipped: list[str] | None = None) -> list[dict]:
    """Rows of a local .jsonl/.json/.csv/.parquet file, or of a hub dataset id (needs network).
    With a ``skipped`` list, malformed JSONL lines are recorded there instead of raising."""
    path = _local(source)
    if path is None:
        return list(_hub(source, split))
    if path.suffix.lower() == ".jsonl":
        return _read_jsonl(path, skipped)
    if path.suffix.lower() == ".json":
        return _read_json(path)
    return list(_load_arrow(path))


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


# --- streamed -------------------------------------------------------------------------------------

def stream(src: str, split: str):
    """(kind, iterator of (number, item), total rows or None). kind "lines": (line number, raw bytes),
    parsed by the workers so that an error names the file and the line; kind "rows": (row number,
    dict), from memory-mapped Arrow in batches (a .json list is read whole)."""
    path = _local(src)
    if path is None:
        ds = _hub(src, split)
    elif path.suffix.lower() == ".jsonl":
        return "lines", _lines(path), None
    elif path.suffix.lower() == ".json":
        rows = _read_json(path)
        return "rows", enumerate(rows, 1), len(rows)
    else:
        ds = _load_arrow(path)
    return "rows", enumerate(_ds_rows(ds), 1), len(ds)


def _lines(path: Path):
    with open(path, "rb") as f:
        yield from enumerate(f, 1)


def _ds_rows(ds):
    for batch in ds.iter(batch_size=CHUNK_ROWS):
        keys = list(batch)
        for vals in zip(*batch.values()):
            yield dict(zip(keys, vals))


def source_digest(src: str, split: str, hashes: dict) -> str:
    """What identifies a source's content: a local file's sha256 (``hashes``: the file-hash cache),
    a hub dataset's fingerprint."""
    path = Path(src)
    if path.is_file():
        return "sha256:" + file_sha256(path, hashes)
    if path.suffix.lower() in LOCAL_SUFFIXES:
        _local(src)  # raises the not-found error
    return f"hub:{src}:{split}:{_hub(src, split)._fingerprint}"
