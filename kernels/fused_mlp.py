"""The fused LoRA SwiGLU MLP: gate, up, SwiGLU and down as one op, and its Triton SwiGLU kernels. It is
what fastft installs in Unsloth's fused MLP slots (the MLP's ``forward``, the tiled ``_unsloth_forward``;
see fastft/models/patch.py). Each projection is a fastft.kernels.fused.Projection.

    from fastft.kernels.fused import Projection
    from fastft.kernels.fused_mlp import lora_mlp_swiglu
    y = lora_mlp_swiglu(x, gate, up, down)          # down(silu(gate(x)) * up(x)), each a Projection

The math. x: [M, K] tokens; gate, up and down each have a frozen base W (16-bit or NF4), an adapter
A, B and a scaling s (fastft.kernels.fused's notation):

    MLP forward   XA = x·[A_g; A_u]ᵀ                    ONE thin product for gate and up
                  g  = x·W_gᵀ + s_g·XA_g·B_gᵀ,  u = x·W_uᵀ + s_u·XA_u·B_uᵀ
                  h  = silu(g)·u                        Triton elementwise kernel (fp32 math)
                  HA = h·A_dᵀ,  y = h·W_dᵀ + s_d·HA·B_dᵀ
    MLP backward  dh = dY·W_d + s_d·(dY·B_d)·A_d
                  h, dg, du = SwiGLU backward(dh, g, u)  one Triton kernel: h is recomputed from the
                                                         saved g and u (never stored), both input
                                                         gradients come out of the same pass, and all
                                                         three overwrite dh, g, u (no allocation)
                  dA_d = s_d·(dY·B_d)ᵀ·h,  dB_d = s_d·dYᵀ·HA
                  dX = dg·W_g + du·W_u + [s_g·dg·B_g, s_u·du·B_u]·[A_g; A_u]   ONE buffer
                  [dA_g; dA_u] = [s_g·dg·B_g, s_u·du·B_u]ᵀ·x,  dB_g = s_g·dgᵀ·XA_g, dB_u = s_u·duᵀ·XA_u

Base products, thin products and precision are as in fastft.kernels.fused: an NF4 W dequantized by
fastft.kernels.nf4 into the shared per-shape buffer and multiplied by torch.matmul (cuBLAS on a GPU),
never saved for the backward; fp32 accumulation, results rounded to x's dtype. The SwiGLU kernels
compute in fp32 and round once.

Why no "SwiGLU in the epilogue": the base products are cuBLAS calls, which have no user epilogue, so
the SwiGLU runs as a separate fused elementwise Triton kernel (one read of g and u, one write of h;
backward: one read of dh, g, u and one write of h, dg, du). An epilogue needs the base product in
Triton (fastft.kernels.lora's in-kernel path); these ops run every base product as dequantize +
cuBLAS, the route fastft.kernels.lora takes by default (NF4_PATH), so the SwiGLU is a kernel of its own.

CPU tensors without TRITON_INTERPRET=1 run the same op with the torch SwiGLU (``swiglu_reference``)
and the torch NF4 reference dequant.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .fused import (
    Projection,
    as_rows,
    base_product,
    check_inputs,
    from_op_args,
    no_autocast,
    op_args,
    out_features,
    projection_reference,
    rank_splits,
)
from .nf4_format import interpreted

# Elements per program of the SwiGLU kernels: 1024 with 4 warps is 8 elements (16 bytes of bf16) per
# thread per tensor; the interpreter pays per program, so it takes larger blocks.
SWIGLU_BLOCK = 1024
SWIGLU_WARPS = 4
INTERPRETER_SWIGLU_BLOCK = 4096


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------

@triton.jit
def _swiglu_forward_kernel(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
    # h = silu(g) * u = g * sigmoid(g) * u, in fp32, rounded once to h's dtype
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    tl.store(h_ptr + offs, (g * sig * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(dh_ptr, g_ptr, u_ptr, h_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    # recompute h (the down projection's dA needs it) and both input gradients from dh, g, u:
    #   du = dh * silu(g),   dg = dh * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sig
    tl.store(h_ptr + offs, (silu * u).to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, (dh * silu).to(du_ptr.dtype.element_ty), mask=mask)
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------

def _triton_ok(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" or interpreted()


def swiglu_launch_args(*tensors, interpreted_run: bool | None = None) -> tuple[tuple, list, dict]:
    """(grid, args, kwargs) of one SwiGLU kernel launch over ``tensors`` (forward: g, u, h; backward:
    dh, g, u, h, dg, du). tests/kernel_specs.py derives the compile specs from it, so CI compiles
    what the JIT builds."""
    n = tensors[0].numel()
    block = INTERPRETER_SWIGLU_BLOCK if (interpreted() if interpreted_run is None else interpreted_run) \
        else SWIGLU_BLOCK
    return (triton.cdiv(n, block),), [*tensors, n], {"BLOCK": block, "num_warps": SWIGLU_WARPS}


def _swiglu_launch(kernel, *tensors):
    if tensors[0].numel() == 0:
        return
    grid, args, kwargs = swiglu_launch_args(*tensors)
    kernel[grid](*args, **kwargs)


def _check_pair(g: torch.Tensor, u: torch.Tensor) -> None:
    if g.shape != u.shape or g.dtype != u.dtype or g.device != u.device:
        raise ValueError(f"swiglu: gate and up must match in shape, dtype and device, got "
                         f"{tuple(g.shape)} {g.dtype} {g.device} and {tuple(u.shape)} {u.dtype} {u.device}")
    if not (g.is_contiguous() and u.is_contiguous()):
        raise ValueError("swiglu: gate and up must be contiguous; call .contiguous()")


def swiglu_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """h = silu(g) * u (Triton on CUDA / under the interpreter, else the torch reference)."""
    _check_pair(g, u)
    if not _triton_ok(g):
        return swiglu_reference(g, u)
    h = torch.empty_like(g)
    _swiglu_launch(_swiglu_forward_kernel, g, u, h)
    return h


def swiglu_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, inplace: bool = False):
    """(h, dg, du) from the upstream gradient dh and the saved g, u; h recomputed.

    ``inplace``: write h over dh, dg over g and du over u (each element is read before the same
    program writes it), so the backward allocates nothing: 3·M·I elements fewer at the MLP's peak.
    The fused MLP's backward does this with buffers only it holds."""
    _check_pair(g, u)
    if dh.shape != g.shape:
        raise ValueError(f"swiglu_backward: dh {tuple(dh.shape)} and g {tuple(g.shape)} differ")
    if dh.dtype != g.dtype or not dh.is_contiguous():
        if inplace:
            raise ValueError("swiglu_backward(inplace=True): dh must be contiguous and in g's dtype")
        dh = dh.to(g.dtype).contiguous()
    if not _triton_ok(g):
        with torch.enable_grad():
            g_, u_ = g.detach().requires_grad_(), u.detach().requires_grad_()
            h = swiglu_reference(g_, u_)
            dg, du = torch.autograd.grad(h, (g_, u_), dh)
        if inplace:
            return dh.copy_(h), g.copy_(dg), u.copy_(du)
        return h.detach(), dg, du
    if inplace:
        h, dg, du = dh, g, u
    else:
        h, dg, du = torch.empty_like(g), torch.empty_like(g), torch.empty_like(g)
    _swiglu_launch(_swiglu_backward_kernel, dh, g, u, h, dg, du)
    return h, dg, du


