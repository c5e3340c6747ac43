"""Swap fastft's fused LoRA kernel into a model's LoRA layers (PEFT and Unsloth models).

    from fastft.models import patch
    report = patch.apply(model, "fastft")   # recipe.kernels: auto | fastft | unsloth | none
    print(report.summary())                 # "kernels fastft: 28 of 28 LoRA layers fused ..."

What each mode does:
- ``fastft``: every PEFT ``lora.Linear`` over an ``nn.Linear`` and every ``lora.Linear4bit`` over a
  bitsandbytes NF4 ``Linear4bit`` gets a forward that calls ``fastft.kernels.lora.lora_linear``. On an
  Unsloth model (on a GPU) Unsloth's own fused paths bypass those layers (``self_attn.apply_qkv``,
  ``self_attn.apply_o`` and the MLP's ``forward`` / tiled ``_unsloth_forward`` run Unsloth's LoRA_QKV /
  LoRA_W / LoRA_MLP); fastft's fused ops take those slots, with Unsloth's calling convention
  (``self.apply_qkv(self, X)``, ``self.apply_o(self, X)``, ``mlp(X)``): QKV runs
  ``fastft.kernels.fused.lora_qkv`` (one thin product for the three adapters, one dX buffer), the MLP
  ``fastft.kernels.fused_mlp.lora_mlp_swiglu`` (gate/up/SwiGLU/down in one op), O the fused o_proj layer
  (``lora_linear``). A slot whose projections fastft does not fuse (see ``unsupported_reason``) or a
  GeGLU MLP goes back to per-projection calls, said in the report; at run time a slot falls back to
  the per-projection layers (said once per reason) for lora_dropout > 0 in training, several active
  adapters, disabled or merged adapters. Unsloth's CPU backend installs none of those slots (its
  layers are plain PEFT ones), so there only the layers are patched.
- ``unsloth``: Unsloth's fused paths as Unsloth installed them (fastft's slot ops are taken out again;
  on the hf backend: stock PEFT; said so).
- ``none``: stock PEFT: removes fastft's forwards and puts Unsloth's fused paths back to PEFT's.
- ``auto``: ``fastft`` when a CUDA device is present and the kernels have passed the GPU suite
  (``GPU_VERIFIED``); otherwise the backend's own path (the Triton kernels need a GPU, or
  TRITON_INTERPRET=1 which is far too slow to train with).

Layers that are not fused keep PEFT's own forward and are listed with the reason: DoRA and other
PEFT LoRA variants, a bias on lora_B, base layers other than nn.Linear / NF4 Linear4bit, r above
the kernel's limit. At run time a patched layer falls back to PEFT's forward (said once per reason)
for what only PEFT handles: several active adapters, disabled or merged adapters, mixed-batch
``adapter_names``; lora_dropout > 0 in training runs unfused: an NF4 base dequantized by the Triton
``dequantize_nf4`` (on CUDA), one matmul, and PEFT's LoRA branch on dropout(x)
(``fastft.kernels.lora.unfused_route``).
"""
from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field

from fastft.models.compile_regime import compile_regime, fused_paths

log = logging.getLogger(__name__)

MODES = ("auto", "fastft", "unsloth", "none")
# `auto` picks fastft's kernels on CUDA only when this is True: the CPU suite proves their math in the
# Triton interpreter, not that the compiled kernels are exact, give the right gradients and run
# faster on a GPU, which is what bench/gpu.sh measures. While it is False, `auto` keeps the
# backend's own path and `kernels: fastft` opts in explicitly.
GPU_VERIFIED = False
_PATCHED = "_fastft_lora_forward"  # instance attribute marking a patched layer
_SLOTS = "_fastft_unsloth_slots"  # instance attribute: {slot name: Unsloth's function fastft replaced}


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
    unsloth_fused: dict[str, int] = field(default_factory=dict)  # slot kind -> slots running fastft's ops
    unsloth_restored_why: dict[str, int] = field(default_factory=dict)  # reason -> slots put back
    # {"regime": "compiled blocks" | "eager", "why": ...}: whether the decoder blocks, and so every
    # LoRA path in them, run under torch.compile; the same for every kernels mode of one model
    compile_regime: dict = field(default_factory=dict)

    def summary(self) -> str:
        regime = f"; blocks {self.compile_regime['regime']}" if self.compile_regime else ""
        if self.path != "fastft":
            extra = f"; {self.unsloth_paths} Unsloth fused paths" if self.unsloth_paths else ""
            return f"kernels {self.mode}: {self.path} LoRA path ({self.reason}){extra}{regime}"
        total = len(self.patched) + len(self.skipped)
        text = (f"kernels {self.mode}: fastft fused LoRA on {len(self.patched)} of {total} LoRA layers "
                f"({self.reason}; {self.kernel})")
        if self.unsloth_fused:
            text += "; Unsloth's fused slots run fastft's fused ops: " + ", ".join(
                f"{kind} {n}" for kind, n in self.unsloth_fused.items())
        if self.unsloth_paths_restored:
            text += f"; {self.unsloth_paths_restored} Unsloth fused paths routed through the per-projection layers"
            if self.unsloth_restored_why:
                text += " (" + ", ".join(f"{n}: {why}" for why, n in self.unsloth_restored_why.items()) + ")"
        if self.skipped:
            reasons: dict[str, int] = {}
            for why in self.skipped.values():
                reasons[why] = reasons.get(why, 0) + 1
            text += "; PEFT's forward kept for " + ", ".join(f"{n} ({why})" for why, n in reasons.items())
        return text + regime

    def to_dict(self) -> dict:
        return {"mode": self.mode, "path": self.path, "reason": self.reason, "kernel": self.kernel,
                "patched": len(self.patched), "skipped": dict(self.skipped),
                "unsloth_paths_restored": self.unsloth_paths_restored, "unsloth_paths": self.unsloth_paths,
                "unsloth_fused": dict(self.unsloth_fused), "unsloth_restored_why": dict(self.unsloth_restored_why),
                "compile_regime": dict(self.compile_regime)}


