"""fastft.models.patch.apply: which LoRA layers get the fused kernel, what is reported, and the modes."""
import importlib.util
import types

import pytest
import torch
from support import assert_close, tiny_recipe_dict

from fastft.models import patch
from fastft.models.compile_regime import compile_regime


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
    assert none.summary() == "kernels none: peft LoRA path (requested); blocks eager"
    uns = patch.apply(model, "unsloth")
    assert uns.path == "peft" and "no Unsloth fused LoRA paths" in uns.reason
    auto = patch.apply(model, "auto")
    if torch.cuda.is_available():
        assert auto.path == "fastft" and len(auto.patched) == 3
    else:  # the Triton kernels need a GPU; auto keeps the backend's own path on CPU
        assert auto.path == "peft" and "no CUDA device" in auto.summary() and "forward" not in fc1.__dict__
    lines = []
    patch.apply(model, "none", log_fn=lines.append)
    assert lines == ["kernels none: peft LoRA path (requested); blocks eager"]
    with pytest.raises(ValueError, match="kernels: 'fast' is not one of auto, fastft, unsloth, none"):
        patch.apply(model, "fast")


class _DecoderLayer(torch.nn.Module):
    def forward(self, x):
        return x


def test_compile_regime_is_reported_with_its_reason(monkeypatch):
    """Every report says whether the decoder blocks run compiled (Unsloth's block compile marks the
    layer class's forward) or eagerly, and why."""
    model, layers = _layers_model(n_layers=2)
    for layer in layers:
        layer.__class__ = _DecoderLayer
    report = patch.apply(model, "fastft")
    assert report.compile_regime == {"regime": "eager", "why": "not an Unsloth model (hf backend): nothing "
                                     "compiles its decoder blocks"}
    assert report.to_dict()["compile_regime"] == report.compile_regime
    assert report.summary().endswith("; blocks eager")

    for layer in layers:  # what Unsloth's loader leaves on each decoder layer
        layer.__dict__["_unsloth_forced_float32"] = False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "only on a CUDA device" in compile_regime(model)["why"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("UNSLOTH_COMPILE_DISABLE", "1")
    assert compile_regime(model) == {"regime": "eager", "why": "Unsloth's block compile switched off by "
                                     "UNSLOTH_COMPILE_DISABLE=1"}
    monkeypatch.delenv("UNSLOTH_COMPILE_DISABLE")
    monkeypatch.setattr(torch, "__version__", "2.10.0+cu128")
    assert "2.10.0 < 2.11" in compile_regime(model)["why"]
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu128")
    assert "uncompiled" in compile_regime(model)["why"]

    def forward(self, x):  # Unsloth's wrap: the class forward replaced and marked
        return x

    forward._unsloth_block_compiled = True
    monkeypatch.setattr(_DecoderLayer, "forward", forward)
    regime = compile_regime(model)
    assert regime == {"regime": "compiled blocks", "why": "Unsloth wrapped the forward of _DecoderLayer in "
                      "torch.compile (torch 2.11.0 with CUDA); every LoRA path in a block runs traced"}


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
def test_unsloth_fused_paths_run_fastft_fused_ops(tmp_path):
    """Unsloth's CPU backend installs no fused LoRA paths (measured: LlamaAttention keeps HF's forward,
    no apply_qkv / apply_o, the MLP keeps its class forward; Unsloth also declines them for fp32 bases),
    so on CPU they are installed here exactly as Unsloth's patch_peft_model does on a GPU, and
    apply(model, "fastft") must put fastft's fused ops in all of them, giving PEFT's results."""
    from unsloth.kernels import fast_lora

    from fastft import recipe
    from fastft.models import backends

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
    n = len(layers)
    assert report.unsloth_fused == {"qkv": n, "o": n, "mlp": n} and report.unsloth_paths_restored == 0
    assert len(report.patched) == 7 * n and not report.skipped
    assert f"Unsloth's fused slots run fastft's fused ops: qkv {n}, o {n}, mlp {n}" in report.summary()
    attn, mlp = layers[0].self_attn, layers[0].mlp
    assert attn.apply_qkv is patch.fastft_apply_qkv and mlp.forward.__func__ is patch.fastft_apply_mlp
    with torch.no_grad():
        assert_close(mlp(x), mlp_want, atol=1e-5, rtol=1e-5, what="MLP through fastft's fused op")
        for got, want in zip(attn.apply_qkv(attn, x), qkv_want):
            assert_close(got, want, atol=1e-5, rtol=1e-5, what="QKV through fastft's fused op")
        assert_close(attn.apply_o(attn, x[..., : attn.o_proj.in_features]),
                     attn.o_proj(x[..., : attn.o_proj.in_features]), atol=0, rtol=0, what="O")
    assert patch.apply(model, "unsloth").unsloth_paths == 3 * n  # Unsloth's functions back
    assert attn.apply_qkv is fast_lora.apply_lora_qkv

    none = patch.apply(model, "none")  # and "none" puts Unsloth's paths back to PEFT's per-projection forwards
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
    from support import tiny_recipe_dict

    from fastft import recipe
    from fastft.models import backends, patch

    model, _, _ = backends.load(recipe.from_dict(tiny_recipe_dict("unused")))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    report = patch.apply(model, "auto")
    assert report.path == "peft" and not report.patched
    assert "have not yet passed the GPU suite" in report.reason
    monkeypatch.setattr(patch, "GPU_VERIFIED", True)
    report = patch.apply(model, "auto")
    assert report.path == "fastft" and report.patched
    patch.apply(model, "none")


# --- fastft's fused ops in Unsloth's fused slots ------------------------------------------------------
# Unsloth's CPU backend installs none of its fused slots, so these tests put functions with Unsloth's
# names and calling conventions (unsloth/kernels/fast_lora.py: apply_lora_qkv(self, X, inplace=True),
# apply_lora_o(self, X), apply_lora_mlp_swiglu(self, X, inplace=True) bound to the MLP) where
# patch_peft_model puts them; their bodies are the per-projection paths.

def apply_lora_qkv(self, X, inplace=True):
    return self.q_proj(X), self.k_proj(X), self.v_proj(X)


def apply_lora_o(self, X):
    return self.o_proj(X)


def apply_lora_mlp_swiglu(self, X, inplace=True):
    return self.down_proj(self.act_fn(self.gate_proj(X)) * self.up_proj(X))


def apply_lora_mlp_geglu_exact(self, X, inplace=True):
    return self.down_proj(torch.nn.functional.gelu(self.gate_proj(X)) * self.up_proj(X))


def _install_unsloth_slots(layers, tiled=(), mlp_fn=apply_lora_mlp_swiglu):
    """What patch_peft_model installs on a GPU; layers in `tiled` have a TiledMLP (its _unsloth_forward)."""
    for i, layer in enumerate(layers):
        layer.self_attn.apply_qkv = apply_lora_qkv
        layer.self_attn.apply_o = apply_lora_o
        attr = "_unsloth_forward" if i in tiled else "forward"
        setattr(layer.mlp, attr, types.MethodType(mlp_fn, layer.mlp))


class _MLP(torch.nn.Module):
    """A Llama-style MLP: the class forward is the per-projection path."""

    def forward(self, x):
        return apply_lora_mlp_swiglu(self, x)


def _layers_model(base="16bit", rank_pattern=None, dropout=0.0, n_layers=2):
    """A PEFT model over `n_layers` modules shaped like Llama layers (self_attn.{q,k,v,o}_proj,
    mlp.{gate,up,down}_proj + act_fn; hidden 24, 2 heads of 12 and 1 key/value head, intermediate 40),
    16-bit or bitsandbytes NF4 bases, LoRA r=8 (k_proj r=4) on all seven projections."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)

    def linear(i, o):
        lin = torch.nn.Linear(i, o, bias=False)
        if base == "16bit":
            return lin
        q = bnb.nn.Linear4bit(i, o, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=True)
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True).to("cpu")  # quantizes (CPU tensors throughout)
        q.support_avx512bf16_for_cpu = False  # as fastft.models.backends sets it: the training layout
        return q

    root = torch.nn.Module()
    root.layers = torch.nn.ModuleList()
    for _ in range(n_layers):
        layer = torch.nn.Module()
        layer.self_attn, layer.mlp = torch.nn.Module(), _MLP()
        for name, (i, o) in {"q_proj": (24, 24), "k_proj": (24, 12), "v_proj": (24, 12), "o_proj": (24, 24)}.items():
            setattr(layer.self_attn, name, linear(i, o))
        for name, (i, o) in {"gate_proj": (24, 40), "up_proj": (24, 40), "down_proj": (40, 24)}.items():
            setattr(layer.mlp, name, linear(i, o))
        layer.mlp.act_fn = torch.nn.SiLU()
        root.layers.append(layer)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, rank_pattern={"k_proj": 4, **(rank_pattern or {})},
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(root, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.train(), model.base_model.model.layers


def _run(module_params, fn, x, dys):
    for p in module_params.parameters():
        p.grad = None
    xi = x.clone().requires_grad_()
    outs = fn(xi)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, dys)
    grads = {n: p.grad.clone() for n, p in module_params.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], xi.grad, grads


def _same(got, want, what, tol=2e-5):
    assert got[2].keys() == want[2].keys() and len(want[2]) == 6, (what, list(got[2]), list(want[2]))
    for g, w in zip(got[0], want[0]):
        assert_close(g, w, atol=tol, rtol=tol, what=f"{what} output")
    assert_close(got[1], want[1], atol=tol, rtol=tol, what=f"{what} dX")
    for name in want[2]:
        assert_close(got[2][name], want[2][name], atol=tol, rtol=tol, what=f"{what} {name}")


@pytest.mark.parametrize("base", ["16bit", "nf4"])
def test_fastft_ops_take_unsloths_fused_slots_and_match_peft(base):
    """fastft mode puts fastft's fused ops in every slot (the MLP's forward and the tiled MLP's
    _unsloth_forward included); their outputs and the gradients of x and of every lora_A / lora_B
    equal PEFT's per-projection layers'; `unsloth` mode gives Unsloth's functions back and `none` the
    per-projection paths."""
    from fastft.kernels import fused, fused_mlp

    model, layers = _layers_model(base)
    attn, mlp, tiled = layers[0].self_attn, layers[0].mlp, layers[1].mlp
    torch.manual_seed(1)
    x = torch.randn(2, 3, 24)
    dqkv = [torch.randn(2, 3, n) for n in (24, 12, 12)]
    dy = torch.randn(2, 3, 24)
    want_qkv = _run(attn, lambda t: (attn.q_proj(t), attn.k_proj(t), attn.v_proj(t)), x, dqkv)
    want_mlp = _run(mlp, mlp, x, [dy])  # no forward of its own: the per-projection path
    want_tiled = _run(tiled, tiled, x, [dy])

    _install_unsloth_slots(layers, tiled=(1,))
    assert patch.apply(model, "unsloth").unsloth_paths == 6
    report = patch.apply(model, "fastft")
    assert report.unsloth_fused == {"qkv": 2, "o": 2, "mlp": 1, "mlp_tiled": 1}
    assert report.unsloth_paths_restored == 0 and not report.skipped and len(report.patched) == 14
    assert "Unsloth's fused slots run fastft's fused ops: qkv 2, o 2, mlp 1, mlp_tiled 1" in report.summary()
    assert attn.apply_qkv is patch.fastft_apply_qkv and attn.apply_o is patch.fastft_apply_o
    assert mlp.forward.__func__ is patch.fastft_apply_mlp and tiled._unsloth_forward.__func__ is patch.fastft_apply_mlp
    assert report.to_dict()["unsloth_fused"]["qkv"] == 2

    calls = []  # the fused ops run, not the per-projection layers behind them
    owner = {"lora_qkv": fused, "lora_mlp_swiglu": fused_mlp}
    real = {name: getattr(owner[name], name) for name in ("lora_qkv", "lora_mlp_swiglu")}
    try:
        for name, fn in real.items():
            setattr(owner[name], name, lambda *a, _fn=fn, _name=name: calls.append(_name) or _fn(*a))
        _same(_run(attn, lambda t: attn.apply_qkv(attn, t), x, dqkv), want_qkv, f"QKV slot {base}")
        _same(_run(mlp, mlp, x, [dy]), want_mlp, f"MLP slot {base}")
        inner = tiled._unsloth_forward.__get__(tiled, type(tiled))  # as unsloth_zoo's TiledMLP calls it
        _same(_run(tiled, inner, x, [dy]), want_tiled, f"tiled MLP slot {base}")
    finally:
        for name, fn in real.items():
            setattr(owner[name], name, fn)
    assert calls == ["lora_qkv", "lora_mlp_swiglu", "lora_mlp_swiglu"]
    with torch.no_grad():
        assert_close(attn.apply_o(attn, x), attn.o_proj(x), atol=0, rtol=0, what="O slot")

    back = patch.apply(model, "unsloth")  # Unsloth's own functions back in their slots
    assert back.path == "unsloth" and back.unsloth_paths == 6
    assert attn.apply_qkv is apply_lora_qkv and mlp.forward.__func__ is apply_lora_mlp_swiglu
    assert tiled._unsloth_forward.__func__ is apply_lora_mlp_swiglu
    patch.apply(model, "fastft")
    none = patch.apply(model, "none")  # from fastft's ops straight to PEFT's per-projection paths
    assert "6 Unsloth fused paths put back" in none.reason
    assert "forward" not in mlp.__dict__ and attn.apply_qkv is patch._per_projection_qkv


def test_slots_on_the_tiny_llama(tmp_path):
    """The real module tree (transformers' Llama through fastft's hf backend, NF4 bases): every slot of
    every layer gets fastft's op (installation only; the numbers are checked above)."""
    from fastft import recipe
    from fastft.models import backends

    model, _, _ = backends.load(recipe.from_dict(tiny_recipe_dict(tmp_path)))
    layers = model.base_model.model.model.layers
    _install_unsloth_slots(layers, tiled=(3,))
    report = patch.apply(model, "fastft")
    assert report.unsloth_fused == {"qkv": 4, "o": 4, "mlp": 3, "mlp_tiled": 1} and len(report.patched) == 28
    assert all(layer.self_attn.apply_qkv is patch.fastft_apply_qkv for layer in layers)
    assert patch.apply(model, "unsloth").unsloth_paths == 12


