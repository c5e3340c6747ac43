"""NF4 / FP4 dequantization in Triton, bit-exact with bitsandbytes: the kernel, its launch configs and
`dequantize_nf4`. The format it decodes (tables, `NF4Weight`, the order of the fp32 roundings, the
pure-torch reference) is fastft.kernels.nf4_format.

    from fastft.kernels.nf4 import dequantize_nf4
    w = dequantize_nf4(linear4bit.weight)                   # Params4bit -> [out, in] in quant_state.dtype
    w = dequantize_nf4(linear4bit)                           # or the module holding it
    w = dequantize_nf4(packed_uint8, quant_state, out=buf)   # into a reused buffer (training)
    q = NF4Weight.from_quant_state(packed, quant_state)     # parsed and checked once: what kernels read
    w = dequantize_nf4_reference(q, dtype=torch.bfloat16)   # pure torch, the same fp32 roundings

Per element: value = fp32(TABLE[code] * absmax[block]) rounded to the output dtype, the nested absmax
decoded first with two separate roundings (a multiply, then the offset add); the kernel multiplies
with libdevice ``mul_rn`` and launches with ``enable_fp_fusion=False``, so no pair becomes an FMA.

Performance (memory bound: per element half a byte read, 2 bytes written for bf16): one launch
replaces bitsandbytes' three for a nested weight (8-bit absmax dequant, offset add, 4-bit dequant).
A program's tile is rows of GROUP packed bytes, GROUP chosen so that a row decodes to exactly one
16-byte vector of output (4 bytes for 16-bit outputs, 2 for fp32); a thread loads a row with one 2-
or 4-byte load, gathers the 16-entry table (64 bytes, stays in L1), interleaves the nibbles in
registers and stores one 16-byte vector, with no shared-memory shuffle (the PTX is checked by
tests/test_kernel_compile.py: Triton caps a thread's store at 16 bytes, so a 16-byte packed load per
thread, 64 bytes of bf16 output, compiled to a shared-memory shuffle before the stores). Each row's
scale (three gathers, a multiply and an add when nested) is decoded once per row, and once per tile
when a block spans the tile. Programs loop over tiles (grid-stride), the grid capped at
PROGRAMS_PER_SM per SM.
Launch configs are autotuned per (bytes, blocksize, nesting, dtypes) from `LAUNCH_CONFIGS`;
`python -m bench.kernels nf4` prints the chosen one per shape.

Errors: `dequantize_nf4` raises TypeError for a wrong kind of input or dtype and ValueError for a
wrong device, a shape that does not match the quant state, a non-contiguous tensor or an unsupported
blocksize / quant type; each message names the tensor and says how to fix it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .nf4_format import (
    NF4Weight,
    block_scale,
    check_output,
    dequantize_nf4_reference,
    interpreted,
    mul_fp32,
    output_dtype,
    weight_of,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only; without it only the torch reference runs
    triton = None

# ----------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LaunchConfig:
    """Packed bytes per program (a power of two) and warps per program."""
    bytes_per_program: int
    num_warps: int

    @property
    def name(self) -> str:
        return f"B{self.bytes_per_program}_w{self.num_warps}"


# The autotuner's candidates; each is compiled for sm_80/sm_89/sm_90 in tests/test_kernel_compile.py.
# They span 8 to 32 packed bytes per thread (2 to 8 independent 4-byte loads for 16-bit outputs),
# trading bytes in flight per thread against registers and occupancy.
LAUNCH_CONFIGS = (
    LaunchConfig(1024, 4),
    LaunchConfig(2048, 4),
    LaunchConfig(2048, 8),
    LaunchConfig(4096, 4),
    LaunchConfig(4096, 8),
    LaunchConfig(8192, 8),
)
# The grid-stride loop's grid: at most this many programs per SM (a 2048-thread SM holds 16 programs
# of 4 warps), so a huge weight launches about one resident wave that loops over its tiles.
PROGRAMS_PER_SM = 16
# Weights under 1 MB packed (2M elements) take DEFAULT_CONFIG untuned: their launches are a few
# microseconds either way, and tuning every small test shape would compile all six configs for it.
AUTOTUNE_MIN_BYTES = 1 << 20
DEFAULT_CONFIG = LaunchConfig(2048, 4)
# Interpreter runs (CPU tests, and training a tiny model with kernels: fastft under TRITON_INTERPRET=1):
# the numpy emulation pays ~10 ms per program whatever its size, so a program takes a large tile
# (measured on 2 cores: a 256 x 256 weight in 1.6 s with 256-byte tiles, 0.03 s with 16 KB ones).
# tests/test_nf4.py launches small tiles explicitly where it needs tiles that start inside a block.
INTERPRETER_CONFIG = LaunchConfig(16384, 4)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _round_to(x, out_ty: tl.constexpr, BF16_BY_BITS: tl.constexpr):
        # fp32 -> output type, round to nearest even. The interpreter's fp32 -> bf16 cast truncates
        # (triton 3.9 runtime/interpreter.py `_convert_float`), so interpreter runs round on the bit
        # pattern instead: add 0x7FFF plus the lowest kept bit, drop 16 bits (exact for finite
        # values). GPUs use the native cvt.rn.bf16.f32.
        if BF16_BY_BITS:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(out_ty)

    @triton.jit
    def _dequantize_4bit_kernel(
        packed_ptr,  # uint8 [n_bytes]: two codes per byte, the even element in the high nibble
        absmax_ptr,  # fp32 [n_blocks], or uint8 [n_blocks] when NESTED
        table_ptr,  # fp32 [16]: the NF4 or FP4 code table
        absmax2_ptr,  # fp32 [ceil(n_blocks / BLOCKSIZE2)] (NESTED only)
        code2_ptr,  # fp32 [256]: the 8-bit dynamic map of the absmax codes (NESTED only)
        offset_ptr,  # fp32 [1]: added to every decoded absmax (NESTED only)
        out_ptr,  # fp16 / bf16 / fp32 [n_elements]
        n_elements,
        n_bytes,
        HALF: tl.constexpr,  # packed bytes per absmax block: blocksize // 2 (16 .. 2048)
        BLOCKSIZE2: tl.constexpr,
        NESTED: tl.constexpr,
        BYTES_PER_PROGRAM: tl.constexpr,  # bytes per tile, a power of two >= 16
        USE_MUL_RN: tl.constexpr,
        BF16_BY_BITS: tl.constexpr = False,  # interpreter only: see _round_to
    ):
        # A tile is [ROWS, GROUP] packed bytes, GROUP chosen so that a row decodes to exactly one
        # 16-byte vector of output (4 bytes -> 8 x 16-bit, 2 bytes -> 4 x fp32): Triton caps a
        # thread's store at 16 bytes, and a row wider than that (a 16-byte packed load is 64 to 128
        # bytes of output) made it move the decoded values through shared memory before the stores
        # (bar.sync in the PTX of every config, tests/test_kernel_compile.py). With GROUP-byte rows
        # the load and the store share one thread mapping and the nibble interleave stays in
        # registers. A row never crosses an absmax block (GROUP <= 4 < 16 <= HALF), so each row needs
        # one scale, and when one block spans the whole tile (blocksize >= 2 * BYTES_PER_PROGRAM) the
        # scale is decoded once per tile. Programs walk the tiles in a grid-stride loop, so the launch
        # caps its grid (the 128256 x 4096 lm_head has 128k tiles of 2 KB).
        GROUP: tl.constexpr = 16 // (2 * (out_ptr.dtype.element_ty.primitive_bitwidth // 8))
        ROWS: tl.constexpr = BYTES_PER_PROGRAM // GROUP
        rows = tl.arange(0, ROWS)
        offs = rows[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # byte offsets inside the tile
        out_offs = rows[:, None] * (2 * GROUP) + tl.arange(0, 2 * GROUP)[None, :]
        out_ty = out_ptr.dtype.element_ty
        n_tiles = tl.cdiv(n_bytes, BYTES_PER_PROGRAM)
        for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            # 64-bit scalar bases (bigger weights than the lm_head pass 2^31 elements); offsets
            # inside the tile stay 32-bit, and what is left past the tile start is clamped to it.
            base = tl.cast(tile, tl.int64) * BYTES_PER_PROGRAM
            bytes_left = tl.minimum(n_bytes - base, BYTES_PER_PROGRAM).to(tl.int32)
            elements_left = tl.minimum(n_elements - 2 * base, 2 * BYTES_PER_PROGRAM).to(tl.int32)
            if HALF >= BYTES_PER_PROGRAM:  # the tile lies inside one block (tiles and blocks align)
                scale = block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, base // HALF, bytes_left > 0,
                                    BLOCKSIZE2, NESTED, USE_MUL_RN)
            else:
                block = base // HALF + rows // (HALF // GROUP)
                scale = block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, rows * GROUP < bytes_left,
                                    BLOCKSIZE2, NESTED, USE_MUL_RN)[:, None]
            packed = tl.load(packed_ptr + base + offs, mask=offs < bytes_left, other=0,
                             eviction_policy="evict_first")  # read once: keep L2 for the output
            hi = tl.load(table_ptr + (packed >> 4).to(tl.int32), eviction_policy="evict_last")
            lo = tl.load(table_ptr + (packed & 15).to(tl.int32), eviction_policy="evict_last")
            hi = _round_to(mul_fp32(hi, scale, USE_MUL_RN), out_ty, BF16_BY_BITS)
            lo = _round_to(mul_fp32(lo, scale, USE_MUL_RN), out_ty, BF16_BY_BITS)
            vals = tl.interleave(hi, lo)  # [ROWS, 2 * GROUP], high nibble first
            tl.store(out_ptr + 2 * base + out_offs, vals, mask=out_offs < elements_left)

    def _autotune_configs():
        return [triton.Config({"BYTES_PER_PROGRAM": c.bytes_per_program}, num_warps=c.num_warps)
                for c in LAUNCH_CONFIGS]

    _dequantize_4bit_autotuned = triton.autotune(
        configs=_autotune_configs(), key=["n_bytes", "HALF", "BLOCKSIZE2", "NESTED"])(_dequantize_4bit_kernel)


# ----------------------------------------------------------------------------------------------
# Launcher and public entry points
# ----------------------------------------------------------------------------------------------

_SMS: dict = {}


def _max_programs(device) -> int:
    """The grid cap for the grid-stride loop on this CUDA device (SM count cached per device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index] * PROGRAMS_PER_SM


