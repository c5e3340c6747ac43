"""Checks on a written GGUF, read back with the gguf package's reader before the file gets its name:
the architecture is set, the chat template is the run's, the end-of-sequence token is the model's
(id and text), and each stop token of the model's generation config is one llama.cpp ends
generation on."""
from __future__ import annotations

import json
from pathlib import Path

# Tokens llama.cpp ends generation on when they are in the vocabulary, besides the eos/eot/eom
# ids in the metadata (llama.cpp's src/llama-vocab.cpp, end-of-generation token detection).
LLAMA_CPP_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
                       "<EOT>", "_<EOT>", "[EOT]", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>",
                       "<|eom_id|>")


def read_metadata(path: Path) -> dict:
    """The fields fastft checks, read back from a GGUF with the gguf package's reader."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    f = r.fields

    def get(key):
        return f[key].contents() if key in f else None

    tokens = f["tokenizer.ggml.tokens"].contents() if "tokenizer.ggml.tokens" in f else []
    return {"architecture": get("general.architecture"), "name": get("general.name"),
            "file_type": get("general.file_type"), "tensors": len(r.tensors),
            "tokenizer_model": get("tokenizer.ggml.model"), "tokenizer_pre": get("tokenizer.ggml.pre"),
            "chat_template": get("tokenizer.chat_template"), "eos_token_id": get("tokenizer.ggml.eos_token_id"),
            "eot_token_id": get("tokenizer.ggml.eot_token_id"), "eom_token_id": get("tokenizer.ggml.eom_token_id"),
            "bos_token_id": get("tokenizer.ggml.bos_token_id"), "tokens": tokens}


def check_metadata(meta: dict, tokenizer, stop_ids: list[int]) -> list[str]:
    """Problems with a GGUF's metadata against the model's tokenizer (empty: good)."""
    problems = []
    if not meta["architecture"]:
        problems.append("no general.architecture")
    template = getattr(tokenizer, "chat_template", None)
    if template and meta["chat_template"] != template:
        problems.append("tokenizer.chat_template is " + ("missing" if meta["chat_template"] is None else
                                                         "not the run's chat template"))
    eos_id = tokenizer.eos_token_id
    tokens = meta["tokens"]
    if eos_id is not None:
        if meta["eos_token_id"] != eos_id:
            problems.append(f"tokenizer.ggml.eos_token_id is {meta['eos_token_id']}, the model's eos is {eos_id} "
                            f"({tokenizer.eos_token!r})")
        elif eos_id >= len(tokens) or tokens[eos_id] != tokenizer.eos_token:
            got = tokens[eos_id] if eos_id < len(tokens) else "out of range"
            problems.append(f"token {eos_id} is {got!r} in the GGUF vocabulary, {tokenizer.eos_token!r} in the model's")
    stops_in_file = {meta[k] for k in ("eos_token_id", "eot_token_id", "eom_token_id") if meta[k] is not None}
    for i in stop_ids:
        text = tokens[i] if i < len(tokens) else None
        if i not in stops_in_file and text not in LLAMA_CPP_EOG_TEXTS:
            problems.append(f"the model stops at token {i} ({text!r}) but llama.cpp would not end generation on it")
    return problems


def stop_token_ids(model_dir: Path, tokenizer) -> list[int]:
    """Token ids the model ends generation on: its generation config's eos ids and the tokenizer's eos."""
    ids = []
    gc = model_dir / "generation_config.json"
    if gc.is_file():
        v = json.loads(gc.read_text()).get("eos_token_id")
        ids += v if isinstance(v, list) else ([] if v is None else [v])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(int(i) for i in ids))
