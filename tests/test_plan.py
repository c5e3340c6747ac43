"""The VRAM planner (fastft/models/plan.py): exact parameter counts, every term by hand for one small
config, the activation terms against peaks measured on CPU, every shipped recipe planned, the CLI."""
import json
import re
import shutil
from pathlib import Path

import pytest

from support import ROOT
from fastft import cli, recipe
from fastft.models import plan, shapes, vram
from fastft.hardware import GiB

# one run each (a set of adapters, sweep: / adapters:, plans per adapter: tests/test_sweep.py)
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "\nsweep:" not in p.read_text()
                 and "\nadapters:" not in p.read_text())
TINY_CONFIG = ROOT / "fastft" / "assets" / "tiny-llama" / "config.json"


# --- parameter counts: the meta-device model against the real architectures -------------------------

@pytest.mark.parametrize("name, total", [
    ("unsloth/llama-3-8b-bnb-4bit", 8_030_261_248),
    ("meta-llama/Meta-Llama-3-8B-Instruct", 8_030_261_248),
    ("unsloth/Meta-Llama-3.1-8B-bnb-4bit", 8_030_261_248),
    ("meta-llama/Llama-3.2-1B", 1_235_814_400),
    ("unsloth/Llama-3.2-3B-Instruct-bnb-4bit", 3_212_749_824),
    ("Qwen/Qwen3-4B", 4_022_468_096),
    ("unsloth/Qwen3-8B-unsloth-bnb-4bit", 8_190_735_360),
    ("Qwen/Qwen3-14B", 14_768_307_200),
    ("Qwen/Qwen2.5-7B-Instruct", 7_615_616_512),
    ("mistralai/Mistral-7B-v0.3", 7_248_023_552),
    ("google/gemma-3-270m", 268_098_176),
    ("google/gemma-3-1b-it", 999_885_952),
    ("google/gemma-3-4b-it", 3_880_263_168),  # the text decoders of the image-text checkpoints
    ("unsloth/gemma-3-12b-it-bnb-4bit", 11_766_034_176),
    ("microsoft/Phi-3-mini-4k-instruct", 3_821_079_552),
    ("microsoft/phi-4", 14_659_507_200),
    ("Qwen/Qwen3-30B-A3B", 30_532_122_624),
    ("openai/gpt-oss-20b", 20_914_757_184),
])
def test_parameter_counts_match_the_real_models(name, total):
    config, _ = shapes.find_config(name)
    assert shapes.shapes(config).total_params == total


def test_llama3_8b_parts_by_hand():
    sh = shapes.shapes(shapes.find_config("unsloth/llama-3-8b-bnb-4bit")[0])
    H, I, kv, V, L = 4096, 14336, 1024, 128256, 32
    per_layer = H * H + 2 * H * kv + H * H + 3 * H * I  # q, k, v, o, gate, up, down
    assert sum(i * o for _, i, o in sh.linears) == L * per_layer == 6_979_321_856
    assert sh.embed_params == sh.lm_head_params == V * H and not sh.tied
    assert sh.norm_params == (2 * L + 1) * H
    assert len(sh.linears) == 7 * L and (sh.q_dim, sh.kv_dim, sh.heads, sh.head_dim) == (4096, 1024, 32, 128)
    # LoRA r=16 on all linears: r * (in + out) summed
    r = recipe.from_dict({"model": {"name": "unsloth/llama-3-8b-bnb-4bit"}, "data": {"train": "d.jsonl"},
                          "output": {"dir": "o"}})
    p = plan.plan(r, "rtx4090", search=False)
    assert p.lora_params == L * 16 * ((H + H) * 2 + (H + kv) * 2 + (H + I) * 3) == 41_943_040


