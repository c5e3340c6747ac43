"""The model families beyond Llama on the hf backend: a tiny random checkpoint of each, built here
from its transformers config (the tiny model's tokenizer, no hub), trained by `fastft train`
end to end; the adapter reloads in plain PEFT with the trained model's logits, and merges."""
import shutil

import pytest

from support import ROOT, assert_close, tiny_recipe_dict
from fastft import recipe, train

pytestmark = pytest.mark.slow
TOKENIZER = ROOT / "fastft" / "assets" / "tiny-llama"

# Every linear's input width is a multiple of 64, the NF4 blocksize: bitsandbytes' CPU dequant is
# wrong for other multiples of 16, which would hide real differences.
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, vocab_size=320,
              bos_token_id=2, eos_token_id=3, pad_token_id=0, tie_word_embeddings=False)
FAMILIES = {
    "qwen3": ("Qwen3Config", {}),
    "qwen2": ("Qwen2Config", {}),  # biases on q, k and v
    "mistral": ("MistralConfig", {"sliding_window": 32}),
    "gemma3_text": ("Gemma3TextConfig", {"sliding_window": 16, "query_pre_attn_scalar": 16,
                                         "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True}),
    "phi3": ("Phi3Config", {}),  # fused qkv_proj and gate_up_proj
    "qwen3_moe": ("Qwen3MoeConfig", {"moe_intermediate_size": 64, "num_experts": 4, "num_experts_per_tok": 2,
                                     "output_router_logits": True}),
    "gpt_oss": ("GptOssConfig", {"intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2,
                                 "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"],
                                 "output_router_logits": True}),
}


def build_checkpoint(family: str, folder):
    """A seeded random checkpoint of ``family`` with the tiny model's tokenizer and chat template."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    cls, extra = FAMILIES[family]
    config = getattr(transformers, cls)(**{**COMMON, **extra})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(TOKENIZER / f, folder / f)
    return folder


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_evaluates_and_reloads_in_plain_peft(family, tmp_path, one_torch_thread):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    base = build_checkpoint(family, tmp_path / family)
    out = tmp_path / "out"
    r = recipe.from_dict(tiny_recipe_dict(out, backend="hf", model={"name": str(base)},
                                          data={"max_examples": 48, "eval_fraction": 0.17},
                                          train={"max_steps": 3, "batch_size": 4}, eval={"max_new_tokens": 2}))
    result = train.run(r, log=lambda m: None)
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "eval.json").is_file()
    assert result.info["metrics"]["steps"] == 3 and result.info["eval"]["task"]["n"] > 0

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, quantization_config=quant)
    reloaded = PeftModel.from_pretrained(plain, out / "adapter").train()  # train mode: see test_train
    tok = AutoTokenizer.from_pretrained(out / "adapter")
    batch = tok(["<|user|> classify red , blue <|end|> <|assistant|>", "hello there"], return_tensors="pt",
                padding=True)
    extra = {"output_router_logits": False} if family in ("qwen3_moe", "gpt_oss") else {}
    with torch.no_grad():
        expected = result.model.train()(**batch, **extra).logits
        got = reloaded(**batch, **extra).logits
    assert_close(got, expected, atol=1e-5, rtol=1e-5, what=f"{family} logits")

    # merged into the 16-bit base: fastft.merge reloads the merged checkpoint with plain
    # transformers and checks its logits against base + adapter (it raises when they differ)
    from fastft import merge

    report = merge.merge(str(out), tmp_path / "merged", dtype="fp32", log=lambda m: None)
    assert report["verify"]["passed"], report["verify"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_kernels_fastft_take_every_lora_layer_and_train_like_stock_peft(family, tmp_path, one_torch_thread):
    """fastft's fused LoRA (Triton; the CPU interpreter here) on each family's projections (Qwen2's
    biased q/k/v, Phi-3's fused qkv_proj and gate_up_proj, Gemma 3's GeGLU MLP, the MoE's attention)
    takes every LoRA layer and gives stock PEFT's per-step losses."""
    import re

    import torch

    base = build_checkpoint(family, tmp_path / family)
    losses, said = {}, {}
    for mode in ("fastft", "none"):
        logs = []
        r = recipe.from_dict(tiny_recipe_dict(tmp_path / mode, backend="hf", kernels=mode,
                                              model={"name": str(base), "dtype": "float32"},
                                              data={"max_examples": 16, "eval_fraction": 0.0},
                                              train={"max_steps": 2, "batch_size": 2, "logging_every": 1}))
        torch.manual_seed(0)  # PEFT draws lora_A's initial values from the global RNG
        losses[mode] = train.run(r, log=logs.append).info["metrics"]["losses"]
        said[mode] = logs
    kernels = [m for m in said["fastft"] if "fastft fused LoRA on" in m]
    if family == "qwen3_moe":
        # PEFT's all-linear puts LoRA on the attention, on the router and, through target_parameters,
        # on the 3-D expert weights; the fused kernels take the attention's nn.Linear / Linear4bit
        # projections, and the rest fall back to PEFT, named as such
        assert any("fused LoRA on 8 of 14 LoRA layers" in m and "Qwen3MoeTopKRouter is not nn.Linear" in m
                   for m in kernels), kernels
    else:
        assert any(re.search(r"fastft fused LoRA on (\d+) of \1 LoRA layers", m) for m in kernels), kernels
    assert len(losses["fastft"]) == len(losses["none"]) == 2
    assert_close(torch.tensor(losses["fastft"]), torch.tensor(losses["none"]), atol=0, rtol=1e-5,
                 what=f"{family} per-step losses")
