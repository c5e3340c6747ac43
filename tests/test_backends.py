import pytest

from fastft import recipe
from fastft.models import backends
from fastft.models.backends import BackendError

BASE = {"model": {"name": "fastft-tiny", "max_seq_length": 64}, "data": {"train": "x"}, "output": {"dir": "x"},
        "train": {"gradient_checkpointing": False}}


def _r(**kw):
    return recipe.from_dict({**BASE, **kw})


@pytest.mark.parametrize("cuda, installed, imports, want, reason", [
    (False, True, True, "hf", "auto: no CUDA device"),
    (False, False, False, "hf", "auto: no CUDA device"),
    (True, False, False, "hf", "auto: CUDA found but unsloth is not installed"),
    (True, True, False, "hf", "auto: CUDA found but unsloth failed to import (RuntimeError: broken)"),
    (True, True, True, "unsloth", "auto: CUDA device and unsloth available"),
])
def test_auto_selection_says_why(monkeypatch, cuda, installed, imports, want, reason):
    import builtins
    import sys

    monkeypatch.setattr(backends, "cuda_available", lambda: cuda)
    monkeypatch.setattr(backends, "unsloth_installed", lambda: installed)
    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "unsloth":
            if not imports:
                raise RuntimeError("broken")
            return type(sys)("unsloth")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    name, why = backends.choose(_r())
    assert name == want and why.startswith(reason), why


def test_explicit_choices(monkeypatch):
    assert backends.choose(_r(backend="hf")) == ("hf", "requested in the recipe (backend: hf)")
    monkeypatch.setattr(backends, "unsloth_installed", lambda: False)
    with pytest.raises(BackendError, match=r"unsloth is not installed. Install it with pip install 'fastft\[gpu\]'"):
        backends.choose(_r(backend="unsloth"))


def test_hf_backend_loads_4bit_base_with_lora_on_every_linear():
    import bitsandbytes as bnb

    model, tok, info = backends.load(_r(backend="hf"))
    assert info.name == "hf" and info.load_in_4bit and info.device == "cpu" and info.dtype == "float32"
    layers = [m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 4 * 7  # 4 decoder layers x q,k,v,o,gate,up,down
    lora_names = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert lora_names == set(backends.LLAMA_LINEAR)
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    assert 0 < info.trainable_params < info.total_params
    w = layers[0].weight
    assert w.quant_state.quant_type == "nf4" and w.quant_state.nested  # double quantization


def test_hf_backend_16bit_lora_and_explicit_targets():
    model, _, info = backends.load(_r(backend="hf", model={**BASE["model"], "load_in_4bit": False},
                                      lora={"target_modules": ["q_proj", "v_proj"], "r": 4, "use_rslora": True}))
    assert not info.load_in_4bit
    wrapped = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "v_proj"}
    layer = next(m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A"))
    assert layer.scaling["default"] == pytest.approx(16 / 4 ** 0.5)  # rsLoRA: alpha / sqrt(r)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(BackendError, match="model.name: cannot load .*No model hub is reachable"):
        backends.load(_r(backend="hf", model={"name": str(tmp_path / "no-such-model")}))


def test_lora_init_is_seeded_by_the_recipe():
    import torch

    def lora_a(seed):
        model, _, _ = backends.load(_r(backend="hf", train={**BASE["train"], "seed": seed}))
        return [p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n]

    a, b, c = lora_a(1), lora_a(1), lora_a(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