def test_qwen_norms_and_biases_are_16_bit_parts():
    """Qwen3's per-head q/k norms and Qwen2.5's q/k/v biases stay 16-bit: counted one tensor each."""
    q3 = shapes.shapes(shapes.find_config("Qwen/Qwen3-8B")[0])
    L, H, hd = 36, 4096, 128
    assert q3.norm_params == (2 * L + 1) * H + 2 * L * hd and sum(q3.small16) == q3.norm_params
    q25 = shapes.shapes(shapes.find_config("Qwen/Qwen2.5-7B")[0])
    L, H, kv = 28, 3584, 512
    assert sum(q25.small16) - q25.norm_params == L * (H + 2 * kv)  # the q, k and v biases
    r = recipe.from_dict({"model": {"name": "Qwen/Qwen2.5-7B"}, "data": {"train": "d.jsonl"}, "output": {"dir": "o"}})
    p = plan.plan(r, "rtx4090", search=False)
    parts = next(t for t in p.static if t.name.startswith("embeddings"))
    assert parts.name == "embeddings, LM head, norms, biases"
    assert f"{q25.embed_params + q25.lm_head_params + sum(q25.small16):,} params" in parts.note


def test_moe_experts_are_16_bit_and_active_params_are_the_top_k():
    """Qwen3-30B-A3B: 128 experts, 8 a token. The 3-D expert tensors and the routers are not
    nn.Linear, so 4-bit loading leaves them 16-bit; the plan counts them and says so."""
    sh = shapes.shapes(shapes.find_config("Qwen/Qwen3-30B-A3B")[0])
    L, H, E, w = 48, 2048, 128, 768
    assert sh.expert_params == L * E * 3 * H * w and (sh.experts, sh.experts_per_token) == (E, 8)
    assert sum(sh.dense16) == sh.expert_params + L * E * H  # + the routers
    assert sh.active_params == sh.total_params - sh.expert_params * (E - 8) // E == 3_353_032_704
    assert len(sh.linears) == 4 * L and sh.intermediate == 8 * w
    r = recipe.from_dict({"model": {"name": "Qwen/Qwen3-30B-A3B"}, "data": {"train": "d.jsonl"},
                          "output": {"dir": "o"}})
    p = plan.plan(r, "a100-80", search=False)
    dense = next(t for t in p.static if t.name == "weights left 16-bit (not nn.Linear)")
    assert dense.bytes == sum(vram.block_bytes(x * 2) for x in sh.dense16) and "MoE experts" in dense.note
    assert any("3,353,032,704 active per token" in n for n in p.notes)
    assert p.fits and not plan.plan(r, "rtx4090", search=False).fits


def test_tied_embeddings_counted_once():
    sh = shapes.shapes(shapes.find_config("meta-llama/Llama-3.2-1B")[0])
    assert sh.tied and sh.lm_head_params == 0


