"""fastft.kernels.lora: the fused LoRA linear against its pure-torch reference and PEFT's own layers.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (conftest) with small tiles, so the odd sizes
below span several tiles and K steps; on a GPU the same tests run the shipped launch configs, and
the GPU-only test at the end runs Llama-3-8B layer shapes in bf16.
"""
import logging

import numpy as np
import pytest
import torch
from fastft.kernels import lora, lora_configs, lora_kernel, nf4, nf4_format
from support import assert_close

# One tolerance per dtype, relative to the largest reference magnitude: fp32 differs from the
# reference only in summation order; fp16/bf16 round the output, x·Aᵀ and dY·B once each.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
SHAPES = [  # (tokens M, in_features K, out_features N, r, bias)
    (1, 40, 24, 1, False),  # one token, r = 1
    (37, 70, 50, 8, True),  # nothing a multiple of a block; NF4 blocks straddle weight rows
    (19, 96, 130, 16, False),
    (9, 64, 33, 64, True),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The kernels run on CUDA tensors on a GPU machine, on CPU tensors under the interpreter elsewhere.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def small_interpreter_tiles(monkeypatch):
    """Tiles smaller than the shapes above: many tiles, several K steps, masked edges everywhere."""
    monkeypatch.setitem(lora.INTERPRETER_CONFIGS, "interp_mm", (16, 32, 32, 2, 4, 1))
    monkeypatch.setitem(lora.INTERPRETER_CONFIGS, "interp_thin", (16, 0, 32, 2, 4, 1))
    monkeypatch.setitem(lora.INTERPRETER_CONFIGS, "interp_red", (0, 32, 32, 1, 4, 1))


@pytest.fixture(scope="module", autouse=True)
def interpreter_bf16_dot():
    """Test-only patch for Triton 3.9's interpreter: it stores bf16 as uint16 and its `tl.dot` multiplies
    those bit patterns as integers (garbage). Widening bf16 operands to fp32 (exact: a 16-bit shift)
    before its numpy matmul gives what a GPU's bf16 tensor-core dot gives: exact products summed in
    fp32. Nothing else in the kernels does bf16 arithmetic (they convert to fp32 first)."""
    if not lora.interpreted():
        yield
        return
    import triton.language as tl
    from triton.runtime import interpreter as ti

    original = ti.InterpreterBuilder.create_dot

    def widen(h):
        if h.dtype == tl.bfloat16:
            return ti.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    ti.InterpreterBuilder.create_dot = create_dot
    yield
    ti.InterpreterBuilder.create_dot = original


def _nf4(w: torch.Tensor, nested: bool = True):
    """bitsandbytes' own NF4 quantization of w and its dense value (packed, quant_state, W).

    The dense oracle is bitsandbytes' portable torch dequantizer, not `dequantize_4bit` on CPU:
    bitsandbytes 0.50's CPU C++ path misplaces absmax blocks for rows that are multiples of 16 but
    not of the blocksize (e.g. 130 x 96; see tests/test_nf4.py), while quantize_4bit and the CUDA
    kernel use the flat layout."""
    import bitsandbytes.functional as bnbf
    from bitsandbytes.backends.default import ops as default_ops

    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    absmax = (bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset) if nested else qs.absmax
    code = torch.tensor(nf4_format.NF4_TABLE, dtype=torch.float32, device=w.device)
    dense = default_ops._dequantize_4bit_compute(packed.reshape(-1), absmax, code, 64, qs.shape, w.dtype)
    return packed, qs, dense


def _inputs(M, K, N, r, bias, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(device, dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(device, dtype)
    a = (torch.randn(r, K, generator=g) / K ** 0.5).to(device)  # adapters in fp32, as fastft keeps them
    b = (torch.randn(N, r, generator=g) / r ** 0.5).to(device)  # non-zero (PEFT starts at 0): every gradient shows
    bvec = torch.randn(N, generator=g).to(device, dtype) if bias else None
    return x, w, a, b, bvec


def _dy(M, N, dtype, device=DEVICE):
    return torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(device, dtype)


def _check(got, want, dtype, what):
    tol = TOL[dtype]
    scale = want.abs().max().item() or 1.0
    assert got.dtype == want.dtype or got.dtype == dtype, (got.dtype, want.dtype)
    assert_close(got.float(), want.float(), atol=tol * scale, rtol=tol, what=what)


def _run_fused(x, weight, a, b, s, bias, quant_state, dy):
    # the Triton path, not the reference fallback (which the comparison would trivially pass)
    assert lora.unfused_reason(x, weight, a, b, bias, quant_state) is None
    x = x.clone().requires_grad_()
    a = a.clone().requires_grad_()
    b = b.clone().requires_grad_()
    y = lora.lora_linear(x, weight, a, b, s, bias, quant_state)
    y.backward(dy)
    return y.detach(), x.grad, a.grad, b.grad


def _run_reference_fp32(x, w_dense, a, b, s, bias, dy):
    x = x.detach().float().clone().requires_grad_()  # a copy even for fp32: the caller's x stays a plain input
    a = a.clone().requires_grad_()
    b = b.clone().requires_grad_()
    y = lora.lora_linear_reference(x, w_dense.float(), a, b, s, None if bias is None else bias.float())
    y.backward(dy.float())
    return y.detach(), x.grad, a.grad, b.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("base", ["16bit", "nf4", "nf4_in_kernel"])
@pytest.mark.parametrize("M,K,N,r,bias", SHAPES, ids=lambda v: str(v))
def test_forward_and_gradients_match_reference(M, K, N, r, bias, base, dtype, monkeypatch):
    """Both NF4 paths ("nf4": the default, dequantize + torch.matmul; "nf4_in_kernel": W decoded inside
    the Triton matmul) and a 16-bit base, forward and every gradient, against fp32 torch."""
    x, w, a, b, bvec = _inputs(M, K, N, r, bias, dtype)
    s = lora.lora_scaling(16, r, rslora=(r == 16))
    monkeypatch.setattr(lora, "NF4_PATH", "in_kernel" if base == "nf4_in_kernel" else "dequantize")
    if base.startswith("nf4"):
        weight, qs, w_dense = _nf4(w)
        # the reference dequant equals bitsandbytes' bit for bit, so both sides see the same W
        assert torch.equal(nf4.dequantize_nf4_reference(nf4.NF4Weight.from_quant_state(weight, qs), dtype=dtype),
                           w_dense)
    else:
        weight, qs, w_dense = w, None, w
    dy = _dy(M, N, dtype)
    got = _run_fused(x, weight, a, b, s, bvec, qs, dy)
    want = _run_reference_fp32(x, w_dense, a, b, s, bvec, dy)
    for g, w_, name in zip(got, want, ("y", "dX", "dA", "dB")):
        _check(g, w_, dtype, f"{base} {dtype} {name}")
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert got[2].dtype == torch.float32 and got[3].dtype == torch.float32  # adapter dtypes kept


def test_batched_input_and_nf4_without_double_quant():
    x, w, a, b, _ = _inputs(12, 72, 40, 8, False, torch.float32)
    weight, qs, w_dense = _nf4(w, nested=False)
    x3 = x.reshape(3, 4, 72)
    dy = _dy(12, 40, torch.float32).reshape(3, 4, 40)
    got = _run_fused(x3, weight, a, b, 0.5, None, qs, dy)
    want = _run_reference_fp32(x3, w_dense, a, b, 0.5, None, dy)
    assert got[0].shape == (3, 4, 40) and got[1].shape == x3.shape
    for g, w_, name in zip(got, want, ("y", "dX", "dA", "dB")):
        _check(g, w_, torch.float32, name)


def test_default_nf4_path_dequantizes_into_scratch_and_saves_no_dense_weight():
    """The default NF4 path: W is dequantized by fastft's kernel into the shared per-shape scratch buffer
    twice per step (forward, and again in the backward for dX), and the autograd graph keeps no dense
    [N, K] copy of it between the two."""
    assert lora.NF4_PATHS[0] == "dequantize"
    x, w, a, b, bvec = _inputs(21, 70, 45, 8, True, torch.float16)
    weight, qs, w_dense = _nf4(w)
    dy = _dy(21, 45, torch.float16)
    saved, outs = [], []
    real = lora.dequantize_nf4

    def dequantize(*args, **kw):
        outs.append(kw.get("out"))
        return real(*args, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(lora, "NF4_PATH", "dequantize")
    mp.setattr(lora, "dequantize_nf4", dequantize)
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            got = _run_fused(x, weight, a, b, 2.0, bvec, qs, dy)
    finally:
        mp.undo()
    assert len(outs) == 2 and outs[0] is outs[1] is nf4.dequant_scratch((45, 70), torch.float16, x.device)
    assert (45, 70) not in saved and (70, 45) not in saved, saved
    want = _run_reference_fp32(x, w_dense, a, b, 2.0, bvec, dy)
    for g, w_, name in zip(got, want, ("y", "dX", "dA", "dB")):
        _check(g, w_, torch.float16, name)


def test_unknown_nf4_path_is_a_clear_error(monkeypatch):
    x, w, a, b, _ = _inputs(4, 64, 8, 4, False, torch.float32)
    weight, qs, _ = _nf4(w)
    monkeypatch.setattr(lora, "NF4_PATH", "cublas")
    with pytest.raises(ValueError, match="FASTFT_LORA_NF4"):
        lora.lora_linear(x, weight, a, b, 1.0, None, qs)


def test_backward_takes_the_nf4_path_its_forward_took(monkeypatch):
    """The NF4 path is read once per forward and kept in ctx: changing NF4_PATH between forward and
    backward does not change the path the backward takes."""
    calls = []
    real = lora.dequantize_nf4
    monkeypatch.setattr(lora, "dequantize_nf4", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w, a, b, _ = _inputs(9, 64, 40, 8, False, torch.float32)
    weight, qs, w_dense = _nf4(w)
    dy = _dy(9, 40, torch.float32)
    want = _run_reference_fp32(x, w_dense, a, b, 0.5, None, dy)
    for forward_path, backward_path, dequants in (("in_kernel", "dequantize", 0), ("dequantize", "in_kernel", 2)):
        calls.clear()
        xg, ag, bg = (t.detach().clone().requires_grad_() for t in (x, a, b))
        monkeypatch.setattr(lora, "NF4_PATH", forward_path)
        y = lora.lora_linear(xg, weight, ag, bg, 0.5, None, qs)
        monkeypatch.setattr(lora, "NF4_PATH", backward_path)
        y.backward(dy)
        assert len(calls) == dequants, (forward_path, calls)
        for g, w_, name in zip((y.detach(), xg.grad, ag.grad, bg.grad), want, ("y", "dX", "dA", "dB")):
            _check(g, w_, torch.float32, f"forward {forward_path} {name}")


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("path", ["dequantize", "in_kernel"])
def test_linear4bit_with_float_quant_storage(storage, path, monkeypatch):
    """bitsandbytes Linear4bit with bnb_4bit_quant_storage bf16 / fp32 (what FSDP-QLoRA uses): the packed
    Params4bit is a float tensor holding the same bytes; the fused layer reads it as bytes on both NF4
    paths, matches the reference forward and backward, and equals the uint8-stored weight bit for bit."""
    import bitsandbytes as bnb

    monkeypatch.setattr(lora, "NF4_PATH", path)
    K, N, r, M = 72, 40, 8, 9
    x, w, a, b, bvec = _inputs(M, K, N, r, True, torch.float32)
    lin = bnb.nn.Linear4bit(K, N, bias=True, compute_dtype=torch.float32, quant_type="nf4",
                            compress_statistics=True, quant_storage=storage)
    lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True,
                                   quant_storage=storage).to(DEVICE)  # quantizes
    packed, qs = lin.weight.data, lin.weight.quant_state
    assert packed.dtype == storage
    u8 = packed.reshape(-1).view(torch.uint8)
    # the oracle: bitsandbytes' portable dequantizer on the bytes (K = 72 avoids its CPU C++ layout bug)
    import bitsandbytes.functional as bnbf

    w_dense = bnbf.dequantize_4bit(u8.reshape(-1, 1), qs)
    assert torch.equal(w_dense, nf4.dequantize_nf4_reference(u8, qs, dtype=torch.float32))
    dy = _dy(M, N, torch.float32)
    got = _run_fused(x, lin.weight, a, b, 0.5, bvec, qs, dy)
    want = _run_reference_fp32(x, w_dense, a, b, 0.5, bvec, dy)
    for g, w_, name in zip(got, want, ("y", "dX", "dA", "dB")):
        _check(g, w_, torch.float32, f"{storage} storage {path} {name}")
    as_bytes = _run_fused(x, u8, a, b, 0.5, bvec, qs, dy)
    for g, w_, name in zip(got, as_bytes, ("y", "dX", "dA", "dB")):
        assert torch.equal(g, w_), f"{storage} storage vs uint8 {name}"


@pytest.mark.parametrize("path", ["dequantize", "in_kernel"])
def test_fused_nf4_reads_no_value_on_the_host(path, monkeypatch):
    """No device-to-host sync on the hot path: with Tensor.item / tolist / __bool__ raising, a fused NF4
    forward + backward (nested quant state: the offset reaches the kernels by pointer) still runs,
    after its first call parsed the quant state (cached on it, so later calls do not parse again).
    The interpreter's own launch machinery is exempt (on a GPU it does not run)."""
    import sys

    monkeypatch.setattr(lora, "NF4_PATH", path)
    x, w, a, b, _ = _inputs(9, 64, 40, 8, False, torch.float32)
    weight, qs, w_dense = _nf4(w, nested=True)
    dy = _dy(9, 40, torch.float32)
    _run_fused(x, weight, a, b, 0.5, None, qs, dy)  # parses and caches the quant state
    parses = []
    real_parse = nf4.NF4Weight.from_quant_state
    monkeypatch.setattr(nf4.NF4Weight, "from_quant_state",
                        classmethod(lambda cls, *args: parses.append(1) or real_parse(*args)))

    def guard(name, real):
        def method(self, *args, **kw):
            f = sys._getframe(1)
            while f is not None:
                if f.f_code.co_filename.replace("\\", "/").endswith("triton/runtime/interpreter.py"):
                    return real(self, *args, **kw)
                f = f.f_back
            raise AssertionError(f"Tensor.{name}() on the fused NF4 path (a host sync per call on a GPU)")
        return method

    for name in ("item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
    got = _run_fused(x, weight, a, b, 0.5, None, qs, dy)
    monkeypatch.undo()
    assert not parses
    want = _run_reference_fp32(x, w_dense, a, b, 0.5, None, dy)
    for g, w_, name in zip(got, want, ("y", "dX", "dA", "dB")):
        _check(g, w_, torch.float32, f"{path} {name}")


def test_fp4_base_runs_the_reference_path():
    """Only NF4 is fused; an FP4 base takes the reference path, which dequantizes it as bitsandbytes does."""
    import bitsandbytes.functional as bnbf

    x, w, a, b, _ = _inputs(6, 64, 24, 4, False, torch.float32)
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="fp4")
    assert "is not NF4" in lora.unfused_reason(x, packed, a, b, quant_state=qs)
    y = lora.lora_linear(x, packed, a, b, 2.0, quant_state=qs)
    want = lora.lora_linear_reference(x, bnbf.dequantize_4bit(packed, qs), a, b, 2.0)
    assert torch.equal(y, want)


def test_index_times_stride_products_are_64_bit():
    """Address arithmetic past 2**31 elements (a 128256 x 4096 lm_head is 2**29 elements, 16384 tokens x
    14336 features 2**27.8; a bigger operand or a large stride passes 2**31). What this proves on a CPU:
    (1) `_offsets`, run by the interpreter with int32 indices and strides, returns the exact 64-bit
    products where int32 arithmetic would wrap; (2) every `* stride_` product in the matmul kernel's
    source goes through `_offsets` or an explicit int64 cast. It does not run a > 2**31-element operand
    (gigabytes, too slow for the interpreter); the NF4 tile decoder's byte and block indices derive
    from the int64 flat index it is given."""
    import inspect
    import re

    import triton
    import triton.language as tl

    @triton.jit
    def offsets_kernel(a_ptr, b_ptr, out_ptr, stride_a, stride_b, A: tl.constexpr, B: tl.constexpr):
        offs = lora_kernel._offsets(tl.load(a_ptr + tl.arange(0, A)), stride_a, tl.load(b_ptr + tl.arange(0, B)),
                                    stride_b)
        tl.store(out_ptr + tl.arange(0, A)[:, None] * B + tl.arange(0, B)[None, :], offs)

    oa = torch.tensor([0, 1, 70_000, 128_255], dtype=torch.int32, device=DEVICE)
    ob = torch.tensor([0, 3, 4_095, 100_000], dtype=torch.int32, device=DEVICE)
    stride_a, stride_b = 40_000, 30_000  # int32 arguments; the products reach 5.1e9
    out = torch.empty(4, 4, dtype=torch.int64, device=DEVICE)
    offsets_kernel[(1,)](oa, ob, out, stride_a, stride_b, A=4, B=4)
    want = oa.long()[:, None] * stride_a + ob.long()[None, :] * stride_b
    assert want.max() > 2 ** 32 and torch.equal(out, want)

    source = inspect.getsource(lora_kernel._lora_matmul_kernel.fn if hasattr(lora_kernel._lora_matmul_kernel, "fn")
                               else lora_kernel._lora_matmul_kernel)
    products = re.findall(r"(\S+) \* (stride_\w+)", source)
    assert products, "the kernel multiplies by no stride at all?"
    for operand, stride in products:
        assert "int64" in operand, f"{operand} * {stride} in _lora_matmul_kernel is not a 64-bit product"
    assert source.count("_offsets(") == 5  # P, Q, L, R and C tiles


def test_thin_and_reduction_splits_fill_the_gpu():
    """At M = 4096 tokens on a 132-SM GPU (H100/H200) the thin products x·Aᵀ (K = 4096) and dY·B (K = N:
    1024, 4096, 14336) launch at least two waves of programs, the token-split dA / dB at least as many
    as the old rule; without an SM count (CPU) nothing splits."""
    bm = lora.CONFIGS["thin_64xRx64_w4_s3"][0]  # what lora_configs.pick_config("thin", ...) ships on a GPU
    tiles = -(-4096 // bm)
    for K in (1024, 4096, 14336):
        split = lora.split_count(tiles, K, lora.THIN_MIN_K, 132)
        assert tiles * split >= 2 * 132, (K, tiles, split)
        assert K // split >= lora.THIN_MIN_K
    assert lora.split_count(tiles, 4096, lora.THIN_MIN_K, None) == 1
    assert lora.split_count(10_000, 4096, lora.THIN_MIN_K, 132) == 1  # enough tiles: no split
    # dA over K = 4096 features (32 column tiles of 128), 4096 tokens: 8 splits of 512 tokens
    assert lora.split_count(32, 4096, lora.RED_MIN_K, 132) == 8


@pytest.mark.parametrize("base,dtype", [("16bit", torch.float32), ("16bit", torch.bfloat16), ("nf4", torch.float16)],
                         ids=["16bit-float32", "16bit-bfloat16", "nf4-float16"])
def test_split_launches_are_exact(base, dtype, monkeypatch):
    """The split thin and reduction launches through lora_linear (an SM count forced on the CPU so they
    split): on integer-valued data every sum is exact in fp32, so the split and unsplit runs are equal
    bit for bit, and equal to torch."""
    M, K, N, r = 40, 96, 48, 8
    g = torch.Generator().manual_seed(7)

    def ints(*shape):
        return torch.randint(-3, 4, shape, generator=g).float()

    x, a, b = ints(M, K).to(DEVICE, dtype), ints(r, K).to(DEVICE), ints(N, r).to(DEVICE)
    dy = ints(M, N).to(DEVICE, dtype)
    if base == "nf4":  # an NF4 weight whose dense values are small integers: absmax 7, codes ±1 and 0
        w = ints(N, K).clamp(-1, 1) * 7
        weight, qs, w_dense = _nf4(w.to(DEVICE), nested=False)
        w_dense = w_dense.to(dtype)
        assert torch.equal(w_dense.float(), w.to(DEVICE))
    else:
        weight = w_dense = ints(N, K).to(DEVICE, dtype)
        qs = None
    runs = {}
    for forced in (None, 8):
        launches = []
        real = lora.lora_matmul
        monkeypatch.setattr(lora, "lora_matmul", lambda *a_, launches=launches, real=real, **k:
                            launches.append(k.get("split_k", 1)) or real(*a_, **k))
        monkeypatch.setattr(lora, "device_sms", lambda device, forced=forced: forced)
        monkeypatch.setattr(lora, "THIN_MIN_K", 32)
        monkeypatch.setattr(lora, "RED_MIN_K", 8)
        runs[forced] = _run_fused(x, weight, a, b, 0.5, None, qs, dy)
        monkeypatch.undo()
        assert (max(launches) > 1) == (forced is not None), launches
    want = _run_reference_fp32(x, w_dense, a, b, 0.5, None, dy)
    for one, split, w_, name in zip(runs[None], runs[8], want, ("y", "dX", "dA", "dB")):
        assert torch.equal(split, one), f"split vs one pass: {name}"
        if split.dtype == torch.bfloat16:  # y, dX: sums are exact but bf16 rounds them (the interpreter
            _check(split, w_, dtype, name)  # truncates its fp32 -> bf16 casts), so compare within tolerance
        else:
            assert torch.equal(split.float(), w_.float()), f"split vs torch: {name}"


def test_split_k_reduction_equals_one_pass():
    g = torch.Generator().manual_seed(3)
    p = torch.randn(200, 8, generator=g).to(DEVICE)  # the dA shape: dYBᵀ [r, M] · x [M, K]
    q = torch.randn(200, 70, generator=g).to(DEVICE)
    one = lora.lora_matmul(p.t(), q, torch.float32, alpha=0.5, kind="red", rank=8)
    split = lora.lora_matmul(p.t(), q, torch.float32, alpha=0.5, kind="red", rank=8, split_k=3)
    assert_close(split, one, atol=1e-5, rtol=1e-5, what="split-K")
    assert_close(one, 0.5 * p.t() @ q, atol=1e-5, rtol=1e-5, what="vs torch")


def test_launcher_errors_are_clear():
    p = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="inner dimensions differ"):
        lora.lora_matmul(p, torch.randn(9, 4, device=DEVICE), torch.float32)
    with pytest.raises(TypeError, match="share a dtype"):
        lora.lora_matmul(p, torch.randn(8, 4, dtype=torch.float16, device=DEVICE), torch.float32)
    with pytest.raises(TypeError, match="unsupported dtype"):
        lora.lora_matmul(p.double(), torch.randn(8, 4, device=DEVICE).double(), torch.float64)
    with pytest.raises(ValueError, match=f"all tensors must be on {DEVICE}"):
        lora.lora_matmul(p, torch.randn(8, 4, device="meta"), torch.float32)


def test_dropout_falls_back_to_the_reference_and_says_so_once(caplog):
    x, w, a, b, _ = _inputs(6, 40, 24, 4, False, torch.float32)
    lora_configs._SAID.clear()
    with caplog.at_level(logging.WARNING, logger="fastft.kernels.lora"):
        torch.manual_seed(5)
        y1 = lora.lora_linear(x, w, a, b, 2.0, dropout_p=0.25, training=True)
        torch.manual_seed(5)
        y2 = lora.lora_linear(x, w, a, b, 2.0, dropout_p=0.25, training=True)
    torch.manual_seed(5)
    want = lora.lora_linear_reference(x, w, a, b, 2.0, dropout_p=0.25, training=True)
    assert torch.equal(y1, want) and torch.equal(y2, want)
    said = [r.getMessage() for r in caplog.records if "lora_dropout=0.25" in r.getMessage()]
    assert len(said) == 1, said
    # out of training, dropout is the identity and the fused path runs
    assert lora.unfused_reason(x, w, a, b, dropout_p=0.25, training=False) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("base", ["16bit", "nf4"])
def test_patched_peft_layer_matches_peft(base, dtype):
    """PEFT's own lora.Linear / lora.Linear4bit, then the same layer patched by fastft.models.patch."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from fastft.models import patch

    K, N, r = 72, 45, 16
    torch.manual_seed(0)
    if base == "nf4":
        lin = bnb.nn.Linear4bit(K, N, bias=True, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
        dense = torch.nn.Linear(K, N, bias=True)
        lin.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                       compress_statistics=True).to(DEVICE)  # quantizes
        lin.bias = torch.nn.Parameter(dense.bias.data.to(dtype), requires_grad=False)
        lin.support_avx512bf16_for_cpu = False  # as fastft.models.backends sets it: keep the training layout
    else:
        lin = torch.nn.Linear(K, N, bias=True).to(DEVICE, dtype)
    model = torch.nn.Sequential()
    model.add_module("proj", lin)
    cfg = LoraConfig(r=r, lora_alpha=32, target_modules=["proj"], use_rslora=True, lora_dropout=0.0)
    model = get_peft_model(model, cfg).to(DEVICE)
    layer = model.base_model.model.proj
    assert abs(layer.scaling["default"] - 32 / r ** 0.5) < 1e-9  # rsLoRA scaling reaches the kernel
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
    model.train()
    x = torch.randn(2, 11, K).to(DEVICE, dtype)
    dy = torch.randn(2, 11, N).to(DEVICE, dtype)

    def run():
        model.zero_grad()
        xi = x.clone().requires_grad_()
        y = model(xi)
        y.backward(dy)
        return y.detach(), xi.grad, layer.lora_A["default"].weight.grad.clone(), layer.lora_B["default"].weight.grad.clone()

    want = run()
    report = patch.apply(model, "fastft")
    assert report.patched == ["base_model.model.proj"] and not report.skipped
    got = run()
    for g, w_, name in zip(got, want, ("y", "dX", "dA", "dB")):
        _check(g, w_, dtype, f"PEFT {base} {dtype} {name}")
    assert got[0].dtype == want[0].dtype and got[1].dtype == want[1].dtype
    patch.apply(model, "none")
    assert "forward" not in layer.__dict__


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the shipped launch configs)")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("base", ["16bit", "nf4", "nf4_in_kernel"])
@pytest.mark.parametrize("M,K,N,r,bias", SHAPES + [(300, 520, 270, 64, True)], ids=lambda v: str(v))
def test_odd_shapes_on_gpu(M, K, N, r, bias, base, dtype, monkeypatch):
    """The odd-shape cases with CUDA tensors: the shipped configs (not the interpreter's) and real bf16."""
    test_forward_and_gradients_match_reference(M, K, N, r, bias, base, dtype, monkeypatch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (Llama-3-8B layer shapes, bf16)")
@pytest.mark.parametrize("K,N", [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)])
@pytest.mark.parametrize("base", ["16bit", "nf4"])
def test_llama3_8b_layer_shapes_bf16_on_gpu(K, N, base):
    M, r = 2048, 16
    x, w, a, b, _ = _inputs(M, K, N, r, False, torch.bfloat16, device="cuda")
    if base == "nf4":
        weight, qs, w_dense = _nf4(w)
    else:
        weight, qs, w_dense = w, None, w
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    got = _run_fused(x, weight, a, b, 1.0, None, qs, dy)
    want = _run_reference_fp32(x, w_dense, a, b, 1.0, None, dy)
    for g, w_, name in zip(got, want, ("y", "dX", "dA", "dB")):
        _check(g, w_, torch.bfloat16, f"{base} {K}->{N} {name}")


@pytest.mark.parametrize("module", ["fastft.kernels.lora_kernel", "fastft.kernels.nf4"])
def test_compile_specs_are_what_the_jit_specializes(module):
    """tests/kernel_specs.py derives each compile spec from the launcher's real argument list; here the
    same arguments go through the argument binder Triton's JIT builds for the kernel (the function
    that decides, at every launch, which compiled variant runs: constexpr 1s, 16-divisibility, types),
    built for an sm_90 CUDA backend, and the spec must match it exactly."""
    import importlib
    import inspect

    import kernel_specs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    specs = {s["name"]: s for s in kernel_specs.COMPILE_CONFIGS[module]}
    if module.endswith("lora_kernel"):
        kernel = lora_kernel._lora_matmul_kernel
        launches = [(f"lora_matmul-{name}", args, kwargs) for name, args, kwargs in kernel_specs.lora_launches()]
    else:
        kernel = nf4._dequantize_4bit_kernel
        launches = kernel_specs.nf4_launches()
    assert {name for name, _, _ in launches} == set(specs)
    fn = getattr(kernel, "fn", kernel)  # the interpreter wraps the Python function; the JIT wraps it anew
    assert inspect.getmodule(fn) is importlib.import_module(module)
    jit = JITFunction(fn)
    binder = create_function_from_signature(jit.signature, jit.params, CUDABackend(GPUTarget("cuda", 90, 32)))
    for name, args, kwargs in launches:
        _, specialization, options = binder(*args, **kwargs)
        signature, constexprs, divisible = {}, {}, []
        for arg, (ty, key) in zip(jit.arg_names, specialization):
            if ty == "constexpr":
                constexprs[arg] = key
            else:
                signature[arg] = ty
                if key == "D":
                    divisible.append(arg)
        spec = specs[name]
        assert spec["signature"] == signature, name
        assert spec["constexprs"] == constexprs, name
        assert spec["divisible_by_16"] == divisible, name
        assert {k: v for k, v in spec["options"].items() if k in options} == options, name


@pytest.mark.parametrize("tiles,blocksize,dtype", [
    ((16, 32, 32, 2, 4, 1), 64, torch.float32),   # K step 32 < blocksize: one scale per row and K step
    ((16, 32, 128, 2, 4, 1), 64, torch.bfloat16),  # K step 128: two blocks per row and K step
    ((16, 64, 64, 2, 4, 1), 32, torch.float16),    # blocksize 32, forward and dX tiles both span 2 blocks
], ids=["bk32-bs64-fp32", "bk128-bs64-bf16", "bk64-bs32-fp16"])
def test_in_kernel_decode_by_rows_equals_elementwise_decode(tiles, blocksize, dtype, monkeypatch):
    """The in_kernel path with the row decoder (`nf4_format.nf4_rows`) and with the element-wise decoder
    (`nf4.nf4_tile`) agree, forward and every gradient, and both match the reference. The decoded W
    tiles are bit-identical (`test_row_decoder_tiles_equal_elementwise_tiles`); the products are not
    compared bit for bit, because the row decoder hands the forward's dot a transposed tile and the
    interpreter's dot (numpy's BLAS) then sums in another order (OpenBLAS' SkylakeX kernels differ
    from Haswell's in the last bits), as a GPU's MMA layout may."""
    import bitsandbytes.functional as bnbf

    monkeypatch.setattr(lora, "NF4_PATH", "in_kernel")
    monkeypatch.setitem(lora.INTERPRETER_CONFIGS, "interp_mm", tiles)
    M, K, N, r = 9, 128, 40, 8  # K % blocksize == 0: rows of W start on block boundaries
    x, w, a, b, bvec = _inputs(M, K, N, r, True, dtype)
    packed, qs = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    w_dense = nf4.dequantize_nf4_reference(packed, qs, dtype=dtype)
    dy = _dy(M, N, dtype)
    runs = {}
    for by_rows in (True, False):
        monkeypatch.setattr(lora_kernel, "NF4_BY_ROWS", by_rows)
        runs[by_rows] = _run_fused(x, packed, a, b, 0.5, bvec, qs, dy)
    want = _run_reference_fp32(x, w_dense, a, b, 0.5, bvec, dy)
    for rows, elementwise, w_, name in zip(runs[True], runs[False], want, ("y", "dX", "dA", "dB")):
        _check(rows, elementwise.to(rows.dtype), dtype, f"rows vs element-wise decode: {name}")
        _check(rows, w_, dtype, name)
        _check(elementwise, w_, dtype, name)


@pytest.mark.parametrize("N,K,blocksize,rows,cols", [
    (40, 128, 64, 16, 32),   # a tile's columns inside one absmax block; 40 rows: a masked row tile
    (40, 128, 64, 16, 128),  # two blocks per tile row
    (24, 192, 32, 8, 64),    # blocksize 32, two blocks per tile row, K not a power of two
    (33, 256, 256, 16, 64),  # one block spans four column tiles; odd row count
], ids=["cols32-bs64", "cols128-bs64", "cols64-bs32", "cols64-bs256"])
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "plain"])
def test_row_decoder_tiles_equal_elementwise_tiles(N, K, blocksize, rows, cols, nested):
    """`nf4_format.nf4_rows` and `nf4_format.nf4_tile` decode every [rows, cols] tile of a weight to the same fp32
    bits (both compute code * absmax with the same roundings; no dot is involved), masked rows and
    columns included, and the tiles put together are the reference dequantization."""
    import bitsandbytes.functional as bnbf
    import triton
    import triton.language as tl

    @triton.jit
    def decode_both(packed_ptr, absmax_ptr, table_ptr, absmax2_ptr, code2_ptr, offset_ptr, by_rows_ptr,
                    by_elements_ptr, n_rows, row_len, ROWS: tl.constexpr, COLS: tl.constexpr,
                    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr):
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        c0 = tl.program_id(1) * COLS
        c = c0 + tl.arange(0, COLS)
        row_mask = r < n_rows
        mask = row_mask[:, None] & (c < row_len)[None, :]
        idx = r[:, None] * row_len + c[None, :]
        a = nf4_format.nf4_rows(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, r, row_len, c0, row_mask,
                                row_len, ROWS, COLS, BLOCKSIZE, BLOCKSIZE2, NESTED)
        b = nf4_format.nf4_tile(packed_ptr, absmax_ptr, table_ptr, absmax2_ptr, code2_ptr, offset_ptr, idx, mask,
                                BLOCKSIZE, BLOCKSIZE2, NESTED)
        tl.store(by_rows_ptr + idx, a, mask=mask)
        tl.store(by_elements_ptr + idx, b, mask=mask)

    w = torch.randn(N, K, generator=torch.Generator().manual_seed(N + K)).to(DEVICE)
    packed, qs = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    nw = nf4.NF4Weight.from_quant_state(packed, qs)
    table = torch.tensor(nf4_format.NF4_TABLE, dtype=torch.float32, device=DEVICE)
    by_rows = torch.full((N, K), float("nan"), device=DEVICE)
    by_elements = torch.full((N, K), float("nan"), device=DEVICE)
    absmax2 = nw.absmax2 if nested else nw.absmax
    code2 = nw.code2 if nested else table
    offset = nw.offset if nested else table
    decode_both[(triton.cdiv(N, rows), triton.cdiv(K, cols))](
        nw.packed, nw.absmax, table, absmax2, code2, offset, by_rows, by_elements, N, K,
        ROWS=rows, COLS=cols, BLOCKSIZE=blocksize, BLOCKSIZE2=nw.blocksize2 if nested else 256, NESTED=nested,
        enable_fp_fusion=False)
    assert torch.equal(by_rows, by_elements)
    assert torch.equal(by_rows, nf4.dequantize_nf4_reference(packed, qs, dtype=torch.float32))


def test_register_code_table_is_the_nf4_table():
    """`_nf4_code`'s literal constants are NF4_TABLE's fp32 values, code by code."""
    import triton
    import triton.language as tl

    @triton.jit
    def codes_kernel(out_ptr):
        q = tl.arange(0, 16)
        tl.store(out_ptr + q, nf4_format._nf4_code(q))

    out = torch.empty(16, dtype=torch.float32, device=DEVICE)
    codes_kernel[(1,)](out)
    assert torch.equal(out.cpu(), torch.tensor(nf4_format.NF4_TABLE, dtype=torch.float32))
