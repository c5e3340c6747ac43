"""fastft.patch.apply: which LoRA layers get the fused kernel, what is reported, and the modes."""
import importlib.util
import types

import pytest
import torch

from support import assert_close, tiny_recipe_dict
from fastft import patch


def _peft_model(use_dora=False, **config):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("emb", torch.nn.Embedding(50, 48))
    model.add_module("fc1", torch.nn.Linear(48, 40))
    model.add_module("fc2", torch.nn.Linear(40, 56, bias=False))
    model.add_module("fc3", torch.nn.Linear(56, 30))
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["emb", "fc1", "fc2", "fc3"], use_dora=use_dora, **config)
    model = get_peft_model(model, cfg)
    with torch.no_grad():  # non-zero B, so the LoRA term shows in outputs and dA
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, 0.1)
    return model.train()


def _loss_and_grads(model, ids):
    model.zero_grad()
    out = model(ids)
    loss = (out * torch.linspace(-1, 1, out.shape[-1])).sum()
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_apply_patches_the_supported_layers_and_reports_the_rest():
    model = _peft_model(rank_pattern={"fc3": 160})  # r above the kernel's limit
    ids = torch.randint(0, 50, (3, 7))
    want, want_grads = _loss_and_grads(model, ids)
    report = patch.apply(model, "fastft")
    assert report.path == "fastft"
    assert sorted(report.patched) == ["base_model.model.fc1", "base_model.model.fc2"]
    assert report.skipped == {"base_model.model.emb": "base layer Embedding is not nn.Linear or NF4 Linear4bit",
                              "base_model.model.fc3": "r=160 > 128"}
    text = report.summary()
    assert "fastft fused LoRA on 2 of 4 LoRA layers" in text
    assert "PEFT's forward kept for 1 (base layer Embedding" in text and "1 (r=160 > 128)" in text
    assert report.to_dict()["patched"] == 2
    got, got_grads = _loss_and_grads(model, ids)
    assert_close(got, want, atol=1e-5, rtol=1e-5, what="output")
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name], atol=1e-4, rtol=1e-4, what=name)


def test_dora_layers_keep_pefts_forward():
    model = _peft_model(use_dora=True)
    report = patch.apply(model, "fastft")
    assert report.patched == []
    linear = {k: v for k, v in report.skipped.items() if "fc" in k}
    assert set(linear.values()) == {"DoRA / LoRA variant"} and len(linear) == 3


def test_runtime_states_only_peft_handles_fall_back_to_it():
    model = _peft_model()
    ids = torch.randint(0, 50, (2, 5))
    fc1 = model.base_model.model.fc1
    with torch.no_grad():
        with model.disable_adapter():
            bare = model(ids)
        patch.apply(model, "fastft")
        assert "forward" in fc1.__dict__
        with model.disable_adapter():  # adapters disabled: the base layer alone, as PEFT does
            assert_close(model(ids), bare, atol=0, rtol=0, what="disabled adapters")
        fused = model(ids)
        fc1.merge()  # merged: PEFT's forward runs the merged base layer
        assert_close(model(ids), fused, atol=1e-5, rtol=1e-5, what="merged")
        fc1.unmerge()


def test_modes_auto_unsloth_none_and_errors():
    model = _peft_model()
    fc1 = model.base_model.model.fc1
    patch.apply(model, "fastft")
    assert "forward" in fc1.__dict__
    none = patch.apply(model, "none")
    assert none.path == "peft" and "forward" not in fc1.__dict__
    assert none.summary() == "kernels none: peft LoRA path (requested)"
    uns = patch.apply(model, "unsloth")
    assert uns.path == "peft" and "no Unsloth fused LoRA paths" in uns.reason
    auto = patch.apply(model, "auto")
    if torch.cuda.is_available():
        assert auto.path == "fastft" and len(auto.patched) == 3
    else:  # the Triton kernels need a GPU; auto keeps the backend's own path on CPU
        assert auto.path == "peft" and "no CUDA device" in auto.summary() and "forward" not in fc1.__dict__
    lines = []
    patch.apply(model, "none", log_fn=lines.append)
    assert lines == ["kernels none: peft LoRA path (requested)"]
    with pytest.raises(ValueError, match="kernels: 'fast' is not one of auto, fastft, unsloth, none"):
        patch.apply(model, "fast")


def test_kernel_location_is_reported():
    report = patch.apply(_peft_model(), "fastft")
    from fastft.kernels import lora

    if torch.cuda.is_available():
        assert "Triton kernels on CUDA" in report.summary()
    elif lora.interpreted():
        assert "CPU interpreter" in report.summary()
    else:
        assert "pure-torch reference" in report.summary()


@pytest.mark.unsloth
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("unsloth") is None,
                    reason="unsloth not installed here; `make test` runs these in .venv-unsloth")
