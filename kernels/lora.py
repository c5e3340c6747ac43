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

``_lora_matmul_kernel`` computes C = alpha·(P·Q) (+ scale·(L·R)) (+ bias), with P and Q read through
strides (so transposes cost nothing; every index·stride product is 64-bit), an optional NF4 Q
dequantized tile by tile inside the K loop, an optional low-rank epilogue L·R, and an optional split
of the reduction into fp32 partial sums. The thin products (x·Aᵀ, dY·B: N = r) and the dA / dB
reductions split their reduction so that a launch has at least WAVES programs per SM
(`split_count`; at M = 4096 on 132 SMs x·Aᵀ runs 64 row tiles x 5 splits). Accumulation is fp32;
fp32 inputs use IEEE fp32 dots (no TF32), matching torch's default for matmul.

NF4 (the format, its parsing into `NF4Weight`, the reference dequant and the tile decoder `nf4_tile`
all come from fastft.kernels.nf4): flat index i of the dense row-major [N, K] weight lives in byte
i // 2 (high nibble first), block i // blocksize; value = code[nibble] * absmax[block], and with
double quantization absmax[block] = code2[absmax_u8[block]] * absmax2[block // blocksize2] + offset,
each step rounded to fp32 separately (the launch disables FMA contraction, as bitsandbytes' own
dequant does two roundings), then the value rounds to the compute dtype. The in_kernel path decodes
W by rows (`nf4_rows`: one contiguous packed load per row of W and K step, one scale per absmax
block, codes from constants in registers) when W's rows start on absmax block boundaries
(in_features % blocksize == 0, every Llama shape), element by element (`nf4_tile`) otherwise.

The layer is the torch.library custom op ``fastft::lora_linear`` (backward: ``fastft::lora_linear_backward``)
with a registered autograd formula and a fake (shape-only) implementation, so torch.compile traces it
as one node, without a graph break.

Launch configs (CONFIGS) are picked by shape; before a CUDA launch the compiled kernel's shared memory
is checked against the device's per-block maximum, and a config over it gives way to a smaller one
(SMALLER, `fit_config`) or, when none fits, to a ValueError naming the need, the limit and the fix.

Not fused (said once, with the route taken): lora_dropout > 0 in training, a trainable base weight or
bias, r > MAX_FUSED_RANK, dtypes other than fp16/bf16/fp32, non-NF4 4-bit, and tensors that are not
on a CUDA device (unless TRITON_INTERPRET=1, the CPU interpreter). An NF4 base on CUDA (or under the
interpreter) then takes `lora_linear_dequantized`: fastft's Triton `dequantize_nf4` + torch.matmul for
the base product and the LoRA branch in torch on dropout(x), as PEFT's forward; everything else (a
16-bit base, FP4, other dtypes, CPU) the pure-torch `lora_linear_reference`.
"""
from __future__ import annotations

import functools
import logging
import math
import os

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
    nf4_rows,
    nf4_tile,
)

log = logging.getLogger(__name__)

MAX_FUSED_RANK = 128  # BLOCK_R = next power of two >= r; beyond 128 the epilogue tile spills registers
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
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
# Reduction splits (`split_count`): the thin products x·Aᵀ and dY·B (N = r, so M / BLOCK_M tiles only:
# 64 at M = 4096) split K into pieces of at least THIN_MIN_K, the dA / dB reductions split the tokens
# into pieces of at least RED_MIN_K; partial sums are fp32, added in a fixed order.
THIN_MIN_K = 128
RED_MIN_K = 512
# The in_kernel path decodes W by rows (`nf4.nf4_rows`: one contiguous packed load per row and K step,
# one scale per absmax block, codes from registers) when W's rows start on absmax block boundaries;
# False forces the element-wise decoder (`nf4.nf4_tile`) everywhere (tests run both).
NF4_BY_ROWS = True

# Launch configurations, one table for every launch (and for tests/test_kernel_compile.py, which
# compiles each for sm_80/89/90). Chosen by shape in `_pick_config`; `python -m bench.kernels lora --sweep`
# times the base-matmul ones (and CANDIDATES) per shape; every run prints the ones chosen.
#   name: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
CONFIGS = {
    "mm_128x128x64_w8_s3": (128, 128, 64, 8, 8, 3),   # large 16-bit base matmuls (forward, dX)
    "mm_64x64x64_w4_s3": (64, 64, 64, 8, 4, 3),       # few tokens
    # NF4 W: the code and absmax gathers are pipelined too, so stages cost far more shared memory
    # (compiled for sm_89, bf16: 128x128x64 with 3 stages needs 224 KB, with 2 stages 128 KB)
    "nf4_128x64x64_w4_s2": (128, 64, 64, 8, 4, 2),    # 72 KB
    "nf4_64x64x64_w4_s2": (64, 64, 64, 8, 4, 2),
    "f32_64x64x32_w4_s2": (64, 64, 32, 8, 4, 2),      # fp32 operands (IEEE dots): twice the bytes per tile
    "thin_64xRx64_w4_s3": (64, 0, 64, 8, 4, 3),       # x·Aᵀ, dY·B: N = r (BLOCK_N set to BLOCK_R), split-K
    "red_Rx128x64_w4_s3": (0, 128, 64, 1, 4, 3),      # dA, dBᵀ: M = r (BLOCK_M = BLOCK_R), split over tokens
    "red_Rx64x64_w4_s3": (0, 64, 64, 1, 4, 3),
    # SMALLER's last resorts for the thin and red products: one K step of 32 in flight, for devices with
    # less shared memory than the fp32 r = 128 tiles above need (96 KB on sm_80/89)
    "thin_64xRx32_w4_s2": (64, 0, 32, 8, 4, 2),
    "red_Rx64x32_w4_s2": (0, 64, 32, 1, 4, 2),
}
# Shared memory. A config's need is what its compiled kernel reports (`metadata.shared`): pipeline
# buffers of BLOCK_K-deep P and Q tiles (triton 3.6 and 3.9 keep num_stages - 1 of them on sm_80/89,
# num_stages on sm_90) or the epilogue's L and R tiles, whichever is larger, so it grows with BLOCK_R
# and the operand width. Before a CUDA launch `launch_plan` compares it with the device's
# shared_memory_per_block_optin (A100 163 KB, RTX 4090 99 KB, H100 227 KB) and, when it is over,
# takes the next config of this chain that fits (`fit_config`; the compiled red_Rx128x64_w4_s3 needs
# 128 KB in fp32 at r = 128 on sm_89), so an oversized config is never launched.
# tests/test_kernel_compile.py compiles every config at r = 16, 64, 128 in bf16 and fp32 for
# sm_80/89/90 under triton 3.6 and 3.9 and checks that each one over a target's limit has a fitting
# fallback there.
SMALLER = {
    "mm_128x128x64_w8_s3": "mm_64x64x64_w4_s3",
    "nf4_128x64x64_w4_s2": "nf4_64x64x64_w4_s2",
    "thin_64xRx64_w4_s3": "thin_64xRx32_w4_s2",
    "red_Rx128x64_w4_s3": "red_Rx64x64_w4_s3",
    "red_Rx64x64_w4_s3": "red_Rx64x32_w4_s2",
}
# Alternatives the benchmark also times (`python -m bench.kernels lora --sweep`); not shipped, so not
# compile-checked in CI: one that wins on a GPU moves into CONFIGS (and so into the compile test).
CANDIDATES = {
    "mm_128x128x32_w8_s4": (128, 128, 32, 8, 8, 4),
    "mm_128x256x64_w8_s3": (128, 256, 64, 8, 8, 3),
    "nf4_128x128x32_w8_s2": (128, 128, 32, 8, 8, 2),  # 64 KB on sm_89
    "nf4_128x128x64_w8_s1": (128, 128, 64, 8, 8, 1),
}
# The CPU interpreter (tests): its cost is per program and per tile op, not per flop, so fewer, wider
# tiles run fastest (measured on 2 cores, NF4 72x256 -> 768, r=8, forward + backward: 1.05 s with
# 32x128x128 tiles, 0.59 s with 128x256x256). Never compiled for a GPU; tests swap in small tiles to
# exercise many tiles and K steps.
INTERPRETER_CONFIGS = {
    "interp_mm": (128, 256, 256, 8, 4, 1),
    "interp_thin": (128, 0, 256, 8, 4, 1),
    "interp_red": (0, 256, 256, 1, 4, 1),
}


# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------

@triton.jit
def _lora_matmul_kernel(
    p_ptr, q_ptr, c_ptr,  # C[M, N] = alpha * P[M, K] @ Q[K, N]   (Q may be NF4-packed)
    l_ptr, r_ptr, bias_ptr,  # + scale * L[M, RANK] @ R[RANK, N] + bias[N]
    absmax_ptr, table_ptr, absmax2_ptr, code2_ptr, offset_ptr,  # NF4 Q (fastft.kernels.nf4.NF4Weight)
    M, N, K, RANK, k_per_split,
    stride_pm, stride_pk, stride_qk, stride_qn, stride_cs, stride_cm, stride_cn,
    stride_lm, stride_lr, stride_rr, stride_rn,
    alpha, scale,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, Q_NF4: tl.constexpr, NESTED: tl.constexpr,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, IEEE: tl.constexpr,
    NF4_ROWS: tl.constexpr,  # NF4 Q decoded by rows of W: 0 no (nf4_tile), 1 Q = Wᵀ (forward), 2 Q = W (dX)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # -- program -> (tile row, tile column, split): grouped order so neighbours share Q tiles in L2
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)

    # -- the K loop: fp32 accumulator, masked loads (sizes need not be multiples of the blocks).
    # Every element offset is an int64 product (`_offsets`): a 128256 x 4096 lm_head or 16384
    # tokens x 14336 features pass 2**31 elements.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        p = tl.load(p_ptr + _offsets(offs_m, stride_pm, offs_k, stride_pk),
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        q_mask = mask_k[:, None] & mask_n[None, :]
        q_idx = _offsets(offs_k, stride_qk, offs_n, stride_qn)
        if Q_NF4:
            # W's rows, each a contiguous run of packed bytes with one scale per absmax block (nf4_rows),
            # when rows start on block boundaries; else element by element (nf4_tile)
            if NF4_ROWS == 1:  # Q = Wᵀ: W's rows are the output columns n, its columns this K step
                q = tl.trans(nf4_rows(q_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n, stride_qn, k0,
                                      mask_n, k_hi, BLOCK_N, BLOCK_K, BLOCKSIZE, BLOCKSIZE2,
                                      NESTED).to(p_ptr.dtype.element_ty))
            elif NF4_ROWS == 2:  # Q = W: W's rows are this K step, its columns the output columns n
                q = nf4_rows(q_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_k, stride_qk,
                             pid_n * BLOCK_N, mask_k, N, BLOCK_K, BLOCK_N, BLOCKSIZE, BLOCKSIZE2,
                             NESTED).to(p_ptr.dtype.element_ty)
            else:
                q = nf4_tile(q_ptr, absmax_ptr, table_ptr, absmax2_ptr, code2_ptr, offset_ptr, q_idx, q_mask,
                             BLOCKSIZE, BLOCKSIZE2, NESTED).to(p_ptr.dtype.element_ty)
        else:
            q = tl.load(q_ptr + q_idx, mask=q_mask, other=0.0)
        if IEEE:
            acc = tl.dot(p, q, acc, input_precision="ieee")
        else:
            acc = tl.dot(p, q, acc)
    acc = acc * alpha

    # -- epilogue: the low-rank term on the tile still in registers, then the bias
    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < RANK
        lo = tl.load(l_ptr + _offsets(offs_m, stride_lm, offs_r, stride_lr),
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        up = tl.load(r_ptr + _offsets(offs_r, stride_rr, offs_n, stride_rn),
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        if IEEE:
            acc += scale * tl.dot(lo, up, input_precision="ieee")
        else:
            acc += scale * tl.dot(lo, up)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]

    c = c_ptr + pid_s.to(tl.int64) * stride_cs + _offsets(offs_m, stride_cm, offs_n, stride_cn)
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _offsets(offs_a, stride_a, offs_b, stride_b):
    """[len(a), len(b)] element offsets offs_a·stride_a + offs_b·stride_b, each product in int64 (the
    one place the matmul kernel multiplies an index by a stride; tests/test_lora.py checks both)."""
    return offs_a.to(tl.int64)[:, None] * stride_a + offs_b.to(tl.int64)[None, :] * stride_b


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------

def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _pick_config(kind: str, M: int, N: int, nf4: bool, fp32: bool = False) -> str:
    """The launch config for one product by shape; `kind`: "mm" (large), "thin" (N = r), "red" (M = r).
    On a CUDA device `launch_plan` may swap it for a smaller one that fits its shared memory (SMALLER)."""
    if interpreted():
        return f"interp_{kind}"
    if kind == "thin":
        return "thin_64xRx64_w4_s3"
    if kind == "red":
        return "red_Rx128x64_w4_s3" if N >= 1024 else "red_Rx64x64_w4_s3"
    if fp32:
        return "f32_64x64x32_w4_s2"
    if M <= 256 or N <= 256:
        return "nf4_64x64x64_w4_s2" if nf4 else "mm_64x64x64_w4_s3"
    return "nf4_128x64x64_w4_s2" if nf4 else "mm_128x128x64_w8_s3"


def lora_matmul(p: torch.Tensor, q, out_dtype: torch.dtype, *, alpha: float = 1.0,
                lora: tuple | None = None, scale: float = 0.0, bias: torch.Tensor | None = None,
                kind: str = "mm", rank: int = 0, split_k: int = 1, config: str | None = None) -> torch.Tensor:
    """C[M, N] = alpha * p[M, K] @ q[K, N] (+ scale * l @ r) (+ bias), fp32 accumulation.

    p and each of lora's two factors are 2-D tensors in any strides (pass a transposed view for free);
    q is a 2-D tensor or ``(NF4Weight, transposed)``: the [K, N] operand is the NF4 weight's dense
    [N, K] form transposed (forward, x·Wᵀ) when ``transposed`` and the [N, K] form itself (dX = dY·W)
    otherwise. ``split_k`` > 1 splits the reduction into fp32 partial sums added at the end.
    """
    out, grid, args, kwargs = launch_plan(p, q, out_dtype, alpha=alpha, lora=lora, scale=scale, bias=bias,
                                          kind=kind, rank=rank, split_k=split_k, config=config)
    if grid is not None:
        _lora_matmul_kernel[grid](*args, **kwargs)
    if out.shape[0] > 1:
        return out.sum(0).to(out_dtype)  # fp32 partial sums, added in split order
    return out[0]


def launch_plan(p: torch.Tensor, q, out_dtype: torch.dtype, *, alpha: float = 1.0,
                lora: tuple | None = None, scale: float = 0.0, bias: torch.Tensor | None = None,
                kind: str = "mm", rank: int = 0, split_k: int = 1, config: str | None = None,
                check_device: bool = True):
    """What `lora_matmul` launches, without launching: (out, grid, args, kwargs), with
    ``_lora_matmul_kernel[grid](*args, **kwargs)`` the launch (grid None: nothing to launch) and `out`
    the [splits, M, N] result buffer. tests/kernel_specs.py derives the compile specs from these
    arguments with Triton's own specialization rule, so CI compiles what the JIT builds.
    check_device=False plans for CPU stand-in tensors (spec derivation)."""
    M, K = p.shape
    nf4 = isinstance(q, tuple)
    if nf4:
        w, transposed = q
        wn, wk = w.shape
        N = wn if transposed else wk
        if (wk if transposed else wn) != K:
            raise ValueError(f"inner dimensions differ: p is {tuple(p.shape)}, NF4 weight is {w.shape}")
        stride_qk, stride_qn = (1, wk) if transposed else (wk, 1)
    else:
        if q.shape[0] != K:
            raise ValueError(f"inner dimensions differ: {tuple(p.shape)} @ {tuple(q.shape)}")
        N = q.shape[1]
        stride_qk, stride_qn = q.stride()
    if check_device:
        _check_device(p)
    others = [w.packed if nf4 else q, *(lora or ()), *(() if bias is None else (bias,))]
    if any(t.device != p.device for t in others):
        raise ValueError(f"lora_matmul: all tensors must be on {p.device}, got "
                         f"{sorted({str(t.device) for t in others})}")
    dtype = p.dtype
    if dtype not in _DTYPES:
        raise TypeError(f"lora_matmul: unsupported dtype {dtype}; use fp16, bf16 or fp32")
    if lora is not None:
        l_, r_ = lora
        if l_.dtype != dtype or r_.dtype != dtype:
            raise TypeError(f"lora factors must be {dtype}, got {l_.dtype} and {r_.dtype}")
        if l_.shape != (M, rank) or r_.shape != (rank, N):
            raise ValueError(f"lora factors {tuple(l_.shape)}, {tuple(r_.shape)} do not fit [{M}, {rank}] @ [{rank}, {N}]")
    if not nf4 and q.dtype != dtype:
        raise TypeError(f"lora_matmul: operands must share a dtype, got {dtype} and {q.dtype}")
    if split_k > 1 and (lora is not None or bias is not None):
        raise ValueError("split_k > 1 supports neither the low-rank epilogue nor a bias")

    name = config or _pick_config(kind, M, N, nf4, dtype == torch.float32)
    if kind in ("thin", "red") and not rank:
        raise ValueError(f"kind {kind!r} needs the rank")
    limit = _smem_limit(p.device) if check_device else None
    if limit is not None and M and N:
        # the same plan for each config of the chain, without this check (it would recurse)
        def plan(n):
            return launch_plan(p, q, out_dtype, alpha=alpha, lora=lora, scale=scale, bias=bias, kind=kind,
                               rank=rank, split_k=split_k, config=n, check_device=False)

        key = (p.device, name, _block_r(rank) if rank else 16, dtype, out_dtype,
               nf4 and (w.nested, transposed, w.blocksize, w.shape[1] % w.blocksize),
               lora is not None, bias is not None, split_k > 1)
        if key not in _FITTED:
            _FITTED[key] = fit_config(name, lambda n: _shared_need(*plan(n)[1:]), limit, rank=rank, dtype=dtype)
        if _FITTED[key] != name:
            return plan(_FITTED[key])
    bm, bn, bk, group_m, num_warps, num_stages = (CONFIGS.get(name) or CANDIDATES.get(name)
                                                   or INTERPRETER_CONFIGS[name])
    block_r = _block_r(rank) if rank else 16
    bm = bm or block_r
    bn = bn or block_r
    if name.startswith("interp_"):  # the interpreter pays for the whole tile: no wider than the problem
        bm, bn, bk = (min(b, max(16, triton.next_power_of_2(d))) for b, d in ((bm, M), (bn, N), (bk, K)))
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), bk) * bk
    split_k = triton.cdiv(K, k_per_split) if K else 1
    if split_k > 1:
        out = torch.empty((split_k, M, N), device=p.device, dtype=torch.float32)
    else:
        out = torch.empty((1, M, N), device=p.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return out.zero_(), None, [], {}
    if K == 0:
        out.zero_()
    dummy = out  # stands in for absent pointers; never read (their constexpr flags are off)
    if nf4:
        q_ptr, absmax, table = w.packed, w.absmax, w.table
        # the offset stays on the device: read through a pointer, never synced to a Python float
        absmax2, code2, offset = (w.absmax2, w.code2, w.offset) if w.nested else (dummy, dummy, dummy)
    else:
        q_ptr, absmax, table, absmax2, code2, offset = q, dummy, dummy, dummy, dummy, dummy
    l_, r_ = lora if lora is not None else (dummy[0], dummy[0])
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn), split_k)
    # rows of W start on absmax block boundaries (Llama: K % 64 == 0): decode by rows (nf4.nf4_rows)
    rows_layout = (1 if transposed else 2) if nf4 and NF4_BY_ROWS and w.shape[1] % w.blocksize == 0 else 0
    extra = {"enable_fp_fusion": False} if nf4 and w.nested else {}
    args = [
        p, q_ptr, out, l_, r_, bias if bias is not None else dummy,
        absmax, table, absmax2, code2, offset,
        M, N, K, rank, k_per_split,
        p.stride(0), p.stride(1), stride_qk, stride_qn, out.stride(0), out.stride(1), out.stride(2),
        l_.stride(0), l_.stride(1), r_.stride(0), r_.stride(1),
        float(alpha), float(scale),
    ]
    kwargs = dict(
        HAS_LORA=lora is not None, HAS_BIAS=bias is not None, Q_NF4=nf4, NESTED=nf4 and w.nested,
        BLOCKSIZE=w.blocksize if nf4 else 64, BLOCKSIZE2=(w.blocksize2 or 256) if nf4 else 256,
        IEEE=dtype == torch.float32, NF4_ROWS=rows_layout,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=block_r, GROUP_M=group_m,
        num_warps=num_warps, num_stages=num_stages, **extra,
    )
    return out, grid, args, kwargs


_FITTED: dict = {}  # (device, config, BLOCK_R, dtypes, operand kinds) -> the config that fits that device


def fit_config(name: str, need, limit: int | None, *, rank: int, dtype: torch.dtype) -> str:
    """`name`, or the first config after it in its SMALLER chain, whose shared memory need(config) in
    bytes fits `limit`, the device's per-block maximum (None: no limit). A fallback is said once; when
    no config of the chain fits, a ValueError names each config's need, the limit and the fixes."""
    tried, n = [], name
    while n is not None:
        bytes_ = need(n)
        if limit is None or bytes_ <= limit:
            if tried:
                say_once(f"{'; '.join(tried)}, over this GPU's {limit} bytes of shared memory per block at r={rank} "
                         f"{dtype}: launching {n} ({bytes_} bytes) instead")
            return n
        tried.append(f"{n} needs {bytes_} bytes")
        n = SMALLER.get(n)
    raise ValueError(f"fastft.kernels.lora: no launch config fits this GPU's shared memory at r={rank} {dtype}: "
                     f"{'; '.join(tried)}, the device has {limit} per block. Use bf16 or fp16 compute (half the "
                     f"tile bytes of fp32) or a smaller r, or add a smaller config to lora.SMALLER (and to CONFIGS, "
                     f"which CI compiles)")