def test_lora_on_experts_is_what_peft_puts_there():
    """Qwen3-MoE's experts and routers take LoRA through PEFT's target_parameters: the plan counts
    what PEFT itself creates (at r=2 on the meta device here), linear in r; gpt-oss's take none."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fastft.models import named

    cfg = shapes.find_config("Qwen/Qwen3-30B-A3B")[0]
    unit = shapes.parameter_lora(cfg, "all-linear")
    with torch.device("meta"):
        peft = get_peft_model(AutoModelForCausalLM.from_config(named.synthetic_config("qwen3-30b-a3b")),
                              LoraConfig(r=2, target_modules="all-linear"))
    linear = sum(2 * (i + o) for _, i, o in shapes.shapes(cfg).linears)
    assert 2 * sum(unit) + linear == sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
    assert sum(unit) * 16 == 983_138_304
    assert shapes.parameter_lora(shapes.find_config("openai/gpt-oss-20b")[0], "all-linear") == ()
    assert shapes.parameter_lora(shapes.find_config("Qwen/Qwen3-8B")[0], "all-linear") == ()  # dense: no PEFT call
    r = recipe.load(ROOT / "recipes" / "qwen3-30b-a3b-qlora-chat-a100-80.yaml")
    p = plan.plan(r, "a100-80", search=False)
    assert p.lora_params == 16 * sum(unit) + 16 * linear // 2


def test_sliding_window_layers_and_their_masks():
    """Gemma 3 has full and sliding-window layers: one 4-D mask per kind on hf; Llama and Qwen3 one."""
    gemma = shapes.shapes(shapes.find_config("google/gemma-3-12b-it")[0])
    assert (gemma.mask_kinds, gemma.sliding_window) == (2, 1024)
    for name in ("meta-llama/Meta-Llama-3-8B", "Qwen/Qwen3-8B", "mistralai/Mistral-7B-v0.3"):
        sh = shapes.shapes(shapes.find_config(name)[0])
        assert (sh.mask_kinds, sh.sliding_window) == (1, 0), name
    assert shapes.shapes(shapes.find_config("openai/gpt-oss-20b")[0]).mask_kinds == 2
    r = recipe.from_dict({"model": {"name": "google/gemma-3-12b-it", "max_seq_length": 1024}, "backend": "hf",
                          "data": {"train": "d.jsonl"}, "output": {"dir": "o"}, "train": {"batch_size": 2}})
    p = plan.plan(r, "rtx4090")
    mask = next(t for t in p.train if t.name == "attention mask")
    assert mask.bytes == 2 * vram.block_bytes(2 * 1024 * 1024) and "sliding window (1024 tokens)" in mask.note
    assert any("sliding-window layers (1024 tokens)" in n for n in p.notes)
    assert any("vision tower" in n for n in p.notes)  # an image-text checkpoint's text decoder


# --- every term by hand, for the tiny config given as a local checkpoint folder --------------------

@pytest.fixture
def tiny_dir(tmp_path):
    d = tmp_path / "my-llama"
    d.mkdir()
    shutil.copy(TINY_CONFIG, d / "config.json")
    return d


def _tiny(tiny_dir, **sections):
    raw = {"model": {"name": str(tiny_dir), "max_seq_length": 256}, "lora": {"r": 8},
           "data": {"train": "d.jsonl", "eval_fraction": 0.1}, "output": {"dir": "o"},
           "train": {"batch_size": 2, "optim": "adamw_8bit", "gradient_checkpointing": "unsloth"}}
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return recipe.from_dict(raw)


def _terms(p):
    return {t.name: t.bytes for t in p.static + p.train + p.eval}


def test_every_term_by_hand_unsloth_bf16(tiny_dir):
    """H=256, I=768, L=4, 4 heads of 64, 2 kv heads, V=320, untied; r=8, bf16 (s=a=2), 2 x 256 tokens."""
    p = plan.plan(_tiny(tiny_dir), "rtx4090", search=False)
    t = _terms(p)
    assert p.config_source.endswith("config.json") and p.backend == "unsloth" and p.dtype == "bfloat16"
    # NF4, blocksize 64, double quant; each tensor rounded up to 512 B:
    #   q, o: 65536 el -> 32768 packed + 1024 absmax + 512 (16 B absmax2) + 512 (code) + 512 (offset)
    #   k, v: 32768 el -> 16384 + 512 + 512 + 512 + 512;  gate, up, down: 196608 el -> 98304 + 3072 + 3 x 512
    q, k, g = 32768 + 1024 + 1536, 16384 + 512 + 1536, 98304 + 3072 + 1536
    assert t["base weights, 4-bit NF4"] == 4 * (2 * q + 2 * k + 3 * g) == 1_665_024
    # bf16 embeddings + LM head (320 x 256 x 2 B each) + 9 norms of 256 x 2 B, each a 512 B block
    assert t["embeddings, LM head, norms"] == 2 * 163_840 + 9 * 512
    # LoRA A (8 x in) and B (8 x out) in bf16, per layer: q 2048+2048, k 2048+1024, v the same,
    # o 2048+2048, gate 2048+6144, up the same, down 6144+2048 elements
    lora_elems = [2048, 2048, 2048, 1024, 2048, 1024, 2048, 2048, 2048, 6144, 2048, 6144, 6144, 2048]
    assert p.lora_params == 4 * sum(lora_elems) == 155_648
    assert t["LoRA parameters"] == t["LoRA gradients"] == 4 * 2 * sum(lora_elems) == 311_296
    # 8-bit AdamW: >= 4096 elements -> 2 x 6144 B + 2 x 512 (fp32 absmax of 24 blocks); else 2 fp32 states
    #   three 6144-element tensors in 8 bits, nine 2048- and two 1024-element tensors in fp32, per layer
    assert t["optimizer states (adamw_8bit)"] == 4 * (3 * (2 * 6144 + 2 * 512) + 9 * 2 * 4 * 2048
                                                      + 2 * 2 * 4 * 1024) == 815_104
    assert t["dequantization buffer"] == 2 * 196_608
    # activations, N = 512 tokens; Unsloth's per-layer A = 4sH + 2sHq + 2sHkv + 2sI + 4nh + 8
    A = 4 * 2 * 256 + 2 * 2 * 256 + 2 * 2 * 128 + 2 * 2 * 768 + 4 * 4 + 8
    assert A == 6680
    fixed = 2 * 4 * 64 * 256 + (2 * 256 + 4) * 512  # RoPE cos/sin + the final norm's bf16 input and 1/rms
    assert t["saved activations, offloaded ckpt"] == 2 * 2 * 256 * 512 + fixed
    assert t["one layer's backward"] == A * 512 + 2 * (2 * 768 + 256) * 512
    # fused CE: 16 B a logit, 320 x 512 logits fit one chunk; + bf16 grad of the hidden states
    assert t["logits and loss"] == 16 * 320 * 512 + 2 * 256 * 512
    # eval: batch max(2, 8) = 8 rows of 256, no grad
    assert t["eval forward, no grad"] == 2 * (2 * 256 + 3 * 768) * 8 * 256
    assert t["eval logits"] == 16 * 320 * 8 * 256
    train = t["saved activations, offloaded ckpt"] + max(t["one layer's backward"], t["logits and loss"])
    evaluation = t["eval forward, no grad"] + t["eval logits"]
    assert p.train_bytes == train and p.eval_bytes == evaluation
    assert p.slack.bytes == pytest.approx(0.08 * max(train, evaluation))
    static = 1_665_024 + 2 * 163_840 + 9 * 512 + 2 * 311_296 + 815_104 + 2 * 196_608
    assert p.total_bytes == pytest.approx(static + max(train, evaluation) + 0.08 * max(train, evaluation))
    assert p.budget_bytes == 24 * GiB - GiB // 2 and p.fits


def test_every_term_by_hand_hf_fp32(tiny_dir):
    """The hf backend in fp32 (s=a=4), checkpointing, torch AdamW, no held-out data."""
    r = _tiny(tiny_dir, backend="hf", model={"dtype": "float32"}, data={"eval_fraction": 0.0},
              train={"optim": "adamw_torch", "gradient_checkpointing": True})
    p = plan.plan(r, "a100-40", search=False)
    t = _terms(p)
    assert t["embeddings, LM head, norms"] == 2 * 327_680 + 9 * 1024  # PEFT's fp32 upcast
    lora_elems = [2048, 2048, 2048, 1024, 2048, 1024, 2048, 2048, 2048, 6144, 2048, 6144, 6144, 2048]
    assert t["LoRA parameters"] == 4 * 4 * sum(lora_elems)
    assert t["optimizer states (adamw_torch)"] == 4 * sum(2 * 4 * n for n in lora_elems)
    # the hf per-layer A, fp32: 2*4H + 2aH + aHq + a(Hq + 2Hkv) + 4nh + 4aI + 7ar + 8
    A = 2 * 4 * 256 + 2 * 4 * 256 + 4 * 256 + 4 * (256 + 2 * 128) + 4 * 4 + 4 * 4 * 768 + 7 * 4 * 8 + 8
    assert A == 19_704
    assert t["saved activations, checkpointing"] == 4 * 4 * 256 * 512 + 2 * 4 * 64 * 256  # layer inputs + RoPE
    assert t["one layer's backward"] == A * 512 + 4 * (2 * 768 + 256) * 512
    # TRL 1.16's chunked head: one 512 x 32768 fp32 tile + gathered hidden + fp32 grad + 32 B/token
    assert t["logits and loss"] == 512 * 32768 * 4 + 4 * 256 * 512 + 32 * 512 + 4 * 256 * 512
    assert t["attention mask"] == 2 * 256 * 256
    assert p.eval == [] and p.total_bytes == pytest.approx(
        p.static_bytes + 1.08 * (t["saved activations, checkpointing"] + t["logits and loss"] + t["attention mask"]))


def test_paged_optimizer_states_are_shown_but_not_counted(tiny_dir):
    p = plan.plan(_tiny(tiny_dir, train={"optim": "paged_adamw_8bit"}), "rtx4090", search=False)
    opt = next(t for t in p.static if t.name.startswith("optimizer"))
    assert not opt.counted and opt.bytes > 0 and p.static_bytes == sum(t.bytes for t in p.static if t.counted)


def test_more_rank_sequence_or_batch_plans_more(tiny_dir):
    no_eval = {"eval_fraction": 0.0}  # else the held-out pass (batch 8) can be the peak
    base = plan.plan(_tiny(tiny_dir, data=no_eval), "rtx4090", search=False).total_bytes
    for sec in ({"lora": {"r": 64}}, {"model": {"max_seq_length": 512}}, {"train": {"batch_size": 4}}):
        assert plan.plan(_tiny(tiny_dir, data=no_eval, **sec), "rtx4090", search=False).total_bytes > base


# --- the activation terms against peaks measured on CPU ----------------------------------------------
# What is measured: (1) the bytes autograd saves for backward (saved_tensors_hooks, each storage once),
# and (2) the peak of live tensor bytes from the CPU allocator's own alloc/free events
# (torch.profiler with profile_memory), over a real forward + backward of the 4-bit tiny model
# through fastft's hf backend (bitsandbytes NF4 + PEFT LoRA r=8, fp32 on CPU, 2 x 128 tokens).
# Tolerances: the saved bytes must be exact (the formula lists every tensor a layer saves); the
# decoder's peak within 5% (with checkpointing this run holds one layer input fewer than the plan's
# L: +3.2% here; without, +1.2%); the whole micro-batch with TRL's chunked LM head within 8%, because
# on CPU TRL folds each logits tile with torch ops, ~6 tile-sized fp32 temporaries that its Triton
# kernel does not make on a GPU and the planner does not count (the plan is 3.6-6.2% under here).

def _profiled_peak(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.fixture(scope="module")
def tiny_qlora(fastft_cache):
    """The tiny model through fastft's hf backend, with and without gradient checkpointing."""
    from fastft.models import backends
    from trl.trainer.utils import add_fused_lm_head

    def recipe_for(gc: bool):
        return recipe.from_dict({"model": {"name": "fastft-tiny", "max_seq_length": 128, "dtype": "float32"},
                                 "lora": {"r": 8, "alpha": 16}, "backend": "hf",
                                 "data": {"train": "d.jsonl", "eval_fraction": 0.0}, "output": {"dir": "o"},
                                 "train": {"batch_size": 2, "gradient_checkpointing": gc}})

    models = {}

    def use(gc: bool):
        if gc not in models:  # loaded as fastft loads it: PEFT sets checkpointing up for k-bit models
            model, _, _ = backends.load(recipe_for(gc))
            add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer
            model.train()
            models[gc] = model
        return recipe_for(gc), models[gc]

    return use


