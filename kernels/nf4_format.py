"""The bitsandbytes 4-bit format (NF4 / FP4): its tables, quant-state parsing (`NF4Weight`), the pure-torch
reference dequantization, and the jit decoders Triton kernels call (`nf4_tile`, `nf4_rows`).

    from fastft.kernels.nf4_format import NF4Weight, dequantize_nf4_reference
    q = NF4Weight.from_quant_state(packed, quant_state)     # parsed and checked once: what kernels read
    w = dequantize_nf4_reference(q, dtype=torch.bfloat16)   # pure torch, the same fp32 roundings

The Triton dequantization built on it is fastft.kernels.nf4 (`dequantize_nf4`).

The format (bitsandbytes `quantize_4bit`): the flattened weight of ``n`` elements is packed two codes
per byte, ``(n + 1) // 2`` bytes, element ``2i`` in the high nibble of byte ``i`` and ``2i + 1`` in the
low one. The packed tensor may be stored in a float dtype (``bnb_4bit_quant_storage``, which FSDP
needs); it is read as bytes either way. Element ``j`` belongs to absmax block ``j // blocksize``
(blocksize a power of two, 32..4096). A code indexes a 16-entry fp32 table (NF4: normal quantiles;
FP4: 1 sign, 2 exponent, 1 mantissa bit).
With double quantization ("compress_statistics") the absmax itself is uint8 codes of an 8-bit
blockwise dynamic map (``state2.code``, 256 fp32 entries) with one fp32 scale per ``state2.blocksize``
(256) absmax values, plus one fp32 ``offset`` (the mean that was subtracted before quantizing them).

The exact order of operations, and why (each step one IEEE fp32 rounding, round to nearest even):

    absmax[b] = fp32(code2[qabsmax[b]] * absmax2[b // blocksize2])      (nested only: one multiply,
    absmax[b] = fp32(absmax[b] + offset)                                  then one add, never an FMA)
    value[j]  = fp32(TABLE[code[j]] * absmax[j // blocksize])
    out[j]    = value[j] rounded to fp16 / bf16 (nearest even), or value[j] itself for fp32

This is what bitsandbytes 0.50 computes on every backend. `functional.dequantize_4bit` dequantizes a
nested absmax with `dequantize_blockwise` (CUDA `kDequantizeBlockwise<General8bit>`:
``code[q] * absmax2``; CPU: the same product in C++) and then adds the offset in a separate torch op
(``absmax += offset``); so two roundings. Fusing them into one FMA changes 6.6% of the absmax values
of a random 4096x4096 weight, hence 5.3% of its fp32 outputs and 2 in a million bf16 ones. The 4-bit kernel
(`kDequantizeBlockwise<NF4|FP4>`) multiplies the fp32 table entry by the fp32 absmax and converts the
product to the output type with a round-to-nearest conversion; its CPU paths (C++ and the torch fallback
used for odd row lengths and blocksize >= 2048) do the same product in fp32 and then cast. (One
exception, a bitsandbytes 0.50 bug: its CPU C++ path picks the wrong absmax for row lengths that are
multiples of 16 but not of the blocksize when there are several rows, e.g. 40 x 96 at blocksize 64,
disagreeing with its quantizer, its CUDA kernel and its own torch path, which this module follows;
tests/test_nf4.py shows it.) bitsandbytes' CUDA library is built with ``--use_fast_math``, so its two
multiplies flush subnormal fp32 results to zero; on the GPU fastft's kernels multiply with libdevice
``mul_rn`` (`mul_fp32`), which Triton links with the FTZ reflection on (``mul.rn.ftz.f32``), and adds
with a plain fp32 add (torch's add, like bitsandbytes' offset add, keeps subnormals). Kernels launch
with ``enable_fp_fusion=False`` as well, so no multiply-add pair can become an FMA. Under the Triton
interpreter (CPU) libdevice is unavailable and the products are plain numpy fp32 multiplies, which keep
subnormals like bitsandbytes' CPU code. Subnormal products need an absmax below 1e-37, which no real
weight has.

The 4-bit tables are fastft's own constants, not ``quant_state.code``, because bitsandbytes' kernels
ignore that tensor too (NF4 and FP4 are selected by ``quant_type``). They equal the fp32 values of
`bitsandbytes.functional.get_4bit_type` and of the CUDA kernel's literals; FP4 code 0b1000 is -0.0 as
in the CUDA kernel (sign * 0.0), where bitsandbytes' CPU table has +0.0 (equal under torch.equal).

`nf4_tile` decodes any tile of flat indices, for kernels that consume W inside their own loop
(fastft.kernels.lora_kernel dequantizes a [BLOCK_K, BLOCK_N] tile of W per K step and never writes it
dense); `nf4_rows` decodes whole rows of W when they start on absmax block boundaries. Both multiply
with plain fp32 ``*``; their caller launches with ``enable_fp_fusion=False`` so the nested absmax
keeps its two roundings.

Errors (the checks `dequantize_nf4` and the reference share): TypeError for a wrong kind of input or
dtype and ValueError for a wrong device, a shape that does not match the quant state, a non-contiguous
tensor or an unsupported blocksize / quant type; each message names the tensor and says how to fix it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only; without it only the torch reference runs
    triton = None

# ----------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------

# bitsandbytes `get_4bit_type("nf4")`: 16 quantiles of N(0, 1) scaled to [-1, 1], as fp32.
NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# bitsandbytes FP4 (e2m1, exponent bias 2), in code order, normalized by its largest magnitude 12.
FP4_TABLE = tuple(v / 12.0 for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)) + tuple(
    -v / 12.0 for v in (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0))  # -0.0 / 12 keeps the sign
TABLES = {"nf4": NF4_TABLE, "fp4": FP4_TABLE}

# Every blocksize bitsandbytes' `quantize_4bit` accepts.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# Triton decoders (called from other modules' kernels)
# ----------------------------------------------------------------------------------------------

if triton is not None:
    from triton.language.extra import libdevice

    @triton.jit
    def nf4_tile(packed_ptr, absmax_ptr, table_ptr, absmax2_ptr, code2_ptr, offset_ptr, idx, mask,
                 BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr):
        """fp32 values of the 4-bit weight at flat indices `idx` (any shape) of its dense row-major form.
        Arguments as fastft.kernels.nf4's `_dequantize_4bit_kernel`; masked-off elements decode to 0."""
        byte = tl.load(packed_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
        q = tl.where(idx % 2 == 0, byte >> 4, byte & 0xF)  # the even element in the high nibble
        value = tl.load(table_ptr + q, mask=mask, other=0.0)
        block = idx // BLOCKSIZE
        if NESTED:
            a8 = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            absmax = tl.load(code2_ptr + a8, mask=mask, other=0.0) * tl.load(absmax2_ptr + block // BLOCKSIZE2,
                                                                          mask=mask, other=0.0)
            absmax = absmax + tl.load(offset_ptr)  # a separate rounding: launched with enable_fp_fusion=False
        else:
            absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        return value * absmax

    @triton.jit
    def _nf4_code(q):
        """NF4_TABLE[q] for int32 codes `q`, from constants held in registers: a select tree on the four
        bits of the code (15 selects, no memory access; bitsandbytes' CUDA kernel decodes NF4 with a
        comparison tree the same way). The literals are NF4_TABLE's fp32 values (tests check each)."""
        b0 = (q & 1) != 0
        b1 = (q & 2) != 0
        b2 = (q & 4) != 0
        v0 = tl.where(b1, tl.where(b0, -0.39491748809814453, -0.5250730514526367),
                      tl.where(b0, -0.6961928009986877, -1.0))
        v1 = tl.where(b1, tl.where(b0, 0.0, -0.09105003625154495),
                      tl.where(b0, -0.18477343022823334, -0.28444138169288635))
        v2 = tl.where(b1, tl.where(b0, 0.33791524171829224, 0.24611230194568634),
                      tl.where(b0, 0.16093020141124725, 0.07958029955625534))
        v3 = tl.where(b1, tl.where(b0, 1.0, 0.7229568362236023),
                      tl.where(b0, 0.5626170039176941, 0.44070982933044434))
        return tl.where((q & 8) != 0, tl.where(b2, v3, v2), tl.where(b2, v1, v0))

    @triton.jit
    def nf4_rows(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, rows, row_len, col0, row_mask,
                 col_limit, ROWS: tl.constexpr, COLS: tl.constexpr, BLOCKSIZE: tl.constexpr,
                 BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr):
        """fp32 [ROWS, COLS] tile of an NF4 weight's dense row-major form: rows `rows` (masked by
        `row_mask`), columns col0 .. col0 + COLS (masked at `col_limit`, even). For a matmul's K loop:
        each row's COLS / 2 packed bytes are one contiguous load (32 bytes at COLS = 64), the scale is
        decoded once per absmax block in the tile (once per row when COLS <= BLOCKSIZE), and codes
        are looked up in registers (`_nf4_code`). Needs row_len % BLOCKSIZE == 0 and col0 % COLS == 0
        (rows start on block boundaries, a tile column range never straddles a block it does not
        cover whole); other layouts take `nf4_tile`. Multiplies with plain fp32 `*`: launch with
        enable_fp_fusion=False so the nested absmax keeps its two roundings."""
        start = rows.to(tl.int64) * row_len + col0  # flat index of each row's first column (even)
        half = tl.arange(0, COLS // 2)
        mask = row_mask[:, None] & (col0 + 2 * half < col_limit)[None, :]
        byte = tl.load(packed_ptr + (start // 2)[:, None] + half[None, :], mask=mask, other=0).to(tl.int32)
        vals = tl.interleave(_nf4_code(byte >> 4), _nf4_code(byte & 15))  # [ROWS, COLS], high nibble first
        block = start // BLOCKSIZE
        if COLS <= BLOCKSIZE:
            scale = block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, row_mask, BLOCKSIZE2,
                                NESTED, False)
            return vals * scale[:, None]
        else:
            NB: tl.constexpr = COLS // BLOCKSIZE
            blocks = block[:, None] + tl.arange(0, NB)[None, :]
            scale = block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, blocks, row_mask[:, None],
                                BLOCKSIZE2, NESTED, False)
            return tl.reshape(tl.reshape(vals, (ROWS, NB, BLOCKSIZE)) * scale[:, :, None], (ROWS, COLS))

    @triton.jit
    def mul_fp32(a, b, USE_MUL_RN: tl.constexpr):
        # mul_rn is never contracted and is FTZ like bitsandbytes' --use_fast_math build; the
        # interpreter has no libdevice, and its numpy multiply is a single rounding anyway.
        if USE_MUL_RN:
            return libdevice.mul_rn(a, b)
        else:
            return a * b

    @triton.jit
    def block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, mask,
                    BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, USE_MUL_RN: tl.constexpr):
        """fp32 absmax of absmax block(s) `block` (a scalar or a tensor), decoded when NESTED."""
        if NESTED:
            qabsmax = tl.load(absmax_ptr + block, mask=mask, other=0)
            code2 = tl.load(code2_ptr + qabsmax.to(tl.int32), mask=mask, other=0.0, eviction_policy="evict_last")
            absmax2 = tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0,
                              eviction_policy="evict_last")
            # Two roundings, as bitsandbytes: the product, then the offset add (no FMA).
            return mul_fp32(code2, absmax2, USE_MUL_RN) + tl.load(offset_ptr)
        else:
            return tl.load(absmax_ptr + block, mask=mask, other=0.0)

    # TRITON_INTERPRET=1 at import makes @triton.jit hand out interpreter functions instead of JITFunctions.
    _INTERPRETED = not isinstance(nf4_tile, triton.runtime.JITFunction)
