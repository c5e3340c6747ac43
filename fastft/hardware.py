"""The GPUs fastft targets, in one table: memory for the planner and the benchmark's memory cap,
peak dense bf16 tensor throughput for MFU, and DRAM bandwidth for kernel roofs (datasheet values).

    from fastft.hardware import TARGETS, detect_target
    TARGETS["rtx4090"].memory_bytes   # 24 GiB
    detect_target()                   # "h100" on an H100 or H200, "cpu" without CUDA
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


def target_for_device(name: str, memory_bytes: int) -> str:
    """The target a GPU of this name and memory measures as: its own row where there is one; an
    H200/H800 counts as h100 (same sm_90), any other GPU too (the result names the real device)."""
    if "A100" in name:
        return "a100-80" if memory_bytes > 60 * GiB else "a100-40"
    if "4090" in name:
        return "rtx4090"
    return "h100"


def detect_target(device: int = 0) -> str:
    """The target of CUDA device ``device``, or "cpu" without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    props = torch.cuda.get_device_properties(device)
    return target_for_device(props.name, props.total_memory)