def launch_args(w: NF4Weight, out: torch.Tensor, config: LaunchConfig | None, *, interpreted: bool = False):
    """(args, kwargs) of one `_dequantize_4bit_kernel` launch (config None: the autotuned kernel's, which
    adds BYTES_PER_PROGRAM and num_warps itself). tests/kernel_specs.py derives the compile specs from
    these with Triton's own specialization rule, so CI compiles what the JIT builds."""
    n_bytes = w.packed.numel()
    table = w.table
    # Non-nested: the unused pointer arguments get a real tensor, never read (NESTED is constexpr).
    absmax2, code2, offset = (w.absmax2, w.code2, w.offset) if w.nested else (table, table, table)
    args = [w.packed, w.absmax, table, absmax2, code2, offset, out, w.numel, n_bytes]
    kwargs = {"HALF": w.blocksize // 2, "BLOCKSIZE2": w.blocksize2 or 1, "NESTED": w.nested,
              "USE_MUL_RN": not interpreted}
    if config is not None:
        kwargs.update(BYTES_PER_PROGRAM=config.bytes_per_program, num_warps=config.num_warps)
    if interpreted:
        kwargs["BF16_BY_BITS"] = out.dtype == torch.bfloat16
    else:
        kwargs["enable_fp_fusion"] = False
    return args, kwargs


