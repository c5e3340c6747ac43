"""fastft.kernels.nf4: bit-exact with bitsandbytes.functional.dequantize_4bit (torch.equal, never a
tolerance), the out= path, and the documented errors.

On CPU the Triton kernel runs under TRITON_INTERPRET=1 (conftest sets it) on small and odd shapes;
the GPU tests repeat exactness on the Llama-3-8B layer shapes and skip without CUDA.
"""
from __future__ import annotations

import copy

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

from fastft.kernels import nf4, nf4_format

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (runs in bench/gpu.sh on the GPU machine)")


def quantize(shape, dtype, quant_type="nf4", blocksize=64, nested=True, seed=0, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    w = (torch.randn(shape, generator=g, device=device) * 0.02).to(dtype)
    return F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)


def assert_bit_exact(actual, expected, what):
    """torch.equal, and on failure say where, by how much, and how many elements differ."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{what}: got {actual.dtype}{list(actual.shape)}, expected {expected.dtype}{list(expected.shape)}")
    if not torch.equal(actual, expected):
        diff = (actual.double() - expected.double()).abs().reshape(-1)
        bad = int((diff > 0).sum())
        i = int(diff.argmax())
        pytest.fail(f"{what}: {bad} of {diff.numel()} elements differ; max {diff[i].item():.3e} at flat "
                    f"index {i} ({actual.reshape(-1)[i].item()!r} vs {expected.reshape(-1)[i].item()!r})")


def check(shape, dtype, quant_type="nf4", blocksize=64, nested=True):
    packed, qs = quantize(shape, dtype, quant_type, blocksize, nested)
    expected = F.dequantize_4bit(packed, qs)
    what = f"{quant_type} bs={blocksize} nested={nested} {dtype} {list(shape)}"
    assert_bit_exact(nf4.dequantize_nf4(packed, qs), expected, "triton " + what)
    assert_bit_exact(nf4.dequantize_nf4_reference(packed, qs), expected, "reference " + what)


# -- exactness ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_formats_match_bitsandbytes(quant_type, nested, dtype):
    check((37, 129), dtype, quant_type, 64, nested)  # 4773 elements: odd, not a multiple of 64


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("blocksize", nf4_format.BLOCKSIZES)
def test_every_blocksize_matches_bitsandbytes(blocksize, nested):
    # 3 x 4099: every blocksize has a partial last block; >= 2048 takes bnb's torch fallback on CPU
    check((3, 4099), torch.bfloat16, "nf4", blocksize, nested)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 1), (1, 4160), (7, 33), (2, 3, 50)], ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_odd_shapes_match_bitsandbytes(quant_type, shape):
    for dtype in (torch.float16, torch.bfloat16):
        check(shape, dtype, quant_type, 64, True)


@pytest.mark.parametrize("blocksize,nested,dtype", [(64, True, torch.bfloat16), (32, False, torch.float32),
                                                    (1024, True, torch.float16)], ids=str)
def test_grid_stride_loop_with_a_capped_grid_is_exact(blocksize, nested, dtype):
    """Fewer programs than tiles (the GPU caps its grid at PROGRAMS_PER_SM per SM): each program loops
    over tiles; 3 programs over 29 tiles leave a partial last round and a partial last tile."""
    packed, qs = quantize((29, 255), dtype, "nf4", blocksize, nested)
    config = nf4.LaunchConfig(256, 4) if nf4.interpreted() else nf4.LAUNCH_CONFIGS[0]
    assert -(-packed.numel() // config.bytes_per_program) > 3
    for programs in (1, 3):
        got = nf4.dequantize_nf4_with_config(packed, qs, config, max_programs=programs)
        assert_bit_exact(got, F.dequantize_4bit(packed, qs), f"{programs} programs bs={blocksize} {dtype}")


@pytest.mark.parametrize("config", nf4.LAUNCH_CONFIGS, ids=lambda c: c.name)
def test_every_shipped_launch_config_is_exact(config):
    # the tile sizes the GPU autotuner chooses from; a 4096 block is larger than every tile
    for blocksize, dtype in ((32, torch.bfloat16), (4096, torch.float16)):
        packed, qs = quantize((7, 1001), dtype, "nf4", blocksize, True)
        assert_bit_exact(nf4.dequantize_nf4_with_config(packed, qs, config), F.dequantize_4bit(packed, qs),
                         f"{config.name} bs={blocksize} {dtype}")


def test_fp4_and_blocksize_32_fp32_flat():
    check((5, 77), torch.float32, "fp4", 32, False)


def test_two_roundings_are_what_bitsandbytes_computes():
    """The double-quant absmax is code2 * absmax2 rounded, then + offset rounded. A single rounding
    (what an FMA gives) differs from bitsandbytes on this weight, so the exactness tests above would
    catch a fused kernel."""
    packed, qs = quantize((128, 256), torch.float32, "nf4", 64, True)
    expected = F.dequantize_4bit(packed, qs)
    st = nf4.NF4Weight.from_quant_state(packed, qs)
    code2, absmax2 = st.code2[st.absmax.long()].double(), st.absmax2.double()
    blocks = torch.arange(st.absmax.numel()) // st.blocksize2
    fused = (code2 * absmax2[blocks] + st.offset.double()).float()  # one rounding, as an FMA
    fused_qs = copy.copy(qs)
    fused_qs.state2, fused_qs.offset, fused_qs.absmax, fused_qs.nested = None, None, fused, False
    assert not torch.equal(F.dequantize_4bit(packed, fused_qs), expected)
    assert_bit_exact(nf4.dequantize_nf4(packed, qs), expected, "two roundings")


def test_blocks_straddling_rows_follow_the_flat_layout():
    """Absmax block j covers flat elements [j * blocksize, (j + 1) * blocksize) whatever the row length:
    that is how quantize_4bit and bitsandbytes' CUDA kernel index. bitsandbytes 0.50's CPU C++
    dequantizer (taken for an even row length) disagrees for row lengths that are multiples of 16 but
    not of the blocksize when there are several rows (e.g. 40 x 96, blocksize 64: 3348 of 3840 values
    differ, with 3x the round-trip error), so the oracle here is bitsandbytes' own portable torch
    implementation of the same op, the path it takes for odd row lengths."""
    default_ops = pytest.importorskip("bitsandbytes.backends.default.ops")
    for nested in (False, True):
        packed, qs = quantize((40, 96), torch.float32, "nf4", 64, nested)
        absmax = (F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset) if nested else qs.absmax
        expected = default_ops._dequantize_4bit_compute(packed.reshape(-1), absmax, nf4_format._table("nf4", "cpu"),
                                                        64, qs.shape, torch.float32)
        assert_bit_exact(nf4.dequantize_nf4(packed, qs), expected, f"40x96 nested={nested}")
        assert_bit_exact(nf4.dequantize_nf4_reference(packed, qs), expected, f"reference 40x96 nested={nested}")


def test_dtype_argument_overrides_quant_state_dtype():
    packed, qs = quantize((9, 70), torch.bfloat16)
    as_fp32 = copy.copy(qs)
    as_fp32.dtype = torch.float32
    assert_bit_exact(nf4.dequantize_nf4(packed, qs, dtype=torch.float32), F.dequantize_4bit(packed, as_fp32),
                     "dtype=float32 from a bf16 quant state")


# -- inputs bitsandbytes hands out -----------------------------------------------------------------

def test_params4bit_and_linear4bit_are_accepted():
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 40, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(40, 128) * 0.02, requires_grad=False,
                                     compress_statistics=True, quant_type="nf4")
    layer = layer.to("cpu")  # quantizes
    weight = layer.weight
    expected = F.dequantize_4bit(weight.data, weight.quant_state)
    assert expected.shape == (40, 128)
    assert_bit_exact(nf4.dequantize_nf4(weight), expected, "Params4bit")
    assert_bit_exact(nf4.dequantize_nf4(layer), expected, "Linear4bit")


def test_float_quant_storage_is_read_as_bytes():
    """bnb_4bit_quant_storage=torch.bfloat16 (what FSDP shards) keeps the packed codes in a bf16 tensor:
    the same bytes, read as uint8, so the same values as uint8 storage."""
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 40, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                              quant_storage=torch.bfloat16)
    layer.weight = bnb.nn.Params4bit(torch.randn(40, 128) * 0.02, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", quant_storage=torch.bfloat16)
    layer = layer.to("cpu")  # quantizes
    weight = layer.weight
    assert weight.dtype == torch.bfloat16
    expected = F.dequantize_4bit(weight.data.view(torch.uint8), weight.quant_state)
    assert_bit_exact(nf4.dequantize_nf4(weight), expected, "bf16 storage")
    assert_bit_exact(nf4.dequantize_nf4_reference(weight), expected, "reference, bf16 storage")
    parsed = nf4.NF4Weight.from_quant_state(weight, weight.quant_state)
    assert parsed.packed.dtype == torch.uint8 and parsed.packed.shape == (40 * 128 // 2,)
    # a packed uint8 tensor viewed as bf16 by hand: the same result as the uint8 tensor itself
    packed, qs = quantize((36, 128), torch.float16)
    as_bf16 = packed.reshape(-1).view(torch.bfloat16)
    expected = F.dequantize_4bit(packed, qs)
    assert_bit_exact(nf4.dequantize_nf4(as_bf16, qs), expected, "uint8 viewed as bf16")
    assert_bit_exact(nf4.dequantize_nf4_reference(as_bf16, qs), expected, "reference, uint8 viewed as bf16")


# -- out= ------------------------------------------------------------------------------------------

def test_out_is_written_in_place():
    packed, qs = quantize((33, 64), torch.bfloat16)
    out = torch.full((33, 64), float("nan"), dtype=torch.bfloat16)
    ptr = out.data_ptr()
    result = nf4.dequantize_nf4(packed, qs, out=out)
    assert result is out and out.data_ptr() == ptr
    assert_bit_exact(out, F.dequantize_4bit(packed, qs), "out=")
    # a second weight into the same buffer overwrites every element
    packed2, qs2 = quantize((33, 64), torch.bfloat16, seed=1)
    nf4.dequantize_nf4(packed2, qs2, out=out)
    assert_bit_exact(out, F.dequantize_4bit(packed2, qs2), "out= reused")


# -- errors ----------------------------------------------------------------------------------------

def test_errors_name_the_problem():
    packed, qs = quantize((16, 64), torch.bfloat16)
    with pytest.raises(TypeError, match="quant_state"):
        nf4.dequantize_nf4(packed)  # packed bytes alone
    with pytest.raises(TypeError, match="no 4-bit weight"):
        nf4.dequantize_nf4(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="output dtype torch.int8 is not supported"):
        nf4.dequantize_nf4(packed, qs, dtype=torch.int8)
    with pytest.raises(TypeError, match="out is torch.float32 but the output dtype is torch.bfloat16"):
        nf4.dequantize_nf4(packed, qs, out=torch.empty(16, 64), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"out has shape \[64, 16\], expected \[16, 64\]"):
        nf4.dequantize_nf4(packed, qs, out=torch.empty(64, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be contiguous"):
        nf4.dequantize_nf4(packed, qs, out=torch.empty(64, 16, dtype=torch.bfloat16).t())

    other, _ = quantize((16, 128), torch.bfloat16)
    with pytest.raises(ValueError, match="packed weight has 1024 bytes but quant_state.shape"):
        nf4.dequantize_nf4(other, qs)

    bad = copy.copy(qs)
    bad.blocksize = 16
    with pytest.raises(ValueError, match="blocksize 16 is not supported"):
        nf4.dequantize_nf4(packed, bad)
    bad = copy.copy(qs)
    bad.quant_type = "int4"
    with pytest.raises(ValueError, match="quant_type 'int4' is not supported"):
        nf4.dequantize_nf4(packed, bad)
    bad = copy.copy(qs)
    bad.shape = torch.Size([16, 128])
    with pytest.raises(ValueError, match="absmax has 16 values but shape"):
        nf4.dequantize_nf4(packed, bad)
    bad = copy.copy(qs)
    bad.absmax = qs.absmax.to("meta")
    with pytest.raises(ValueError, match="absmax is on meta but the packed weight is on cpu"):
        nf4.dequantize_nf4(packed, bad)

    flat_packed, flat_qs = quantize((16, 64), torch.bfloat16, nested=False)
    bad = copy.copy(flat_qs)
    bad.absmax = flat_qs.absmax.half()
    with pytest.raises(TypeError, match="absmax must be float32"):
        nf4.dequantize_nf4(flat_packed, bad)


def test_cpu_without_interpreter_runs_the_torch_reference():
    """Outside the Triton interpreter, CPU tensors take the pure-torch reference (a fresh process:
    this one has TRITON_INTERPRET=1 from conftest)."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, bitsandbytes.functional as F\n"
        "from fastft.kernels import nf4\n"
        "assert not nf4.interpreted()\n"
        "w = torch.randn(37, 129, dtype=torch.bfloat16) * 0.02\n"
        "p, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type='nf4')\n"
        "out = torch.empty(37, 129, dtype=torch.bfloat16)\n"
        "assert nf4.dequantize_nf4(p, qs, out=out) is out\n"
        "assert torch.equal(out, F.dequantize_4bit(p, qs))\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# -- GPU: Llama-3-8B layer shapes ------------------------------------------------------------------

