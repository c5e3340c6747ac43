"""fastft.kernels.lora with lora_dropout > 0 in training (dropout is not fused): an NF4 base on CUDA, or
under the interpreter, takes `lora_linear_dequantized` (fastft's Triton dequant + torch.matmul, the
LoRA branch in torch on dropout(x), as PEFT's forward), never the int64-index reference dequant; its
values and gradients are the reference's, bit for bit (the dequant is exact, the products the same
torch ops). On CPU the dequant kernel runs under TRITON_INTERPRET=1 (conftest)."""
import logging

import pytest
import torch
from fastft.kernels import lora, lora_configs, nf4

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _nf4_inputs(M, K, N, r, dtype, nested, bias, seed=0):
    import bitsandbytes.functional as bnbf

    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(DEVICE, dtype)
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    x = torch.randn(*M, K, generator=g).to(DEVICE, dtype)
    a = (torch.randn(r, K, generator=g) / K ** 0.5).to(DEVICE)  # adapters in fp32, as fastft keeps them
    b = (torch.randn(N, r, generator=g) / r ** 0.5).to(DEVICE)
    bvec = torch.randn(N, generator=g).to(DEVICE, dtype) if bias else None
    dy = torch.randn(*M, N, generator=g).to(DEVICE, dtype)
    return x, packed, qs, a, b, bvec, dy


def _run(fn, x, packed, qs, a, b, bvec, dy, seed, train_bias=False):
    x, a, b = (t.clone().requires_grad_() for t in (x, a, b))
    bias = None if bvec is None else bvec.clone().requires_grad_(train_bias)
    torch.manual_seed(seed)  # the same dropout mask for both runs
    y = fn(x, packed, a, b, 0.5, bias, qs, 0.25, True)
    y.backward(dy)
    grads = [x.grad, a.grad, b.grad] + ([bias.grad] if train_bias else [])
    return [y.detach(), *grads]


@pytest.fixture
def counted_dequant(monkeypatch):
    """Counts the Triton dequant kernel's launches (the weight shape of each) and fails any call of
    the reference dequant."""
    calls = []
    launch = nf4._launch

    def counted(w, out, *args, **kwargs):
        calls.append(tuple(w.shape))
        return launch(w, out, *args, **kwargs)

    def no_reference(*args, **kwargs):
        raise AssertionError("the dropout route ran the int64-index reference dequant")

    monkeypatch.setattr(nf4, "_launch", counted)
    monkeypatch.setattr(nf4, "dequantize_nf4_reference", no_reference)
    monkeypatch.setattr(lora, "dequantize_nf4_reference", no_reference)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("M,K,N,r,nested,bias", [
    ((5,), 128, 72, 8, True, False),     # tokens fewer than a tile; double quantization
    ((2, 3), 192, 40, 4, False, True),   # leading batch dims, plain absmax, a bias
], ids=["nested", "plain-bias"])
def test_dropout_route_equals_reference(M, K, N, r, nested, bias, dtype, counted_dequant, monkeypatch):
    x, packed, qs, a, b, bvec, dy = _nf4_inputs(M, K, N, r, dtype, nested, bias)
    assert lora.unfused_route(x, qs) == "dequantize"
    got = _run(lora.lora_linear, x, packed, qs, a, b, bvec, dy, seed=7)
    # the forward dequantizes W once, the backward once more (no dense W kept for dX)
    assert counted_dequant == [(N, K), (N, K)], counted_dequant
    monkeypatch.undo()  # the reference with its own dequant
    want = _run(lora.lora_linear_reference, x, packed, qs, a, b, bvec, dy, seed=7)
    for g, w, name in zip(got, want, ("y", "dX", "dA", "dB")):
        assert g.dtype == w.dtype and torch.equal(g, w), \
            f"{name}: max abs diff {(g.float() - w.float()).abs().max().item():.3e}"