def test_slots_fastft_does_not_cover_go_back_to_per_projection_calls():
    model, layers = _layers_model(rank_pattern={"k_proj": 160}, n_layers=1)
    _install_unsloth_slots(layers, mlp_fn=apply_lora_mlp_geglu_exact)
    report = patch.apply(model, "fastft")
    assert report.unsloth_fused == {"o": 1}
    assert report.unsloth_paths_restored == 2
    assert report.unsloth_restored_why == {"k_proj: r=160 > 128": 1,
                                           "apply_lora_mlp_geglu_exact: fastft fuses the SwiGLU MLP only": 1}
    assert "2 Unsloth fused paths routed through the per-projection layers (1: k_proj: r=160 > 128" in report.summary()
    assert layers[0].self_attn.apply_qkv is patch._per_projection_qkv and "forward" not in layers[0].mlp.__dict__
    patch.apply(model, "none")


def test_slots_fall_back_at_run_time_for_dropout_in_training(caplog):
    """lora_dropout > 0 in training: the slot runs the per-projection layers (said once), so PEFT's
    dropout draws are the same as without fastft; in eval the fused op runs."""
    model, layers = _layers_model(dropout=0.25, n_layers=1)
    attn, mlp = layers[0].self_attn, layers[0].mlp
    x = torch.randn(3, 24)
    torch.manual_seed(7)
    want = apply_lora_qkv(attn, x)
    _install_unsloth_slots(layers)
    report = patch.apply(model, "fastft")
    assert report.unsloth_fused == {"qkv": 1, "o": 1, "mlp": 1}
    with caplog.at_level("WARNING"):
        torch.manual_seed(7)
        got = attn.apply_qkv(attn, x)
        mlp(x)
        attn.apply_qkv(attn, x)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    said = [r.getMessage() for r in caplog.records if "lora_dropout=0.25" in r.getMessage() and "slot" in r.getMessage()]
    assert len(said) == 2 and "QKV slot" in said[0] and "MLP slot" in said[1], said
    model.eval()
    with torch.no_grad():
        for g, w in zip(attn.apply_qkv(attn, x), apply_lora_qkv(attn, x)):
            assert_close(g, w, atol=1e-5, rtol=1e-5, what="eval QKV")
        assert_close(mlp(x), apply_lora_mlp_swiglu(mlp, x), atol=1e-5, rtol=1e-5, what="eval MLP")
    patch.apply(model, "none")
