"""The segmented LoRA product: several adapters, each on its own rows of one batch.

    from fastft.kernels.segmented_lora import Segments, segmented_lora, segmented_lora_reference
    seg = Segments.of([3, 0, 5], ranks=[8, 4, 16], device=x.device)   # rows per adapter, in order
    delta = segmented_lora(x, [a0, a1, a2], [b0, b1, b2], [s0, s1, s2], seg)   # [M, N]
    y = base(x) + delta

Rows ``seg.starts[i]:seg.starts[i + 1]`` of ``x`` [M, K] belong to adapter i, whose A_i is [r_i, K]
and B_i [N, r_i]; their delta is s_i · x_i A_iᵀ B_iᵀ. The base product x Wᵀ is the caller's, once for
every row, so N adapters share one pass over the (4-bit) base weight. Ranks may differ; a segment
may be empty (an adapter that stopped early keeps its place).

On a CUDA tensor (or under TRITON_INTERPRET=1) two launches of one Triton kernel compute it:
H = x·Aᵀ, then delta = H·Bᵀ, each row block taking its adapter's A or B and scale from a block
table. The adapters' A are stacked along the rank ([R, K], R = Σ r_i), B along its columns ([N, R]),
so H is [M, R_max] with each row's own rank used and the rest zero. The backward uses the same
kernel for dH = s·dY·B and dX = dH·A, and a second kernel for the per-adapter sums over rows,
dA_i = dH_iᵀ·x_i and dB_i = s_i·dY_iᵀ·H_i, one program per adapter and output tile. Accumulation is
fp32; fp32 inputs use IEEE dots. Elsewhere (plain CPU) ``segmented_lora`` runs the reference, a
loop over the adapters in torch, which is also what the tests hold the kernels to.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .nf4_format import interpreted

BLOCK_M = 32  # rows of one program: every block lies inside one segment


@dataclass(frozen=True)
class Segments:
    """Which rows belong to which adapter, and the block table the kernels read."""

    starts: tuple[int, ...]  # N + 1 row offsets, the last one M
    ranks: tuple[int, ...]
    block_seg: torch.Tensor  # int32 [blocks]: the adapter of each BLOCK_M-row block
    block_row: torch.Tensor  # int32 [blocks]: its first row
    rank_offsets: torch.Tensor  # int32 [N + 1]: where each adapter's rows of the stacked A start
    row_starts: torch.Tensor  # int32 [N + 1]: ``starts`` on the device, for the kernels

    @classmethod
    def of(cls, rows: list[int], ranks: list[int], device=None) -> "Segments":
        if len(rows) != len(ranks):
            raise ValueError(f"segments: {len(rows)} row counts for {len(ranks)} ranks; give one of each per adapter")
        if any(n < 0 for n in rows) or any(r < 1 for r in ranks):
            raise ValueError(f"segments: row counts must be >= 0 and ranks >= 1 (rows {rows}, ranks {ranks})")
        starts = [0]
        for n in rows:
            starts.append(starts[-1] + n)
        seg, first = [], []
        for i, n in enumerate(rows):
            for r0 in range(starts[i], starts[i] + n, BLOCK_M):
                seg.append(i)
                first.append(r0)
        offsets = [0]
        for r in ranks:
            offsets.append(offsets[-1] + r)
        as_int = dict(dtype=torch.int32, device=device)
        return cls(tuple(starts), tuple(ranks), torch.tensor(seg, **as_int), torch.tensor(first, **as_int),
                   torch.tensor(offsets, **as_int), torch.tensor(starts, **as_int))

    @property
    def rows(self) -> int:
        return self.starts[-1]


def segmented_lora_reference(x, a: list, b: list, scales: list[float], seg: Segments) -> torch.Tensor:
    """The product in torch, adapter by adapter (the oracle; differentiable)."""
    parts = []
    for i, (ai, bi, s) in enumerate(zip(a, b, scales)):
        xi = x[seg.starts[i]:seg.starts[i + 1]]
        parts.append((xi @ ai.t()) @ bi.t() * s)
    return torch.cat(parts) if parts else x.new_zeros(0, b[0].shape[0])


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------

@triton.jit
def _rows_kernel(
    p_ptr, q_ptr, c_ptr, scale_ptr, block_seg_ptr, block_row_ptr, starts_ptr, offsets_ptr,
    N, K,
    stride_pm, stride_pk, stride_qa, stride_qb, stride_cm, stride_cn,
    Q_RANK_ROWS: tl.constexpr,  # Q's rank runs along its rows (A [R, K]) or its columns (B [N, R])
    P_RANKED: tl.constexpr,  # P's columns are the rank (H or dH [M, R_max]): K is the adapter's rank
    C_RANKED: tl.constexpr,  # C's columns are the rank: N is the adapter's rank
    SCALED: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[rows of one block, n] = (scale of its adapter ·) Σ_k P[row, k] · Q_adapter[k, n]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg = tl.load(block_seg_ptr + pid_m)
    row0 = tl.load(block_row_ptr + pid_m)
    row_end = tl.load(starts_ptr + seg + 1)
    r0 = tl.load(offsets_ptr + seg)
    rank = tl.load(offsets_ptr + seg + 1) - r0
    k_len = rank if P_RANKED else K
    n_len = rank if C_RANKED else N
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    col_ok = cols < n_len
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_len, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_len
        p = tl.load(p_ptr + rows[:, None].to(tl.int64) * stride_pm + ks[None, :] * stride_pk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # Q[k, n] of this adapter: its rank index is k (A·, forward H·Bᵀ) or n (H = x·Aᵀ, dH = dY·B)
        if Q_RANK_ROWS:
            if C_RANKED:  # Q = A_iᵀ: A[r0 + n, k]
                q_off = (r0 + cols[None, :]).to(tl.int64) * stride_qa + ks[:, None] * stride_qb
            else:  # Q = A_i: A[r0 + k, n]
                q_off = (r0 + ks[:, None]).to(tl.int64) * stride_qa + cols[None, :] * stride_qb
        else:
            if C_RANKED:  # Q = B_i: B[k, r0 + n]
                q_off = ks[:, None].to(tl.int64) * stride_qa + (r0 + cols[None, :]) * stride_qb
            else:  # Q = B_iᵀ: B[n, r0 + k]
                q_off = cols[None, :].to(tl.int64) * stride_qa + (r0 + ks[:, None]) * stride_qb
        q = tl.load(q_ptr + q_off, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(p, q, acc, input_precision="ieee")
        else:
            acc = tl.dot(p, q, acc)
    if SCALED:
        acc = acc * tl.load(scale_ptr + seg)
    tl.store(c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _sum_rows_kernel(
    u_ptr, v_ptr, c_ptr, scale_ptr, starts_ptr, offsets_ptr,
    K, D,
    stride_um, stride_uk, stride_vm, stride_vd, stride_ca, stride_cb,
    U_RANKED: tl.constexpr,  # U's columns are the rank (dH -> dA_i) or V's are (H -> dB_i)
    SCALED: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Per adapter i: C_i[a, b] = (s_i ·) Σ_{rows of i} U[row, a] · V[row, b], written into the stacked
    dA ([R, K]: a = rank, b = k) or dB ([N, R]: a = n, b = rank)."""
    seg = tl.program_id(0)
    pid_a = tl.program_id(1)
    pid_b = tl.program_id(2)
    start = tl.load(starts_ptr + seg)
    end = tl.load(starts_ptr + seg + 1)
    r0 = tl.load(offsets_ptr + seg)
    rank = tl.load(offsets_ptr + seg + 1) - r0
    a_len = rank if U_RANKED else K
    b_len = D if U_RANKED else rank
    ia = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    ib = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    a_ok = ia < a_len
    b_ok = ib < b_len
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        u = tl.load(u_ptr + rows[None, :].to(tl.int64) * stride_um + ia[:, None] * stride_uk,
                    mask=a_ok[:, None] & row_ok[None, :], other=0.0)  # Uᵀ tile [BLOCK_A, BLOCK_M]
        v = tl.load(v_ptr + rows[:, None].to(tl.int64) * stride_vm + ib[None, :] * stride_vd,
                    mask=row_ok[:, None] & b_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(u, v, acc, input_precision="ieee")
        else:
            acc = tl.dot(u, v, acc)
    if SCALED:
        acc = acc * tl.load(scale_ptr + seg)
    if U_RANKED:
        c_off = (r0 + ia[:, None]).to(tl.int64) * stride_ca + ib[None, :] * stride_cb
    else:
        c_off = ia[:, None].to(tl.int64) * stride_ca + (r0 + ib[None, :]) * stride_cb
    tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=a_ok[:, None] & b_ok[None, :])


