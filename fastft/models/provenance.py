"""Which base model an adapter belongs to, and whether a base about to be loaded is that one.

fastft.json records, under "base_model", what the adapter was trained on: the model id from the
recipe, the checkpoint path it resolved to, the architecture (config class and shapes), a sha256
over the checkpoint's weight files and one over its tokenizer files. ``check_compatible`` compares
that record with a base about to be loaded (eval, merge, generate) and refuses a mismatch.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .. import info
from . import named
from ..errors import FastftError
from ..files import HASH_CACHE, atomic_write_text, cache_dir, file_sha256

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")
ARCH_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "vocab_size", "tie_word_embeddings")


class IncompatibleBaseError(FastftError, RuntimeError):
    """An adapter whose recorded base model differs from the base about to be loaded."""


def _files_digest(root: Path, files: list[Path], cache: dict) -> str | None:
    if not files:
        return None
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + file_sha256(f, cache).encode() + b"\n")
    return "sha256:" + h.hexdigest()


def local_checkpoint_dir(path: str) -> Path | None:
    """The folder holding ``path``'s files: itself when local, else the hub cache's snapshot (or None)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p.resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path), local_files_only=True))
    except Exception:  # not a hub id, or not downloaded: nothing local to hash
        return None


def base_fingerprint(path: str, model_id: str | None = None) -> dict:
    """What identifies a base checkpoint: architecture, weights hash, tokenizer hash.

    The weights hash is sha256 over (file name, file sha256) of every weight file (.safetensors,
    .bin, .gguf) in the folder; per-file hashes are cached by path + size + mtime in the fastft cache."""
    root = local_checkpoint_dir(path)
    out = {"model_id": model_id or str(path), "path": str(root or path), "architecture": None,
           "weights_sha256": None, "tokenizer_sha256": None, "quantized_checkpoint": None}
    if root is None:
        out["note"] = "not a local checkpoint: weights and tokenizer not hashed"
        return out
    cfg_path = root / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        arch = {"class": (cfg.get("architectures") or [None])[0]}
        arch.update({k: cfg[k] for k in ARCH_KEYS if k in cfg})
        out["architecture"] = arch
        out["quantized_checkpoint"] = "quantization_config" in cfg
    cache_path = cache_dir() / HASH_CACHE
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8")) if cache_path.is_file() else {}
    except (OSError, ValueError):
        cache = {}
    before = dict(cache)
    weights = [f for f in root.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)]
    out["weights_sha256"] = _files_digest(root, weights, cache)
    out["tokenizer_sha256"] = _files_digest(root, [root / n for n in TOKENIZER_FILES if (root / n).is_file()], cache)
    if cache != before:
        try:  # only a cache: a lost update between two processes costs one re-hash
            atomic_write_text(cache_path, json.dumps(cache, indent=1, sort_keys=True))
        except OSError:
            pass
    return out


def provenance(recipe, backend_info) -> dict:
    """The fastft.json keys that say what an adapter was made from: ``base_model`` (see
    ``base_fingerprint``) and ``source`` (the fastft git commit, when run from a checkout)."""
    try:
        fp = base_fingerprint(backend_info.model_path, model_id=recipe.model.name)
    except (OSError, ValueError) as e:  # never fail a finished run over its record
        fp = {"model_id": recipe.model.name, "path": backend_info.model_path,
              "note": f"not fingerprinted: {type(e).__name__}: {e}"}
    fp["load_in_4bit"] = bool(recipe.model.load_in_4bit)
    fp["compute_dtype"] = backend_info.dtype
    return {"base_model": fp, "source": info.source_revision()}


def base_path_for(run_info: dict, base: str | None = None) -> str:
    """The base checkpoint to load an adapter onto: ``base`` when given (a path, hub id or embedded
    name), else the path recorded at training time when it still exists, else the recipe's
    model.name resolved again (a registry entry pulled onto another machine)."""
    load_in_4bit = bool(run_info.get("recipe", {}).get("model", {}).get("load_in_4bit", True))
    if base:
        return named.resolve(base, load_in_4bit=load_in_4bit)
    recorded = (run_info.get("base_model") or {}).get("path") or run_info.get("backend", {}).get("model_path")
    if recorded and Path(recorded).is_dir():
        return recorded
    return named.resolve(run_info["recipe"]["model"]["name"], load_in_4bit=load_in_4bit)


def check_compatible(run_info: dict, base_path: str, force: bool = False,
                     load_in_4bit: bool | None = None) -> list[str]:
    """Compare the base recorded in ``run_info`` (fastft.json) with the checkpoint at ``base_path``.

    Raises IncompatibleBaseError naming every difference (architecture, weights hash, tokenizer
    hash) unless ``force``; returns notes for the caller to print: the differences when forced,
    what could not be checked (a run from before provenance was recorded, a base not on disk), and,
    given ``load_in_4bit`` (how the caller loads the base), a quantization different from training's."""
    rec = run_info.get("base_model")
    if not rec:
        return ["the run records no base-model fingerprint (trained before fastft recorded one): "
                "compatibility not checked"]
    now = base_fingerprint(base_path, model_id=rec.get("model_id"))
    problems, notes = [], []
    trained_4bit = rec.get("load_in_4bit")
    if load_in_4bit is not None and trained_4bit is not None and bool(load_in_4bit) != bool(trained_4bit):
        notes.append(f"the adapter was trained on a {'4-bit NF4' if trained_4bit else '16-bit'} base and is loaded "
                     f"onto a {'4-bit NF4' if load_in_4bit else '16-bit'} one: its outputs differ from training's "
                     "by the NF4 rounding of the base (fastft merge measures it)")
    if rec.get("architecture") and now.get("architecture") and rec["architecture"] != now["architecture"]:
        diff = {k for k in set(rec["architecture"]) | set(now["architecture"])
                if rec["architecture"].get(k) != now["architecture"].get(k)}
        problems.append("architecture differs (" + ", ".join(
            f"{k}: trained {rec['architecture'].get(k)!r}, now {now['architecture'].get(k)!r}" for k in sorted(diff)) + ")")
    for key, what in (("weights_sha256", "weights"), ("tokenizer_sha256", "tokenizer")):
        if key == "weights_sha256" and rec.get("quantized_checkpoint") and now.get("quantized_checkpoint") is False:
            notes.append("the run trained on a pre-quantized 4-bit checkpoint and this base is a 16-bit one: their "
                         "weight files cannot match, so only the architecture and tokenizer were checked")
            continue
        if rec.get(key) and now.get(key):
            if rec[key] != now[key]:
                verb = "differ" if what == "weights" else "differs"
                problems.append(f"{what} {verb} (trained on {rec[key][:19]}..., this base has {now[key][:19]}...)")
        else:
            notes.append(f"{what} hash not available for {'the recorded base' if not rec.get(key) else base_path}: "
                         "not checked")
    if problems:
        msg = (f"the adapter was trained on {rec.get('model_id')!r} ({rec.get('path')}), and the base being "
               f"loaded, {base_path}, is a different model: " + "; ".join(problems)
               + ". An adapter only works on the exact base it was trained on: give that base "
               "(--base PATH), or pass --force to load it anyway.")
        if not force:
            raise IncompatibleBaseError(msg)
        notes.insert(0, "--force: " + msg)
    return notes