def _launch(w: NF4Weight, out: torch.Tensor, config: LaunchConfig | None = None, max_programs: int | None = None):
    """Launch the Triton kernel (GPU, or CPU tensors under TRITON_INTERPRET=1) into `out`.
    config=None: autotuned (or DEFAULT_CONFIG below AUTOTUNE_MIN_BYTES); else that config.
    max_programs: the grid cap (default: PROGRAMS_PER_SM per SM on a GPU, none in the interpreter)."""
    n_bytes = w.packed.numel()
    if interpreted():
        config = config or INTERPRETER_CONFIG
        tiles = triton.cdiv(n_bytes, config.bytes_per_program)
        args, kwargs = launch_args(w, out, config, interpreted=True)
        _dequantize_4bit_kernel[(min(tiles, max_programs or tiles),)](*args, **kwargs)
        return out
    if config is None and n_bytes < AUTOTUNE_MIN_BYTES:
        config = DEFAULT_CONFIG
    cap = max_programs or _max_programs(w.packed.device)
    args, kwargs = launch_args(w, out, config)
    with torch.cuda.device(w.packed.device):
        if config is None:
            _dequantize_4bit_autotuned[lambda m: (min(triton.cdiv(n_bytes, m["BYTES_PER_PROGRAM"]), cap),)](
                *args, **kwargs)
        else:
            _dequantize_4bit_kernel[(min(triton.cdiv(n_bytes, config.bytes_per_program), cap),)](*args, **kwargs)
    return out


