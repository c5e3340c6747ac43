"""Fused LoRA ops for projections that share one input: Q/K/V as one op (any number of projections:
`lora_projections`), and `Projection`, the one-projection description every fused op takes (the SwiGLU
MLP op, fastft.kernels.fused_mlp, is built on it). These ops are what fastft installs in Unsloth's
fused slots (``self_attn.apply_qkv``; see fastft/models/patch.py); the O projection is the single-projection
op, fastft.kernels.lora.lora_linear.

    from fastft.kernels.fused import Projection, lora_qkv
    q, k, v = lora_qkv(x, Projection(wq, aq, bq, sq, quant_state=qs_q), Projection(...), Projection(...))

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

Base products: an NF4 W is dequantized by fastft.kernels.nf4.dequantize_nf4 (its Triton kernel) into
a reused buffer (``dequant_scratch``: one per weight shape, allocated once) and multiplied with
torch.matmul (cuBLAS on a GPU), the same dequantize + cuBLAS route as fastft.kernels.lora's default
NF4 path: the dense weight is never saved for the backward, which dequantizes it again into the same
buffer. A 16-bit W is used as it is. The weights of one op are used one after another (each product
finishes reading its buffer before the next dequantize is ordered on the same stream), so they share
slot 0.

Thin products (x·Aᵀ, dY·B, Gᵀ·x, dYᵀ·XA) are torch.matmul too (cuBLAS on a GPU): they are small
next to the base ones (r columns against thousands), so one matmul library for every product keeps
the op simple; fastft.kernels.lora's split-K thin kernel is the alternative for them.

Precision: every product accumulates in fp32 (torch's default for fp16/bf16 matmuls) and rounds its
result to the compute dtype (x's dtype). Gradients of A and B come back in the adapter's dtypes.
Dropout on the LoRA input is not fused (callers fall back for lora_dropout > 0 in training), nor are
DoRA, several adapters, or a trainable base weight. CPU tensors without TRITON_INTERPRET=1 run the
same ops with the torch NF4 reference dequant.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .nf4 import dequant_scratch, dequantize_nf4
from .nf4_format import NF4Weight, dequantize_nf4_reference

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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


def base_product(x2: torch.Tensor, p: Projection) -> torch.Tensor:
    """x·Wᵀ (+ bias) in x's dtype."""
    w = p.dense(x2.dtype)
    if p.bias is not None:
        return torch.addmm(p.bias.to(x2.dtype), x2, w.t())
    return x2 @ w.t()


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous 2-D [tokens, features] tensor (a view when it already is one)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.is_contiguous() else x2.contiguous()


def check_inputs(x: torch.Tensor, projs) -> None:
    """x's dtype and every projection's features, device and frozen base, with the fix in each error."""
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


def rank_splits(ranks) -> list[tuple[int, int]]:
    """The [lo, hi) columns of each adapter in a concatenation of adapters with these ranks."""
    out, lo = [], 0
    for r in ranks:
        out.append((lo, lo + r))
        lo += r
    return out


# --------------------------------------------------------------------------------------------------
# Custom ops and their autograd
# --------------------------------------------------------------------------------------------------

# Unsloth compiles every decoder block on torch >= 2.11 + CUDA, so these ops run inside Dynamo. Each fused
# op is a torch.library custom op (forward, and backward as a second op) with a fake implementation
# and a registered autograd formula: one opaque node for Dynamo and AOTAutograd, no graph break.
# Custom ops take tensors and plain values, so projections travel flattened (`op_args`): base
# weights (an NF4 weight as its bytes), A's, B's, biases, the NF4 fields and metadata, scalings.

_META = 8  # ints per projection in the flattened metadata: NF4 or not, then NF4Weight.op_args' seven


def op_args(projs) -> dict:
    """Projections flattened into a fused op's keyword arguments (the inverse: `from_op_args`)."""
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


def from_op_args(weights, lora_as, lora_bs, biases, nf4_tensors, meta, scalings) -> list[Projection]:
    """The Projections `op_args` flattened (their checks ran when they were built)."""
    out, t = [], 0
    for i, w in enumerate(weights):
        m = meta[i * _META:(i + 1) * _META]
        nf4 = None
        if m[0]:
            nf4 = NF4Weight.from_op_args(nf4_tensors[t:t + 5], m[1:])
            t += 5
        out.append(Projection(w, lora_as[i], lora_bs[i], scalings[i], quant_state=nf4, bias=biases[i]))
    return out