def swiglu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u as HF's LlamaMLP computes it (torch ops, autograd-able)."""
    return F.silu(g) * u


# --------------------------------------------------------------------------------------------------
# The custom ops and their autograd
# --------------------------------------------------------------------------------------------------

# One op forward, one backward (see fastft.kernels.fused for why custom ops); projections travel
# flattened by fastft.kernels.fused.op_args.

@torch.library.custom_op("fastft::lora_mlp_swiglu", mutates_args=())
def _mlp_op(x2: torch.Tensor, weights: list[torch.Tensor], lora_as: list[torch.Tensor], lora_bs: list[torch.Tensor],
            nf4_tensors: list[torch.Tensor], meta: list[int], scalings: list[float]) -> list[torch.Tensor]:
    """[y, XA, g, u, HA] for 2-D contiguous x: the output, then what the backward needs (h is not
    kept: the backward recomputes it from g and u)."""
    gate, up, down = from_op_args(weights, lora_as, lora_bs, [None] * 3, nf4_tensors, meta, scalings)
    dtype = x2.dtype
    a_gu = torch.cat([gate.lora_a.to(dtype), up.lora_a.to(dtype)])
    xa = x2 @ a_gu.t()  # [M, r_g + r_u]: one thin product for gate and up
    (g_lo, g_hi), (u_lo, u_hi) = rank_splits((gate.rank, up.rank))
    g = base_product(x2, gate).addmm_(xa[:, g_lo:g_hi], gate.lora_b.to(dtype).t(), alpha=gate.scaling)
    u = base_product(x2, up).addmm_(xa[:, u_lo:u_hi], up.lora_b.to(dtype).t(), alpha=up.scaling)
    h = swiglu_forward(g, u)
    ha = h @ down.lora_a.to(dtype).t()  # [M, r_d]
    y = base_product(h, down).addmm_(ha, down.lora_b.to(dtype).t(), alpha=down.scaling)
    return [y, xa, g, u, ha]


