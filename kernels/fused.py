"""Fused LoRA ops for a transformer block's shared-input projections: Q/K/V as one op, the SwiGLU MLP
(gate, up, SwiGLU, down) as one op. These are what fastft installs in Unsloth's fused slots
(``self_attn.apply_qkv``, the MLP's ``forward``; see fastft/patch.py); the O projection is the
single-projection op, fastft.kernels.lora.lora_linear.

    from fastft.kernels.fused import Projection, lora_qkv, lora_mlp_swiglu
    q, k, v = lora_qkv(x, Projection(wq, aq, bq, sq, quant_state=qs_q), Projection(...), Projection(...))
    y = lora_mlp_swiglu(x, gate, up, down)          # down(silu(gate(x)) * up(x)), each a Projection

The math. x: [M, K] tokens; projection i has a frozen base W_i [N_i, K] (16-bit, or NF4 packed as
bitsandbytes stores it, with its quant_state), an adapter A_i [r_i, K], B_i [N_i, r_i] and s_i:

    QKV forward   XA  = x·[A_q; A_k; A_v]ᵀ             [M, Σr]  ONE thin product for the three adapters
                  Y_i = x·W_iᵀ (+ bias_i) + s_i·XA_i·B_iᵀ        per output; the LoRA term is added
                                                                 into Y_i in place (addmm_)
    QKV backward  G   = [s_q·dY_q·B_q, s_k·dY_k·B_k, s_v·dY_v·B_v]   [M, Σr]
                  dX  = Σ dY_i·W_i + G·[A_q; A_k; A_v]            ONE buffer: the first base product
                                                                 writes it, the rest accumulate (addmm_)
                  [dA_q; dA_k; dA_v] = Gᵀ·x                      ONE product, split by rows
                  dB_i = s_i·dY_iᵀ·XA_i

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

Base products: an NF4 W is dequantized by fastft.kernels.nf4.dequantize_nf4 (its Triton kernel) into
a reused buffer (``dequant_scratch``: one per weight shape, allocated once) and multiplied with
torch.matmul (cuBLAS on a GPU), as the issue's "dequantize + cuBLAS" default; the dense weight is
never saved for the backward: the backward dequantizes it again into the same buffer. A 16-bit W is
used as it is. The weights of one op are used one after another (each product finishes reading its
buffer before the next dequantize is ordered on the same stream), so they share slot 0.

Why no "SwiGLU in the epilogue": the base products are cuBLAS calls, which have no user epilogue, so
the SwiGLU runs as a separate fused elementwise Triton kernel (one read of g and u, one write of h;
backward: one read of dh, g, u and one write of h, dg, du). That is the honest equivalent here; an
epilogue needs the base product in Triton (fastft.kernels.lora's in-kernel path), which loses to
cuBLAS on an NF4 base until a GPU says otherwise.

Thin products (x·Aᵀ, dY·B, Gᵀ·x, dYᵀ·XA) are torch.matmul too (cuBLAS on a GPU): they are small
next to the base ones; whether fastft.kernels.lora's split-K thin kernel beats cuBLAS on them is a
GPU-suite question, not yet measured.

Precision: every product accumulates in fp32 (torch's default for fp16/bf16 matmuls) and rounds its
result to the compute dtype (x's dtype); the SwiGLU kernel computes in fp32 and rounds once. Gradients
of A and B come back in the adapter's dtypes. Dropout on the LoRA input is not fused (callers fall back
for lora_dropout > 0 in training), nor are DoRA, several adapters, or a trainable base weight.
CPU tensors without TRITON_INTERPRET=1 run the same ops with the torch SwiGLU (``swiglu_reference``)
and the torch NF4 reference dequant.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .nf4 import (
    NF4Weight,
    dequant_scratch,
    dequantize_nf4,
    dequantize_nf4_reference,
    interpreted,
)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
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
# Projections and base products
# --------------------------------------------------------------------------------------------------

@dataclass
class Projection:
    """One LoRA projection: y = x·Wᵀ (+ bias) + scaling·(x·Aᵀ)·Bᵀ.

    ``weight`` is the dense [N, K] weight, or the packed NF4 tensor with its bitsandbytes
    ``quant_state`` (or an NF4Weight as ``quant_state``); W and bias are frozen."""
    weight: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    quant_state: object = None
    bias: torch.Tensor | None = None

    def __post_init__(self):
        qs = self.quant_state
        self.nf4 = None
        if qs is not None:
            self.nf4 = qs if isinstance(qs, NF4Weight) else NF4Weight.from_quant_state(self.weight, qs)
            if self.nf4.quant_type != "nf4":
                raise ValueError(f"fused LoRA: 4-bit type {self.nf4.quant_type!r} is not NF4; "
                                 "quantize with quant_type='nf4' (or use PEFT's per-projection forward)")
            if len(self.nf4.shape) != 2:
                raise ValueError(f"fused LoRA: NF4 weight must be 2-D, got shape {self.nf4.shape}")
        self.out_features, self.in_features = self.shape
        r = self.lora_a.shape[0]
        if self.lora_a.shape != (r, self.in_features) or self.lora_b.shape != (self.out_features, r):
            raise ValueError(f"fused LoRA: adapter A {tuple(self.lora_a.shape)}, B {tuple(self.lora_b.shape)} "
                             f"do not fit a [{self.out_features}, {self.in_features}] weight")
        self.scaling = float(self.scaling)

    @property
    def shape(self) -> tuple:
        return tuple(self.nf4.shape) if self.nf4 is not None else tuple(self.weight.shape)

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """W in ``dtype``: an NF4 weight dequantized into the shared per-shape buffer (valid until the
        next dequantize of that shape); a 16-bit weight itself (cast if its dtype differs)."""
        if self.nf4 is not None:
            out = dequant_scratch(self.nf4.shape, dtype, self.nf4.packed.device)
            return dequantize_nf4(self.nf4, out=out, dtype=dtype)
        w = self.weight
        return w if w.dtype == dtype else w.to(dtype)

    def dense_reference(self, dtype: torch.dtype) -> torch.Tensor:
        if self.nf4 is not None:
            return dequantize_nf4_reference(self.nf4, dtype=dtype)
        return self.weight.to(dtype)


def _base_product(x2: torch.Tensor, p: Projection) -> torch.Tensor:
    """x·Wᵀ (+ bias) in x's dtype."""
    w = p.dense(x2.dtype)
    if p.bias is not None:
        return torch.addmm(p.bias.to(x2.dtype), x2, w.t())
    return x2 @ w.t()


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.is_contiguous() else x2.contiguous()


