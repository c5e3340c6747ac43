"""Named embedded models, usable as ``model.name`` in a recipe without any hub access.

    from fastft import models
    path = models.resolve("fastft-tiny")   # -> ~/.cache/fastft/models/fastft-tiny-<hash>/

``fastft-tiny`` is a ~3M-parameter Llama (config and word-level tokenizer shipped in
fastft/assets/tiny-llama) whose weights are drawn from a fixed seed and written once, as a normal
transformers checkpoint (safetensors), into the cache (``$FASTFT_CACHE``, default ~/.cache/fastft).
Any other name is returned unchanged: a local path or a hub id for transformers/Unsloth to load.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_SEED = 20261126
# A random lm_head with the usual std 0.02 caps every logit near 5 (row norm 0.3 x normed hidden
# norm 16), so no LoRA update could make the model confident. Trained models' output layers are
# ~10x larger; drawing lm_head with this std gives the tiny model that range.
TINY_LM_HEAD_STD = 0.25
EMBEDDED = {"fastft-tiny": ASSETS / "tiny-llama"}


def cache_dir() -> Path:
    return Path(os.environ.get("FASTFT_CACHE") or Path.home() / ".cache" / "fastft").expanduser()


def is_embedded(name: str) -> bool:
    return name in EMBEDDED


def resolve(name: str) -> str:
    """Return a path or hub id that ``from_pretrained`` can load for ``name``."""
    if name not in EMBEDDED:
        return name
    src = EMBEDDED[name]
    digest = _hash_dir(src, extra=f"{TINY_SEED}:{TINY_LM_HEAD_STD}")
    dst = cache_dir() / "models" / f"{name}-{digest[:12]}"
    if (dst / "model.safetensors").is_file():
        return str(dst)
    from filelock import FileLock

    dst.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dst) + ".lock"):
        if not (dst / "model.safetensors").is_file():  # another process may have finished meanwhile
            _materialize_tiny(src, dst)
    return str(dst)


def _hash_dir(path: Path, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _materialize_tiny(src: Path, dst: Path) -> None:
    """Random weights from TINY_SEED, saved with the shipped tokenizer; written to a temp dir and
    renamed, so a crash never leaves a half-written checkpoint in the cache."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{k: v for k, v in json.loads((src / "config.json").read_text()).items()
                         if k not in ("architectures", "model_type")})
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(cfg)
        torch.nn.init.normal_(model.lm_head.weight, std=TINY_LM_HEAD_STD)
    tok = AutoTokenizer.from_pretrained(str(src))
    tmp = Path(tempfile.mkdtemp(prefix=dst.name + ".", dir=dst.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
