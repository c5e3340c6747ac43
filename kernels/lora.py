"""Fused LoRA linear: forward and backward in Triton, over a 16-bit or an NF4 (bitsandbytes) base weight.

    from fastft.kernels.lora import lora_linear
    y = lora_linear(x, weight, lora_a, lora_b, scaling, bias=None, quant_state=None)

The math. x: [M, K] tokens, W: [N, K] frozen base weight (16-bit, or NF4 packed as bitsandbytes stores
it), A: [r, K], B: [N, r] (the trained adapter), s = alpha / r (or alpha / sqrt(r), rsLoRA):

    forward    XA = x·Aᵀ                           [M, r]   kept for the backward
               y  = x·Wᵀ + s·XA·Bᵀ (+ bias)          [M, N]
    backward   dYB = dY·B                          [M, r]
               dX  = dY·W + s·dYB·A                [M, K]
               dA  = s·dYBᵀ·x                      [r, K]   split over tokens (M is long, r·K is small)
               dB  = s·dYᵀ·XA                      [N, r]   split over tokens
               W and the base bias get no gradient.

The base products x·Wᵀ and dY·W take one of two routes. A 16-bit W, and an NF4 W on the "in_kernel"
path, run one launch of ``_lora_matmul_kernel`` with the LoRA term as the epilogue of the base
matmul (x·Wᵀ is never stored). An NF4 W on the default "dequantize" path (NF4_PATH, FASTFT_LORA_NF4)
is first dequantized by fastft.kernels.nf4 into a reused per-shape buffer, then torch.matmul (cuBLAS)
does the base product and ``addmm_`` adds s·XA·Bᵀ (s·dYB·A in the backward) in place; the backward
dequantizes W again rather than keeping a dense copy alive between forward and backward.

The products are launches of one Triton kernel (fastft.kernels.lora_kernel: C = alpha·(P·Q)
(+ scale·(L·R)) (+ bias), strided operands, an optional NF4 Q decoded inside the K loop, an optional
split of the reduction into fp32 partial sums). The thin products (x·Aᵀ, dY·B: N = r) and the dA / dB
reductions split their reduction so that a launch has at least WAVES programs per SM
(fastft.kernels.lora_configs.split_count; at M = 4096 on 132 SMs x·Aᵀ runs 64 row tiles x 5 splits).
Accumulation is fp32; fp32 inputs use IEEE fp32 dots (no TF32), matching torch's default for matmul.
Launch configs are picked by shape and fitted to the device's shared memory in
fastft.kernels.lora_configs (CONFIGS, SMALLER, `fit_config`; both tables are importable from here).

NF4 (the format and its parsing into `NF4Weight` come from fastft.kernels.nf4_format, the dequant
kernel from fastft.kernels.nf4): flat index i of the dense row-major [N, K] weight lives in byte
i // 2 (high nibble first), block i // blocksize; value = code[nibble] * absmax[block], and with
double quantization absmax[block] = code2[absmax_u8[block]] * absmax2[block // blocksize2] + offset,
each step rounded to fp32 separately, then the value rounds to the compute dtype.

The layer is the torch.library custom op ``fastft::lora_linear`` (backward: ``fastft::lora_linear_backward``)
with a registered autograd formula and a fake (shape-only) implementation, so torch.compile traces it
as one node, without a graph break.

Not fused (said once, with the route taken): lora_dropout > 0 in training, a trainable base weight or
bias, r > MAX_FUSED_RANK, dtypes other than fp16/bf16/fp32, non-NF4 4-bit, and tensors that are not
on a CUDA device (unless TRITON_INTERPRET=1, the CPU interpreter). An NF4 base on CUDA (or under the
interpreter) then takes `lora_linear_dequantized`: fastft's Triton `dequantize_nf4` + torch.matmul for
the base product and the LoRA branch in torch on dropout(x), as PEFT's forward; everything else (a
16-bit base, FP4, other dtypes, CPU) the pure-torch `lora_linear_reference`.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import triton

from .lora_configs import (  # CONFIGS and SMALLER: the launch tables fit_config's error tells users to extend
    CONFIGS,
    INTERPRETER_CONFIGS,
    RED_MIN_K,
    SMALLER,  # noqa: F401
    THIN_MIN_K,
    device_sms,
    pick_config,
    say_once,
    split_count,
)
from .lora_kernel import DTYPES, lora_matmul
from .nf4 import dequant_scratch, dequantize_nf4
from .nf4_format import NF4Weight, dequantize_nf4_reference, interpreted

MAX_FUSED_RANK = 128  # BLOCK_R = next power of two >= r; beyond 128 the epilogue tile spills registers
# How an NF4 base weight reaches the matmuls (FASTFT_LORA_NF4 in the environment, or set NF4_PATH):
#   "dequantize" (default): fastft.kernels.nf4 writes the dense W into a reused per-shape scratch
#       buffer (one memory-bound pass, 0.5 byte read and 2 written per element) and torch.matmul runs
#       the base product (cuBLAS on a GPU), with the LoRA products around it: y = x·Wᵀ (+ bias) then
#       y += s·XA·Bᵀ (addmm_); in the backward W is dequantized again (never saved) for dX = dY·W, then
#       dX += s·dYB·A. This is Unsloth's design, and the one with a measured chance on a GPU.
#   "in_kernel": the fused Triton kernel dequantizes each [BLOCK_K, BLOCK_N] tile of W in registers
#       inside the K loop (W read as 4-bit, never written dense), the LoRA term in its epilogue.
# `python -m bench.kernels lora` times both ("fastft_dequant" and "fastft"). A forward records the
# path it took in its autograd context, and its backward takes the same one.
NF4_PATHS = ("dequantize", "in_kernel")
NF4_PATH = os.environ.get("FASTFT_LORA_NF4", "dequantize")
if NF4_PATH not in NF4_PATHS:
    raise ValueError(f"FASTFT_LORA_NF4={NF4_PATH!r} is not one of {', '.join(NF4_PATHS)}; unset it or pick one")


# --------------------------------------------------------------------------------------------------
# The forward and the backward: launches of the LoRA matmul kernel around the base product
# --------------------------------------------------------------------------------------------------

def _nf4_weight(weight, quant_state) -> NF4Weight:
    """The packed weight and its bitsandbytes quant_state as an NF4Weight (one passes through).

    Parsed and checked once per (quant_state, packed tensor) and cached on the quant_state: a training
    step re-reads the cached NF4Weight, so no forward touches a value on the host (the nested offset,
    even when a state-dict round trip left it a Python float, becomes a device tensor here, once)."""
    if isinstance(quant_state, NF4Weight):
        nf4 = quant_state
    elif torch.compiler.is_compiling():
        # Traced once into the graph: a data_ptr key would break it, and the cache would be
        # a guard on every layer's state; the parse is shape and dtype logic only
        nf4 = NF4Weight.from_quant_state(weight.data if isinstance(weight, torch.nn.Parameter) else weight,
                                         quant_state)
    else:
        packed = weight.data if isinstance(weight, torch.nn.Parameter) else weight
        key = (packed.data_ptr(), packed.dtype, tuple(packed.shape), packed.device, quant_state.absmax.data_ptr())
        cached = getattr(quant_state, "_fastft_nf4", None)
        if cached is not None and cached[0] == key:
            nf4 = cached[1]
        else:
            nf4 = NF4Weight.from_quant_state(packed, quant_state)
            try:
                quant_state._fastft_nf4 = (key, nf4)
            except AttributeError:  # a quant state with __slots__: parse per call
                pass
    if len(nf4.shape) != 2:
        raise ValueError(f"NF4 weight must be 2-D, got shape {nf4.shape}")
    return nf4


def dense_weight(nf4: NF4Weight, dtype: torch.dtype, slot: int = 0) -> torch.Tensor:
    """W [N, K] in `dtype`, dequantized by fastft's NF4 kernel into the shared per-shape scratch buffer
    (`fastft.kernels.nf4.dequant_scratch`): valid until the next dequantize into the same buffer, so
    used at once and never saved for the backward."""
    return dequantize_nf4(nf4, out=dequant_scratch(nf4.shape, dtype, nf4.packed.device, slot))


def _thin(p, q, dtype, r):
    """p[M, K] @ q[K, r] (x·Aᵀ or dY·B), split over K so that M / BLOCK_M tiles still fill the GPU."""
    M, K = p.shape
    name = pick_config("thin", M, r, False, dtype == torch.float32)
    bm = (CONFIGS.get(name) or INTERPRETER_CONFIGS[name])[0]
    split = split_count(triton.cdiv(M, bm), K, THIN_MIN_K, device_sms(p.device))
    return lora_matmul(p, q, dtype, kind="thin", rank=r, split_k=split, config=name)


def _nf4_path(nf4_path: str | None) -> str:
    path = nf4_path or NF4_PATH
    if path not in NF4_PATHS:
        raise ValueError(f"NF4 path {path!r} is not one of {', '.join(NF4_PATHS)}; set FASTFT_LORA_NF4 "
                         "(or fastft.kernels.lora.NF4_PATH) to one of them")
    return path


def lora_forward(x2, weight, lora_a, lora_b, scaling, bias=None, nf4: NF4Weight | None = None,
                 nf4_path: str | None = None):
    """(y, xa) for 2-D x: y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ + bias in x's dtype, xa = x·Aᵀ (kept for backward).
    nf4_path: "dequantize" | "in_kernel" for an NF4 weight (default: NF4_PATH)."""
    dtype, r = x2.dtype, lora_a.shape[0]
    a, b = lora_a.to(dtype), lora_b.to(dtype)
    xa = _thin(x2, a.t(), dtype, r)
    bias = None if bias is None else bias.to(dtype)
    if nf4 is not None and _nf4_path(nf4_path) == "dequantize":
        w = dense_weight(nf4, dtype)
        y = torch.matmul(x2, w.t()) if bias is None else torch.addmm(bias, x2, w.t())
        return y.addmm_(xa, b.t(), alpha=scaling), xa
    w = (nf4, True) if nf4 is not None else (weight if weight.dtype == dtype else weight.to(dtype)).t()
    y = lora_matmul(x2, w, dtype, lora=(xa, b.t()), scale=scaling, rank=r, bias=bias)
    return y, xa


def lora_backward(dy2, x2, xa, weight, lora_a, lora_b, scaling, nf4: NF4Weight | None = None,
                  need_dx=True, need_da=True, need_db=True, nf4_path: str | None = None):
    """(dX, dA, dB) for 2-D tensors; dA and dB come back in the adapter's dtypes. nf4_path: the one the
    forward took (default: NF4_PATH)."""
    dtype, r = dy2.dtype, lora_a.shape[0]
    M = dy2.shape[0]
    a, b = lora_a.to(dtype), lora_b.to(dtype)
    dx = da = db = None
    dyb = _thin(dy2, b, dtype, r) if (need_dx or need_da) else None
    if need_dx:
        if nf4 is not None and _nf4_path(nf4_path) == "dequantize":
            dx = torch.matmul(dy2, dense_weight(nf4, dtype)).addmm_(dyb, a, alpha=scaling)
        else:
            w = (nf4, False) if nf4 is not None else (weight if weight.dtype == dtype else weight.to(dtype))
            dx = lora_matmul(dy2, w, dtype, lora=(dyb, a), scale=scaling, rank=r)
    sms = device_sms(dy2.device)
    if need_da:
        K = x2.shape[1]
        split = split_count(triton.cdiv(K, 128), M, RED_MIN_K, sms)
        da = lora_matmul(dyb.t(), x2, lora_a.dtype, alpha=scaling, kind="red", rank=r, split_k=split)
    if need_db:
        N = dy2.shape[1]
        split = split_count(triton.cdiv(N, 128), M, RED_MIN_K, sms)
        # dB^T = s·XAᵀ·dY: [r, N], the reduction shape with r rows; returned transposed
        db = lora_matmul(xa.t(), dy2, lora_b.dtype, alpha=scaling, kind="red", rank=r, split_k=split).t()
    return dx, da, db


# --------------------------------------------------------------------------------------------------
# The custom ops and their autograd
# --------------------------------------------------------------------------------------------------

# Unsloth compiles every decoder block on torch >= 2.11 + CUDA, so on the GPU these run inside Dynamo.
# The forward and the backward are torch.library custom ops with fake (shape-only) implementations and a
# registered autograd formula: Dynamo and AOTAutograd see one opaque node each (no graph break, no guard
# on the launchers' Python), and Inductor schedules them among its own kernels. Their arguments are
# tensors and plain values: an NF4 weight travels as `NF4Weight.op_args()`. The NF4 path is an argument,
# so the backward takes the path its forward took.

@torch.library.custom_op("fastft::lora_linear", mutates_args=())
def _lora_linear_op(x2: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    bias: torch.Tensor | None, nf4_tensors: list[torch.Tensor], nf4_meta: list[int],
                    scaling: float, nf4_path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, xa) of `lora_forward` for 2-D contiguous x; an NF4 weight as op_args (weight: its bytes)."""
    nf4 = NF4Weight.from_op_args(nf4_tensors, nf4_meta) if nf4_tensors else None
    return lora_forward(x2, weight, lora_a, lora_b, scaling, bias, nf4, nf4_path)