def chosen_config(packed: torch.Tensor, quant_state, dtype: torch.dtype | None = None):
    """The LaunchConfig `dequantize_nf4` uses for this weight: the autotuner's pick once it has run
    for this (size, blocksize, nesting, dtype), DEFAULT_CONFIG for small weights, else None."""
    w = weight_of(packed, quant_state)
    dtype = output_dtype(w, dtype, None)
    n_bytes = (w.numel + 1) // 2
    if triton is None or interpreted():
        return INTERPRETER_CONFIG if interpreted() else None
    if n_bytes < AUTOTUNE_MIN_BYTES:
        return DEFAULT_CONFIG
    want = (n_bytes, w.blocksize // 2, w.blocksize2 or 1, w.nested)
    for key, cfg in _dequantize_4bit_autotuned.cache.items():
        # the tuner's key: the `key` arguments in order, then the dtype of each tensor argument
        # in order, so out's dtype comes last
        if tuple(key[:4]) == want and key[-1] == str(dtype):
            return LaunchConfig(cfg.kwargs["BYTES_PER_PROGRAM"], cfg.num_warps)
    return None


def dequantize_nf4_with_config(packed, quant_state, config: LaunchConfig, out=None, dtype=None,
                               max_programs: int | None = None):
    """`dequantize_nf4` with a fixed launch config instead of the autotuner (benchmark sweeps), and
    optionally a grid cap (tests run the grid-stride loop with a few programs)."""
    w = weight_of(packed, quant_state)
    dtype = output_dtype(w, dtype, out)
    check_output(w, out, dtype)
    if out is None:
        out = torch.empty(w.shape, dtype=dtype, device=w.packed.device)
    return _launch(w, out, config, max_programs) if w.numel else out


_SCRATCH: dict[tuple, torch.Tensor] = {}


def dequant_scratch(shape, dtype: torch.dtype, device, slot: int = 0) -> torch.Tensor:
    """A reusable buffer for a dequantized weight: one per (shape, dtype, device, slot), allocated
    on first use and handed out again on every later call, so a training step's dequantize + matmul
    paths allocate nothing. The contents are only valid until the next ``dequantize_nf4(..., out=)``
    into the same buffer: callers that need two dense weights of one shape alive at once (fused
    K and V projections) take different ``slot`` numbers; nothing may keep it for the backward."""
    key = (tuple(shape), dtype, torch.device(device), slot)
    buf = _SCRATCH.get(key)
    if buf is None:
        buf = _SCRATCH[key] = torch.empty(tuple(shape), dtype=dtype, device=device)
    return buf


def dequantize_nf4(weight_or_packed, quant_state=None, out: torch.Tensor | None = None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize a bitsandbytes 4-bit weight (NF4 or FP4, any 4-bit blocksize, double quantization
    on or off) into a tensor of ``quant_state.shape``, bit-exact with
    ``bitsandbytes.functional.dequantize_4bit``.

    weight_or_packed: a ``bitsandbytes.nn.Params4bit``, the module holding it (``.weight``), an
        ``NF4Weight``, or the packed bytes (uint8, or another dtype viewed as bytes) when
        ``quant_state`` is given.
    out: optional preallocated, contiguous output of ``quant_state.shape``; written in place and
        returned (reuse one per shape in training instead of allocating per call).
    dtype: float16, bfloat16 or float32; defaults to ``out.dtype``, else ``quant_state.dtype``.

    CUDA tensors run the Triton kernel; CPU tensors run it under ``TRITON_INTERPRET=1`` and the torch
    reference otherwise. The result always has ``quant_state.shape`` (bitsandbytes transposes its
    result when the packed tensor has a single row, a legacy layout; this function does not).
    """
    w = weight_of(weight_or_packed, quant_state)
    dtype = output_dtype(w, dtype, out)
    check_output(w, out, dtype)
    if w.packed.device.type == "cpu" and not interpreted():
        result = dequantize_nf4_reference(w, dtype=dtype)
        return result if out is None else out.copy_(result)
    if triton is None:
        raise RuntimeError("dequantize_nf4: CUDA tensors need triton; pip install triton")
    if out is None:
        out = torch.empty(w.shape, dtype=dtype, device=w.packed.device)
    if w.numel:
        _launch(w, out)
    return out