def apply(model, mode: str = "auto", log_fn=None) -> PatchReport:
    """Select the LoRA path for ``model`` (a PEFT or Unsloth model) and return what was done."""
    if mode not in MODES:
        raise ValueError(f"kernels: {mode!r} is not one of {', '.join(MODES)}")
    import torch

    _unpatch_slots(model)  # Unsloth's own functions back in any slot fastft took earlier
    unsloth_found = fused_paths(model)
    if mode == "auto":
        if not torch.cuda.is_available():
            _unpatch_all(model)
            path = "unsloth" if unsloth_found else "peft"
            report = PatchReport(mode, path, "auto: no CUDA device; fastft's Triton kernels need one",
                                 unsloth_paths=len(unsloth_found))
            return _said(report, log_fn, model)
        if not GPU_VERIFIED:
            _unpatch_all(model)
            path = "unsloth" if unsloth_found else "peft"
            report = PatchReport(mode, path, "auto: fastft's fused kernels have not yet passed the GPU suite "
                                 "(bench/gpu.sh); kernels: fastft opts in", unsloth_paths=len(unsloth_found))
            return _said(report, log_fn, model)
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
        return _said(report, log_fn, model)
    else:  # none
        _unpatch_all(model)
        restored = _restore_unsloth_paths(unsloth_found)
        reason = "requested" + (f"; {restored} Unsloth fused paths put back to PEFT's" if restored else "")
        return _said(PatchReport(mode, "peft", reason), log_fn, model)

    report = PatchReport(mode, "fastft", mode_reason, kernel=_kernel_location())
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
    _install_fused_slots(unsloth_found, report)
    return _said(report, log_fn, model)


def _said(report: PatchReport, log_fn, model) -> PatchReport:
    report.compile_regime = compile_regime(model)
    if log_fn is not None:
        log_fn(report.summary())
    return report


def _kernel_location() -> str:
    import torch

    if torch.cuda.is_available():
        return "Triton kernels on CUDA"
    from fastft.kernels.nf4_format import interpreted

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
    _unpatch_slots(model)
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

_SLOT_ATTR = {"qkv": "apply_qkv", "o": "apply_o", "mlp": "forward", "mlp_tiled": "_unsloth_forward"}


def _per_projection_qkv(self, X):
    return self.q_proj(X), self.k_proj(X), self.v_proj(X)


def _per_projection_o(self, X):
    return self.o_proj(X)


def _restore_unsloth_paths(found) -> int:
    """Route Unsloth's fused QKV / O / MLP paths back through the per-projection LoRA layers."""
    for module, kind, _ in found:
        _restore_path(module, kind)
    return len(found)


def _restore_path(module, kind: str) -> None:
    if kind == "qkv":
        module.apply_qkv = _per_projection_qkv  # called as self.apply_qkv(self, X)
    elif kind == "o":
        module.apply_o = _per_projection_o
    elif kind == "mlp":
        del module.forward  # the class's forward: down(act(gate(x)) * up(x))
    else:
        module._unsloth_forward = type(module).forward  # Unsloth's tiled MLP calls it unbound


def _install_fused_slots(found, report: PatchReport) -> None:
    """Put fastft's fused ops into Unsloth's fused slots; slots they do not cover go back to
    per-projection calls (which reach the fused layers), each reason counted in the report."""
    for module, kind, name in found:
        why = _slot_reason(module, kind, name)
        if why is not None:
            _restore_path(module, kind)
            report.unsloth_paths_restored += 1
            report.unsloth_restored_why[why] = report.unsloth_restored_why.get(why, 0) + 1
            continue
        attr = _SLOT_ATTR[kind]
        module.__dict__.setdefault(_SLOTS, {})[attr] = module.__dict__[attr]
        if kind == "qkv":
            module.apply_qkv = fastft_apply_qkv  # Unsloth calls self.apply_qkv(self, X): a plain function
        elif kind == "o":
            module.apply_o = fastft_apply_o
        else:  # bound, as Unsloth binds its own (the tiled MLP calls _unsloth_forward.__get__(self))
            setattr(module, attr, types.MethodType(fastft_apply_mlp, module))
        report.unsloth_fused[kind] = report.unsloth_fused.get(kind, 0) + 1