def _block(n: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _rows(p, q, out, scales, seg: Segments, n: int, k: int, q_rank_rows: bool, p_ranked: bool, c_ranked: bool,
          scaled: bool) -> None:
    blocks = seg.block_seg.numel()
    if not blocks:
        return
    bn = _block(max(seg.ranks) if c_ranked else n)
    bk = _block(max(seg.ranks) if p_ranked else k, hi=32)
    grid = (blocks, triton.cdiv(max(seg.ranks) if c_ranked else n, bn))
    _rows_kernel[grid](
        p, q, out, scales, seg.block_seg, seg.block_row, seg.row_starts, seg.rank_offsets, n, k,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        Q_RANK_ROWS=q_rank_rows, P_RANKED=p_ranked, C_RANKED=c_ranked, SCALED=scaled,
        IEEE=p.dtype == torch.float32, BLOCK_M=BLOCK_M, BLOCK_N=bn, BLOCK_K=bk)


def _sum_rows(u, v, out, scales, seg: Segments, k: int, d: int, u_ranked: bool, scaled: bool) -> None:
    r = max(seg.ranks)
    a_len, b_len = (r, d) if u_ranked else (k, r)
    ba, bb = _block(a_len), _block(b_len)
    grid = (len(seg.ranks), triton.cdiv(a_len, ba), triton.cdiv(b_len, bb))
    _sum_rows_kernel[grid](
        u, v, out, scales, seg.row_starts, seg.rank_offsets, k, d,
        u.stride(0), u.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        U_RANKED=u_ranked, SCALED=scaled, IEEE=u.dtype == torch.float32, BLOCK_A=ba, BLOCK_B=bb, BLOCK_M=BLOCK_M)


class _SegmentedLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a_cat, b_cat, scales, seg: Segments):
        m, k = x.shape
        n = b_cat.shape[0]
        h = x.new_zeros(m, max(seg.ranks))
        _rows(x, a_cat, h, scales, seg, max(seg.ranks), k, q_rank_rows=True, p_ranked=False, c_ranked=True,
              scaled=False)
        out = x.new_empty(m, n)
        _rows(h, b_cat, out, scales, seg, n, max(seg.ranks), q_rank_rows=False, p_ranked=True, c_ranked=False,
              scaled=True)
        ctx.save_for_backward(x, a_cat, b_cat, scales, h)
        ctx.seg = seg
        return out

    @staticmethod
    def backward(ctx, dy):
        x, a_cat, b_cat, scales, h = ctx.saved_tensors
        seg = ctx.seg
        dy = dy.contiguous()
        m, k = x.shape
        n = b_cat.shape[0]
        r = max(seg.ranks)
        dh = x.new_zeros(m, r)  # s_i · dY_i · B_i
        _rows(dy, b_cat, dh, scales, seg, r, n, q_rank_rows=False, p_ranked=False, c_ranked=True, scaled=True)
        dx = x.new_empty(m, k)
        _rows(dh, a_cat, dx, scales, seg, k, r, q_rank_rows=True, p_ranked=True, c_ranked=False, scaled=False)
        da = torch.zeros_like(a_cat)  # an empty segment's A and B get zero gradients
        _sum_rows(dh, x, da, scales, seg, k, k, u_ranked=True, scaled=False)
        db = torch.zeros_like(b_cat)
        _sum_rows(dy, h, db, scales, seg, n, r, u_ranked=False, scaled=True)
        return dx, da, db, None, None