@_lora_linear_op.register_fake
def _lora_linear_fake(x2, weight, lora_a, lora_b, bias, nf4_tensors, nf4_meta, scaling, nf4_path):
    n = nf4_meta[0] if nf4_tensors else weight.shape[0]
    return x2.new_empty((x2.shape[0], n)), x2.new_empty((x2.shape[0], lora_a.shape[0]))


@torch.library.custom_op("fastft::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(dy2: torch.Tensor, x2: torch.Tensor, xa: torch.Tensor, weight: torch.Tensor,
                             lora_a: torch.Tensor, lora_b: torch.Tensor, nf4_tensors: list[torch.Tensor],
                             nf4_meta: list[int], scaling: float, nf4_path: str, need_dx: bool, need_da: bool,
                             need_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dX, dA, dB) of `lora_backward`; a gradient not needed comes back as an empty tensor (an op's
    outputs are tensors, each its own)."""
    nf4 = NF4Weight.from_op_args(nf4_tensors, nf4_meta) if nf4_tensors else None
    dx, da, db = lora_backward(dy2, x2, xa, weight, lora_a, lora_b, scaling, nf4, need_dx=need_dx,
                               need_da=need_da, need_db=need_db, nf4_path=nf4_path)
    return tuple(g if g is not None else dy2.new_empty(0) for g in (dx, da, db))


@_lora_linear_backward_op.register_fake
def _lora_linear_backward_fake(dy2, x2, xa, weight, lora_a, lora_b, nf4_tensors, nf4_meta, scaling, nf4_path,
                               need_dx, need_da, need_db):
    # dB is the transpose of the [r, N] reduction `lora_backward` computes (strides (1, N)); Inductor
    # checks each real output's strides against the fake's, so the fake has the same layout
    return (dy2.new_empty(x2.shape if need_dx else (0,)),
            lora_a.new_empty(lora_a.shape) if need_da else dy2.new_empty(0),
            lora_b.new_empty(lora_b.shape[::-1]).t() if need_db else dy2.new_empty(0))


def _lora_linear_setup(ctx, inputs, output):
    x2, weight, lora_a, lora_b, _bias, nf4_tensors, nf4_meta, scaling, nf4_path = inputs
    ctx.save_for_backward(x2, output[1], weight, lora_a, lora_b, *nf4_tensors)
    ctx.nf4_meta, ctx.scaling, ctx.nf4_path = list(nf4_meta), scaling, nf4_path


def _lora_linear_grad(ctx, dy, _dxa):
    x2, xa, weight, lora_a, lora_b, *nf4_tensors = ctx.saved_tensors
    need_dx, _, need_da, need_db = ctx.needs_input_grad[:4]
    dy2 = dy.contiguous() if dy.dtype == x2.dtype else dy.to(x2.dtype).contiguous()
    dx, da, db = _lora_linear_backward_op(dy2, x2, xa, weight, lora_a, lora_b, nf4_tensors, ctx.nf4_meta,
                                          ctx.scaling, ctx.nf4_path, need_dx, need_da, need_db)
    # the inputs' structure: a list of tensors takes a list of gradients, plain values one None
    return (dx if need_dx else None, None, da if need_da else None, db if need_db else None, None,
            [None] * len(nf4_tensors), None, None, None)


_lora_linear_op.register_autograd(_lora_linear_grad, setup_context=_lora_linear_setup)


def lora_linear_fused(x, weight, lora_a, lora_b, scaling, bias=None, nf4: NF4Weight | None = None):
    """y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ (+ bias) for x of any leading shape through the custom op, with
    gradients for x, A and B (W and bias are frozen); no checks (`lora_linear` is the checked entry)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    # a dense weight passes meta [0]: a non-empty int list is one argument to the op's autograd (an
    # empty one would count as a list of gradients)
    tensors, meta = nf4.op_args() if nf4 is not None else ([], [0])
    y, _ = _lora_linear_op(x2, nf4.packed if nf4 is not None else weight, lora_a, lora_b, bias, tensors, meta,
                           float(scaling), _nf4_path(None))
    return y.reshape(*shape[:-1], y.shape[-1])


