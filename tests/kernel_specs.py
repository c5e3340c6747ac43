"""What tests/test_kernel_compile.py compiles for sm_80 / sm_89 / sm_90 without a GPU: every launch
config the kernel modules ship, in the specializations their launchers produce.

    from kernel_specs import COMPILE_CONFIGS     # {"fastft.kernels.nf4": [spec, ...], ...}

A spec is a dict: name, kernel ("module:attribute"), signature, constexprs, options, divisible_by_16,
ptx_require, ptx_forbid (tests/test_kernel_compile.py documents each field). The launch configs
themselves (LAUNCH_CONFIGS, CONFIGS) stay in the kernel modules; this file only says how each is
compiled, and must follow a kernel's signature when it changes.
"""
from __future__ import annotations

import importlib.util


def nf4_configs() -> list[dict]:
    """fastft.kernels.nf4: every LAUNCH_CONFIG on the production specialization, plus the extremes."""
    from fastft.kernels.nf4 import LAUNCH_CONFIGS

    sig = {"packed_ptr": "*u8", "absmax_ptr": "*fp32", "table_ptr": "*fp32", "absmax2_ptr": "*fp32",
           "code2_ptr": "*fp32", "offset_ptr": "*fp32", "out_ptr": "*bf16", "n_elements": "i32",
           "n_bytes": "i32", "n_blocks": "i32"}
    cases = []
    # Every shipped config on the production specialization (blocksize 64, nested, bf16 and fp32:
    # fp32 holds the most registers per output) ...
    for c in LAUNCH_CONFIGS:
        for out_ty in ("bf16", "fp32"):
            cases.append((c, 64, True, out_ty))
    # ... and the blocksize extremes (tile shapes 4096x... rows of 16 bytes; one row of 2048), fp16,
    # non-nested, with the largest tile.
    big = max(LAUNCH_CONFIGS, key=lambda c: (c.bytes_per_program, c.num_warps))
    for bs, nested, out_ty in ((32, True, "fp16"), (4096, True, "bf16"), (64, False, "fp16"),
                               (4096, False, "fp32")):
        cases.append((big, bs, nested, out_ty))
    configs = []
    for c, bs, nested, out_ty in cases:
        s = dict(sig, out_ptr=f"*{out_ty}")
        if not nested:
            s["absmax_ptr"] = "*fp32"
        else:
            s["absmax_ptr"] = "*u8"
        configs.append(dict(
            name=f"nf4_dequant-{c.name}-bs{bs}-{'nested' if nested else 'flat'}-{out_ty}",
            kernel="fastft.kernels.nf4:_dequantize_4bit_kernel",
            signature=s,
            constexprs=dict(HALF=bs // 2, BLOCKSIZE2=256, NESTED=nested, BYTES_PER_PROGRAM=c.bytes_per_program,
                            USE_MUL_RN=True, BF16_BY_BITS=False),
            options=dict(num_warps=c.num_warps, num_stages=1, enable_fp_fusion=False),
            # torch allocations are 16-byte aligned; Llama shapes make every count a multiple of 16
            divisible_by_16=list(s),
            # bit-exactness: FTZ multiplies as bitsandbytes' fast-math build, a separate rn add for
            # the offset, no FMA; speed: 16-byte stores and no shared-memory shuffle
            ptx_require=["mul.rn.ftz.f32", "st.global.v4.b32"] + (["add.rn.f32"] if nested else []),
            ptx_forbid=["fma.rn", "bar.sync"],
        ))
    return configs