else:
    _INTERPRETED = False


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 when fastft.kernels
    was imported): CPU tensors then run the Triton kernels instead of the torch reference."""
    return _INTERPRETED


# ----------------------------------------------------------------------------------------------
# Inputs: a Params4bit, the module holding one, or packed bytes + a QuantState (duck-typed)
# ----------------------------------------------------------------------------------------------

@dataclass
class NF4Weight:
    """A bitsandbytes 4-bit weight as the kernels read it: the packed bytes and the fields of its
    QuantState, validated (`from_quant_state`). Read by attribute: no bitsandbytes import."""
    packed: torch.Tensor  # uint8 [(numel + 1) // 2], flat: two codes per byte (float storage viewed as bytes)
    shape: tuple  # the dense weight, [out_features, in_features] for a Linear
    dtype: torch.dtype  # quant_state.dtype: the default output dtype
    blocksize: int
    quant_type: str  # "nf4" | "fp4"
    absmax: torch.Tensor  # fp32 per block, or uint8 codes when nested (double quantization)
    nested: bool
    offset: torch.Tensor | None = None  # nested: fp32, one value (read by the kernels through a pointer)
    absmax2: torch.Tensor | None = None  # nested: fp32 per blocksize2 absmax codes
    code2: torch.Tensor | None = None  # nested: fp32 [256]
    blocksize2: int = 0
    numel: int = field(init=False)

    def __post_init__(self):
        self.numel = math.prod(self.shape)

    def op_args(self) -> tuple[list[torch.Tensor], list[int]]:
        """The weight as a torch.library custom op's arguments (ops take tensors and plain values, not
        objects): [packed, absmax, absmax2, code2, offset], the absmax standing in for the three nested
        fields of a plain weight, and [rows, cols, blocksize, blocksize2, nested, quant type, dtype]
        as indexes into TABLES and OUT_DTYPES. `from_op_args` is the inverse."""
        if len(self.shape) != 2:
            raise ValueError(f"NF4 weight must be 2-D for the fused ops, got shape {list(self.shape)}")
        fill = self.absmax
        tensors = [self.packed, self.absmax, self.absmax2 if self.nested else fill,
                   self.code2 if self.nested else fill, self.offset if self.nested else fill]
        dtype = OUT_DTYPES.index(self.dtype) if self.dtype in OUT_DTYPES else -1
        return tensors, [*self.shape, self.blocksize, self.blocksize2, int(self.nested),
                         list(TABLES).index(self.quant_type), dtype]

    @classmethod
    def from_op_args(cls, tensors, meta) -> NF4Weight:
        """The NF4Weight `op_args` described, without the checks (it was checked when it was parsed)."""
        packed, absmax, absmax2, code2, offset = tensors
        rows, cols, blocksize, blocksize2, nested, quant_type, dtype = (int(v) for v in meta)
        w = cls(packed=packed, shape=(rows, cols), dtype=OUT_DTYPES[dtype] if dtype >= 0 else torch.float32,
                blocksize=blocksize, quant_type=list(TABLES)[quant_type], absmax=absmax, nested=bool(nested))
        if nested:
            w.absmax2, w.code2, w.offset, w.blocksize2 = absmax2, code2, offset, blocksize2
        return w

    @property
    def table(self) -> torch.Tensor:
        """The 16-entry fp32 code table (fastft's constants: bitsandbytes' kernels ignore quant_state.code)."""
        return _table(self.quant_type, self.packed.device)

    @classmethod
    def from_quant_state(cls, packed: torch.Tensor, quant_state) -> NF4Weight:
        """Parse and check bitsandbytes' ``weight.quant_state`` against its packed tensor."""
        missing = [k for k in ("absmax", "shape", "blocksize", "quant_type", "dtype")
                   if getattr(quant_state, k, None) is None]
        if missing:
            raise TypeError(f"dequantize_nf4: quant_state lacks {', '.join(missing)}; expected a "
                            f"bitsandbytes QuantState from quantize_4bit, got {type(quant_state).__name__}")
        quant_type = quant_state.quant_type
        if quant_type not in TABLES:
            raise ValueError(f"dequantize_nf4: quant_type {quant_type!r} is not supported; "
                             f"supported: {', '.join(TABLES)} (quantize with quant_type='nf4')")
        blocksize = int(quant_state.blocksize)
        if blocksize not in BLOCKSIZES:
            raise ValueError(f"dequantize_nf4: blocksize {blocksize} is not supported; supported: "
                             f"{', '.join(map(str, BLOCKSIZES))} (bitsandbytes' 4-bit blocksizes)")
        if isinstance(packed, torch.nn.Parameter):
            packed = packed.data
        state2 = getattr(quant_state, "state2", None)
        w = cls(packed=packed, shape=tuple(quant_state.shape), dtype=quant_state.dtype, blocksize=blocksize,
                quant_type=quant_type, absmax=quant_state.absmax, nested=state2 is not None)
        n_blocks = -(-w.numel // blocksize)
        if w.absmax.numel() != n_blocks:
            raise ValueError(f"dequantize_nf4: absmax has {w.absmax.numel()} values but shape "
                             f"{list(w.shape)} with blocksize {blocksize} needs {n_blocks}; the weight and "
                             "its quant_state do not belong together")
        if w.nested:
            if w.absmax.dtype != torch.uint8:
                raise TypeError(f"dequantize_nf4: a double-quantized absmax must be uint8 codes, got "
                                f"{w.absmax.dtype}")
            w.offset, w.absmax2, w.code2 = quant_state.offset, state2.absmax, state2.code
            w.blocksize2 = int(state2.blocksize)
            if w.offset is None or w.absmax2 is None or w.code2 is None:
                raise TypeError("dequantize_nf4: a double-quantized quant_state needs offset, state2.absmax "
                                "and state2.code")
            if w.blocksize2 < 1 or w.blocksize2 & (w.blocksize2 - 1):
                raise ValueError(f"dequantize_nf4: state2.blocksize {w.blocksize2} is not a power of two")
            if not isinstance(w.offset, torch.Tensor):  # a float after some state-dict round trips
                w.offset = torch.tensor(float(w.offset), dtype=torch.float32, device=w.absmax.device)
            for name, t, n in (("state2.absmax", w.absmax2, -(-n_blocks // w.blocksize2)),
                               ("state2.code", w.code2, 256), ("offset", w.offset, 1)):
                if t.dtype != torch.float32:
                    raise TypeError(f"dequantize_nf4: {name} must be float32, got {t.dtype}")
                if t.numel() != n:
                    raise ValueError(f"dequantize_nf4: {name} has {t.numel()} values, expected {n} for "
                                     f"{n_blocks} absmax blocks; the quant_state is inconsistent")
        elif w.absmax.dtype != torch.float32:
            raise TypeError(f"dequantize_nf4: absmax must be float32 (or uint8 with double quantization), "
                            f"got {w.absmax.dtype}")

        n_bytes = (w.numel + 1) // 2
        if packed.numel() * packed.element_size() != n_bytes:
            raise ValueError(f"dequantize_nf4: the packed weight has {packed.numel() * packed.element_size()} "
                             f"bytes but quant_state.shape {list(w.shape)} needs {n_bytes}; the weight and "
                             "its quant_state do not belong together")
        if not packed.is_contiguous():
            raise ValueError("dequantize_nf4: the packed weight must be contiguous; call .contiguous()")
        device = packed.device
        tensors = [("absmax", w.absmax)]
        if w.nested:
            tensors += [("state2.absmax", w.absmax2), ("state2.code", w.code2), ("offset", w.offset)]
        for name, t in tensors:
            if t.device != device:
                raise ValueError(f"dequantize_nf4: {name} is on {t.device} but the packed weight is on "
                                 f"{device}; move the whole layer with .to({str(device)!r})")
        # a float quant storage (bnb_4bit_quant_storage=torch.bfloat16, for FSDP) holds the same bytes
        w.packed = (packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)).reshape(-1)
        return w


_TABLE_CACHE: dict = {}


def _table(quant_type: str, device) -> torch.Tensor:
    """TABLES[quant_type] as an fp32 tensor on `device`, made once per device."""
    key = (quant_type, str(device))
    if key not in _TABLE_CACHE:
        _TABLE_CACHE[key] = torch.tensor(TABLES[quant_type], dtype=torch.float32, device=device)
    return _TABLE_CACHE[key]


def _unpack(weight_or_packed, quant_state):
    """-> (packed tensor, quant_state object)."""
    obj = weight_or_packed
    if quant_state is None:
        if isinstance(obj, torch.nn.Module):
            weight = getattr(obj, "weight", None)
            if weight is None or getattr(weight, "quant_state", None) is None:
                raise TypeError(f"dequantize_nf4: module {type(obj).__name__} has no 4-bit weight "
                                "(no .weight.quant_state); pass a bitsandbytes Linear4bit / Params4bit, "
                                "or packed bytes with their quant_state")
            obj = weight
        if not isinstance(obj, torch.Tensor):
            raise TypeError(f"dequantize_nf4: expected a bitsandbytes Params4bit, the module holding it, "
                            f"an NF4Weight, or a packed uint8 tensor with quant_state=..., got {type(obj).__name__}")
        quant_state = getattr(obj, "quant_state", None)
        if quant_state is None:
            raise TypeError("dequantize_nf4: this tensor has no quant_state: pass quant_state=... with "
                            "packed bytes, or quantize the Params4bit first (moving it to CUDA does)")
    elif not isinstance(obj, torch.Tensor):
        raise TypeError(f"dequantize_nf4: with quant_state=..., the first argument must be the packed "
                        f"tensor, got {type(obj).__name__}")
    packed = obj.data if isinstance(obj, torch.nn.Parameter) else obj
    if isinstance(quant_state, (list, tuple)):
        raise TypeError("dequantize_nf4: the list form of a quant state (bitsandbytes < 0.41) is not "
                        "supported; pass a bitsandbytes.functional.QuantState")
    return packed, quant_state


def weight_of(weight_or_packed, quant_state) -> NF4Weight:
    """An NF4Weight from any accepted input (an NF4Weight passes through)."""
    if isinstance(weight_or_packed, NF4Weight):
        if quant_state is not None:
            raise TypeError("dequantize_nf4: an NF4Weight carries its quant state; pass quant_state=None")
        return weight_or_packed
    return NF4Weight.from_quant_state(*_unpack(weight_or_packed, quant_state))


def output_dtype(w: NF4Weight, dtype, out) -> torch.dtype:
    if dtype is None and out is not None:
        dtype = out.dtype
    dtype = dtype or w.dtype
    if dtype not in OUT_DTYPES:
        raise TypeError(f"dequantize_nf4: output dtype {dtype} is not supported; use torch.float16, "
                        "torch.bfloat16 or torch.float32")
    return dtype


def check_output(w: NF4Weight, out, dtype):
    device = w.packed.device
    if out is not None:
        if out.device != device:
            raise ValueError(f"dequantize_nf4: out is on {out.device} but the packed weight is on "
                             f"{device}; move the whole layer with .to({str(device)!r})")
        if out.dtype != dtype:
            raise TypeError(f"dequantize_nf4: out is {out.dtype} but the output dtype is {dtype}; "
                            "pass dtype=out.dtype or allocate out with that dtype")
        if tuple(out.shape) != w.shape:
            raise ValueError(f"dequantize_nf4: out has shape {list(out.shape)}, expected "
                             f"{list(w.shape)} (quant_state.shape)")
        if not out.is_contiguous():
            raise ValueError("dequantize_nf4: out must be contiguous")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"dequantize_nf4: tensors on {device.type} are not supported; use a CUDA "
                         "device (or the CPU, where the torch reference runs)")


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------

def dequantize_nf4_reference(weight_or_packed, quant_state=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pure-torch dequantization with the same fp32 roundings as the kernels (see the module docstring).
    Takes what `dequantize_nf4` takes, or an NF4Weight; it is what `dequantize_nf4` runs on CPU tensors
    outside the Triton interpreter, and the reference path of fastft.kernels.lora."""
    w = weight_of(weight_or_packed, quant_state)
    dtype = output_dtype(w, dtype, None)
    check_output(w, None, dtype)
    codes = torch.stack([w.packed >> 4, w.packed & 15], dim=1).reshape(-1)[: w.numel].long()
    if w.nested:
        blocks = torch.arange(w.absmax.numel(), device=w.packed.device)
        absmax = w.code2[w.absmax.long()] * w.absmax2[blocks // w.blocksize2]  # rounding 1
        absmax = absmax + w.offset.reshape(())  # rounding 2: a separate op, never fused
    else:
        absmax = w.absmax
    index = torch.arange(w.numel, device=w.packed.device) // w.blocksize
    values = w.table[codes] * absmax.reshape(-1)[index]
    return values.to(dtype).reshape(w.shape)