# --------------------------------------------------------------------------------------------------
# Reference and entry point
# --------------------------------------------------------------------------------------------------

def lora_linear_reference(x, weight, lora_a, lora_b, scaling, bias=None, quant_state=None, dropout_p=0.0,
                          training=True):
    """The same function in plain torch (autograd does the backward); also the fallback path."""
    dtype = x.dtype
    if quant_state is not None:
        w = dequantize_nf4_reference(_nf4_weight(weight, quant_state), dtype=dtype)
    else:
        w = weight.to(dtype)
    y = F.linear(x, w, None if bias is None else bias.to(dtype))
    return y + _lora_branch(x, lora_a, lora_b, scaling, dropout_p, training)


def _lora_branch(x, lora_a, lora_b, scaling, dropout_p, training):
    """s·(dropout(x)·Aᵀ)·Bᵀ in torch, dropout on the LoRA branch's input only, as PEFT's forward."""
    dtype = x.dtype
    xd = F.dropout(x, dropout_p, training) if dropout_p else x
    return scaling * F.linear(F.linear(xd, lora_a.to(dtype)), lora_b.to(dtype))


class NF4LinearFunction(torch.autograd.Function):
    """x·Wᵀ (+ bias) for an NF4 W: fastft's dequant kernel writes the dense W into the shared scratch
    buffer (`dense_weight`), torch.matmul does the product; the backward dequantizes W again for
    dX = dY·W, so no dense copy of W lives between forward and backward (bitsandbytes' MatMul4Bit,
    which PEFT's Linear4bit runs, does the same). W gets no gradient; a trainable bias does."""

    @staticmethod
    def forward(ctx, x, nf4, bias):
        ctx.nf4 = nf4
        return F.linear(x, dense_weight(nf4, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, dy):
        dx = dy.matmul(dense_weight(ctx.nf4, dy.dtype)) if ctx.needs_input_grad[0] else None
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return dx, None, db


def lora_linear_dequantized(x, weight, lora_a, lora_b, scaling, bias=None, quant_state=None, dropout_p=0.0,
                            training=True):
    """The unfused route for an NF4 base on CUDA (or under the interpreter): the base product by
    `NF4LinearFunction` (Triton dequant + torch.matmul, 0.5 byte read and 2 written per element of W)
    instead of the reference dequant, whose int64 index tensors take ~0.9 GB per 14336 x 4096
    projection, and the LoRA branch in torch on dropout(x), as PEFT's forward. Same values as
    `lora_linear_reference` (the dequant is bit-exact); autograd does the LoRA branch's backward."""
    nf4 = _nf4_weight(weight, quant_state)
    y = NF4LinearFunction.apply(x, nf4, bias)
    return y + _lora_branch(x, lora_a, lora_b, scaling, dropout_p, training)


def unfused_reason(x, weight, lora_a, lora_b, bias=None, quant_state=None, dropout_p=0.0,
                   training=True) -> str | None:
    """Why this call cannot take the fused path, and the route it takes instead (None: it can)."""
    why = _unfused_cause(x, weight, lora_a, lora_b, bias, quant_state, dropout_p, training)
    return None if why is None else f"{why}: {_ROUTES[unfused_route(x, quant_state)]}"


_ROUTES = {
    "dequantize": "the NF4 base by dequantize_nf4 (Triton) + torch.matmul, the LoRA branch in torch as PEFT's "
                  "forward (lora_linear_dequantized)",
    "reference": "reference path (pure torch)",
}


def unfused_route(x, quant_state=None) -> str:
    """Where an unfused call goes: "dequantize" (`lora_linear_dequantized`) for an NF4 base on CUDA
    or under the interpreter in a dtype the Triton dequant writes, else "reference"
    (`lora_linear_reference`: a dense base, FP4, other dtypes, CPU without the interpreter)."""
    nf4 = quant_state is not None and getattr(quant_state, "quant_type", "nf4") == "nf4"
    on_triton = x.device.type == "cuda" or interpreted()
    return "dequantize" if nf4 and on_triton and x.dtype in DTYPES else "reference"


def _unfused_cause(x, weight, lora_a, lora_b, bias, quant_state, dropout_p, training) -> str | None:
    if x.device.type != "cuda" and not interpreted():
        return f"tensors on {x.device.type}, not CUDA (and TRITON_INTERPRET unset)"
    if dropout_p and training:
        return f"lora_dropout={dropout_p} > 0 in training (dropout is not fused)"
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} is not fp16/bf16/fp32"
    if lora_a.shape[0] > MAX_FUSED_RANK:
        return f"r={lora_a.shape[0]} > {MAX_FUSED_RANK}"
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return "trainable base weight or bias (the fused backward gives them no gradient)"
    if quant_state is not None and getattr(quant_state, "quant_type", "nf4") != "nf4":
        return f"4-bit type {quant_state.quant_type!r} is not NF4"
    if quant_state is None and weight.dtype not in DTYPES:
        return f"base weight dtype {weight.dtype} is neither 16-bit nor fp32 nor NF4"
    return None


def lora_linear(x, weight, lora_a, lora_b, scaling, bias=None, quant_state=None, dropout_p=0.0, training=True):
    """y = x·Wᵀ + scaling·(dropout(x)·Aᵀ)·Bᵀ (+ bias), fused when it can be (see ``unfused_reason``).

    ``weight`` is the dense [N, K] weight, or the packed uint8 tensor of an NF4 weight with its
    bitsandbytes ``quant_state`` (or an NF4Weight). Gradients flow to x, lora_a and lora_b.
    """
    why = unfused_reason(x, weight, lora_a, lora_b, bias, quant_state, dropout_p, training)
    if why is not None:
        say_once(why)
        route = lora_linear_dequantized if unfused_route(x, quant_state) == "dequantize" else lora_linear_reference
        return route(x, weight, lora_a, lora_b, scaling, bias, quant_state, dropout_p, training)
    nf4 = None if quant_state is None else _nf4_weight(weight, quant_state)
    return lora_linear_fused(x, weight, lora_a, lora_b, scaling, bias, nf4)


def lora_scaling(alpha: float, r: int, rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r