def _check(x: torch.Tensor, projs) -> None:
    if x.dtype not in _DTYPES:
        raise TypeError(f"fused LoRA: unsupported dtype {x.dtype}; use fp16, bf16 or fp32")
    for p in projs:
        if p.in_features != x.shape[-1]:
            raise ValueError(f"fused LoRA: x has {x.shape[-1]} features but a weight is {list(p.shape)}")
        if (p.nf4.packed if p.nf4 is not None else p.weight).device != x.device:
            raise ValueError(f"fused LoRA: weights must be on {x.device} like x")
        if p.weight.requires_grad or (p.bias is not None and p.bias.requires_grad):
            raise ValueError("fused LoRA: the base weight and bias must be frozen (requires_grad=False); "
                             "the fused backward gives them no gradient")


def _splits(ranks) -> list[tuple[int, int]]:
    out, lo = [], 0
    for r in ranks:
        out.append((lo, lo + r))
        lo += r
    return out


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------

# On the GPU machine Unsloth compiles every decoder block, so these ops run inside Dynamo. Each fused
# op is a torch.library custom op (forward, and backward as a second op) with a fake implementation
# and a registered autograd formula: one opaque node for Dynamo and AOTAutograd, no graph break.
# Custom ops take tensors and plain values, so projections travel flattened (`_op_args`): base
# weights (an NF4 weight as its bytes), A's, B's, biases, the NF4 fields and metadata, scalings.

_META = 8  # ints per projection in the flattened metadata: NF4 or not, then NF4Weight.op_args' seven


def _op_args(projs) -> dict:
    weights, nf4_tensors, meta = [], [], []
    for p in projs:
        if p.nf4 is not None:
            tensors, m = p.nf4.op_args()
            weights.append(p.nf4.packed)
            nf4_tensors += tensors
            meta += [1, *m]
        else:
            weights.append(p.weight)
            meta += [0] * _META
    return dict(weights=weights, lora_as=[p.lora_a for p in projs], lora_bs=[p.lora_b for p in projs],
                biases=[p.bias for p in projs], nf4_tensors=nf4_tensors, meta=meta,
                scalings=[p.scaling for p in projs])