LLAMA3_8B_SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (128256, 4096)]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", LLAMA3_8B_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gpu_llama3_8b_shapes_match_bitsandbytes(shape, dtype):
    packed, qs = quantize(shape, dtype, "nf4", 64, True, device="cuda")
    expected = F.dequantize_4bit(packed, qs)
    assert_bit_exact(nf4.dequantize_nf4(packed, qs), expected, f"cuda nf4 {list(shape)} {dtype}")
    out = torch.empty_like(expected)
    assert nf4.dequantize_nf4(packed, qs, out=out) is out
    assert_bit_exact(out, expected, "cuda out=")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_gpu_formats_and_blocksizes_match_bitsandbytes(quant_type, nested):
    # four blocksizes, not eight: each is its own compile per dtype, and the GPU suite's slot is short
    for blocksize in (32, 64, 256, 4096):
        for dtype in DTYPES:
            packed, qs = quantize((1027, 771), dtype, quant_type, blocksize, nested, device="cuda")
            assert_bit_exact(nf4.dequantize_nf4(packed, qs), F.dequantize_4bit(packed, qs),
                             f"cuda {quant_type} bs={blocksize} nested={nested} {dtype}")


# -- the benchmark harness runs end to end (CPU: interpreter smoke, figures are not claims) ----------