def test_dropout_route_draws_the_mask_on_the_lora_branch_only():
    """The base product sees x itself: with B = 0 the output is x·Wᵀ whatever the dropout draws, and
    dropout(x) (scaled by 1/(1-p), zeros where dropped) is what reaches A's gradient."""
    x, packed, qs, a, b, _, dy = _nf4_inputs((6,), 128, 32, 4, torch.float32, True, False)
    b = torch.zeros_like(b)
    w = nf4.dequantize_nf4_reference(packed, qs, dtype=torch.float32)
    y = lora.lora_linear(x, packed, a, b, 1.0, None, qs, dropout_p=0.5, training=True)
    assert torch.equal(y, torch.nn.functional.linear(x, w))
    torch.manual_seed(3)
    a_ = a.clone().requires_grad_()
    b_ = b.clone().requires_grad_()
    lora.lora_linear(x, packed, a_, b_, 1.0, None, qs, dropout_p=0.5, training=True).backward(dy)
    torch.manual_seed(3)
    xd = torch.nn.functional.dropout(x, 0.5, True)
    assert (xd == 0).any() and not (x == 0).any()
    assert torch.equal(b_.grad, dy.t() @ (xd @ a.t()))


def test_trainable_bias_gets_its_gradient_on_the_dequantize_route(counted_dequant):
    x, packed, qs, a, b, bvec, dy = _nf4_inputs((7,), 128, 24, 4, torch.float32, True, True)
    assert "trainable base weight or bias" in lora.unfused_reason(x, packed, a, b, bvec.requires_grad_(), qs)
    got = _run(lora.lora_linear, x, packed, qs, a, b, bvec.detach(), dy, seed=1, train_bias=True)
    torch.testing.assert_close(got[-1], dy.sum(0), atol=1e-5, rtol=1e-6)


def test_the_route_is_said_once_and_named(caplog):
    x, packed, qs, a, b, _, _ = _nf4_inputs((4,), 128, 16, 4, torch.float32, True, False)
    lora_configs._SAID.clear()
    with caplog.at_level(logging.WARNING, logger="fastft.kernels.lora"):
        for _ in range(2):
            lora.lora_linear(x, packed, a, b, 1.0, None, qs, dropout_p=0.1, training=True)
    said = [r.getMessage() for r in caplog.records if "lora_dropout=0.1" in r.getMessage()]
    assert len(said) == 1, said
    assert "dequantize_nf4 (Triton)" in said[0] and "PEFT's forward" in said[0], said[0]


def test_routes_other_bases_and_settings():
    x, packed, qs, a, b, _, _ = _nf4_inputs((4,), 128, 16, 4, torch.float32, True, False)
    # out of training dropout is the identity: the fused path runs
    assert lora.unfused_reason(x, packed, a, b, None, qs, dropout_p=0.25, training=False) is None
    # a 16-bit base needs no dequant: the reference is already PEFT's forward (F.linear on W)
    w = torch.randn(16, 128, device=DEVICE)
    assert lora.unfused_route(x, None) == "reference"
    assert "reference path" in lora.unfused_reason(x, w, a, b, dropout_p=0.25)
    # a rank the kernels do not fuse still gets the Triton dequant for an NF4 base
    big = torch.zeros(lora.MAX_FUSED_RANK + 1, 128, device=DEVICE)
    assert "dequantize_nf4 (Triton)" in lora.unfused_reason(x, packed, big, torch.zeros(16, big.shape[0]), None, qs)
    # dtypes the Triton dequant does not write stay on the reference
    assert lora.unfused_route(x.double(), qs) == "reference"


def test_cpu_without_the_interpreter_takes_the_reference(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("CUDA tensors always have the Triton dequant")
    x, packed, qs, *_ = _nf4_inputs((4,), 128, 16, 4, torch.float32, True, False)
    monkeypatch.setattr(lora, "interpreted", lambda: False)
    assert lora.unfused_route(x, qs) == "reference"