def _projections(weights, lora_as, lora_bs, biases, nf4_tensors, meta, scalings) -> list[Projection]:
    """The Projections `_op_args` flattened (their checks ran when they were built)."""
    out, t = [], 0
    for i, w in enumerate(weights):
        m = meta[i * _META:(i + 1) * _META]
        nf4 = None
        if m[0]:
            nf4 = NF4Weight.from_op_args(nf4_tensors[t:t + 5], m[1:])
            t += 5
        out.append(Projection(w, lora_as[i], lora_bs[i], scalings[i], quant_state=nf4, bias=biases[i]))
    return out


def _out_features(weights, meta, i: int) -> int:
    return meta[i * _META + 1] if meta[i * _META] else weights[i].shape[0]


# --- Q/K/V: projections sharing one input ---------------------------------------------------------

@torch.library.custom_op("fastft::lora_projections", mutates_args=())
def _projections_op(x2: torch.Tensor, weights: list[torch.Tensor], lora_as: list[torch.Tensor],
                    lora_bs: list[torch.Tensor], biases: list[torch.Tensor | None], nf4_tensors: list[torch.Tensor],
                    meta: list[int], scalings: list[float]) -> list[torch.Tensor]:
    """[Y_1, ..., Y_n, XA] for 2-D contiguous x (XA = x·[A_1; ...]ᵀ, kept for the backward)."""
    projs = _projections(weights, lora_as, lora_bs, biases, nf4_tensors, meta, scalings)
    dtype = x2.dtype
    a_cat = torch.cat([p.lora_a.to(dtype) for p in projs])  # [Σr, K]
    xa = x2 @ a_cat.t()  # [M, Σr]: one thin product for all adapters
    outs = []
    for p, (lo, hi) in zip(projs, _splits(p.rank for p in projs)):
        y = _base_product(x2, p)
        outs.append(y.addmm_(xa[:, lo:hi], p.lora_b.to(dtype).t(), alpha=p.scaling))
    return [*outs, xa]


@_projections_op.register_fake
def _projections_fake(x2, weights, lora_as, lora_bs, biases, nf4_tensors, meta, scalings):
    M = x2.shape[0]
    return [*(x2.new_empty((M, _out_features(weights, meta, i))) for i in range(len(weights))),
            x2.new_empty((M, sum(a.shape[0] for a in lora_as)))]


@torch.library.custom_op("fastft::lora_projections_backward", mutates_args=())
def _projections_backward_op(dys: list[torch.Tensor | None], x2: torch.Tensor, xa: torch.Tensor,
                             weights: list[torch.Tensor], lora_as: list[torch.Tensor], lora_bs: list[torch.Tensor],
                             nf4_tensors: list[torch.Tensor], meta: list[int], scalings: list[float],
                             need: list[bool]) -> list[torch.Tensor]:
    """[dX, dA_1.., dB_1..] (need: x, then each A, then each B; a gradient not needed, or the dB of an
    output that took no part in the loss (its dY None), comes back empty)."""
    projs = _projections(weights, lora_as, lora_bs, [None] * len(weights), nf4_tensors, meta, scalings)
    n = len(projs)
    dtype, M = x2.dtype, x2.shape[0]
    need_x, need_a, need_b = need[0], need[1:1 + n], need[1 + n:]
    dx, parts, da, db = None, [], [None] * n, [None] * n
    for i, (p, (lo, hi)) in enumerate(zip(projs, _splits(p.rank for p in projs))):
        dy = dys[i]
        if dy is None:  # an output that took no part in the loss: no dB, a zero block in G
            parts.append(torch.zeros((M, p.rank), dtype=dtype, device=x2.device))
            continue
        dy2 = _rows(dy.to(dtype))
        parts.append((dy2 @ p.lora_b.to(dtype)).mul_(p.scaling))  # s_i·dY_i·B_i
        if need_b[i]:
            db[i] = (dy2.t() @ xa[:, lo:hi]).mul_(p.scaling).to(p.lora_b.dtype)
        if need_x:  # W re-dequantized into the shared buffer, never saved
            w = p.dense(dtype)
            dx = dy2 @ w if dx is None else dx.addmm_(dy2, w)
    g = torch.cat(parts, 1)  # [M, Σr]
    if need_x:
        a_cat = torch.cat([p.lora_a.to(dtype) for p in projs])
        dx = g @ a_cat if dx is None else dx.addmm_(g, a_cat)
    if any(need_a):
        da_cat = g.t() @ x2  # [Σr, K]: one product, split by rows
        for i, (lo, hi) in enumerate(_splits(p.rank for p in projs)):
            if need_a[i]:
                da[i] = da_cat[lo:hi].to(projs[i].lora_a.dtype, copy=True)  # an op's outputs never alias
    return [t if t is not None else x2.new_empty(0) for t in (dx, *da, *db)]