def _batch():
    import torch

    return torch.randint(4, 320, (2, 128), generator=torch.Generator().manual_seed(0))


def test_layer_activations_measured_exactly_on_cpu(tiny_qlora):
    """Bytes autograd saves for backward: one more decoder layer adds exactly A bytes per token."""
    import torch

    r, model = tiny_qlora(False)
    backbone = model.get_base_model().model
    x = _batch()
    p = plan.plan(r, "rtx4090", search=False)

    def saved_bytes(n_layers):
        store, params = {}, {q.untyped_storage().data_ptr() for q in model.parameters()}
        params |= {b.untyped_storage().data_ptr() for b in model.buffers()}

        def pack(tensor):
            s = tensor.untyped_storage()
            if s.data_ptr() not in params:
                store[s.data_ptr()] = s.nbytes()
            return tensor

        old = backbone.config.num_hidden_layers
        backbone.config.num_hidden_layers = n_layers  # the decoder runs layers[:num_hidden_layers]
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                backbone(input_ids=x, attention_mask=torch.ones_like(x))
        finally:
            backbone.config.num_hidden_layers = old
        return sum(store.values())

    four, three = saved_bytes(4), saved_bytes(3)
    A = vram.layer_activation_bytes(p.shapes, "hf", 4, 4, 8, False)
    assert four - three == A * 256 == 19_704 * 256
    print(f"saved for backward: measured {four:,}, planned {p.train[0].bytes:,.0f}")
    assert p.train[0].bytes == four  # 4 layers + RoPE tables, nothing else


