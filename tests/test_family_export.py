"""GGUF export per model family: a tiny random checkpoint of each family (tests/test_families.py's
configs) goes through llama.cpp's converter, and llama.cpp's logits on the file equal the
checkpoint's own.

The converter needs a vocabulary it knows, which the tiny model's word-level one is not: the
checkpoints here take SmolLM2's byte-level BPE (49,152 tokens; llama.cpp knows its pre-tokenizer),
and Phi-3, whose converter reads only a SentencePiece ``tokenizer.model``, a SentencePiece model
trained here. Qwen2 is left out: for model_type qwen2 transformers loads any vocabulary as its own
Qwen2Tokenizer, whose pre-tokenizer the converter recognizes only for Qwen's real vocabulary (Qwen3
goes through the same converter class). The conversion and the metadata check run everywhere;
llama.cpp's logits need llama-cpp-python (``make test-gguf``)."""
from __future__ import annotations

import json
import shutil

import pytest

from test_families import COMMON, FAMILIES

pytestmark = pytest.mark.slow
EXPORTED = [f for f in FAMILIES if f != "qwen2"]
# llama.cpp's names for them (general.architecture)
ARCH = {"qwen3": "qwen3", "mistral": "llama", "gemma3_text": "gemma3", "phi3": "phi3", "qwen3_moe": "qwen3moe",
        "gpt_oss": "gpt-oss"}
PROMPT = [1, 57, 200, 31, 120, 299, 7, 64, 180, 33, 250, 2]


def _sentencepiece_model(folder, vocab: int) -> None:
    import sentencepiece as spm

    from fastft.models.named import ASSETS

    text = folder / "spm.txt"
    rows = [json.loads(x) for x in (ASSETS / "data" / "order-extraction.jsonl").read_text().splitlines()]
    text.write_text("".join(r["instruction"] + "\n" + r["input"] + "\n" + r["output"] + "\n" for r in rows))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "tokenizer"), vocab_size=vocab,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2,
                                   # Phi-3's own markers: llama.cpp's loader looks <|endoftext|> up in a phi3 vocabulary
                                   user_defined_symbols=["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"])
    (folder / "tokenizer.vocab").unlink()
    text.unlink()


def build(family: str, folder, smollm2):
    """The family's tiny checkpoint with a vocabulary llama.cpp's converter takes."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    cls, extra = FAMILIES[family]
    vocab = 512 if family == "phi3" else 49152  # 256 byte pieces + the characters + merges
    # the converter's qwen3moe always normalizes the top-k routing weights (as Qwen3-30B-A3B's config says)
    moe = {"norm_topk_prob": True} if family == "qwen3_moe" else {}
    config = getattr(transformers, cls)(**{**COMMON, **extra, **moe, "vocab_size": vocab, "bos_token_id": 1,
                                           "eos_token_id": 2, "pad_token_id": 2})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
    folder.mkdir(parents=True)
    model.save_pretrained(folder, safe_serialization=True)
    if family == "phi3":
        _sentencepiece_model(folder, vocab)
    else:
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy2(smollm2 / f, folder / f)
    return model


@pytest.fixture(scope="module")
def smollm2(download_cache, fastft_cache):
    from pathlib import Path

    from fastft.models import named

    return Path(named.resolve("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def exported(smollm2, tmp_path_factory):
    """family -> (the checkpoint's model, its f32 GGUF), converted once."""
    from fastft.export import llamacpp

    out = {}
    root = tmp_path_factory.mktemp("family-gguf")
    for family in EXPORTED:
        folder = root / family
        model = build(family, folder, smollm2)
        gguf = folder / "model-f32.gguf"
        llamacpp.convert(folder, gguf, "f32", folder / "convert.log", f"tiny-{family}")
        out[family] = (model, gguf)
    return out


@pytest.mark.parametrize("family", EXPORTED)
def test_family_converts_to_gguf(family, exported):
    from fastft.export import checks

    model, gguf = exported[family]
    meta = checks.read_metadata(gguf)
    assert meta["architecture"] == ARCH[family]
    assert meta["file_type"] == 0  # all f32
    assert len(meta["tokens"]) == model.config.vocab_size
    # every weight of the checkpoint is in the file (tied embeddings once; the converter may split or
    # fuse some: Phi-3's fused projections stay fused, gpt-oss's experts are split into gate and up)
    assert meta["tensors"] >= len({p.data_ptr() for p in model.parameters()}) - 1


@pytest.mark.gguf
@pytest.mark.parametrize("family", EXPORTED)
def test_llama_cpp_logits_equal_the_checkpoints(family, exported):
    import numpy as np
    import torch

    from fastft.export.options import llama_cpp

    module = llama_cpp()
    if module is None:
        pytest.skip("llama-cpp-python is not installed (make gguf)")
    model, gguf = exported[family]
    llm = module.Llama(str(gguf), n_ctx=64, logits_all=True, verbose=False, n_threads=1, seed=0)
    try:
        llm.eval(PROMPT)
        theirs = np.array([llm.scores[i] for i in range(len(PROMPT))])
    finally:
        llm.close()
    with torch.no_grad():
        ours = model(torch.tensor([PROMPT])).logits[0].numpy()
    scale = float(np.abs(ours).max())
    diff = float(np.abs(ours - theirs).max())
    print(family, "max |logit diff|", diff, "scale", scale)
    assert diff <= 2e-3 * scale, (family, diff, scale)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