@_mlp_op.register_fake
def _mlp_fake(x2, weights, lora_as, lora_bs, nf4_tensors, meta, scalings):
    M = x2.shape[0]
    n_inter = out_features(weights, meta, 0)
    return [x2.new_empty((M, out_features(weights, meta, 2))),
            x2.new_empty((M, lora_as[0].shape[0] + lora_as[1].shape[0])),
            x2.new_empty((M, n_inter)), x2.new_empty((M, n_inter)), x2.new_empty((M, lora_as[2].shape[0]))]


_SEVEN_TENSORS = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                      torch.Tensor]


# g and u are this op's saved buffers; the backward overwrites them with dg and du (no allocation)
@torch.library.custom_op("fastft::lora_mlp_swiglu_backward", mutates_args=("g", "u"))
def _mlp_backward_op(dy2: torch.Tensor, x2: torch.Tensor, xa: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
                     ha: torch.Tensor, weights: list[torch.Tensor], lora_as: list[torch.Tensor],
                     lora_bs: list[torch.Tensor], nf4_tensors: list[torch.Tensor], meta: list[int],
                     scalings: list[float], need: list[bool]) -> _SEVEN_TENSORS:
    """(dX, dA_g, dA_u, dA_d, dB_g, dB_u, dB_d) (need in that order; one not needed comes back empty).
    A fixed tuple, not a list: functionalization (AOTAutograd, Inductor) handles an op that mutates
    its arguments only when each return is a plain Tensor."""
    gate, up, down = from_op_args(weights, lora_as, lora_bs, [None] * 3, nf4_tensors, meta, scalings)
    a_g, a_u, a_d = lora_as
    b_g, b_u, b_d = lora_bs
    dtype = x2.dtype
    need_x, *need = need
    dyb = (dy2 @ b_d.to(dtype)).mul_(down.scaling)  # s_d·dY·B_d
    dh = (dy2 @ down.dense(dtype)).addmm_(dyb, a_d.to(dtype))
    h, dg, du = swiglu_backward(dh, g, u, inplace=True)  # h over dh, dg over g, du over u
    grads = [None] * 6  # a_g, a_u, a_d, b_g, b_u, b_d
    if need[2]:
        grads[2] = (dyb.t() @ h).to(a_d.dtype)
    if need[5]:
        grads[5] = (dy2.t() @ ha).mul_(down.scaling).to(b_d.dtype)
    del h
    (g_lo, g_hi), (u_lo, u_hi) = rank_splits((gate.rank, up.rank))
    gu = torch.cat([(dg @ b_g.to(dtype)).mul_(gate.scaling), (du @ b_u.to(dtype)).mul_(up.scaling)], 1)
    if need[3]:
        grads[3] = (dg.t() @ xa[:, g_lo:g_hi]).mul_(gate.scaling).to(b_g.dtype)
    if need[4]:
        grads[4] = (du.t() @ xa[:, u_lo:u_hi]).mul_(up.scaling).to(b_u.dtype)
    dx = None
    if need_x:  # one buffer: dg·W_g, then += du·W_u, then += the LoRA terms of both
        dx = dg @ gate.dense(dtype)
        dx.addmm_(du, up.dense(dtype))
        dx.addmm_(gu, torch.cat([a_g.to(dtype), a_u.to(dtype)]))
    if need[0] or need[1]:
        da = gu.t() @ x2  # [r_g + r_u, K]
        grads[0] = da[g_lo:g_hi].to(a_g.dtype, copy=True) if need[0] else None  # an op's outputs never alias
        grads[1] = da[u_lo:u_hi].to(a_u.dtype, copy=True) if need[1] else None
    return tuple(t if t is not None else x2.new_empty(0) for t in (dx, *grads))