@pytest.mark.parametrize("gc", [False, True], ids=["no-checkpointing", "checkpointing"])
def test_peaks_match_measured_on_cpu(tiny_qlora, gc):
    """Peak live bytes of a forward + backward: the decoder alone, then the whole micro-batch."""
    import torch

    r, model = tiny_qlora(gc)
    backbone = model.get_base_model().model
    x, mask = _batch(), torch.ones(2, 128, dtype=torch.long)
    p = plan.plan(r, "rtx4090", search=False)

    def decoder():
        backbone(input_ids=x, attention_mask=mask).last_hidden_state.sum().backward()

    def micro_batch():
        model(input_ids=x, attention_mask=mask, labels=x, fused_lm_head=True).loss.backward()

    decoder()  # warm-up: lazy initializations stay out of the measurement
    peak = _profiled_peak(decoder)
    planned = p.train[0].bytes + p.train[1].bytes
    print(f"decoder peak: measured {peak:,}, planned {planned:,.0f} ({planned / peak - 1:+.1%})")
    assert abs(planned - peak) / peak < 0.05
    micro_batch()
    peak = _profiled_peak(micro_batch)
    print(f"micro-batch peak: measured {peak:,}, planned {p.train_bytes:,.0f} ({p.train_bytes / peak - 1:+.1%})")
    assert abs(p.train_bytes - peak) / peak < 0.08


