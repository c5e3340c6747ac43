"""Swap fastft's fused LoRA kernel into a model's LoRA layers (PEFT and Unsloth models).

    from fastft import patch
    report = patch.apply(model, "fastft")   # recipe.kernels: auto | fastft | unsloth | none
    print(report.summary())                 # "kernels fastft: 28 of 28 LoRA layers fused ..."

What each mode does:
- ``fastft``: every PEFT ``lora.Linear`` over an ``nn.Linear`` and every ``lora.Linear4bit`` over a
  bitsandbytes NF4 ``Linear4bit`` gets a forward that calls ``fastft.kernels.lora.lora_linear``. On an
  Unsloth model (on a GPU) Unsloth's own fused paths bypass those layers (``self_attn.apply_qkv``,
  ``self_attn.apply_o`` and the MLP's ``forward`` run Unsloth's LoRA_QKV / LoRA_W / LoRA_MLP), so they
  are first put back to per-projection calls, which then reach the fused layers. Unsloth's CPU backend
  installs none of those paths (its layers are plain PEFT ones), so there only the layers are patched.
- ``unsloth``: leave Unsloth's fused paths as they are (on the hf backend: stock PEFT; said so).
- ``none``: stock PEFT: removes fastft's forwards and puts Unsloth's fused paths back to PEFT's.
- ``auto``: ``fastft`` when a CUDA device is present and the kernels have passed the GPU suite
  (``GPU_VERIFIED``); otherwise the backend's own path (the Triton kernels need a GPU, or
  TRITON_INTERPRET=1 which is far too slow to train with).

Layers that are not fused keep PEFT's own forward and are listed with the reason: DoRA and other
PEFT LoRA variants, a bias on lora_B, base layers other than nn.Linear / NF4 Linear4bit, r above
the kernel's limit. At run time a patched layer falls back to PEFT's forward (said once per reason)
for what only PEFT handles: several active adapters, disabled or merged adapters, mixed-batch
``adapter_names``; lora_dropout > 0 in training runs the kernel module's reference path.
"""
from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MODES = ("auto", "fastft", "unsloth", "none")
# `auto` picks fastft's kernels on CUDA only once they have passed the GPU suite (bench/gpu.sh:
# exactness and gradients on a real GPU). Until a session with a GPU has run it and set this to
# True, `auto` keeps the backend's own path and `kernels: fastft` opts in explicitly.
GPU_VERIFIED = False
_PATCHED = "_fastft_lora_forward"  # instance attribute marking a patched layer


@dataclass
class PatchReport:
    """What ``apply`` did: the LoRA path that runs, and per layer whether it is fused."""

    mode: str  # as requested
    path: str  # "fastft" | "unsloth" | "peft"
    reason: str  # why this path
    kernel: str = ""  # where the fused forward runs: Triton on CUDA, the interpreter, or the torch reference
    patched: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layer name -> why PEFT's forward stays
    unsloth_paths_restored: int = 0  # Unsloth fused QKV / O / MLP paths put back to per-projection calls
    unsloth_paths: int = 0  # Unsloth fused paths left in place (mode unsloth)

    def summary(self) -> str:
        if self.path != "fastft":
            extra = f"; {self.unsloth_paths} Unsloth fused paths" if self.unsloth_paths else ""
            return f"kernels {self.mode}: {self.path} LoRA path ({self.reason}){extra}"
        total = len(self.patched) + len(self.skipped)
        text = (f"kernels {self.mode}: fastft fused LoRA on {len(self.patched)} of {total} LoRA layers "
                f"({self.reason}; {self.kernel})")
        if self.unsloth_paths_restored:
            text += f"; {self.unsloth_paths_restored} Unsloth fused paths routed through them"
        if self.skipped:
            reasons: dict[str, int] = {}
            for why in self.skipped.values():
                reasons[why] = reasons.get(why, 0) + 1
            text += "; PEFT's forward kept for " + ", ".join(f"{n} ({why})" for why, n in reasons.items())
        return text

    def to_dict(self) -> dict:
        return {"mode": self.mode, "path": self.path, "reason": self.reason, "kernel": self.kernel,
                "patched": len(self.patched), "skipped": dict(self.skipped),
                "unsloth_paths_restored": self.unsloth_paths_restored, "unsloth_paths": self.unsloth_paths}


