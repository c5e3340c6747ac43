"""fastft.kernels.segmented_lora: several adapters' LoRA products, each on its own rows of one batch,
against the per-adapter torch reference: outputs and every gradient (x, each A_i, each B_i), with
ranks that differ, empty segments, segments spanning several row blocks, and odd sizes.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (conftest); bf16 dots go through
test_lora's widening patch for the interpreter's bf16 `tl.dot`."""
import pytest
import torch
from fastft.kernels import segmented_lora as sl
from support import assert_close
from test_lora import interpreter_bf16_dot  # noqa: F401 (the fixture)

# relative to the largest reference magnitude: fp32 differs only in summation order; 16-bit rounds
# x·Aᵀ (stored as H) and the output once each
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYOUTS = [  # (rows per adapter, ranks, in K, out N)
    ([5], [8], 24, 20),  # one adapter
    ([3, 0, 5], [8, 4, 16], 40, 50),  # an empty segment (an adapter that stopped) in the middle
    ([0, 37, 1, 70], [4, 16, 8, 12], 70, 33),  # empty first, one row, several 32-row blocks, odd rank
    ([33, 31], [64, 2], 96, 130),
]


def _close(got, want, tol, what):
    assert_close(got.float(), want, atol=tol * max(want.abs().max().item(), 1e-6), rtol=0, what=what)


def _case(rows, ranks, k, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = sum(rows)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    a = [(torch.randn(r, k, generator=g) / k ** 0.5).to(DEVICE, dtype) for r in ranks]
    b = [(torch.randn(n, r, generator=g) / r ** 0.5).to(DEVICE, dtype) for r in ranks]
    scales = [2.0 / (i + 1) for i in range(len(ranks))]
    return x, a, b, scales, sl.Segments.of(rows, ranks, device=DEVICE)


def _run(fn, x, a, b, scales, seg, dy):
    x = x.clone().requires_grad_()
    a = [t.clone().requires_grad_() for t in a]
    b = [t.clone().requires_grad_() for t in b]
    out = fn(x, a, b, scales, seg)
    out.backward(dy)
    return out.detach(), x.grad, [t.grad for t in a], [t.grad for t in b]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda v: "-".join(map(str, v[0])) if isinstance(v[0], list) else None)
def test_outputs_and_gradients_equal_the_reference(layout, dtype):
    rows, ranks, k, n = layout
    x, a, b, scales, seg = _case(rows, ranks, k, n, dtype)
    dy = torch.randn(sum(rows), n, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    got = _run(sl.segmented_lora, x, a, b, scales, seg, dy)
    # the oracle in fp32 from the same (rounded) inputs
    want = _run(sl.segmented_lora_reference, x.float(), [t.float() for t in a], [t.float() for t in b],
                scales, seg, dy.float())
    tol = TOL[dtype]
    assert got[0].dtype == dtype and got[0].shape == (sum(rows), n)
    _close(got[0], want[0], tol, "delta")
    _close(got[1], want[1], tol, "dx")
    for i in range(len(ranks)):
        if rows[i] == 0:  # no rows: no gradient, exactly
            assert not got[2][i].any() and not got[3][i].any()
            continue
        _close(got[2][i], want[2][i], tol, f"dA[{i}]")
        _close(got[3][i], want[3][i], tol, f"dB[{i}]")


def test_each_adapter_sees_only_its_rows():
    """Changing one adapter's weights changes its rows of the output and no other row."""
    x, a, b, scales, seg = _case([4, 6, 5], [4, 8, 2], 32, 16, torch.float32)
    before = sl.segmented_lora(x, a, b, scales, seg)
    b[1] = b[1] + 1.0
    after = sl.segmented_lora(x, a, b, scales, seg)
    changed = (after != before).any(dim=1)
    assert changed[4:10].all() and not changed[:4].any() and not changed[10:].any()


def test_bad_shapes_name_the_adapter():
    x, a, b, scales, seg = _case([3, 2], [4, 8], 16, 16, torch.float32)
    with pytest.raises(ValueError, match=r"adapter 1: A \(4, 16\) and B \(16, 8\) do not fit rank 8"):
        sl.segmented_lora(x, [a[0], a[0]], b, scales, seg)
    with pytest.raises(ValueError, match=r"x must be \[rows, in\] with 5 rows"):
        sl.segmented_lora(x[:4], a, b, scales, seg)
    with pytest.raises(ValueError, match=r"2 row counts for 1 ranks"):
        sl.Segments.of([1, 2], [4])
    with pytest.raises(ValueError, match=r"ranks >= 1"):
        sl.Segments.of([1], [0])


def test_the_kernels_run_not_the_reference(monkeypatch):
    """Under the interpreter (or on CUDA) the product goes through the Triton launches: 2 forward, 4 backward."""
    assert DEVICE == "cuda" or sl.interpreted()
    launches = []
    real_rows, real_sums = sl._rows, sl._sum_rows
    monkeypatch.setattr(sl, "_rows", lambda *a, **k: launches.append("rows") or real_rows(*a, **k))
    monkeypatch.setattr(sl, "_sum_rows", lambda *a, **k: launches.append("sum") or real_sums(*a, **k))
    monkeypatch.setattr(sl, "segmented_lora_reference", None)  # any fallback would fail
    x, a, b, scales, seg = _case([3, 4], [4, 8], 16, 16, torch.float32)
    _run(sl.segmented_lora, x, a, b, scales, seg, torch.ones(7, 16, device=DEVICE))
    assert launches == ["rows", "rows", "rows", "rows", "sum", "sum"]
