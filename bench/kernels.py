"""Kernel microbenchmarks, one module per kernel family.

    python -m bench.kernels nf4                    # NF4 dequant, Llama-3-8B shapes (GPU)
    python -m bench.kernels nf4 --cpu-smoke        # the same harness end to end on CPU (interpreter)
    python -m bench.kernels nf4 --help
    python -m bench.kernels static                 # no GPU: compiled configs' registers, spills, SASS, roofline

A family is a module bench/kernels_<family>.py with ``main(argv) -> int``; add it to FAMILIES.
"""
from __future__ import annotations

import importlib
import sys

FAMILIES = {
    "nf4": ("bench.kernels_nf4", "NF4 / FP4 dequantization: fastft Triton vs bitsandbytes, Unsloth, torch"),
    "lora": ("bench.kernels_lora", "fused LoRA linear fwd+bwd: fastft Triton vs Unsloth, PEFT, cuBLAS floor"),
    "static": ("bench.static", "no GPU: compile every shipped config for sm_80/89/90; registers, spills, SASS per K step"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in FAMILIES:
        print(__doc__.strip())
        print("\nfamilies:")
        for name, (_, what) in FAMILIES.items():
            print(f"  {name:6s} {what}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nbench.kernels: unknown family {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    return importlib.import_module(FAMILIES[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