def test_unsloth_fused_paths_are_routed_through_fastft_layers(tmp_path):
    """Unsloth's CPU backend installs no fused LoRA paths (measured: LlamaAttention keeps HF's forward,
    no apply_qkv / apply_o, the MLP keeps its class forward; Unsloth also declines them for fp32 bases),
    so on CPU they are installed here exactly as Unsloth's patch_peft_model does on a GPU, and
    apply(model, "fastft") must route all of them back through the (fused) projection layers."""
    from unsloth.kernels import fast_lora

    from fastft import backends, recipe

    r = recipe.from_dict(tiny_recipe_dict(tmp_path, backend="unsloth"))
    model, _, info = backends.load(r)
    assert info.name == "unsloth"
    layers = model.base_model.model.model.layers
    assert all(getattr(l.self_attn, "apply_qkv", None) is None for l in layers)  # the CPU backend's state
    assert patch.apply(model, "unsloth").path == "peft"

    x = torch.randn(2, 5, layers[0].mlp.gate_proj.in_features)
    with torch.no_grad():
        mlp_want = layers[0].mlp(x)
        qkv_want = [p(x) for p in (layers[0].self_attn.q_proj, layers[0].self_attn.k_proj, layers[0].self_attn.v_proj)]
    for layer in layers:  # what Unsloth's patch_peft_model installs on a GPU
        layer.self_attn.apply_qkv = fast_lora.apply_lora_qkv
        layer.self_attn.apply_o = fast_lora.apply_lora_o
        layer.mlp.forward = types.MethodType(fast_lora.apply_lora_mlp_swiglu, layer.mlp)
    kept = patch.apply(model, "unsloth")
    assert kept.path == "unsloth" and kept.unsloth_paths == 3 * len(layers)

    report = patch.apply(model, "fastft")
    assert report.unsloth_paths_restored == 3 * len(layers)
    assert len(report.patched) == 7 * len(layers) and not report.skipped
    assert f"{3 * len(layers)} Unsloth fused paths routed through them" in report.summary()
    attn, mlp = layers[0].self_attn, layers[0].mlp
    assert "forward" not in mlp.__dict__ and "forward" in attn.q_proj.__dict__
    with torch.no_grad():
        assert_close(mlp(x), mlp_want, atol=1e-5, rtol=1e-5, what="MLP through fused projections")
        for got, want in zip(attn.apply_qkv(attn, x), qkv_want):
            assert_close(got, want, atol=1e-5, rtol=1e-5, what="QKV through fused projections")
        assert_close(attn.apply_o(attn, x[..., : attn.o_proj.in_features]),
                     attn.o_proj(x[..., : attn.o_proj.in_features]), atol=0, rtol=0, what="O")

    for layer in layers:  # and "none" puts Unsloth's paths back to PEFT's per-projection forwards
        layer.mlp.forward = types.MethodType(fast_lora.apply_lora_mlp_swiglu, layer.mlp)
    none = patch.apply(model, "none")
    assert none.path == "peft" and "Unsloth fused paths put back" in none.reason
    assert "forward" not in mlp.__dict__ and "forward" not in attn.q_proj.__dict__


@pytest.mark.unsloth
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("unsloth") is None,
                    reason="unsloth not installed here; `make test` runs these in .venv-unsloth")
def test_unsloth_backend_trains_the_same_with_fastft_kernels(tmp_path):
    """Two QLoRA steps through Unsloth's backend (its CPU backend here) with fastft's fused layers and
    with stock PEFT layers: the same losses (fp32; summation order only)."""
    from fastft import recipe, train

    losses, logs = {}, {}
    for mode in ("fastft", "none"):
        r = recipe.from_dict(tiny_recipe_dict(tmp_path / mode, backend="unsloth", kernels=mode,
                                              train={"batch_size": 2, "max_steps": 2, "logging_every": 1},
                                              data={"max_examples": 24, "eval_fraction": 0.0}))
        torch.manual_seed(0)  # lora_A's initial values come from the global RNG
        logs[mode] = []
        losses[mode] = train.run(r, log=logs[mode].append).info["metrics"]["losses"]
    assert any("fastft fused LoRA on 28 of 28 LoRA layers" in m for m in logs["fastft"]), logs["fastft"]
    assert len(losses["fastft"]) == 2
    assert_close(torch.tensor(losses["fastft"]), torch.tensor(losses["none"]), atol=0, rtol=1e-5, what="losses")


def test_auto_waits_for_the_gpu_suite_before_choosing_fastft(monkeypatch):
    import torch

    from fastft import backends, patch, recipe
    from support import tiny_recipe_dict

    model, _, _ = backends.load(recipe.from_dict(tiny_recipe_dict("unused")))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    report = patch.apply(model, "auto")
    assert report.path == "peft" and not report.patched
    assert "have not yet passed the GPU suite" in report.reason
    monkeypatch.setattr(patch, "GPU_VERIFIED", True)
    report = patch.apply(model, "auto")
    assert report.path == "fastft" and report.patched
    patch.apply(model, "none")
