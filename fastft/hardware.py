"""The GPUs fastft targets, in one table: memory for the planner and the benchmark's memory cap,
peak dense bf16 tensor throughput for MFU, and DRAM bandwidth for kernel roofs (datasheet values).

    from fastft.hardware import TARGETS
    TARGETS["rtx4090"].memory_bytes   # 24 GiB
"""
from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    memory_bytes: int | None  # None: no cap (cpu)
    bf16_tflops: float | None  # dense, fp32 accumulate
    dram_gbps: float | None  # GB/s


TARGETS = {
    t.name: t
    for t in (
        Target("rtx4090", "NVIDIA GeForce RTX 4090 (24 GB, sm_89)", 24 * GiB, 165.2, 1008.0),
        Target("a100-40", "NVIDIA A100 40GB (sm_80)", 40 * GiB, 312.0, 1555.0),
        Target("a100-80", "NVIDIA A100 80GB SXM (sm_80)", 80 * GiB, 312.0, 2039.0),
        Target("h100", "NVIDIA H100 80GB SXM (sm_90)", 80 * GiB, 989.4, 3350.0),
        Target("cpu", "CPU (tiny model; exercises the harness, its figures are not GPU claims)", None, None, None),
    )
}
GPU_TARGETS = [n for n in TARGETS if n != "cpu"]


def get(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]