@_mlp_backward_op.register_fake
def _mlp_backward_fake(dy2, x2, xa, g, u, ha, weights, lora_as, lora_bs, nf4_tensors, meta, scalings, need):
    factors = [*lora_as, *lora_bs]
    return (x2.new_empty(x2.shape if need[0] else (0,)),
            *(f.new_empty(f.shape) if n else x2.new_empty(0) for f, n in zip(factors, need[1:])))


def _mlp_setup(ctx, inputs, output):
    x2, weights, lora_as, lora_bs, nf4_tensors, meta, scalings = inputs
    _y, xa, g, u, ha = output
    ctx.save_for_backward(x2, xa, g, u, ha, *weights, *lora_as, *lora_bs, *nf4_tensors)
    ctx.n_nf4, ctx.meta, ctx.scalings, ctx.backward_done = len(nf4_tensors), list(meta), list(scalings), False
    ctx.mark_non_differentiable(xa, g, u, ha)


def _mlp_grad(ctx, grads):
    if ctx.backward_done:
        raise RuntimeError("fastft.kernels.fused: the fused MLP's backward reuses its saved buffers, so it "
                           "runs once per forward; backward through it again (retain_graph=True) is not "
                           "supported: run the forward again, or use the per-projection path")
    ctx.backward_done = True
    x2, xa, g, u, ha, *rest = ctx.saved_tensors
    weights, lora_as, lora_bs, nf4_tensors = rest[:3], rest[3:6], rest[6:9], rest[9:]
    needs = ctx.needs_input_grad  # one entry per argument, a list of them for a list of tensors
    need = [needs[0], *needs[2], *needs[3]]
    dy2 = as_rows(grads[0].to(x2.dtype))
    got = _mlp_backward_op(dy2, x2, xa, g, u, ha, list(weights), list(lora_as), list(lora_bs), list(nf4_tensors),
                           ctx.meta, ctx.scalings, need)
    out = [t if n else None for t, n in zip(got, need)]
    return out[0], [None] * 3, out[1:4], out[4:7], [None] * ctx.n_nf4, None, None


_mlp_op.register_autograd(_mlp_grad, setup_context=_mlp_setup)


# --------------------------------------------------------------------------------------------------
# Entry point and reference
# --------------------------------------------------------------------------------------------------

def lora_mlp_swiglu(x: torch.Tensor, gate: Projection, up: Projection, down: Projection) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)), each a LoRA projection, as one fused op. Gate and up must have no
    bias (a Llama-style MLP); the output is in x's dtype."""
    check_inputs(x, (gate, up))
    if gate.shape != up.shape:
        raise ValueError(f"lora_mlp_swiglu: gate {list(gate.shape)} and up {list(up.shape)} differ")
    if down.in_features != gate.out_features:
        raise ValueError(f"lora_mlp_swiglu: down takes {down.in_features} features but gate gives {gate.out_features}")
    if any(p.bias is not None for p in (gate, up, down)):
        raise ValueError("lora_mlp_swiglu: biased gate/up/down projections are not fused; use the per-projection path")
    check_inputs(x.new_empty(0, down.in_features), (down,))  # down's device and frozen weight
    args = op_args((gate, up, down))
    del args["biases"]
    with no_autocast(x) as xc:
        y = _mlp_op(as_rows(xc), **args)[0]
    return y.reshape(*x.shape[:-1], y.shape[-1])


def lora_mlp_swiglu_reference(x: torch.Tensor, gate: Projection, up: Projection, down: Projection) -> torch.Tensor:
    return projection_reference(swiglu_reference(projection_reference(x, gate), projection_reference(x, up)), down)
