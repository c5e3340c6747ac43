"""fastft.kernels.fused: the QKV and SwiGLU-MLP ops against their pure-torch references and against
PEFT's per-projection layers on a tiny Llama block (16-bit and bitsandbytes NF4 bases); outputs and
the gradients of x and of every A and B.

On CPU the Triton kernels (the SwiGLU kernels, fastft's NF4 dequant) run under TRITON_INTERPRET=1
(tests/conftest.py). They do no tl.dot, so bf16 needs no interpreter patch (see tests/test_lora.py
for the one tl.dot does); the products are torch.matmul.
"""
import json

import pytest
import torch
from fastft.kernels import fused, fused_mlp
from fastft.kernels.fused import Projection
from support import ROOT, assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The op and its reference differ in summation order (fp32) and in where fp16/bf16 results are
# rounded (the fused op adds the LoRA term into the rounded base product in place; the reference
# rounds both terms and then adds): a few ulps of the output's magnitude.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _ids(v):
    return str(v).split(".")[-1] if isinstance(v, torch.dtype) else str(v)


def _projection(N, K, r, dtype, base, bias=False, seed=0):
    import bitsandbytes.functional as bnbf

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    qs = None
    if base == "nf4":
        w, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    else:
        w = w.to(dtype)
    a = (torch.randn(r, K, generator=g) / K ** 0.5).to(DEVICE, dtype).requires_grad_()
    b = (torch.randn(N, r, generator=g) * 0.1).to(DEVICE, dtype).requires_grad_()
    bias_t = (torch.randn(N, generator=g) * 0.1).to(DEVICE, dtype) if bias else None
    if qs is not None:
        qs.to(DEVICE)
    return Projection(w.to(DEVICE), a, b, 2.0 / r ** 0.5, quant_state=qs, bias=bias_t)


def _grads(outs, dys, x, projs):
    for t in [x, *(p.lora_a for p in projs), *(p.lora_b for p in projs)]:
        t.grad = None
    torch.autograd.backward(outs, dys)
    return [x.grad, *(p.lora_a.grad for p in projs), *(p.lora_b.grad for p in projs)]


def _compare(got, want, dtype, what):
    """Outputs / gradients: tolerance relative to the tensor's own scale (fp16/bf16 round per element)."""
    for i, (g, w) in enumerate(zip(got, want)):
        scale = w.float().abs().max().item() or 1.0
        assert g.dtype == w.dtype, f"{what}[{i}] dtype {g.dtype} != {w.dtype}"
        assert_close(g, w, atol=TOL[dtype] * scale, rtol=TOL[dtype], what=f"{what}[{i}]")


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("n", [1, 4096 + 37])  # one element; more than the interpreter's block, ragged
def test_swiglu_kernels_match_torch(n, dtype):
    torch.manual_seed(0)
    g = (torch.randn(n) * 3).to(DEVICE, dtype)
    u = torch.randn(n).to(DEVICE, dtype)
    dh = torch.randn(n).to(DEVICE, dtype)
    h = fused_mlp.swiglu_forward(g, u)
    g_, u_ = g.float().requires_grad_(), u.float().requires_grad_()
    want = fused_mlp.swiglu_reference(g_, u_)  # in fp32, rounded once: what the kernel computes
    want.backward(dh.float())
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert h.dtype == dtype
    assert_close(h, want.to(dtype), atol=tol, rtol=tol, what="h")
    h2, dg, du = fused_mlp.swiglu_backward(dh, g, u)
    assert_close(h2, h, atol=0, rtol=0, what="recomputed h")
    assert_close(dg, g_.grad.to(dtype), atol=tol, rtol=tol, what="dg")
    assert_close(du, u_.grad.to(dtype), atol=tol, rtol=tol, what="du")
    bufs = (dh.clone(), g.clone(), u.clone())  # in place: h over dh, dg over g, du over u
    out = fused_mlp.swiglu_backward(*bufs, inplace=True)
    assert all(o.data_ptr() == b.data_ptr() for o, b in zip(out, bufs))
    for o, want_, name in zip(out, (h2, dg, du), ("h", "dg", "du")):
        assert_close(o, want_, atol=0, rtol=0, what=f"in-place {name}")


def _cases(shapes):
    """Every dtype and base on the first shape; the others (edge cases) in fp32 only (test time)."""
    return [(shape, base, dtype) for i, shape in enumerate(shapes) for base in ("16bit", "nf4")
            for dtype in (DTYPES if i == 0 else DTYPES[:1])]


# (tokens, hidden, q features, k/v features, ranks q/k/v): odd sizes, NF4 blocks straddling rows
QKV_SHAPES = [(7, 40, 36, 12, (8, 4, 16)), (1, 24, 40, 8, (1, 8, 8))]