def apply(model, mode: str = "auto", log_fn=None) -> PatchReport:
    """Select the LoRA path for ``model`` (a PEFT or Unsloth model) and return what was done."""
    if mode not in MODES:
        raise ValueError(f"kernels: {mode!r} is not one of {', '.join(MODES)}")
    import torch

    unsloth_found = _unsloth_fused_modules(model)
    if mode == "auto":
        if not torch.cuda.is_available():
            _unpatch_all(model)
            path = "unsloth" if unsloth_found else "peft"
            report = PatchReport(mode, path, "auto: no CUDA device; fastft's Triton kernels need one",
                                 unsloth_paths=len(unsloth_found))
            return _said(report, log_fn)
        if not GPU_VERIFIED:
            _unpatch_all(model)
            path = "unsloth" if unsloth_found else "peft"
            report = PatchReport(mode, path, "auto: fastft's fused kernels have not yet passed the GPU suite "
                                 "(bench/gpu.sh); kernels: fastft opts in", unsloth_paths=len(unsloth_found))
            return _said(report, log_fn)
        mode_reason = "auto: CUDA device present"
    elif mode == "fastft":
        mode_reason = "requested"
    elif mode == "unsloth":
        _unpatch_all(model)
        if unsloth_found:
            report = PatchReport(mode, "unsloth", "requested; Unsloth's fused LoRA paths stay",
                                 unsloth_paths=len(unsloth_found))
        else:
            report = PatchReport(mode, "peft", "requested, but this model has no Unsloth fused LoRA paths "
                                 "(hf backend, or Unsloth's CPU backend): stock PEFT")
        return _said(report, log_fn)
    else:  # none
        _unpatch_all(model)
        restored = _restore_unsloth_paths(unsloth_found)
        reason = "requested" + (f"; {restored} Unsloth fused paths put back to PEFT's" if restored else "")
        return _said(PatchReport(mode, "peft", reason), log_fn)

    report = PatchReport(mode, "fastft", mode_reason, kernel=_kernel_location())
    report.unsloth_paths_restored = _restore_unsloth_paths(unsloth_found)
    for name, module in model.named_modules():
        if not _is_lora_layer(module):
            continue
        why = unsupported_reason(module)
        if why is None:
            _patch_layer(module)
            report.patched.append(name)
        else:
            _unpatch_layer(module)
            report.skipped[name] = why
    return _said(report, log_fn)


def _said(report: PatchReport, log_fn) -> PatchReport:
    if log_fn is not None:
        log_fn(report.summary())
    return report


def _kernel_location() -> str:
    import torch

    if torch.cuda.is_available():
        return "Triton kernels on CUDA"
    from fastft.kernels.nf4 import interpreted

    if interpreted():
        return "Triton kernels in the CPU interpreter (TRITON_INTERPRET=1)"
    return "no CUDA device: the kernel module's pure-torch reference runs (TRITON_INTERPRET=1 runs the Triton kernels)"


# --- which layers ------------------------------------------------------------------------------

