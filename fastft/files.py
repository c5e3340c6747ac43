"""Leaf file helpers: atomic writes, swapping a finished folder into place, file hashes, the cache.

Nothing here imports another fastft module, so every layer can use it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

CACHE_ENV = "FASTFT_CACHE"
HASH_CACHE = "file-hashes.json"  # in cache_dir(): the cache file_sha256 reuses (path -> size, mtime, sha256)


def cache_dir() -> Path:
    """fastft's cache root: ``$FASTFT_CACHE``, else ``~/.cache/fastft``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fastft").expanduser()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def install_dir(tmp: Path, dst: Path) -> None:
    """Put a finished folder built at ``tmp`` (same filesystem) in place of ``dst``: an existing
    ``dst`` is first renamed aside and removed only after the new one is in place, so at no moment
    is there a half-written folder at ``dst``."""
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old.", dir=dst.parent))
        os.replace(dst, old / dst.name)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)


@contextmanager
def building(dst: Path, prefix: str | None = None, suffix: str = "", install=install_dir):
    """Build a folder that replaces ``dst`` as a whole: yields an empty temporary folder beside
    ``dst`` (same filesystem, so the final rename is atomic); when the block ends without an error
    it is installed at ``dst`` by ``install(tmp, dst)`` (default ``install_dir``), and on any error,
    Ctrl-C included, it is removed and ``dst`` is left as it was.

        with building(cache / "model") as tmp:
            save_into(tmp)
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{dst.name}.", suffix=suffix, dir=dst.parent))
    try:
        yield tmp
        install(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: Path, cache: dict | None = None) -> str:
    """sha256 of one file; with ``cache`` (a dict kept in the fastft cache) reused while the file's
    size and mtime are unchanged, so an 8B checkpoint (16 GB, ~1 min to hash) is hashed once."""
    st = path.stat()
    key = str(path.resolve())
    hit = cache.get(key) if cache is not None else None
    if hit and hit["size"] == st.st_size and hit["mtime_ns"] == st.st_mtime_ns:
        return hit["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if cache is not None:
        cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    return digest