@pytest.mark.parametrize("shape,base,dtype", _cases(QKV_SHAPES), ids=_ids)
def test_qkv_matches_reference(shape, base, dtype):
    M, K, Nq, Nkv, ranks = shape
    projs = [_projection(N, K, r, dtype, base, bias=i == 0, seed=i)
             for i, (N, r) in enumerate(zip((Nq, Nkv, Nkv), ranks))]
    torch.manual_seed(1)
    x = torch.randn(1, M, K).to(DEVICE, dtype).requires_grad_()
    got = fused.lora_qkv(x, *projs)
    dys = [torch.randn_like(t) for t in got]
    got_grads = _grads(got, dys, x, projs)
    want = fused.lora_projections_reference(x, *projs)
    want_grads = _grads(want, dys, x, projs)
    _compare(got, want, dtype, f"QKV {base} outputs")
    _compare(got_grads, want_grads, dtype, f"QKV {base} grads (x, A q/k/v, B q/k/v)")
    # an output left out of the loss (K here): its B gets no gradient, its A a zero one, the rest as before
    got = fused.lora_qkv(x, *projs)
    grads = _grads([got[0], got[2]], [dys[0], dys[2]], x, projs)
    want = fused.lora_projections_reference(x, *projs)
    want_grads = _grads([want[0], want[2]], [dys[0], dys[2]], x, projs)
    assert grads[5] is None and not grads[2].any()
    _compare([grads[i] for i in (0, 1, 3, 4, 6)], [want_grads[i] for i in (0, 1, 3, 4, 6)], dtype, "QKV without K")


MLP_SHAPES = [(9, 40, 66, (8, 4, 16)), (1, 24, 40, (2, 2, 1))]


@pytest.mark.parametrize("shape,base,dtype", _cases(MLP_SHAPES), ids=_ids)
def test_mlp_swiglu_matches_reference(shape, base, dtype):
    M, K, inter, (rg, ru, rd) = shape
    projs = [_projection(inter, K, rg, dtype, base, seed=3), _projection(inter, K, ru, dtype, base, seed=4),
             _projection(K, inter, rd, dtype, base, seed=5)]
    torch.manual_seed(2)
    x = torch.randn(M, K).to(DEVICE, dtype).requires_grad_()
    got = fused_mlp.lora_mlp_swiglu(x, *projs)
    dy = torch.randn_like(got)
    got_grads = _grads([got], [dy], x, projs)
    want = fused_mlp.lora_mlp_swiglu_reference(x, *projs)
    want_grads = _grads([want], [dy], x, projs)
    _compare([got], [want], dtype, f"MLP {base} output")
    _compare(got_grads, want_grads, dtype, f"MLP {base} grads (x, A g/u/d, B g/u/d)")


