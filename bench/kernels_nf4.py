"""NF4 dequantization microbenchmark: fastft's Triton kernel against bitsandbytes' `dequantize_4bit`,
Unsloth's dequantization (`fast_dequantize`, its own Triton NF4 kernel, its bitsandbytes ctypes
path; each when installed) and the torch reference, in one process on one device.

    python -m bench.kernels nf4                                  # GPU: Llama-3-8B shapes, bf16 + fp16
    python -m bench.kernels nf4 --dtypes bf16 --shapes 4096x4096,128256x4096
    python -m bench.kernels nf4 --sweep                          # also time every shipped launch config
    python -m bench.kernels nf4 --cpu-smoke                      # CPU, Triton interpreter, tiny shapes:
                                                                 # proves the harness runs; not a measurement

Weights are NF4 with double quantization, blocksize 64 (what pre-quantized hub checkpoints such as
unsloth/llama-3-8b-bnb-4bit hold), random N(0, 0.02) values quantized by bitsandbytes on the device.
Timings are `triton.testing.do_bench` medians (L2 flushed before each run) with p20/p80. Effective
bandwidth counts bytes read (packed codes, uint8 absmax, fp32 absmax2) plus bytes written (the
output); "% copy" divides it by the device's measured copy bandwidth (a large tensor copy, read +
write, timed the same way), "% roof" by the datasheet DRAM bandwidth of the target
(fastft.hardware). Before timing, every implementation's output is compared with bitsandbytes'
(torch.equal) and the result says which are bit-exact.

Output: a table per dtype, the launch config the autotuner chose per shape, a summary against the
targets (>= 1.15x bitsandbytes on every shape, >= Unsloth's best on the median, >= 85% of
copy bandwidth on the largest shape), then one result JSON (bench.common) and the same document as
one compact JSON line, last. The JSON goes to --out, else $FASTFT_BENCH_RESULTS, else bench/results/;
with --cpu-smoke the last fallback is a temporary folder, never bench/results/.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

LLAMA3_8B_SHAPES = {  # (out_features, in_features) of each 4-bit linear layer, and the lm_head
    "q_proj/o_proj": (4096, 4096),
    "k_proj/v_proj": (1024, 4096),
    "gate/up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
    "lm_head": (128256, 4096),
}
SMOKE_SHAPES = [(64, 128), (96, 200)]
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.kernels nf4", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", help="comma-separated OUTxIN (default: the Llama-3-8B layer shapes)")
    p.add_argument("--dtypes", default="bf16,fp16", help="output dtypes, comma-separated: bf16,fp16,fp32")
    p.add_argument("--target", help="hardware target for the roof and the result name (default: from the "
                                    "device name; cpu for --cpu-smoke)")
    p.add_argument("--sweep", action="store_true", help="also time every shipped launch config")
    p.add_argument("--no-torch", action="store_true", help="skip the torch reference (slow on big shapes)")
    p.add_argument("--time-budget", type=float, help="seconds: start no new case after this; the cases left are "
                                                     "recorded as cut (bench/gpu.sh sets it from its step limit)")
    from bench import common

    common.add_output_args(p)
    return p.parse_args(argv)


# -- implementations ---------------------------------------------------------------------------------

def implementations(args, notes):
    """name -> fn(packed, quant_state, out) writing/returning the dequantized weight; None = unavailable."""
    import bitsandbytes.functional as F

    from fastft.kernels import nf4

    impls = {
        "fastft": lambda p, qs, out: nf4.dequantize_nf4(p, qs, out=out),
        # bitsandbytes' CPU backend has no out= variant of its op
        "bitsandbytes": (lambda p, qs, out: out.copy_(F.dequantize_4bit(p, qs))) if args.cpu_smoke
        else (lambda p, qs, out: F.dequantize_4bit(p, qs, out=out)),
    }
    if not args.cpu_smoke:
        impls.update(unsloth_implementations(notes))
    if not args.no_torch:
        impls["torch_reference"] = lambda p, qs, out: out.copy_(nf4.dequantize_nf4_reference(p, qs))
    return impls


def unsloth_implementations(notes):
    try:
        import unsloth  # noqa: F401  (patches must load before its kernels module)
        from unsloth.kernels import utils as uk
    except Exception as e:  # not installed, or no GPU it supports
        notes.append(f"unsloth unavailable: {type(e).__name__}: {str(e)[:200]}")
        return {}
    out = {"unsloth_fast_dequantize": lambda p, qs, o: uk.fast_dequantize(p, qs, out=o)}
    notes.append(f"unsloth_fast_dequantize runs Unsloth's {'Triton NF4 kernel' if getattr(uk, '_USE_NF4_KERNELS', False) else 'bitsandbytes ctypes path'} "
                 "(unsloth.kernels.utils._USE_NF4_KERNELS)")
    if hasattr(uk, "_fast_dequantize_ctypes"):
        out["unsloth_ctypes"] = lambda p, qs, o: uk._fast_dequantize_ctypes(p, qs, o, False)
    try:
        from unsloth.kernels import nf4 as unf4

        def triton_nf4(p, qs, o):
            s2 = qs.state2
            return unf4.dequantize_nf4(p, qs.absmax, s2.code, s2.absmax, qs.offset, qs.code, qs.blocksize,
                                       s2.blocksize, qs.shape, qs.dtype, out=o)
        out["unsloth_triton_nf4"] = triton_nf4
    except Exception as e:
        notes.append(f"unsloth Triton NF4 kernel unavailable: {type(e).__name__}: {str(e)[:200]}")
    return out


# -- timing ------------------------------------------------------------------------------------------

def copy_bandwidth(torch, device, measure, n_bytes):
    """GB/s of dst.copy_(src) on the device, counting the read and the write."""
    src = torch.empty(n_bytes // 2, dtype=torch.int16, device=device).random_()
    dst = torch.empty_like(src)
    us, _, _ = measure(lambda: dst.copy_(src))
    src = dst = None  # free before the caller allocates (the timed lambda has run)
    return 2 * n_bytes / (us * 1e-6) / 1e9, us


# -- main --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before fastft.kernels is imported
    import torch

    cpu = args.cpu_smoke
    if not cpu and not torch.cuda.is_available():
        print("bench.kernels nf4: no CUDA device; use --cpu-smoke to check the harness on CPU", file=sys.stderr)
        return 2
    notes = []
    impls = implementations(args, notes)  # imports unsloth first, when present
    import bitsandbytes.functional as F

    from bench import common
    from fastft import hardware
    from fastft.kernels import nf4

    device = "cpu" if cpu else "cuda"
    target = args.target or ("cpu" if cpu else hardware.detect_target())
    roof = hardware.get(target).dram_gbps
    dtypes = [DTYPES[d.strip()] for d in args.dtypes.split(",")]
    if args.shapes:
        shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes.split(",")]
    else:
        shapes = SMOKE_SHAPES if cpu else list(LLAMA3_8B_SHAPES.values())
    # 10 ms warm-up, 50 ms of runs: thousands of runs of a 10-500 us kernel; keeps the whole
    # benchmark inside its 90 s slot in bench/gpu.sh
    measure = common.timer(cpu, warmup_ms=10, rep_ms=50, unit="us")
    if cpu:
        notes.insert(0, "interpreter smoke, not a measurement: CPU run under TRITON_INTERPRET=1 on tiny shapes; "
                        "it shows the harness runs end to end, its timings are not claims")

    # copy bandwidth on a buffer as big as the largest output (at least 256 MiB on a GPU)
    largest = max(m * n for m, n in shapes) * 2
    copy_gbps, copy_us = copy_bandwidth(torch, device, measure, max(largest, 1 << 20 if cpu else 1 << 28))
    print(f"device: {common.device()['name']} ({device}), target {target}; measured copy bandwidth "
          f"{copy_gbps:,.0f} GB/s" + (f", datasheet {roof:,.0f} GB/s" if roof else ""))

    rows, sweeps, cut = [], [], []
    t_start = time.monotonic()
    config = {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "shapes": [list(s) for s in shapes],
              "dtypes": dtypes, "implementations": list(impls), "timer": "perf_counter x3 median" if cpu else
              "triton.testing.do_bench median (p20, p80), L2 flushed", "launch_configs": [c.name for c in nf4.LAUNCH_CONFIGS],
              "autotune_min_bytes": nf4.AUTOTUNE_MIN_BYTES, "cpu_smoke": cpu, "time_budget_s": args.time_budget}
    command = [sys.executable, "-m", "bench.kernels", "nf4", *(sys.argv[2:] if argv is None else argv)]
    # a smoke result never lands in bench/results/ by default: it is not a measurement
    out_dir = args.out or (os.environ.get("FASTFT_BENCH_RESULTS") or tempfile.mkdtemp(prefix="fastft-nf4-smoke-")
                           if cpu else None)
    stamp = {}

    def document(complete: bool) -> dict:
        metrics = {"copy_bandwidth_gbps": round(copy_gbps, 1), "copy_us": round(copy_us, 2),
                   "datasheet_gbps": roof, "rows": rows, "sweep": sweeps, "cut": cut,
                   "summary": summarize(rows, shapes, dtypes, smoke=cpu), "complete": complete}
        doc = common.result(kind="kernel", name="nf4-dequant-smoke" if cpu else "nf4-dequant", target=target,
                            config=config, metrics=metrics, command=command, notes=notes)
        doc["created_utc"] = stamp.setdefault("utc", doc["created_utc"])  # one file, rewritten after each case
        return doc

    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for shape in shapes:
            if args.time_budget is not None and time.monotonic() - t_start > args.time_budget:
                cut.append({"shape": list(shape), "dtype": dtype_name,
                            "reason": f"time budget {args.time_budget:g} s spent before this case started"})
                print(f"bench.kernels nf4: {shape} {dtype_name}: cut (time budget {args.time_budget:g} s)")
                continue
            g = torch.Generator(device=device).manual_seed(0)
            w = (torch.randn(shape, generator=g, device=device) * 0.02).to(dtype)
            packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            del w
            numel = shape[0] * shape[1]
            bytes_moved = (packed.numel() + qs.absmax.numel() + 4 * qs.state2.absmax.numel()
                           + numel * torch.finfo(dtype).bits // 8)
            expected = F.dequantize_4bit(packed, qs)
            out = torch.empty_like(expected)
            for name, fn in impls.items():
                row = {"shape": list(shape), "dtype": dtype_name, "impl": name}
                try:
                    out.fill_(float("nan"))
                    fn(packed, qs, out)
                    row["bit_exact"] = bool(torch.equal(out, expected))
                    us, p20, p80 = measure(lambda: fn(packed, qs, out))
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    rows.append(row)
                    continue
                gbps = bytes_moved / (us * 1e-6) / 1e9
                row.update(us=round(us, 2), us_p20=round(p20, 2), us_p80=round(p80, 2), gbps=round(gbps, 1),
                           pct_copy=round(100 * gbps / copy_gbps, 1),
                           pct_roof=round(100 * gbps / roof, 1) if roof else None)
                if name == "fastft":
                    cfg = nf4.chosen_config(packed, qs)
                    row["config"] = cfg.name if cfg else None
                rows.append(row)
            if args.sweep:
                for cfg in nf4.LAUNCH_CONFIGS:
                    def run_cfg(cfg=cfg):
                        return nf4.dequantize_nf4_with_config(packed, qs, cfg, out=out)
                    run_cfg()
                    us, _, _ = measure(run_cfg)
                    sweeps.append({"shape": list(shape), "dtype": dtype_name, "config": cfg.name,
                                   "us": round(us, 2), "bit_exact": bool(torch.equal(out, expected))})
            packed = qs = expected = out = None  # free before the next shape
            if not cpu:
                torch.cuda.empty_cache()
            if not args.no_write:  # rewritten after every case: a run cut short keeps what it measured
                common.write(document(complete=False), out_dir)

    doc = document(complete=True)
    print_report(rows, sweeps, doc["metrics"]["summary"], shapes, dtypes, cpu)
    if not args.no_write:
        print(f"result: {common.write(doc, out_dir)}")
    print(common.dumps_line(doc))
    return 0


def summarize(rows, shapes, dtypes, smoke=False) -> dict:
    """Speedups of fastft over bitsandbytes and Unsloth's best, per dtype, against the targets."""
    def t(shape, dtype, impl):
        for r in rows:
            if r["shape"] == list(shape) and r["dtype"] == dtype and r["impl"] == impl and "us" in r:
                return r
        return None

    out = {}
    largest = max(shapes, key=lambda s: s[0] * s[1])
    for dtype in dtypes:
        vs_bnb, vs_unsloth, exact = [], [], []
        for shape in shapes:
            ours, bnb = t(shape, dtype, "fastft"), t(shape, dtype, "bitsandbytes")
            if not ours:
                continue
            exact.append(ours["bit_exact"])
            if bnb:
                vs_bnb.append(bnb["us"] / ours["us"])
            unsloth = [r for r in rows if r["shape"] == list(shape) and r["dtype"] == dtype
                       and r["impl"].startswith("unsloth") and "us" in r and r["bit_exact"]]
            if unsloth:
                vs_unsloth.append(min(r["us"] for r in unsloth) / ours["us"])
        big = t(largest, dtype, "fastft")
        s = {"fastft_bit_exact_all": all(exact) if exact else None,
             "speedup_vs_bitsandbytes": [round(x, 3) for x in vs_bnb],
             "speedup_vs_bitsandbytes_min": round(min(vs_bnb), 3) if vs_bnb else None,
             "speedup_vs_bitsandbytes_median": round(statistics.median(vs_bnb), 3) if vs_bnb else None,
             "speedup_vs_unsloth_best": [round(x, 3) for x in vs_unsloth],
             "speedup_vs_unsloth_best_median": round(statistics.median(vs_unsloth), 3) if vs_unsloth else None,
             "largest_shape": list(largest), "largest_pct_copy": big["pct_copy"] if big else None}
        s["targets"] = {"bit_exact": s["fastft_bit_exact_all"]} if smoke else {
            "bit_exact": s["fastft_bit_exact_all"],
            ">=1.15x bitsandbytes on every shape": (s["speedup_vs_bitsandbytes_min"] or 0) >= 1.15 if vs_bnb else None,
            ">= unsloth best on the median": (s["speedup_vs_unsloth_best_median"] or 0) >= 1.0 if vs_unsloth else None,
            ">=85% copy bandwidth on the largest": (s["largest_pct_copy"] or 0) >= 85 if big else None,
        }
        out[dtype] = s
    return out


