"""The LoRA matmul kernel: one Triton kernel for every product of the fused LoRA linear
(fastft.kernels.lora), forward and backward, and its launcher.

    from fastft.kernels.lora_kernel import lora_matmul
    y = lora_matmul(x, w.t(), dtype, lora=(xa, b.t()), scale=s, rank=r, bias=bias)   # x·Wᵀ + s·XA·Bᵀ + bias
    dx = lora_matmul(dy, (nf4_weight, False), dtype, lora=(dyb, a), scale=s, rank=r)  # dY·W + s·dYB·A

``_lora_matmul_kernel`` computes C = alpha·(P·Q) (+ scale·(L·R)) (+ bias), fp32 accumulation:

    P [M, K], Q [K, N]   read through strides (a transposed view costs nothing); every index·stride
                         product is 64-bit (`_offsets`): a 128256 x 4096 lm_head passes 2**31 elements
    Q NF4                the packed base weight W [N, K] (Q = Wᵀ forward, Q = W for dX) dequantized tile
                         by tile inside the K loop (fastft.kernels.nf4_format): by rows of W (`nf4_rows`:
                         one contiguous packed load per row and K step, one scale per absmax block, codes
                         from constants in registers) when W's rows start on absmax block boundaries
                         (in_features % blocksize == 0, every Llama shape), element by element
                         (`nf4_tile`) otherwise; a nested absmax keeps its two fp32 roundings (the launch
                         disables FMA contraction)
    L [M, RANK], R [RANK, N]   the low-rank epilogue on the tile still in registers (x·Wᵀ is never stored)
    split                the reduction split into fp32 partial sums [splits, M, N], added in split order

fp32 inputs use IEEE fp32 dots (no TF32), matching torch's default for matmul. The launch config
comes from fastft.kernels.lora_configs by shape; before a CUDA launch the compiled kernel's shared
memory is checked against the device's per-block maximum and a config over it gives way to a
smaller one (`fit_config`) or, when none fits, to a ValueError naming the need, the limit and the fix.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora_configs import CANDIDATES, CONFIGS, INTERPRETER_CONFIGS, fit_config, pick_config, smem_limit
from .nf4_format import interpreted, nf4_rows, nf4_tile

DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # operand dtypes the kernel takes

# An NF4 Q is decoded by rows of W (`nf4_format.nf4_rows`: one contiguous packed load per row and K
# step, one scale per absmax block, codes from registers) when W's rows start on absmax block
# boundaries; False forces the element-wise decoder (`nf4_format.nf4_tile`) everywhere (tests run both).
NF4_BY_ROWS = True


# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------

@triton.jit
def _lora_matmul_kernel(
    p_ptr, q_ptr, c_ptr,  # C[M, N] = alpha * P[M, K] @ Q[K, N]   (Q may be NF4-packed)
    l_ptr, r_ptr, bias_ptr,  # + scale * L[M, RANK] @ R[RANK, N] + bias[N]
    absmax_ptr, table_ptr, absmax2_ptr, code2_ptr, offset_ptr,  # NF4 Q (fastft.kernels.nf4_format.NF4Weight)
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
    if dtype not in DTYPES:
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

    name = config or pick_config(kind, M, N, nf4, dtype == torch.float32)
    if kind in ("thin", "red") and not rank:
        raise ValueError(f"kind {kind!r} needs the rank")
    limit = smem_limit(p.device) if check_device else None
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
    # rows of W start on absmax block boundaries (Llama: K % 64 == 0): decode by rows (nf4_rows)
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


def _shared_need(grid, args, kwargs) -> int:
    """Bytes of shared memory the compiled kernel of this launch needs: compiled (or taken from the
    JIT's cache) without launching, so the launch that follows reuses the build."""
    return int(_lora_matmul_kernel.warmup(*args, grid=grid, **kwargs).metadata.shared)


def _check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not interpreted():
        raise RuntimeError(f"fastft.kernels.lora needs CUDA tensors (got {t.device}); on CPU set TRITON_INTERPRET=1 "
                           "before importing it, or use lora_linear_reference")
