"""fastft.kernels.lora: the fused LoRA linear against its pure-torch reference and PEFT's own layers.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (conftest) with small tiles, so the odd sizes
below span several tiles and K steps; on a GPU the same tests run the shipped launch configs, and
the GPU-only test at the end runs Llama-3-8B layer shapes in bf16.
"""
import logging

import numpy as np
import pytest
import torch

from support import assert_close
from fastft.kernels import lora, nf4

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
    code = torch.tensor(nf4.NF4_TABLE, dtype=torch.float32, device=w.device)
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
    x = x.float().requires_grad_()
    a = a.clone().requires_grad_()
    b = b.clone().requires_grad_()
    y = lora.lora_linear_reference(x, w_dense.float(), a, b, s, None if bias is None else bias.float())
    y.backward(dy.float())
    return y.detach(), x.grad, a.grad, b.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("base", ["16bit", "nf4"])
@pytest.mark.parametrize("M,K,N,r,bias", SHAPES, ids=lambda v: str(v))
def test_forward_and_gradients_match_reference(M, K, N, r, bias, base, dtype):
    x, w, a, b, bvec = _inputs(M, K, N, r, bias, dtype)
    s = lora.lora_scaling(16, r, rslora=(r == 16))
    if base == "nf4":
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


def test_nf4_through_fastft_dequant_kernel_matches(monkeypatch):
    """NF4_PATH="dequantize": fastft.kernels.nf4 writes the dense W, then the 16-bit kernel runs."""
    pytest.importorskip("fastft.kernels.nf4")
    monkeypatch.setattr(lora, "NF4_PATH", "dequantize")
    x, w, a, b, bvec = _inputs(21, 70, 45, 8, True, torch.float16)
    weight, qs, w_dense = _nf4(w)
    dy = _dy(21, 45, torch.float16)
    got = _run_fused(x, weight, a, b, 2.0, bvec, qs, dy)
    want = _run_reference_fp32(x, w_dense, a, b, 2.0, bvec, dy)
    for g, w_, name in zip(got, want, ("y", "dX", "dA", "dB")):
        _check(g, w_, torch.float16, name)


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


def test_nf4_in_float_storage_matches_uint8_storage():
    """A packed weight stored as bf16 (bnb_4bit_quant_storage, for FSDP) holds the same bytes: the fused
    kernel reads it as uint8 and gives exactly the uint8 storage's result."""
    x, w, a, b, _ = _inputs(9, 64, 40, 8, False, torch.float32)
    weight, qs, _ = _nf4(w)
    as_bf16 = weight.reshape(-1).view(torch.bfloat16)
    dy = _dy(9, 40, torch.float32)
    want = _run_fused(x, weight, a, b, 0.5, None, qs, dy)
    got = _run_fused(x, as_bf16, a, b, 0.5, None, qs, dy)
    for g, w_, name in zip(got, want, ("y", "dX", "dA", "dB")):
        assert torch.equal(g, w_), f"bf16 storage {name}"


def test_fused_nf4_reads_no_value_on_the_host(monkeypatch):
    """The nested offset reaches the kernel by pointer: a fused NF4 forward + backward calls no
    Tensor.item() (a host sync per call on a GPU)."""
    x, w, a, b, _ = _inputs(9, 64, 40, 8, False, torch.float32)
    weight, qs, _ = _nf4(w)
    dy = _dy(9, 40, torch.float32)

    def item(self):
        raise AssertionError("Tensor.item() in the fused NF4 path")

    monkeypatch.setattr(torch.Tensor, "item", item)
    _run_fused(x, weight, a, b, 0.5, None, qs, dy)


def test_fp4_base_runs_the_reference_path():
    """Only NF4 is fused; an FP4 base takes the reference path, which dequantizes it as bitsandbytes does."""
    import bitsandbytes.functional as bnbf

    x, w, a, b, _ = _inputs(6, 64, 24, 4, False, torch.float32)
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="fp4")
    assert "is not NF4" in lora.unfused_reason(x, packed, a, b, quant_state=qs)
    y = lora.lora_linear(x, packed, a, b, 2.0, quant_state=qs)
    want = lora.lora_linear_reference(x, bnbf.dequantize_4bit(packed, qs), a, b, 2.0)
    assert torch.equal(y, want)


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
    lora._SAID.clear()
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
    """PEFT's own lora.Linear / lora.Linear4bit, then the same layer patched by fastft.patch."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from fastft import patch

    K, N, r = 72, 45, 16
    torch.manual_seed(0)
    if base == "nf4":
        lin = bnb.nn.Linear4bit(K, N, bias=True, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
        dense = torch.nn.Linear(K, N, bias=True)
        lin.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                       compress_statistics=True).to(DEVICE)  # quantizes
        lin.bias = torch.nn.Parameter(dense.bias.data.to(dtype), requires_grad=False)
        lin.support_avx512bf16_for_cpu = False  # as fastft.backends sets it: keep the training layout
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
@pytest.mark.parametrize("base", ["16bit", "nf4"])
@pytest.mark.parametrize("M,K,N,r,bias", SHAPES + [(300, 520, 270, 64, True)], ids=lambda v: str(v))
def test_odd_shapes_on_gpu(M, K, N, r, bias, base, dtype):
    """The odd-shape cases with CUDA tensors: the shipped configs (not the interpreter's) and real bf16."""
    test_forward_and_gradients_match_reference(M, K, N, r, bias, base, dtype)


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