def print_report(rows, sweeps, summary, shapes, dtypes, cpu):
    if cpu:
        print("\n*** interpreter smoke on CPU: the figures below are not measurements and claim nothing ***")
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    for dtype in dtypes:
        print(f"\n{dtype}: microseconds (median) | GB/s | % of measured copy bandwidth | bit-exact vs bitsandbytes")
        print(f"{'shape':>13} " + " ".join(f"{i:>26}" for i in impls) + "  fastft config")
        for shape in shapes:
            cells, cfg = [], ""
            for impl in impls:
                r = next((r for r in rows if r["shape"] == list(shape) and r["dtype"] == dtype and r["impl"] == impl), None)
                if r is None or "us" not in r:
                    cells.append(f"{'error' if r else '-':>26}")
                    continue
                cells.append(f"{r['us']:>9.1f} {r['gbps']:>7.0f} {r['pct_copy']:>5.0f}% {'=' if r['bit_exact'] else 'x':>1}")
                if impl == "fastft":
                    cfg = r.get("config") or "?"
            print(f"{shape[0]:>6}x{shape[1]:<6} " + " ".join(cells) + f"  {cfg}")
        s = summary.get(dtype, {})
        print(f"  fastft vs bitsandbytes: min {s.get('speedup_vs_bitsandbytes_min')}x, median "
              f"{s.get('speedup_vs_bitsandbytes_median')}x; vs Unsloth's best (median): "
              f"{s.get('speedup_vs_unsloth_best_median')}x; largest shape at {s.get('largest_pct_copy')}% of copy")
        for k, v in s.get("targets", {}).items():
            print(f"    [{'ok' if v else ('--' if v is None else 'MISS')}] {k}")
        if cpu:
            print("    (speed targets are not evaluated on an interpreter smoke run)")
    if sweeps:
        print("\nlaunch config sweep (microseconds):")
        for dtype in dtypes:
            for shape in shapes:
                cells = [f"{s['config']}={s['us']:.1f}" for s in sweeps if s["shape"] == list(shape) and s["dtype"] == dtype]
                print(f"  {dtype} {shape[0]}x{shape[1]}: " + "  ".join(cells))
    for r in rows:
        if "error" in r:
            print(f"  error: {r['impl']} {r['shape']} {r['dtype']}: {r['error']}")


if __name__ == "__main__":
    sys.exit(main())
