"""Launch configurations of the LoRA matmul kernel (fastft.kernels.lora_kernel) and how a launch gets
one: by shape (`pick_config`), fitted to the device's shared memory (`fit_config` down the `SMALLER`
chain), and with its reduction split so that the grid fills the GPU (`split_count`).

    from fastft.kernels.lora_configs import CONFIGS, pick_config, split_count
    name = pick_config("mm", M, N, nf4=True)       # "nf4_128x64x64_w4_s2" for a large NF4 forward
    BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages = CONFIGS[name]

A config is (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); a 0 in BLOCK_M or BLOCK_N
stands for BLOCK_R, the rank rounded up to a power of two (the thin products x·Aᵀ and dY·B have
N = r, the reductions dA and dBᵀ have M = r). Every config in CONFIGS is compiled for sm_80/89/90 by
tests/test_kernel_compile.py; CANDIDATES are only timed by the benchmark.

Also `say_once`: the LoRA family's one-time log of a fallback (a config that does not fit here, a
call the fused path does not take), under the logger "fastft.kernels.lora".
"""
from __future__ import annotations

import functools
import logging

import torch
import triton

from .nf4_format import interpreted

# The family's one logger (the name users filter on), whichever LoRA module says the fallback.
log = logging.getLogger("fastft.kernels.lora")

# Reduction splits (`split_count`): the thin products x·Aᵀ and dY·B (N = r, so M / BLOCK_M tiles only:
# 64 at M = 4096) split K into pieces of at least THIN_MIN_K, the dA / dB reductions split the tokens
# into pieces of at least RED_MIN_K; partial sums are fp32, added in a fixed order.
THIN_MIN_K = 128
RED_MIN_K = 512
WAVES = 2  # split reductions until the grid holds at least this many CTAs per SM (one wave is a tail)

# Launch configurations, one table for every launch (and for tests/test_kernel_compile.py, which
# compiles each for sm_80/89/90). Chosen by shape in `pick_config`; `python -m bench.kernels lora --sweep`
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
# and the operand width. Before a CUDA launch `lora_kernel.launch_plan` compares it with the device's
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


_SAID: set[str] = set()


def say_once(message: str) -> None:
    """Log a fallback reason the first time it happens in this process."""
    if message not in _SAID:
        _SAID.add(message)
        log.warning("fastft.kernels.lora: %s", message)


def pick_config(kind: str, M: int, N: int, nf4: bool, fp32: bool = False) -> str:
    """The launch config for one product by shape; `kind`: "mm" (large), "thin" (N = r), "red" (M = r).
    On a CUDA device the launch plan may swap it for a smaller one that fits its shared memory (SMALLER)."""
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


@functools.cache
def _smem_optin(index: int) -> int:
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


def smem_limit(device: torch.device) -> int | None:
    """The most shared memory one block may use on a CUDA device, bytes (cached); None off CUDA."""
    if device.type != "cuda":
        return None
    return _smem_optin(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_sms(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device (cached: no query per call); None off CUDA, where
    nothing is split (tests monkeypatch this to run the split launches under the interpreter)."""
    if device.type != "cuda":
        return None
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def split_count(tiles: int, K: int, min_k: int, sms: int | None) -> int:
    """Reduction splits for a launch of `tiles` output tiles over a K-long reduction: enough for
    WAVES * sms programs, but no split shorter than `min_k`; 1 without an SM count. A pure function
    of the shape and the GPU, so a shape always takes the same splits (deterministic sums)."""
    if not sms:
        return 1
    return max(1, min(triton.cdiv(WAVES * sms, max(tiles, 1)), K // min_k))