def lora_configs() -> list[dict]:
    """fastft.kernels.lora: every shipped config in the specializations the launchers produce.

    Triton's JIT turns integer arguments equal to 1 into constants, so each launch's unit strides are
    constexprs here, as at run time (which strides are 1 follows from the launchers' views). Worst
    cases for registers: BLOCK_R 128 (r up to MAX_FUSED_RANK) in every epilogue, NF4 nested with bias.
    """
    from fastft.kernels.lora import CONFIGS

    ptrs = ("p_ptr", "q_ptr", "c_ptr", "l_ptr", "r_ptr", "bias_ptr", "absmax_ptr", "table_ptr", "absmax2_ptr",
            "code2_ptr", "offset_ptr")
    ints = ("M", "N", "K", "RANK", "k_per_split", "stride_pm", "stride_pk", "stride_qk", "stride_qn",
            "stride_cs", "stride_cm", "stride_cn", "stride_lm", "stride_lr", "stride_rr", "stride_rn")
    unit = {  # launch -> the strides that are 1
        "fwd": ("stride_pk", "stride_qk", "stride_cn", "stride_lr", "stride_rr"),  # x·Wᵀ + s·XA·Bᵀ
        "dx": ("stride_pk", "stride_qn", "stride_cn", "stride_lr", "stride_rn"),  # dY·W + s·dYB·A
        "thin": ("stride_pk", "stride_qk", "stride_cn", "stride_lr", "stride_rn"),  # x·Aᵀ (dY·B: qn)
        "red": ("stride_pm", "stride_qn", "stride_cn", "stride_lr", "stride_rn"),  # dYBᵀ·x, XAᵀ·dY
    }
    cases = []  # (config name, launch, dtype, q: "dense" | "nf4" | "nf4_flat", bias, BLOCK_R, split)
    # every config once in its heaviest specialization (bf16, BLOCK_R 128, bias, NF4 nested), the large
    # NF4 one in both operand layouts; one fp16 and the fp32 one (CI compiles each for 3 targets, 1-10 s
    # per compile on 2 cores, so the list stays short)
    for name in CONFIGS:
        if name.startswith("mm_"):
            cases.append((name, "fwd", "bf16", "dense", True, 128, False))
        elif name.startswith("nf4_"):
            cases.append((name, "fwd", "bf16", "nf4", True, 128, False))
            if name == "nf4_128x64x64_w4_s2":
                cases.append((name, "dx", "bf16", "nf4", False, 128, False))
        elif name.startswith("thin_"):
            cases.append((name, "thin", "bf16", "dense", False, 128, False))
        elif name.startswith("red_"):
            cases.append((name, "red", "bf16", "dense", False, 128, True))
    cases.append(("nf4_128x64x64_w4_s2", "fwd", "fp16", "nf4_flat", True, 64, False))
    cases.append(("f32_64x64x32_w4_s2", "fwd", "fp32", "nf4", True, 64, False))
    configs = []
    for name, launch, dtype, q, bias, block_r, split in cases:
        bm, bn, bk, group_m, num_warps, num_stages = CONFIGS[name]
        bm, bn = bm or block_r, bn or block_r
        nf4 = q.startswith("nf4")
        nested = q == "nf4"
        out = "fp32" if split else dtype
        sig = {k: f"*{dtype}" for k in ptrs}
        sig.update(c_ptr=f"*{out}", bias_ptr=f"*{dtype}" if bias else f"*{out}",
                   q_ptr="*u8" if nf4 else f"*{dtype}", absmax_ptr="*u8" if nested else "*fp32",
                   table_ptr="*fp32", absmax2_ptr="*fp32", code2_ptr="*fp32", offset_ptr="*fp32")
        sig.update({k: "i32" for k in ints if k not in unit[launch]})
        sig.update(alpha="fp32", scale="fp32")
        constexprs = {k: 1 for k in unit[launch]}
        constexprs.update(HAS_LORA=launch in ("fwd", "dx"), HAS_BIAS=bias, Q_NF4=nf4, NESTED=nested,
                          BLOCKSIZE=64, BLOCKSIZE2=256, IEEE=dtype == "fp32", BLOCK_M=bm, BLOCK_N=bn,
                          BLOCK_K=bk, BLOCK_R=block_r, GROUP_M=group_m)
        options = dict(num_warps=num_warps, num_stages=num_stages)
        if nested:
            options["enable_fp_fusion"] = False
        configs.append(dict(
            name=f"lora_matmul-{name}-{launch}-{dtype}-{q}{'-bias' if bias else ''}-r{block_r}",
            kernel="fastft.kernels.lora:_lora_matmul_kernel", signature=sig, constexprs=constexprs, options=options,
            # torch allocations are 16-byte aligned; Llama shapes make sizes and leading strides 16-divisible
            divisible_by_16=[k for k in sig if k.endswith("_ptr") or k in ("M", "N", "K", "stride_pm",
                                                                            "stride_qk", "stride_qn", "stride_cm")
                             and k in sig],
        ))
    return configs


# module -> its specs; empty without the triton wheel (the compile test then skips)
if importlib.util.find_spec("triton") is None:
    COMPILE_CONFIGS = {"fastft.kernels.nf4": [], "fastft.kernels.lora": []}
else:
    COMPILE_CONFIGS = {"fastft.kernels.nf4": nf4_configs(), "fastft.kernels.lora": lora_configs()}
