"""The unsloth backend, on CPU through Unsloth 2026.10's CPU backend (and on a GPU when there is one).

`make test` runs these in .venv-unsloth (unsloth + trl 1.15); in the main environment, which has no
unsloth, they skip with that reason."""
import importlib.util
import json

import pytest

from support import assert_close, tiny_recipe_dict

pytestmark = [
    pytest.mark.unsloth,
    pytest.mark.skipif(importlib.util.find_spec("unsloth") is None,
                       reason="unsloth not installed here; `make test` runs these in .venv-unsloth"),
]


def test_auto_picks_unsloth_only_with_cuda():
    import torch

    from fastft import recipe
    from fastft.models import backends

    r = recipe.from_dict(tiny_recipe_dict("x"))
    name, why = backends.choose(r)
    if torch.cuda.is_available():
        assert (name, why) == ("unsloth", "auto: CUDA device and unsloth available")
    else:
        assert name == "hf" and why.startswith("auto: no CUDA device")


def test_unsloth_backend_trains_and_saves_a_plain_peft_adapter(tmp_path):
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from fastft import recipe, train

    r = recipe.from_dict(tiny_recipe_dict(tmp_path, backend="unsloth", eval={"max_examples": 20, "max_new_tokens": 16}))
    result = train.run(r, log=lambda m: None)
    info = result.info
    assert info["backend"]["name"] == "unsloth"
    assert info["backend"]["reason"] == "requested in the recipe (backend: unsloth)"
    assert info["versions"]["unsloth"]
    losses = info["metrics"]["losses"]
    assert losses[-1] < 0.5 * losses[0], losses
    assert info["eval"]["task"]["adapter"]["exact_match"] > info["eval"]["task"]["base"]["exact_match"]
    assert json.loads((tmp_path / "fastft.json").read_text())["backend"]["name"] == "unsloth"

    adapter = tmp_path / "adapter"
    cfg = PeftConfig.from_pretrained(adapter)
    assert cfg.r == 8
    base = AutoModelForCausalLM.from_pretrained(
        cfg.base_model_name_or_path, dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
    reloaded = PeftModel.from_pretrained(base, adapter).train()  # train mode: see test_train.py
    tok = AutoTokenizer.from_pretrained(adapter)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Classify : red , blue , teal ."}],
                                     tokenize=False, add_generation_prompt=True)
    batch = tok([prompt], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        got = reloaded(**batch).logits
        expected = result.model.train()(**batch).logits
    assert_close(got, expected, atol=1e-4, rtol=1e-4, what="logits (plain PEFT reload vs unsloth in memory)")


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "mistral", "gemma3_text", "phi3", "qwen3_moe", "gpt_oss"])
def test_unsloth_backend_trains_each_family_and_fastft_takes_its_lora_layers(family, tmp_path):
    """Each family's tiny random checkpoint through Unsloth's loader: it trains, evaluates and saves
    its adapter; with kernels: fastft (the interpreter on CPU) the fused path takes every LoRA layer
    of the dense families. On CPU Unsloth runs the stock modules; its fused slots need a GPU."""
    import re

    from test_families import build_checkpoint

    from fastft import recipe, train

    base = build_checkpoint(family, tmp_path / family)
    logs = []
    r = recipe.from_dict(tiny_recipe_dict(tmp_path / "out", backend="unsloth", kernels="fastft",
                                          model={"name": str(base), "dtype": "float32"},
                                          data={"max_examples": 32, "eval_fraction": 0.2},
                                          train={"max_steps": 2, "batch_size": 4}, eval={"max_new_tokens": 2}))
    result = train.run(r, log=logs.append)
    assert result.info["backend"]["name"] == "unsloth" and result.info["metrics"]["steps"] == 2
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file() and result.info["eval"]
    kernels = [m for m in logs if "fastft fused LoRA on" in m]
    if family == "qwen3_moe":  # the attention's 8; the experts (and routers, where LoRA'd) stay on PEFT's path
        assert any(re.search(r"fused LoRA on 8 of \d+ LoRA layers", m) and "Qwen3MoeExperts is not nn.Linear" in m
                   for m in kernels), kernels
    else:
        assert any(re.search(r"fastft fused LoRA on (\d+) of \1 LoRA layers", m) for m in kernels), kernels