def _is_lora_layer(module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return isinstance(module, LoraLayer)


def _is_4bit(base) -> bool:
    return type(base).__name__ == "Linear4bit" and hasattr(getattr(base, "weight", None), "quant_state")


def unsupported_reason(layer) -> str | None:
    """Why a PEFT LoRA layer keeps PEFT's own forward (None: fastft fuses it)."""
    import torch
    from fastft.kernels.lora import MAX_FUSED_RANK

    base = layer.get_base_layer()
    if not (type(base) is torch.nn.Linear or _is_4bit(base)):
        return f"base layer {type(base).__name__} is not nn.Linear or NF4 Linear4bit"
    if _is_4bit(base):
        qs = base.weight.quant_state
        if qs is None:
            return "4-bit weight not quantized yet"
        if getattr(qs, "quant_type", None) != "nf4":
            return f"4-bit type {getattr(qs, 'quant_type', None)} is not NF4"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out weights"
    for adapter in layer.lora_A:
        if getattr(layer, "lora_variant", {}).get(adapter) is not None or layer.use_dora.get(adapter, False):
            return "DoRA / LoRA variant"
        if getattr(layer.lora_B[adapter], "bias", None) is not None:
            return "bias on lora_B"
        if not isinstance(layer.lora_A[adapter], torch.nn.Linear):
            return "lora_A is not a Linear"
        if layer.r[adapter] > MAX_FUSED_RANK:
            return f"r={layer.r[adapter]} > {MAX_FUSED_RANK}"
    return None


# --- the patched forward ----------------------------------------------------------------------

def _patch_layer(layer) -> None:
    layer.forward = types.MethodType(_fused_forward, layer)
    setattr(layer, _PATCHED, True)


def _unpatch_layer(layer) -> None:
    if layer.__dict__.pop(_PATCHED, False):
        layer.__dict__.pop("forward", None)


def _unpatch_all(model) -> None:
    for module in model.modules():
        _unpatch_layer(module)


def _peft_forward(layer, x, args, kwargs, why: str | None):
    if why:
        from fastft.kernels.lora import say_once

        say_once(f"{why}: PEFT's forward runs")
    return type(layer).forward(layer, x, *args, **kwargs)


def _fused_forward(self, x, *args, **kwargs):
    """A PEFT LoRA layer's forward through fastft.kernels.lora.lora_linear (vanilla LoRA only)."""
    import torch
    from fastft.kernels.lora import lora_linear

    if args or kwargs:
        return _peft_forward(self, x, args, kwargs, "extra forward arguments (adapter_names, variant kwargs)")
    if self.disable_adapters or self.merged:
        return _peft_forward(self, x, args, kwargs, None)
    active = [a for a in self.active_adapters if a in self.lora_A]
    if len(active) != 1:
        return _peft_forward(self, x, args, kwargs, "several active adapters" if active else None)
    adapter = active[0]
    base = self.get_base_layer()
    weight, quant_state = base.weight, None
    out_dtype = x.dtype
    if _is_4bit(base):
        quant_state = weight.quant_state
        if getattr(quant_state, "packing_format_for_cpu", False):
            return _peft_forward(self, x, args, kwargs, "bitsandbytes' CPU inference layout")
        compute = getattr(base, "compute_dtype", None) or x.dtype
    else:
        compute = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        compute = out_dtype = torch.get_autocast_dtype(x.device.type)
    dropout = self.lora_dropout[adapter]
    p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0
    if not isinstance(dropout, (torch.nn.Dropout, torch.nn.Identity)):
        return _peft_forward(self, x, args, kwargs, f"dropout module {type(dropout).__name__}")
    y = lora_linear(x.to(compute), weight, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                    self.scaling[adapter], base.bias, quant_state, dropout_p=p, training=dropout.training)
    return y.to(out_dtype)


# --- Unsloth's fused paths ----------------------------------------------------------------------

def _unsloth_fused_modules(model) -> list[tuple[object, str]]:
    """(module, "qkv" | "o" | "mlp" | "mlp_tiled") for each Unsloth fused LoRA path installed."""
    found = []
    for module in model.modules():
        qkv = module.__dict__.get("apply_qkv")
        if getattr(qkv, "__name__", "") == "apply_lora_qkv":
            found.append((module, "qkv"))
        o = module.__dict__.get("apply_o")
        if getattr(o, "__name__", "") == "apply_lora_o":
            found.append((module, "o"))
        for attr, kind in (("forward", "mlp"), ("_unsloth_forward", "mlp_tiled")):
            fn = getattr(module.__dict__.get(attr), "__func__", None)
            fn = getattr(fn, "func", fn)  # functools.partial(apply_lora_mlp, inplace=False)
            if getattr(fn, "__name__", "").startswith("apply_lora_mlp"):
                found.append((module, kind))
    return found


def _per_projection_qkv(self, X):
    return self.q_proj(X), self.k_proj(X), self.v_proj(X)


def _per_projection_o(self, X):
    return self.o_proj(X)


def _restore_unsloth_paths(found) -> int:
    """Route Unsloth's fused QKV / O / MLP paths back through the per-projection LoRA layers."""
    for module, kind in found:
        if kind == "qkv":
            module.apply_qkv = _per_projection_qkv  # called as self.apply_qkv(self, X)
        elif kind == "o":
            module.apply_o = _per_projection_o
        elif kind == "mlp":
            del module.forward  # the class's forward: down(act(gate(x)) * up(x))
        else:
            module._unsloth_forward = type(module).forward  # Unsloth's tiled MLP calls it unbound
    return len(found)