def segmented_lora(x, a: list, b: list, scales: list[float], seg: Segments) -> torch.Tensor:
    """Σ over adapters of s_i · x_i A_iᵀ B_iᵀ on their own rows: [M, N]. Differentiable in x and every
    A_i, B_i. The Triton kernels on CUDA (or in the interpreter), the reference elsewhere."""
    if x.dim() != 2 or x.shape[0] != seg.rows:
        raise ValueError(f"segmented_lora: x must be [rows, in] with {seg.rows} rows (the segments'), "
                         f"got {tuple(x.shape)}")
    for i, (ai, bi) in enumerate(zip(a, b)):
        if ai.shape != (seg.ranks[i], x.shape[1]) or bi.shape != (b[0].shape[0], seg.ranks[i]):
            raise ValueError(f"segmented_lora: adapter {i}: A {tuple(ai.shape)} and B {tuple(bi.shape)} do not fit "
                             f"rank {seg.ranks[i]}, in {x.shape[1]}, out {b[0].shape[0]}")
    if not (x.is_cuda or interpreted()):
        return segmented_lora_reference(x, a, b, scales, seg)
    a_cat = torch.cat(list(a)).contiguous()
    b_cat = torch.cat(list(b), dim=1).contiguous()
    s = torch.tensor(scales, dtype=torch.float32, device=x.device)
    return _SegmentedLoRA.apply(x.contiguous(), a_cat, b_cat, s, seg)
