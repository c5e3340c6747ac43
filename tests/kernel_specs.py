"""What tests/test_kernel_compile.py compiles for sm_80 / sm_89 / sm_90 without a GPU: every launch
config the kernel modules ship, in the specializations their launchers produce.

    from kernel_specs import COMPILE_CONFIGS     # {"fastft.kernels.nf4": [spec, ...], ...}

A spec is a dict: name, kernel ("module:attribute"), signature, constexprs, options, divisible_by_16,
ptx_require, ptx_forbid (tests/test_kernel_compile.py documents each field). The launch configs
themselves (LAUNCH_CONFIGS, CONFIGS) stay in the kernel modules. Each spec is derived, not written:
the kernel module's own launch-argument builder (`nf4.launch_args`, `lora_kernel.launch_plan`) builds the
real argument list of a shipped launch at Llama-3-8B shapes on CPU stand-in tensors, and Triton's
JIT specialization function turns it into signature, constexprs and divisibility, so the spec and
the run-time specialization cannot drift (tests/test_lora.py checks them against the JIT's binder).
"""
from __future__ import annotations

import importlib.util

# Llama-3-8B: hidden 4096, MLP 14336, k/v projections 1024; 4096 tokens per step (e.g. 2 x 2048);
# an H100 / H200 has 132 SMs (the split counts depend on it, and the split counts decide k_per_split).
LLAMA_M, LLAMA_SMS = 4096, 132
# LoRA ranks compiled: BLOCK_R (the next power of two >= r, at least 16) is the one rank-dependent
# tile size, so r = 16 stands for every r <= 16, and 128 is lora.MAX_FUSED_RANK, the largest tiles.
LORA_RANKS = (16, 64, 128)
# The compute dtypes each lora config family serves (`lora_configs.pick_config`): fp32 base products take
# f32_*, 16-bit ones mm_* (dense) and nf4_* (NF4 in_kernel); thin and red serve every dtype. bf16
# stands for both 16-bit dtypes (fp16 tiles have the same bytes).
LORA_DTYPES = {"mm": ("bf16",), "nf4": ("bf16",), "f32": ("fp32",), "thin": ("bf16", "fp32"), "red": ("bf16", "fp32")}