# --- every shipped recipe plans; the headers' planned peaks are the planner's ----------------------

# the recipes for full-size models (a GPU to run them) and their models' exact parameter counts
GPU_RECIPE_PARAMS = {"llama3-70b-": 70_553_706_496, "llama3-": 8_030_261_248, "qwen3-8b-": 8_190_735_360,
                     "qwen3-30b-a3b-": 30_532_122_624, "mistral-7b-v0.3-": 7_248_023_552,
                     "gemma3-12b-": 11_766_034_176}
GPU_RECIPES = ("llama3-", "qwen3-", "mistral-", "gemma3-12b-")


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_plans(path):
    text = path.read_text()
    m = re.search(r"fastft plan\s+\S+(?:\s+--gpus\s+(\d+)\s+--strategy\s+(\S+))?\s+--target\s+(\S+)", text)
    gpus, strategy, target = (int(m.group(1) or 1), m.group(2), m.group(3)) if m else (1, None, "rtx4090")
    p = plan.plan(recipe.load(path), target, gpus=gpus, strategy=strategy)
    assert p.fits, plan.format_plan(p)
    stated = re.search(r"Peak VRAM(?: per rank)?, planned by `fastft plan (?:--gpus \d+ --strategy \S+ )?--target "
                       r"(\S+)` \(not measured yet\): ([0-9.]+) GiB", text)
    if path.name.startswith(GPU_RECIPES):
        assert stated, f"{path.name}: the header must state its planned peak"
        assert stated.group(1) == target and float(stated.group(2)) == round(p.total_bytes / GiB, 2), (
            f"{path.name}: header says {stated.group(2)} GiB, the planner says {p.total_bytes / GiB:.2f}")
        assert p.shapes.total_params == next(n for k, n in GPU_RECIPE_PARAMS.items() if path.name.startswith(k))


def test_long_context_recipe_is_near_the_longest_that_fits():
    p = plan.plan(recipe.load(ROOT / "recipes" / "llama3-8b-long-context-rtx4090.yaml"), "rtx4090")
    assert p.max_seq_length <= p.max_seq_length_fit and p.total_bytes <= 0.9 * p.budget_bytes
    bigger = recipe.load(ROOT / "recipes" / "llama3-8b-long-context-rtx4090.yaml",
                         [f"model.max_seq_length={p.max_seq_length + 8192}"])
    assert plan.plan(bigger, "rtx4090", search=False).total_bytes > 0.9 * p.budget_bytes


# --- the command line and its errors ---------------------------------------------------------------

RTX = str(ROOT / "recipes" / "llama3-8b-qlora-alpaca-rtx4090.yaml")