@_projections_backward_op.register_fake
def _projections_backward_fake(dys, x2, xa, weights, lora_as, lora_bs, nf4_tensors, meta, scalings, need):
    n = len(weights)
    dx = x2.new_empty(x2.shape if need[0] else (0,))
    da = [a.new_empty(a.shape) if need[1 + i] else x2.new_empty(0) for i, a in enumerate(lora_as)]
    db = [b.new_empty(b.shape) if need[1 + n + i] and dys[i] is not None else x2.new_empty(0)
          for i, b in enumerate(lora_bs)]
    return [dx, *da, *db]


def _projections_setup(ctx, inputs, output):
    x2, weights, lora_as, lora_bs, biases, nf4_tensors, meta, scalings = inputs
    n = len(weights)
    ctx.save_for_backward(x2, output[n], *weights, *lora_as, *lora_bs, *nf4_tensors)
    ctx.n, ctx.n_nf4, ctx.meta, ctx.scalings = n, len(nf4_tensors), list(meta), list(scalings)
    ctx.mark_non_differentiable(output[n])
    ctx.set_materialize_grads(False)  # an output outside the loss arrives as None: skipped


def _projections_grad(ctx, grads):
    x2, xa, *rest = ctx.saved_tensors
    n = ctx.n
    weights, lora_as, lora_bs, nf4_tensors = rest[:n], rest[n:2 * n], rest[2 * n:3 * n], rest[3 * n:]
    needs = ctx.needs_input_grad  # one entry per argument, a list of them for a list of tensors
    need = [needs[0], *needs[2], *needs[3]]
    got = _projections_backward_op(list(grads[:n]), x2, xa, list(weights), list(lora_as), list(lora_bs),
                                   list(nf4_tensors), ctx.meta, ctx.scalings, need)
    keep = [need[i] and (i <= n or grads[i - n - 1] is not None) for i in range(1 + 2 * n)]
    out = [g if k else None for g, k in zip(got, keep)]
    dx, da, db = out[0], out[1:1 + n], out[1 + n:]
    # the arguments' structure: a list of tensors takes a list, an optional-tensor list or a value one None
    return dx, [None] * n, da, db, None, [None] * ctx.n_nf4, None, None


_projections_op.register_autograd(_projections_grad, setup_context=_projections_setup)


# --- the SwiGLU MLP ---------------------------------------------------------------------------------

@torch.library.custom_op("fastft::lora_mlp_swiglu", mutates_args=())
def _mlp_op(x2: torch.Tensor, weights: list[torch.Tensor], lora_as: list[torch.Tensor], lora_bs: list[torch.Tensor],
            nf4_tensors: list[torch.Tensor], meta: list[int], scalings: list[float]) -> list[torch.Tensor]:
    """[y, XA, g, u, HA] for 2-D contiguous x: the output, then what the backward needs (h is not
    kept: the backward recomputes it from g and u)."""
    gate, up, down = _projections(weights, lora_as, lora_bs, [None] * 3, nf4_tensors, meta, scalings)
    dtype = x2.dtype
    a_gu = torch.cat([gate.lora_a.to(dtype), up.lora_a.to(dtype)])
    xa = x2 @ a_gu.t()  # [M, r_g + r_u]: one thin product for gate and up
    (g_lo, g_hi), (u_lo, u_hi) = _splits((gate.rank, up.rank))
    g = _base_product(x2, gate).addmm_(xa[:, g_lo:g_hi], gate.lora_b.to(dtype).t(), alpha=gate.scaling)
    u = _base_product(x2, up).addmm_(xa[:, u_lo:u_hi], up.lora_b.to(dtype).t(), alpha=up.scaling)
    h = swiglu_forward(g, u)
    ha = h @ down.lora_a.to(dtype).t()  # [M, r_d]
    y = _base_product(h, down).addmm_(ha, down.lora_b.to(dtype).t(), alpha=down.scaling)
    return [y, xa, g, u, ha]


