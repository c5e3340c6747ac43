"""Whether a loaded model's decoder blocks, and so every LoRA path in them, run under torch.compile
(`compile_regime`), read without changing the model. Unsloth decides it at load time, so the answer
comes from what Unsloth left on the model, its fused LoRA paths included (`fused_paths`, which
fastft.models.patch also reads to find the slots it fills).

    from fastft.models.compile_regime import compile_regime, fused_paths
    compile_regime(model)   # {"regime": "compiled blocks" | "eager", "why": ...}
    fused_paths(model)      # [(attention module, "qkv", "apply_lora_qkv"), ...]; [] for a plain PEFT model
"""
from __future__ import annotations

# unsloth/models/_block_compile.py marks a decoder layer class's forward it wrapped in torch.compile
_UNSLOTH_COMPILED = "_unsloth_block_compiled"


def fused_paths(model) -> list[tuple[object, str, str]]:
    """(module, "qkv" | "o" | "mlp" | "mlp_tiled", function name) for each Unsloth fused LoRA path
    installed (unsloth/models/llama.py's patch_peft_model; names from unsloth/kernels/fast_lora.py)."""
    found = []
    for module in model.modules():
        qkv = module.__dict__.get("apply_qkv")
        if getattr(qkv, "__name__", "") == "apply_lora_qkv":
            found.append((module, "qkv", qkv.__name__))
        o = module.__dict__.get("apply_o")
        if getattr(o, "__name__", "") == "apply_lora_o":
            found.append((module, "o", o.__name__))
        for attr, kind in (("forward", "mlp"), ("_unsloth_forward", "mlp_tiled")):
            fn = getattr(module.__dict__.get(attr), "__func__", None)
            fn = getattr(fn, "func", fn)  # functools.partial(apply_lora_mlp, inplace=False)
            name = getattr(fn, "__name__", "")
            if name.startswith("apply_lora_mlp"):
                found.append((module, kind, name))
    return found


def _decoder_layers(model) -> list:
    """The model's decoder layers: the modules of its first ModuleList named ``layers``/``h``/``blocks``."""
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks"):
            return list(module)
    return []


def compile_regime(model) -> dict:
    """Whether ``model``'s decoder blocks run under torch.compile, and why. Unsloth decides it when
    it loads the model (patch_block_compile: torch >= 2.11, a CUDA device, not switched off by its
    environment variables), by wrapping each decoder layer class's forward; fastft compiles nothing
    itself, so fastft's and Unsloth's LoRA paths in one model always share the regime. fastft's ops
    are torch.library custom ops, traced into the block's graph without a break."""
    import os

    import torch

    layers = _decoder_layers(model)
    compiled = sorted({type(l).__name__ for l in layers if getattr(type(l).forward, _UNSLOTH_COMPILED, False)})
    if compiled:
        return {"regime": "compiled blocks",
                "why": f"Unsloth wrapped the forward of {', '.join(compiled)} in torch.compile (torch "
                       f"{torch.__version__.split('+')[0]} with CUDA); every LoRA path in a block runs traced"}
    inner = getattr(getattr(model, "base_model", None), "model", model)
    unsloth = bool(fused_paths(model)) or any(
        k.startswith("_unsloth") for m in (model, inner, *layers[:1]) for k in getattr(m, "__dict__", {}))
    if not unsloth:
        return {"regime": "eager", "why": "not an Unsloth model (hf backend): nothing compiles its decoder blocks"}
    if not torch.cuda.is_available():
        return {"regime": "eager", "why": "Unsloth compiles decoder blocks only on a CUDA device (its CPU backend "
                                          "runs them eagerly)"}
    env = {k: os.environ[k] for k in ("UNSLOTH_BLOCK_COMPILE", "UNSLOTH_COMPILE_DISABLE", "UNSLOTH_FORCE_FLOAT32",
                                       "UNSLOTH_BLOCK_COMPILE_LEGACY") if k in os.environ}
    off = [f"{k}={v}" for k, v in env.items()
           if (k == "UNSLOTH_BLOCK_COMPILE" and v == "0") or (k == "UNSLOTH_COMPILE_DISABLE" and v in ("1", "partial"))
           or (k == "UNSLOTH_FORCE_FLOAT32" and v == "1") or (k == "UNSLOTH_BLOCK_COMPILE_LEGACY" and v == "0")]
    if off:
        return {"regime": "eager", "why": f"Unsloth's block compile switched off by {', '.join(off)}"}
    from packaging.version import Version

    if Version(torch.__version__.split("+")[0]) < Version("2.11") and env.get("UNSLOTH_BLOCK_COMPILE_LEGACY") != "1":
        return {"regime": "eager", "why": f"torch {torch.__version__.split('+')[0]} < 2.11: Unsloth does not trace its "
                                          "fused LoRA functions (TRACE_LORA_FUNCTIONS), so it compiles no blocks"}
    return {"regime": "eager", "why": "Unsloth left the decoder blocks uncompiled (its log says why)"}