def test_nf4_weights_are_dequantized_again_in_the_backward_not_saved(monkeypatch):
    """The dense W lives in the per-shape scratch buffer only: forward dequantizes each NF4 weight once,
    backward once more; nothing the autograd graph holds has W's shape."""
    calls = []
    real = fused.dequantize_nf4
    monkeypatch.setattr(fused, "dequantize_nf4", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    projs = [_projection(N, 40, 8, torch.float32, "nf4", seed=i) for i, N in enumerate((36, 12, 12))]
    x = torch.randn(5, 40, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        outs = fused.lora_qkv(x, *projs)
    assert calls == [(36, 40), (12, 40), (12, 40)]
    assert (5, 40) in saved and (36, 40) not in saved and (12, 40) not in saved, saved
    torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
    assert len(calls) == 6


def test_bad_inputs_are_named():
    p = _projection(12, 40, 4, torch.float32, "16bit")
    with pytest.raises(ValueError, match="x has 24 features but a weight is \\[12, 40\\]"):
        fused.lora_qkv(torch.randn(3, 24), p, p, p)
    with pytest.raises(ValueError, match="adapter A .* do not fit"):
        Projection(p.weight, p.lora_b, p.lora_b, 1.0)
    p.weight.requires_grad_()
    with pytest.raises(ValueError, match="must be frozen"):
        fused.lora_qkv(torch.randn(3, 40), p, p, p)
    with pytest.raises(ValueError, match="gate .* and up .* differ"):
        q = _projection(36, 40, 4, torch.float32, "16bit")
        fused_mlp.lora_mlp_swiglu(torch.randn(3, 40), q, _projection(12, 40, 4, torch.float32, "16bit"),
                                  _projection(40, 36, 4, torch.float32, "16bit"))


# --- against PEFT's per-projection layers on a tiny Llama block ---------------------------------------

def _llama_block(base, dtype):
    """Layer 0's attention and MLP of the shipped tiny Llama config, shrunk to odd sizes (hidden 40,
    head_dim 10, 4 query and 2 key/value heads, intermediate 66), LoRA on all seven projections
    through PEFT, with 16-bit or bitsandbytes NF4 base layers; adapters in the compute dtype."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

    cfg = json.loads((ROOT / "fastft/assets/tiny-llama/config.json").read_text())
    cfg.update(hidden_size=40, head_dim=10, num_attention_heads=4, num_key_value_heads=2, intermediate_size=66)
    config = LlamaConfig(**cfg)
    torch.manual_seed(0)
    block = torch.nn.Module()
    block.self_attn, block.mlp = LlamaAttention(config, 0), LlamaMLP(config)
    for parent in (block.self_attn, block.mlp):
        for name, lin in list(parent.named_children()):
            if not isinstance(lin, torch.nn.Linear):
                continue
            if base == "nf4":
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=dtype,
                                      quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True).to(DEVICE)  # quantizes
                q.support_avx512bf16_for_cpu = False  # as fastft.models.backends sets it: the training layout
                setattr(parent, name, q)
            else:
                setattr(parent, name, lin.to(DEVICE, dtype))
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, rank_pattern={"k_proj": 4, "up_proj": 16},
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(block, cfg).to(DEVICE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                if "lora_B" in name:
                    p.normal_(0, 0.1)
                p.data = p.data.to(dtype)
    return model.train().base_model.model


def projections_of(layers):
    """fastft.kernels.fused.Projection for PEFT LoRA layers (the default adapter)."""
    out = []
    for layer in layers:
        base = layer.get_base_layer()
        qs = getattr(base.weight, "quant_state", None)
        out.append(Projection(base.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                              layer.scaling["default"], quant_state=qs, bias=base.bias))
    return out


def _block_grads(block, run, dys, x):
    block.zero_grad()
    x.grad = None
    outs = run()
    torch.autograd.backward(outs, dys)
    grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    return [t.detach() for t in outs], x.grad.clone(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_ids)
@pytest.mark.parametrize("base", ["16bit", "nf4"])
def test_fused_ops_match_peft_per_projection_layers(base, dtype):
    block = _llama_block(base, dtype)
    attn, mlp = block.self_attn, block.mlp
    torch.manual_seed(3)
    x = torch.randn(2, 5, 40).to(DEVICE, dtype).requires_grad_()
    dqkv = [torch.randn(2, 5, n).to(DEVICE, dtype) for n in (40, 20, 20)]
    dy = torch.randn(2, 5, 40).to(DEVICE, dtype)

    q, k, v = (attn.q_proj, attn.k_proj, attn.v_proj)
    want = _block_grads(attn, lambda: (q(x), k(x), v(x)), dqkv, x)
    got = _block_grads(attn, lambda: fused.lora_qkv(x, *projections_of((q, k, v))), dqkv, x)
    assert len(want[2]) == 6 and want[2].keys() == got[2].keys()
    _compare(got[0], want[0], dtype, f"QKV vs PEFT {base}")
    _compare([got[1]], [want[1]], dtype, f"QKV dX vs PEFT {base}")
    _compare(list(got[2].values()), list(want[2].values()), dtype, f"QKV dA/dB vs PEFT {base} {list(want[2])}")

    want = _block_grads(mlp, lambda: (mlp(x),), [dy], x)  # LlamaMLP: down(act(gate(x)) * up(x))
    got = _block_grads(mlp, lambda: (fused_mlp.lora_mlp_swiglu(x, *projections_of(
        (mlp.gate_proj, mlp.up_proj, mlp.down_proj))),), [dy], x)
    assert len(want[2]) == 6 and want[2].keys() == got[2].keys()
    _compare(got[0], want[0], dtype, f"MLP vs PEFT {base}")
    _compare([got[1]], [want[1]], dtype, f"MLP dX vs PEFT {base}")
    _compare(list(got[2].values()), list(want[2].values()), dtype, f"MLP dA/dB vs PEFT {base} {list(want[2])}")


def test_autocast_runs_the_op_in_the_autocast_dtype():
    """Under autocast x is cast once to the autocast dtype and the op runs in it (its in-place
    accumulations are not autocast); gradients come back in the adapters' own dtypes."""
    kind = "cuda" if DEVICE == "cuda" else "cpu"
    projs = [_projection(N, 40, 8, torch.float32, "16bit", seed=i) for i, N in enumerate((36, 12, 12))]
    x = torch.randn(4, 40, device=DEVICE, requires_grad=True)
    with torch.autocast(kind, dtype=torch.bfloat16):
        got = fused.lora_qkv(x, *projs)
    assert all(t.dtype == torch.bfloat16 for t in got)
    dys = [torch.randn_like(t) for t in got]
    got_grads = _grads(got, dys, x, projs)
    assert got_grads[0].dtype == torch.float32 and got_grads[1].dtype == torch.float32
    xb = x.detach().to(torch.bfloat16).requires_grad_()
    want = fused.lora_projections_reference(xb, *projs)
    want_grads = _grads(want, dys, xb, projs)
    _compare(got, want, torch.bfloat16, "autocast outputs")
    _compare(got_grads[1:], want_grads[1:], torch.bfloat16, "autocast dA/dB")
    assert_close(got_grads[0], want_grads[0].float(), atol=3e-2, rtol=3e-2, what="autocast dX")


def test_mlp_backward_runs_once_per_forward():
    """The MLP backward overwrites its saved g and u: a second backward through the graph is refused."""
    projs = [_projection(40, 24, 4, torch.float32, "16bit", seed=i) for i in range(2)]
    projs.append(_projection(24, 40, 4, torch.float32, "16bit", seed=2))
    y = fused_mlp.lora_mlp_swiglu(torch.randn(3, 24, device=DEVICE, requires_grad=True), *projs)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once per forward"):
        y.sum().backward()