def _unpatch_slots(model) -> None:
    """Give every slot fastft took back the Unsloth function that was there."""
    for module in model.modules():
        for attr, fn in module.__dict__.pop(_SLOTS, {}).items():
            setattr(module, attr, fn)


_SLOT_PROJECTIONS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
                     "mlp": ("gate_proj", "up_proj", "down_proj"), "mlp_tiled": ("gate_proj", "up_proj", "down_proj")}


def _slot_reason(module, kind: str, name: str) -> str | None:
    """Why a slot keeps per-projection calls instead of fastft's fused op (None: it takes the op)."""
    if kind.startswith("mlp") and name != "apply_lora_mlp_swiglu":
        return f"{name}: fastft fuses the SwiGLU MLP only"
    for attr in _SLOT_PROJECTIONS[kind]:
        proj = getattr(module, attr, None)
        if proj is None or not _is_lora_layer(proj):
            return f"{attr} is not a PEFT LoRA layer"
        why = unsupported_reason(proj)
        if why is not None:
            return f"{attr}: {why}"
        if kind.startswith("mlp") and proj.get_base_layer().bias is not None:
            return f"{attr} has a bias (the fused MLP has none)"
    return None


def _projection_args(projs, X):
    """(fastft.kernels.fused.Projection per layer, compute dtype, output dtype) for the fused ops, or a
    string: why this call runs the per-projection layers (empty: no need to say, e.g. disabled adapters)."""
    import torch

    from fastft.kernels.fused import Projection

    out = []
    compute = out_dtype = X.dtype
    for i, layer in enumerate(projs):
        if not layer.__dict__.get(_PATCHED):
            return "a projection is no longer fastft-patched"
        if layer.disable_adapters or layer.merged:
            return ""
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if len(active) != 1:
            return "several active adapters" if active else ""
        adapter = active[0]
        dropout = layer.lora_dropout[adapter]
        if not isinstance(dropout, (torch.nn.Dropout, torch.nn.Identity)):
            return f"dropout module {type(dropout).__name__}"
        if isinstance(dropout, torch.nn.Dropout) and dropout.p and dropout.training:
            return f"lora_dropout={dropout.p} > 0 in training (dropout is not fused)"
        base = layer.get_base_layer()
        quant_state = None
        if _is_4bit(base):
            quant_state = base.weight.quant_state
            if getattr(quant_state, "packing_format_for_cpu", False):
                return "bitsandbytes' CPU inference layout"
            if i == 0:
                compute = getattr(base, "compute_dtype", None) or X.dtype
        out.append(Projection(base.weight, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight,
                              layer.scaling[adapter], quant_state=quant_state, bias=base.bias))
    if torch.is_autocast_enabled(X.device.type):
        compute = out_dtype = torch.get_autocast_dtype(X.device.type)
    return out, compute, out_dtype


def _say_fallback(slot: str, why: str) -> None:
    if why:
        from fastft.kernels.lora import say_once

        say_once(f"{why}: Unsloth's {slot} slot runs the per-projection layers")


def fastft_apply_qkv(self, X, inplace=True):
    """Unsloth's ``apply_qkv`` slot (called ``self.apply_qkv(self, X)``, self the attention module) run
    by fastft.kernels.fused.lora_qkv. ``inplace`` is Unsloth's permission to overwrite X in the
    backward; fastft's op never writes into X, so it is accepted and unused."""
    projs = (self.q_proj, self.k_proj, self.v_proj)
    args = _projection_args(projs, X)
    if isinstance(args, str):
        _say_fallback("QKV", args)
        return _per_projection_qkv(self, X)
    from fastft.kernels.fused import lora_qkv

    ps, compute, out_dtype = args
    return tuple(t.to(out_dtype) for t in lora_qkv(X.to(compute), *ps))


def fastft_apply_o(self, X):
    """Unsloth's ``apply_o`` slot: the O projection is one projection, so its fused layer
    (fastft.kernels.lora.lora_linear through the patched o_proj) is the fused op."""
    return self.o_proj(X)


def fastft_apply_mlp(self, X, inplace=True):
    """Unsloth's MLP ``forward`` / tiled ``_unsloth_forward`` slot (bound to the MLP module) run by
    fastft.kernels.fused_mlp.lora_mlp_swiglu: down(silu(gate(X)) * up(X)). ``inplace`` as in QKV."""
    projs = (self.gate_proj, self.up_proj, self.down_proj)
    args = _projection_args(projs, X)
    if isinstance(args, str):
        _say_fallback("MLP", args)
        return self.down_proj(self.act_fn(self.gate_proj(X)) * self.up_proj(X))
    from fastft.kernels.fused_mlp import lora_mlp_swiglu

    ps, compute, out_dtype = args
    return lora_mlp_swiglu(X.to(compute), *ps).to(out_dtype)