def out_features(weights, meta, i: int) -> int:
    """Output features of the i-th flattened projection, from its metadata (a fake op has no NF4Weight)."""
    return meta[i * _META + 1] if meta[i * _META] else weights[i].shape[0]


# --- Q/K/V: projections sharing one input ---------------------------------------------------------

@torch.library.custom_op("fastft::lora_projections", mutates_args=())
def _projections_op(x2: torch.Tensor, weights: list[torch.Tensor], lora_as: list[torch.Tensor],
                    lora_bs: list[torch.Tensor], biases: list[torch.Tensor | None], nf4_tensors: list[torch.Tensor],
                    meta: list[int], scalings: list[float]) -> list[torch.Tensor]:
    """[Y_1, ..., Y_n, XA] for 2-D contiguous x (XA = x·[A_1; ...]ᵀ, kept for the backward)."""
    projs = from_op_args(weights, lora_as, lora_bs, biases, nf4_tensors, meta, scalings)
    dtype = x2.dtype
    a_cat = torch.cat([p.lora_a.to(dtype) for p in projs])  # [Σr, K]
    xa = x2 @ a_cat.t()  # [M, Σr]: one thin product for all adapters
    outs = []
    for p, (lo, hi) in zip(projs, rank_splits(p.rank for p in projs)):
        y = base_product(x2, p)
        outs.append(y.addmm_(xa[:, lo:hi], p.lora_b.to(dtype).t(), alpha=p.scaling))
    return [*outs, xa]


@_projections_op.register_fake
def _projections_fake(x2, weights, lora_as, lora_bs, biases, nf4_tensors, meta, scalings):
    M = x2.shape[0]
    return [*(x2.new_empty((M, out_features(weights, meta, i))) for i in range(len(weights))),
            x2.new_empty((M, sum(a.shape[0] for a in lora_as)))]


@torch.library.custom_op("fastft::lora_projections_backward", mutates_args=())
def _projections_backward_op(dys: list[torch.Tensor | None], x2: torch.Tensor, xa: torch.Tensor,
                             weights: list[torch.Tensor], lora_as: list[torch.Tensor], lora_bs: list[torch.Tensor],
                             nf4_tensors: list[torch.Tensor], meta: list[int], scalings: list[float],
                             need: list[bool]) -> list[torch.Tensor]:
    """[dX, dA_1.., dB_1..] (need: x, then each A, then each B; a gradient not needed, or the dB of an
    output that took no part in the loss (its dY None), comes back empty)."""
    projs = from_op_args(weights, lora_as, lora_bs, [None] * len(weights), nf4_tensors, meta, scalings)
    n = len(projs)
    dtype, M = x2.dtype, x2.shape[0]
    need_x, need_a, need_b = need[0], need[1:1 + n], need[1 + n:]
    dx, parts, da, db = None, [], [None] * n, [None] * n
    for i, (p, (lo, hi)) in enumerate(zip(projs, rank_splits(p.rank for p in projs))):
        dy = dys[i]
        if dy is None:  # an output that took no part in the loss: no dB, a zero block in G
            parts.append(torch.zeros((M, p.rank), dtype=dtype, device=x2.device))
            continue
        dy2 = as_rows(dy.to(dtype))
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
        for i, (lo, hi) in enumerate(rank_splits(p.rank for p in projs)):
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


# --------------------------------------------------------------------------------------------------
# Entry points and references
# --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def no_autocast(x: torch.Tensor):
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
    check_inputs(x, projs)
    with no_autocast(x) as xc:
        outs = _projections_op(as_rows(xc), **op_args(projs))
    return tuple(y.reshape(*x.shape[:-1], y.shape[-1]) for y in outs[:-1])


def lora_qkv(x: torch.Tensor, q: Projection, k: Projection, v: Projection) -> tuple:
    """(Q, K, V) of an attention block from one fused op (see ``lora_projections``)."""
    return lora_projections(x, q, k, v)


def projection_reference(x: torch.Tensor, p: Projection) -> torch.Tensor:
    """One projection in plain torch (autograd does the backward)."""
    dtype = x.dtype
    y = F.linear(x, p.dense_reference(dtype), None if p.bias is None else p.bias.to(dtype))
    return y + p.scaling * F.linear(F.linear(x, p.lora_a.to(dtype)), p.lora_b.to(dtype))


def lora_projections_reference(x: torch.Tensor, *projs: Projection) -> tuple:
    return tuple(projection_reference(x, p) for p in projs)
