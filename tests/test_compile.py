"""fastft's LoRA ops under torch.compile, the way Unsloth runs them on a GPU with torch >= 2.11: each
decoder layer's forward compiled. On CPU the Triton kernels run under the interpreter inside the
custom ops; what is checked is what Dynamo and AOTAutograd make of the ops (no graph break, one
graph for every layer, the same loss and LoRA gradients as uncompiled), which the GPU shares."""
from __future__ import annotations

import importlib.util
import os
import shutil

import pytest
import torch

from bench import compile as bench_compile

N_LAYERS = 2  # the second layer is where a guard on per-layer state would recompile
LORA_PER_LAYER = 14  # lora_A and lora_B of q, k, v, o, gate, up, down


def _check(row: dict) -> None:
    assert row["error"] is None, row["error"]
    assert row["graph_breaks"] == 0, row["graph_break_reasons"]
    # one compiled graph serves every layer, and running the stack again compiles nothing new
    assert row["unique_graphs"] == 1 and row["unique_graphs_after_second_call"] == 1, row
    assert row["recompiles"] == 0
    assert row["grads_compared"] == LORA_PER_LAYER * row["layers"] + 1  # every LoRA factor and the input
    # eager replays the same ops; aot_eager may decompose some, so an fp32 tolerance, not equality
    worst = {k: v for k, v in row["max_abs_diff"].items() if v > 1e-5}
    assert not worst, worst


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("mode", ["fastft", "fastft-slots"])
def test_compiled_layers_with_fastft_kernels_equal_eager(mode, backend, fastft_cache):
    """fastft: the PEFT layers' forward runs fastft's fused LoRA op; fastft-slots: fastft's fused QKV,
    O and SwiGLU MLP ops in Unsloth's slot calling convention."""
    row = bench_compile.measure(mode, backend, N_LAYERS, tokens=8)
    assert row["model_backend"] == "hf" and "fastft fused LoRA" in row["patch"]
    if mode == "fastft-slots":
        assert "Unsloth's fused slots run fastft's fused ops" in row["patch"]
    _check(row)


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="Inductor on CPU needs a C++ compiler")
def test_inductor_takes_the_ops_as_their_fakes_describe_them(fastft_cache, tmp_path, monkeypatch):
    """Inductor (what Unsloth's block compile uses) checks every real output of a custom op against
    the size and strides its fake implementation gave; a fresh cache, so no graph compiled from an
    older fake is reused."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    _check(bench_compile.measure("fastft-slots", "inductor", N_LAYERS, tokens=8))


def test_stock_peft_compiles_as_the_baseline(fastft_cache):
    """The comparison's other side (kernels none: PEFT + bitsandbytes) under the same regime."""
    _check(bench_compile.measure("none", "aot_eager", N_LAYERS, tokens=8))


def test_a_graph_break_is_counted(fastft_cache, monkeypatch):
    """The counters this file relies on do see a graph break when one happens."""
    from fastft.models import patch

    real = patch.fastft_apply_o

    def with_break(self, X):
        torch._dynamo.graph_break()
        return real(self, X)

    monkeypatch.setattr(patch, "fastft_apply_o", with_break)
    row = bench_compile.measure("fastft-slots", "eager", 1, tokens=8)
    assert row["error"] is None and row["graph_breaks"] >= 1


@pytest.mark.unsloth
@pytest.mark.skipif(importlib.util.find_spec("unsloth") is None,
                    reason="unsloth not installed here; `make test` runs these in .venv-unsloth")
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_unsloth_backend_slots_compiled_equal_eager(backend, fastft_cache):
    """The model loaded through Unsloth, Unsloth's own fused LoRA functions put in its slots (as its
    patch_peft_model does on a GPU), then taken by fastft's ops: compiled equals eager."""
    row = bench_compile.measure("fastft-slots", backend, N_LAYERS, tokens=8, model_backend="unsloth")
    assert "qkv 2, o 2, mlp 2" in row["patch"], row["patch"]
    assert row["compile_regime"]["regime"] == "eager"  # no CUDA: Unsloth compiles no blocks here
    _check(row)