def launch_defaults() -> dict:
    """num_warps / num_stages as the running triton fills them in for a launch that leaves them out,
    read from triton itself: the JIT takes the CUDA backend's `parse_options` defaults, the autotuner
    `triton.Config`'s (fastft.kernels.nf4 launches both ways). Both are 4 warps and 3 stages in triton
    3.6 and 3.9; a version that parts them would need the two launches compiled apart."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend

    jit = CUDABackend(GPUTarget("cuda", 90, 32)).parse_options({})
    config = {k: p.default for k, p in inspect.signature(triton.Config.__init__).parameters.items()}
    out = {k: getattr(jit, k) for k in ("num_warps", "num_stages")}
    differ = {k: (v, config.get(k)) for k, v in out.items() if config.get(k) != v}
    if differ:
        raise AssertionError(f"triton {triton.__version__}: the JIT's and triton.Config's launch defaults differ "
                             f"({differ}, JIT first): compile the nf4 kernel's autotuned and direct launches apart")
    return out


def _specialize(kernel, args: list, kwargs: dict) -> tuple[dict, dict, list, dict]:
    """(signature, constexprs, divisible_by_16, options) of one launch, by Triton's own rule
    (`native_specialize_impl`, the function the JIT's argument binder calls, in triton 3.6 and 3.9):
    an int equal to 1 becomes a constexpr, an int or pointer divisible by 16 gets tt.divisibility 16,
    ints past 2**31 are i64, floats fp32."""
    import inspect

    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    names = list(inspect.signature(getattr(kernel, "fn", kernel)).parameters)
    signature, constexprs, divisible = {}, {}, []
    for name, value in zip(names, args):
        ty, key = native_specialize_impl(BaseBackend, value, False, True, True)
        if ty == "constexpr":
            constexprs[name] = key
        else:
            signature[name] = ty
            if key == "D":
                divisible.append(name)
    options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages", "enable_fp_fusion")}
    constexprs.update({k: v for k, v in kwargs.items() if k not in options})
    options = {**launch_defaults(), **options}  # what the launch leaves out, triton fills in
    params = inspect.signature(getattr(kernel, "fn", kernel)).parameters
    constexprs.update({k: p.default for k, p in params.items()  # constexpr defaults the launch leaves out
                       if k not in constexprs and k not in signature and p.default is not inspect.Parameter.empty})
    return signature, constexprs, divisible, options


def nf4_launches() -> list[tuple[str, list, dict]]:
    """fastft.kernels.nf4: every LAUNCH_CONFIG on the production specialization (Llama-3-8B's MLP
    weight 14336 x 4096, blocksize 64, nested; bf16 and fp32 outputs: fp32 holds the most registers),
    plus the blocksize extremes, fp16 and non-nested with the largest tile; each spec derived from
    `nf4.launch_args`: (name, args, kwargs) as the launcher passes them."""
    import torch
    from fastft.kernels import nf4

    def weight(N, K, blocksize, nested):
        n = N * K
        blocks = n // blocksize
        t = torch.empty
        return nf4.NF4Weight(packed=t(n // 2, dtype=torch.uint8), shape=(N, K), dtype=torch.bfloat16,
                             blocksize=blocksize, quant_type="nf4",
                             absmax=t(blocks, dtype=torch.uint8 if nested else torch.float32), nested=nested,
                             offset=t(1, dtype=torch.float32) if nested else None,
                             absmax2=t(-(-blocks // 256), dtype=torch.float32) if nested else None,
                             code2=t(256, dtype=torch.float32) if nested else None, blocksize2=256 if nested else 0)

    out_dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    cases = [(c, 64, True, out_ty) for c in nf4.LAUNCH_CONFIGS for out_ty in ("bf16", "fp32")]
    big = max(nf4.LAUNCH_CONFIGS, key=lambda c: (c.bytes_per_program, c.num_warps))
    cases += [(big, bs, nested, out_ty) for bs, nested, out_ty in ((32, True, "fp16"), (4096, True, "bf16"),
                                                                   (64, False, "fp16"), (4096, False, "fp32"))]
    launches = []
    for c, bs, nested, out_ty in cases:
        w = weight(14336, 4096, bs, nested)
        args, kwargs = nf4.launch_args(w, torch.empty(w.shape, dtype=out_dtypes[out_ty]), c)
        launches.append((f"nf4_dequant-{c.name}-bs{bs}-{'nested' if nested else 'flat'}-{out_ty}", args, kwargs))
    return launches


def nf4_configs() -> list[dict]:
    """fastft.kernels.nf4: the specs of `nf4_launches`, with the PTX each must (not) contain."""
    from fastft.kernels import nf4

    configs = []
    for name, args, kwargs in nf4_launches():
        signature, constexprs, divisible, options = _specialize(nf4._dequantize_4bit_kernel, args, kwargs)
        configs.append({
            "name": name, "kernel": "fastft.kernels.nf4:_dequantize_4bit_kernel",
            "signature": signature, "constexprs": constexprs, "options": options, "divisible_by_16": divisible,
            # bit-exactness: FTZ multiplies as bitsandbytes' fast-math build, a separate rn add for
            # the offset, no FMA; speed: 16-byte loads and stores, no shared-memory shuffle
            "ptx_require": ["mul.rn.ftz.f32", "st.global.v4.b32"] + (["add.rn.f32"] if constexprs["NESTED"] else []),
            "ptx_forbid": ["fma.rn", "bar.sync"],
        })
    return configs


def lora_launches() -> list[tuple[str, list, dict]]:
    """Every launch config fastft.kernels.lora_configs ships, in the launches that use it, at Llama-3-8B
    shapes, for each LoRA rank in LORA_RANKS and each compute dtype the config serves (LORA_DTYPES):
    (name, args, kwargs) exactly as
    `lora_kernel.launch_plan` builds them for `_lora_matmul_kernel` (CPU stand-in tensors: empty, never
    touched; torch aligns them as it aligns CUDA ones)."""
    import torch
    import triton
    from fastft.kernels.lora_configs import CONFIGS, RED_MIN_K, THIN_MIN_K, split_count
    from fastft.kernels.lora_kernel import launch_plan
    from fastft.kernels.nf4_format import NF4Weight

    M, sms = LLAMA_M, LLAMA_SMS
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}

    def t(*shape, dtype):
        return torch.empty(shape, dtype=dtype)

    def nf4(N, K):  # bitsandbytes' Llama default: blocksize 64, double quantization (blocksize2 256)
        n = N * K
        return NF4Weight(packed=t(n // 2, dtype=torch.uint8), shape=(N, K), dtype=torch.bfloat16, blocksize=64,
                         quant_type="nf4", absmax=t(n // 64, dtype=torch.uint8), nested=True,
                         offset=t(1, dtype=torch.float32), absmax2=t(n // 64 // 256, dtype=torch.float32),
                         code2=t(256, dtype=torch.float32), blocksize2=256)

    def plan(name, launch, r, ty, p, q, out_dtype=None, **kw):
        _out, _grid, args, kwargs = launch_plan(p, q, out_dtype or p.dtype, config=name, check_device=False,
                                                rank=r, **kw)
        return (f"{name}-{launch}-r{r}-{ty}", args, kwargs)

    K, N = 4096, 14336  # the MLP up projection: forward x·Wᵀ, backward dY·W
    launches = []
    for name in CONFIGS:
        for r in LORA_RANKS:
            for ty in LORA_DTYPES[name[:name.index("_")]]:
                d = dtypes[ty]
                x, dy, xa, dyb = t(M, K, dtype=d), t(M, N, dtype=d), t(M, r, dtype=d), t(M, r, dtype=d)
                a, b = t(r, K, dtype=d), t(N, r, dtype=d)  # adapters cast to the compute dtype
                # the few-token configs run at 256 tokens, the others at 4096
                m = 256 if name.startswith(("mm_64", "nf4_64")) else M
                if name.startswith(("mm_", "nf4_", "f32_")):  # base matmul + LoRA epilogue: forward and dX
                    bases = {"mm_": ["dense"], "nf4_": ["nf4"], "f32_": ["nf4", "dense"]}[name[:name.index("_") + 1]]
                    for base in bases:
                        fwd, dx = ((nf4(N, K), True), (nf4(N, K), False)) if base == "nf4" else (t(N, K, dtype=d).t(),
                                                                                                 t(N, K, dtype=d))
                        tag = "" if len(bases) == 1 else f"-{base}"
                        launches.append(plan(name, f"fwd{tag}", r, ty, x[:m], fwd, lora=(xa[:m], b.t()), scale=2.0))
                        launches.append(plan(name, f"dx{tag}", r, ty, dy[:m], dx, lora=(dyb[:m], a), scale=2.0))
                elif name.startswith("thin_"):  # x·Aᵀ over K = 4096, dY·B over K = N = 14336, split as shipped
                    bm = CONFIGS[name][0]
                    for launch, p, q in (("xa", x, a.t()), ("dyb", dy, b)):
                        split = split_count(triton.cdiv(M, bm), p.shape[1], THIN_MIN_K, sms)
                        launches.append(plan(name, launch, r, ty, p, q, kind="thin", split_k=split))
                elif name.startswith("red_"):  # dA = s·dYBᵀ·x [r, 4096], dBᵀ = s·XAᵀ·dY [r, 1024] (k_proj)
                    for launch, p, q in (("da", dyb.t(), x), ("db", xa.t(), t(M, 1024, dtype=d))):
                        tiles = triton.cdiv(q.shape[1], 128)  # as lora_backward counts them
                        split = split_count(tiles, M, RED_MIN_K, sms)
                        launches.append(plan(name, launch, r, ty, p, q, torch.float32, alpha=2.0, kind="red",
                                             split_k=split))
                else:
                    raise AssertionError(f"kernel_specs: no launch for lora config {name}; add one")
    return launches


def lora_configs() -> list[dict]:
    """fastft.kernels.lora_kernel: every shipped config in the specializations its Llama-3-8B launches get
    from Triton's JIT (`lora_launches` + `_specialize`): unit strides and sizes are constexprs,
    every pointer, size, stride and k_per_split divisible by 16 is marked so."""
    from fastft.kernels.lora_configs import CONFIGS, SMALLER
    from fastft.kernels.lora_kernel import _lora_matmul_kernel

    launches = lora_launches()
    names = {f"lora_matmul-{name}" for name, _, _ in launches}
    configs = []
    for name, args, kwargs in launches:
        signature, constexprs, divisible, options = _specialize(_lora_matmul_kernel, args, kwargs)
        spec = {"name": f"lora_matmul-{name}", "kernel": "fastft.kernels.lora_kernel:_lora_matmul_kernel",
                "signature": signature, "constexprs": constexprs, "options": options, "divisible_by_16": divisible}
        # over a target's shared memory, `lora_kernel.launch_plan` launches the first config of the SMALLER
        # chain that fits instead (`lora_configs.fit_config`): the chain's specs of the same launch, rank and
        # dtype (the few-token fallback of a base matmul is compiled at 256 tokens: M is no constexpr)
        config = max((c for c in CONFIGS if name.startswith(c + "-")), key=len)
        rest, chain, c = name[len(config):], {}, config
        while c is not None:
            chain[c] = f"lora_matmul-{c}{rest}"
            c = SMALLER.get(c)
        missing = [n for n in chain.values() if n not in names]
        if missing:
            raise AssertionError(f"kernel_specs: {spec['name']} falls back to {missing}, which lora_launches does not "
                                 "compile; add the launch")
        r, ty = rest.rsplit("-", 2)[1:]
        spec["refusal"] = {"fit": "fastft.kernels.lora_configs:fit_config", "rank": int(r[1:]), "dtype": ty,
                           "chain": chain}
        configs.append(spec)
    return configs


def fused_configs() -> list[dict]:
    """fastft.kernels.fused_mlp: the SwiGLU forward and backward kernels on Llama-3-8B's MLP activations
    (4096 tokens x 14336), bf16, fp16 and fp32, derived from `fused_mlp.swiglu_launch_args`."""
    import torch
    from fastft.kernels import fused_mlp

    configs = []
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for ty, dtype in dtypes.items():
        for kernel_name, count in (("_swiglu_forward_kernel", 3), ("_swiglu_backward_kernel", 6)):
            tensors = [torch.empty(LLAMA_M, 14336, dtype=dtype) for _ in range(count)]
            _grid, args, kwargs = fused_mlp.swiglu_launch_args(*tensors, interpreted_run=False)
            kernel = getattr(fused_mlp, kernel_name)
            signature, constexprs, divisible, options = _specialize(kernel, args, kwargs)
            configs.append({"name": f"swiglu-{kernel_name.strip('_').removesuffix('_kernel')}-{ty}",
                            "kernel": f"fastft.kernels.fused_mlp:{kernel_name}", "signature": signature,
                            "constexprs": constexprs, "options": options, "divisible_by_16": divisible,
                            # one pass over memory: vector loads, no shared-memory shuffle
                            "ptx_forbid": ["bar.sync"]})
    return configs


# module -> its specs; empty without the triton wheel (the compile test then skips)
if importlib.util.find_spec("triton") is None:
    COMPILE_CONFIGS = {"fastft.kernels.nf4": [], "fastft.kernels.lora_kernel": [], "fastft.kernels.fused_mlp": []}
else:
    COMPILE_CONFIGS = {"fastft.kernels.nf4": nf4_configs(), "fastft.kernels.lora_kernel": lora_configs(),
                       "fastft.kernels.fused_mlp": fused_configs()}