@_mlp_op.register_fake
def _mlp_fake(x2, weights, lora_as, lora_bs, nf4_tensors, meta, scalings):
    M = x2.shape[0]
    n_inter = _out_features(weights, meta, 0)
    return [x2.new_empty((M, _out_features(weights, meta, 2))),
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
    gate, up, down = _projections(weights, lora_as, lora_bs, [None] * 3, nf4_tensors, meta, scalings)
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
    (g_lo, g_hi), (u_lo, u_hi) = _splits((gate.rank, up.rank))
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
    dy2 = _rows(grads[0].to(x2.dtype))
    got = _mlp_backward_op(dy2, x2, xa, g, u, ha, list(weights), list(lora_as), list(lora_bs), list(nf4_tensors),
                           ctx.meta, ctx.scalings, need)
    out = [t if n else None for t, n in zip(got, need)]
    return out[0], [None] * 3, out[1:4], out[4:7], [None] * ctx.n_nf4, None, None


_mlp_op.register_autograd(_mlp_grad, setup_context=_mlp_setup)


# --------------------------------------------------------------------------------------------------
# Entry points and references
# --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _no_autocast(x: torch.Tensor):
    """Under autocast: x cast to the autocast dtype once, and autocast off inside the op (its in-place
    accumulations, addmm_, are not autocast and need every product in one dtype)."""
    kind = x.device.type
    if not torch.is_autocast_enabled(kind):
        yield x
        return
    x = x.to(torch.get_autocast_dtype(kind))
    with torch.autocast(kind, enabled=False):
        yield x


def lora_projections(x: torch.Tensor, *projs: Projection) -> tuple:
    """Y_i = x·W_iᵀ (+ bias_i) + s_i·(x·A_iᵀ)·B_iᵀ for projections sharing the input x, fused: one thin
    product for all adapters forward, one dX buffer backward. Outputs in x's dtype."""
    if not projs:
        raise ValueError("lora_projections: no projections given")
    _check(x, projs)
    with _no_autocast(x) as xc:
        outs = _projections_op(_rows(xc), **_op_args(projs))
    return tuple(y.reshape(*x.shape[:-1], y.shape[-1]) for y in outs[:-1])


def lora_qkv(x: torch.Tensor, q: Projection, k: Projection, v: Projection) -> tuple:
    """(Q, K, V) of an attention block from one fused op (see ``lora_projections``)."""
    return lora_projections(x, q, k, v)


def lora_mlp_swiglu(x: torch.Tensor, gate: Projection, up: Projection, down: Projection) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)), each a LoRA projection, as one fused op. Gate and up must have no
    bias (a Llama-style MLP); the output is in x's dtype."""
    _check(x, (gate, up))
    if gate.shape != up.shape:
        raise ValueError(f"lora_mlp_swiglu: gate {list(gate.shape)} and up {list(up.shape)} differ")
    if down.in_features != gate.out_features:
        raise ValueError(f"lora_mlp_swiglu: down takes {down.in_features} features but gate gives {gate.out_features}")
    if any(p.bias is not None for p in (gate, up, down)):
        raise ValueError("lora_mlp_swiglu: biased gate/up/down projections are not fused; use the per-projection path")
    _check(x.new_empty(0, down.in_features), (down,))  # down's device and frozen weight
    args = _op_args((gate, up, down))
    del args["biases"]
    with _no_autocast(x) as xc:
        y = _mlp_op(_rows(xc), **args)[0]
    return y.reshape(*x.shape[:-1], y.shape[-1])


def projection_reference(x: torch.Tensor, p: Projection) -> torch.Tensor:
    """One projection in plain torch (autograd does the backward)."""
    dtype = x.dtype
    y = F.linear(x, p.dense_reference(dtype), None if p.bias is None else p.bias.to(dtype))
    return y + p.scaling * F.linear(F.linear(x, p.lora_a.to(dtype)), p.lora_b.to(dtype))


def lora_projections_reference(x: torch.Tensor, *projs: Projection) -> tuple:
    return tuple(projection_reference(x, p) for p in projs)


def lora_mlp_swiglu_reference(x: torch.Tensor, gate: Projection, up: Projection, down: Projection) -> torch.Tensor:
    return projection_reference(swiglu_reference(projection_reference(x, gate), projection_reference(x, up)), down)