def test_bench_cpu_smoke_runs_end_to_end(tmp_path):
    import json
    import subprocess
    import sys

    from support import ROOT

    proc = subprocess.run([sys.executable, "-m", "bench.kernels", "nf4", "--cpu-smoke", "--dtypes", "bf16",
                           "--shapes", "48x64,3x100", "--no-torch", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["kind"] == "kernel" and doc["target"] == "cpu" and doc["config"]["cpu_smoke"]
    assert any("not a measurement" in n for n in doc["notes"])
    rows = {r["impl"]: r for r in doc["metrics"]["rows"] if r["shape"] == [3, 100]}
    assert rows["fastft"]["bit_exact"] and rows["bitsandbytes"]["bit_exact"]
    assert list(tmp_path.glob("kernel-nf4-dequant-smoke-cpu-*.json"))


@gpu
@pytest.mark.gpu
def test_gpu_wrong_device_is_an_error():
    packed, qs = quantize((64, 64), torch.bfloat16, device="cuda")
    bad = copy.copy(qs)
    bad.absmax = qs.absmax.cpu()
    with pytest.raises(ValueError, match="absmax is on cpu but the packed weight is on cuda"):
        nf4.dequantize_nf4(packed, bad)
    with pytest.raises(ValueError, match="out is on cpu but the packed weight is on cuda"):
        nf4.dequantize_nf4(packed, qs, out=torch.empty(64, 64, dtype=torch.bfloat16))


def test_untuned_configs_are_among_the_compiled_ones():
    # tests/test_kernel_compile.py compiles LAUNCH_CONFIGS for sm_80/89/90; the untuned default
    # for small weights must be one of them
    from kernel_specs import COMPILE_CONFIGS

    assert nf4.DEFAULT_CONFIG in nf4.LAUNCH_CONFIGS
    assert {c["constexprs"]["BYTES_PER_PROGRAM"] for c in COMPILE_CONFIGS["fastft.kernels.nf4"]} == {
        c.bytes_per_program for c in nf4.LAUNCH_CONFIGS}