def test_cli_plan_fits(capsys):
    assert cli.main(["plan", RTX, "--target", "rtx4090"]) == 0
    out = capsys.readouterr().out
    for word in ("base weights, 4-bit NF4", "LoRA parameters", "optimizer states", "saved activations",
                 "logits and loss", "TOTAL", "FITS on rtx4090", "largest max_seq_length", "largest batch_size"):
        assert word in out, word


def test_cli_plan_does_not_fit_exits_1(capsys):
    rc = cli.main(["plan", RTX, "--set", "train.batch_size=64", "--set", "model.max_seq_length=8192",
                   "--set", "train.gradient_checkpointing=false", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 1 and doc["fits"] is False and doc["total_bytes"] > doc["budget_bytes"]


def test_unknown_model_says_how_to_fix(tmp_path, capsys):
    rc = cli.main(["plan", RTX, "--set", "model.name=acme/secret-model-7b"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.name: no config for 'acme/secret-model-7b'" in err and "local folder" in err


def test_bad_target_modules_and_target(tiny_dir):
    with pytest.raises(plan.PlanError, match="lora.target_modules: qkv_proj not in this model; valid: down_proj"):
        plan.plan(_tiny(tiny_dir, lora={"target_modules": ["q_proj", "qkv_proj"]}), "rtx4090")
    with pytest.raises(plan.PlanError, match="--target: unknown GPU target 'cpu'"):
        plan.plan(_tiny(tiny_dir), "cpu")


def test_local_path_relative_to_the_recipe(tmp_path):
    (tmp_path / "models" / "mine").mkdir(parents=True)
    shutil.copy(TINY_CONFIG, tmp_path / "models" / "mine" / "config.json")
    path = tmp_path / "r.yaml"
    path.write_text("model: {name: models/mine}\ndata: {train: d.jsonl}\noutput: {dir: o}\n")
    p = plan.plan(recipe.load(path), "rtx4090", search=False)
    assert p.shapes.hidden == 256 and Path(p.config_source) == tmp_path / "models" / "mine" / "config.json"


def test_readme_lists_every_gpu_recipe_with_its_planned_peak():
    readme = (ROOT / "README.md").read_text()
    for path in RECIPES:
        if not path.name.startswith(GPU_RECIPES):
            continue
        stated = re.search(r"\(not measured yet\): ([0-9.]+) GiB", path.read_text()).group(1)
        row = next((line for line in readme.splitlines() if line.startswith(f"| `recipes/{path.name}`")), None)
        assert row and f"planned {stated} GiB" in row, f"README's recipe table: {path.name} (planned {stated} GiB)"


@pytest.mark.parametrize("eval_batch_size, expected", [(None, 8), (1, 1)])
def test_eval_batch_size_reaches_the_trainer(tmp_path, eval_batch_size, expected):
    """train.eval_batch_size (the long-context recipe sets 1) is what the trainer evaluates with."""
    from types import SimpleNamespace

    from fastft import trainer
    from fastft.world import World

    r = recipe.from_dict({"model": {"name": "fastft-tiny"}, "data": {"train": "d.jsonl"}, "output": {"dir": "o"},
                          "train": {"batch_size": 2, "eval_every": 5, "eval_batch_size": eval_batch_size}})
    info = SimpleNamespace(device="cpu", dtype="float32")
    config = trainer.sft_config(r, tmp_path, info, "adamw_torch", True, World(), (2, 4))
    assert config.per_device_eval_batch_size == expected
    assert plan.plan(r, "rtx4090", search=False).eval[0].note.startswith(f"batch {expected} x")


# --- several GPUs: fastft plan --gpus N --strategy fsdp -------------------------------------------

FSDP_70B = ROOT / "recipes" / "llama3-70b-qlora-fsdp-2x4090.yaml"


def test_fsdp_plan_shards_by_hand():
    """One rank's terms for Llama-3-70B over 2 and 4 GPUs against the single-GPU plan: sharded terms
    are 1/N, the NF4 quantization state stays whole, two gathered decoder layers and the LM head are
    added (bf16), the activation terms are those of the per-device batch."""
    H, I, kv, V, L = 8192, 28672, 1024, 128256, 80
    r = recipe.load(FSDP_70B, ["distributed.cpu_offload=false"])
    one = plan.plan(r, "rtx4090", search=False)
    assert one.shapes.total_params == 70_553_706_496 and not one.fits
    terms1 = {t.name: t for t in one.static}
    for n in (2, 4):
        p = plan.plan(r, "rtx4090", search=False, gpus=n, strategy="fsdp")
        assert (p.gpus, p.strategy, p.backend, p.batch_size) == (n, "fsdp", "hf", 1)
        t = {x.name: x for x in p.static}
        packed = t[f"base weights, 4-bit NF4, 1/{n}"].bytes * n
        assert packed == pytest.approx(L * (2 * H * H + 2 * H * kv + 3 * H * I) / 2, rel=1e-6)
        assert packed + t["NF4 quantization state, whole"].bytes == terms1["base weights, 4-bit NF4"].bytes
        for name in ("embeddings, LM head, norms", "LoRA parameters", "LoRA gradients",
                     "optimizer states (adamw_torch)"):
            assert t[f"{name}, 1/{n}"].bytes == terms1[name].bytes / n
        layer = (2 * H * H + 2 * H * kv + 3 * H * I) / 2 + 2 * H * 2 + 16 * (2 * (H + H) + 2 * (H + kv) + 3 * (H + I)) * 2
        assert t["gathered decoder layers (2)"].bytes == pytest.approx(2 * layer, rel=1e-3)
        assert t["gathered LM head"].bytes == V * H * 2
        assert [x.bytes for x in p.train] == [x.bytes for x in one.train]  # batch 1 either way
    two = plan.plan(r, "rtx4090", search=False, gpus=2, strategy="fsdp")
    four = plan.plan(r, "rtx4090", search=False, gpus=4, strategy="fsdp")
    assert one.total_bytes > two.total_bytes > four.total_bytes


def test_llama3_70b_at_2048_on_2_and_4_rtx4090():
    """The 70B-on-consumer-cards case: Llama-3-70B QLoRA, seq 2048, RTX 4090s. Two fit only with the shards
    and the optimizer step offloaded to host RAM (the recipe's setting); four fit without."""
    fits = {}
    for n, offload in ((2, False), (2, True), (4, False)):
        r = recipe.load(FSDP_70B, [f"distributed.cpu_offload={str(offload).lower()}"])
        p = plan.plan(r, "rtx4090", search=False, gpus=n, strategy="fsdp")
        assert p.max_seq_length == 2048
        fits[(n, offload)] = p.fits
    assert fits == {(2, False): False, (2, True): True, (4, False): True}


def test_ddp_plan_is_the_single_gpu_plan_at_the_per_device_batch():
    r = recipe.load(RTX)  # batch 4 x grad accum 2: two GPUs take the accumulation
    p1 = plan.plan(r, "rtx4090", search=False)
    p2 = plan.plan(r, "rtx4090", search=False, gpus=2, strategy="ddp")
    assert p2.batch_size == 4 and p2.strategy == "ddp" and p2.backend == "hf"
    p8 = plan.plan(r, "rtx4090", search=False, gpus=8)  # the recipe's strategy: auto -> ddp
    assert p8.batch_size == 1 and p8.strategy == "ddp" and p8.train_bytes < p1.train_bytes
    with pytest.raises(plan.PlanError, match=r"cannot be split evenly over 3 GPUs; make it a multiple of 3"):
        plan.plan(r, "rtx4090", search=False, gpus=3)


def test_cli_plan_fsdp(capsys):
    assert cli.main(["plan", str(FSDP_70B), "--gpus", "2", "--strategy", "fsdp", "--target", "rtx4090"]) == 0
    out = capsys.readouterr().out
    for word in ("per rank, 2 GPUs, fsdp", "base weights, 4-bit NF4, 1/2", "NF4 quantization state, whole",
                 "gathered decoder layers (2)", "gathered LM head", "host RAM (cpu_offload)", "FITS on rtx4090"):
        assert word in out, word
    rc = cli.main(["plan", str(FSDP_70B), "--gpus", "2", "--strategy", "fsdp", "--json",
                   "--set", "distributed.cpu_offload=false"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 1 and doc["gpus"] == 2 and doc["strategy"] == "fsdp" and not doc["fits"]