def _shared_need(grid, args, kwargs) -> int:
    """Bytes of shared memory the compiled kernel of this launch needs: compiled (or taken from the
    JIT's cache) without launching, so the launch that follows reuses the build."""
    return int(_lora_matmul_kernel.warmup(*args, grid=grid, **kwargs).metadata.shared)


@functools.cache
def _smem_optin(index: int) -> int:
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


def _smem_limit(device: torch.device) -> int | None:
    """The most shared memory one block may use on a CUDA device, bytes (cached); None off CUDA."""
    if device.type != "cuda":
        return None
    return _smem_optin(device.index if device.index is not None else torch.cuda.current_device())


def _check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not interpreted():
        raise RuntimeError(f"fastft.kernels.lora needs CUDA tensors (got {t.device}); on CPU set TRITON_INTERPRET=1 "
                           "before importing it, or use lora_linear_reference")


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _device_sms(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device (cached: no query per call); None off CUDA, where
    nothing is split (tests monkeypatch this to run the split launches under the interpreter)."""
    if device.type != "cuda":
        return None
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


WAVES = 2  # split reductions until the grid holds at least this many CTAs per SM (one wave is a tail)


def split_count(tiles: int, K: int, min_k: int, sms: int | None) -> int:
    """Reduction splits for a launch of `tiles` output tiles over a K-long reduction: enough for
    WAVES * sms programs, but no split shorter than `min_k`; 1 without an SM count. A pure function
    of the shape and the GPU, so a shape always takes the same splits (deterministic sums)."""
    if not sms:
        return 1
    return max(1, min(triton.cdiv(WAVES * sms, max(tiles, 1)), K // min_k))


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
    name = _pick_config("thin", M, r, False, dtype == torch.float32)
    bm = (CONFIGS.get(name) or INTERPRETER_CONFIGS[name])[0]
    split = split_count(triton.cdiv(M, bm), K, THIN_MIN_K, _device_sms(p.device))
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
    sms = _device_sms(dy2.device)
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


_SAID: set[str] = set()


def say_once(message: str) -> None:
    """Log a fallback reason the first time it happens in this process."""
    if message not in _SAID:
        _SAID.add(message)
        log.warning("fastft.kernels.lora: %s", message)


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
    return "dequantize" if nf4 and on_triton and x.dtype in _DTYPES else "reference"


def _unfused_cause(x, weight, lora_a, lora_b, bias, quant_state, dropout_p, training) -> str | None:
    if x.device.type != "cuda" and not interpreted():
        return f"tensors on {x.device.type}, not CUDA (and TRITON_INTERPRET unset)"
    if dropout_p and training:
        return f"lora_dropout={dropout_p} > 0 in training (dropout is not fused)"
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype} is not fp16/bf16/fp32"
    if lora_a.shape[0] > MAX_FUSED_RANK:
        return f"r={lora_a.shape[0]} > {MAX_FUSED_RANK}"
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return "trainable base weight or bias (the fused backward gives them no gradient)"
    if quant_state is not None and getattr(quant_state, "quant_type", "nf4") != "nf4":
        return f"4-bit type {quant_state.quant_type!r} is not NF4"
    if quant_state is None and weight.dtype not in _DTYPES:
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
