"""Fused LoRA linear microbenchmark: forward + backward of one LoRA linear layer, fastft's Triton kernels
against Unsloth's path (LoRA_W: dequantize + cuBLAS + addmm, when installed), PEFT's lora.Linear /
lora.Linear4bit, and a plain cuBLAS matmul of the same base (the floor: x·Wᵀ forward, dY·W backward,
no LoRA, no dequantization), in one process on one device.

    python -m bench.kernels lora                          # GPU: Llama-3-8B shapes, r 16/64, M 4096/16384, bf16
    python -m bench.kernels lora --bases nf4 --ranks 16 --tokens 4096
    python -m bench.kernels lora --sweep                  # also time the forward matmul in every launch config
    python -m bench.kernels lora --cpu-smoke              # CPU, Triton interpreter, tiny shapes: proves the
                                                          # harness runs end to end; not a measurement

Each case builds one PEFT LoRA layer on the device (NF4 with double quantization, blocksize 64, or a
16-bit nn.Linear), lora_B non-zero, x and dY random. Before timing, fastft's output and dX/dA/dB are
compared with PEFT's and the largest relative difference is recorded. Timings are
`triton.testing.do_bench` medians (p20, p80) of forward + backward. TFLOP/s counts the useful work,
4·M·K·N + 6·M·r·(K+N) (forward, dX, dA, dB; W gets no gradient); "% floor" is the floor's time over
the implementation's (100% = as fast as the bare base matmuls). Over an NF4 base fastft runs both
of its NF4 paths, lora.NF4_PATH held at the row's path through forward and backward: "fastft" the
in_kernel path (W dequantized tile by tile inside the fused matmul kernel), "fastft_dequant" the
dequantize path (fastft's NF4 kernel writes W dense, then cuBLAS; the shipped default). Each fastft row
records as nf4_path the route its forward and its backward really took, read from the kernel calls
they made (NF4PathProbe), not from its label; the chosen launch configs are printed per shape.

Output: a table, a summary against the targets (NF4 base, median over shapes: >= 1.10x
Unsloth, >= 1.5x PEFT), then one result JSON (bench.common) and the same document as one compact JSON
line, last. The JSON goes to --out, else $FASTFT_BENCH_RESULTS, else bench/results/; a --cpu-smoke
result never goes to bench/results/ (a temporary folder unless --out says otherwise).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import types

LLAMA3_8B_SHAPES = {  # (in_features K, out_features N) of Llama-3-8B's linear layers
    "q_proj/o_proj": (4096, 4096),
    "k_proj/v_proj": (4096, 1024),
    "gate/up_proj": (4096, 14336),
    "down_proj": (14336, 4096),
}
SMOKE = {"shapes": [(64, 96), (128, 40)], "ranks": [8], "tokens": [24]}  # rows not multiples of 16 but of 64: bitsandbytes 0.50's CPU dequant (PEFT's path here) misplaces absmax blocks for rows that are multiples of 16 but not 64
TARGETS = {"vs_unsloth": 1.10, "vs_peft": 1.5}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.kernels lora", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", help="comma-separated INxOUT (default: the Llama-3-8B layer shapes)")
    p.add_argument("--ranks", default="16,64", help="LoRA ranks, comma-separated")
    p.add_argument("--tokens", default="4096,16384", help="token counts M, comma-separated")
    p.add_argument("--bases", default="nf4,16bit", help="base weights: nf4, 16bit")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--target", help="hardware target for roofs and the result name (default: from the device)")
    p.add_argument("--sweep", action="store_true", help="also time the forward matmul in every launch config")
    p.add_argument("--time-budget", type=float, help="seconds: start no new layer after this; the cases left are "
                                                     "recorded as cut (bench/gpu.sh sets it from its step limit)")
    from bench import common

    common.add_output_args(p)
    return p.parse_args(argv)


# -- the layer and the implementations ------------------------------------------------------------

def build_layer(torch, K, N, r, base, dtype, device):
    """A PEFT LoRA layer (lora.Linear4bit over NF4, or lora.Linear) inside a container module."""
    from peft import LoraConfig, get_peft_model

    g = torch.Generator(device="cpu").manual_seed(0)
    dense = torch.nn.Linear(K, N, bias=False)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(N, K, generator=g) * 0.02)
    if base == "nf4":
        import bitsandbytes as bnb

        lin = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
        lin.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                       compress_statistics=True)
        lin = lin.to(device)  # quantizes
        if device == "cpu":
            lin.support_avx512bf16_for_cpu = False  # keep the trainable layout (see fastft.models.backends)
    else:
        lin = dense.to(device=device, dtype=dtype)
        lin.weight.requires_grad_(False)
    holder = torch.nn.Sequential()
    holder.add_module("proj", lin)
    model = get_peft_model(holder, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], lora_dropout=0.0))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.randn(r, K, generator=g) / K ** 0.5)
        layer.lora_B["default"].weight.copy_(torch.randn(N, r, generator=g) / r ** 0.5)
    model.to(device)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)  # bf16 adapters, as TRL trains QLoRA
    return model.train(), layer


def dense_weight(torch, layer, dtype):
    from fastft.kernels import nf4

    base = layer.get_base_layer()
    if getattr(base.weight, "quant_state", None) is None:
        return base.weight.to(dtype)
    return nf4.dequantize_nf4_reference(base.weight, dtype=dtype)


def implementations(torch, layer, base, dtype, notes, cpu):
    """name -> forward(x) using the layer's weights; None where unavailable."""
    from fastft.models import patch

    def fastft_fwd(x):
        return patch._fused_forward(layer, x)

    # over NF4 the two rows run the same layer on the two NF4 paths: fwd_bwd holds lora.NF4_PATH at the
    # row's path (NF4_PATH_OF) for the whole step, forward and backward
    impls = {"fastft": fastft_fwd}
    if base == "nf4":
        impls["fastft_dequant"] = fastft_fwd
    impls["peft"] = lambda x: type(layer).forward(layer, x)
    if not cpu:
        unsloth_o = unsloth_path(notes)
        if unsloth_o is not None:
            holder = types.SimpleNamespace(o_proj=layer)
            impls["unsloth"] = lambda x: unsloth_o(holder, x)
    w = dense_weight(torch, layer, dtype)

    class Floor(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x @ w.t()

        @staticmethod
        def backward(ctx, dy):
            return dy @ w

    impls["floor_matmul"] = lambda x: Floor.apply(x)
    return impls


def unsloth_path(notes):
    """Unsloth's single-projection LoRA path (LoRA_W via apply_lora_o), or None."""
    try:
        import unsloth  # noqa: F401
        from unsloth.kernels import fast_lora
    except Exception as e:
        notes.append(f"unsloth unavailable: {type(e).__name__}: {str(e)[:200]}")
        return None
    notes.append("unsloth: unsloth.kernels.fast_lora.apply_lora_o (LoRA_W: fast_dequantize + cuBLAS + addmm)")
    return fast_lora.apply_lora_o


# -- timing ---------------------------------------------------------------------------------------

NF4_PATH_OF = {"fastft": "in_kernel", "fastft_dequant": "dequantize"}  # row -> its NF4 path, forward and backward


class NF4PathProbe:
    """Which route fastft's LoRA op really took for an NF4 weight, per direction, read from the calls
    it makes: the dequantize path writes W dense through ``lora.dense_weight``; the in_kernel path
    hands the NF4Weight itself to ``lora.lora_matmul`` (x·Wᵀ forward, dY·W backward). Each direction
    is the op's ``lora_forward`` / ``lora_backward``; a dense W written outside them is the unfused
    fallback (``lora_linear_dequantized``). Wraps those module functions while in use, restored after
    (the timed runs go through the unwrapped ones)."""

    def __init__(self, lora):
        self.lora, self.phase = lora, None
        self.seen: dict[str, list[str]] = {}

    def _saw(self, route: str) -> None:
        routes = self.seen.setdefault(self.phase or "unfused", [])
        if route not in routes:
            routes.append(route)

    def __enter__(self):
        lora = self.lora
        self.saved = {n: getattr(lora, n) for n in ("lora_forward", "lora_backward", "dense_weight", "lora_matmul")}
        fwd, bwd, dense, matmul = (self.saved[n] for n in ("lora_forward", "lora_backward", "dense_weight",
                                                           "lora_matmul"))

        def in_phase(phase, fn):
            def run(*a, **kw):
                outer, self.phase = self.phase, phase
                self.seen.setdefault(phase, [])
                try:
                    return fn(*a, **kw)
                finally:
                    self.phase = outer
            return run

        def dense_weight(*a, **kw):
            self._saw("dequantize")
            return dense(*a, **kw)

        def lora_matmul(p, q, *a, **kw):
            if isinstance(q, tuple) and q and isinstance(q[0], lora.NF4Weight):
                self._saw("in_kernel")
            return matmul(p, q, *a, **kw)

        lora.lora_forward, lora.lora_backward = in_phase("forward", fwd), in_phase("backward", bwd)
        lora.dense_weight, lora.lora_matmul = dense_weight, lora_matmul
        return self

    def __exit__(self, *exc):
        for n, fn in self.saved.items():
            setattr(self.lora, n, fn)
        return False

    def paths(self) -> dict:
        """{"forward": route, "backward": route}: "dequantize", "in_kernel", "not run" (the fused op was
        not called), or both joined by "+"; with "unfused" when the fallback ran instead."""
        out = {d: "+".join(self.seen[d]) or "neither" if d in self.seen else "not run" for d in ("forward", "backward")}
        if "unfused" in self.seen:
            out["unfused"] = "+".join(self.seen["unfused"])
        return out


def fwd_bwd(torch, fn, x, dy, params, nf4_path: str | None = None):
    """One forward + backward; with nf4_path, fastft.kernels.lora.NF4_PATH is that path throughout both
    (the backward reads it too), and restored after."""
    from fastft.kernels import lora

    def step():
        old = lora.NF4_PATH
        if nf4_path:
            lora.NF4_PATH = nf4_path
        try:
            for p in params:
                p.grad = None
            y = fn(x)
            y.backward(dy)
        finally:
            lora.NF4_PATH = old
    return step


def rel_diff(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


# -- main -----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cpu = args.cpu_smoke
    if cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before fastft.kernels is imported
    import torch

    if not cpu and not torch.cuda.is_available():
        print("bench.kernels lora: no CUDA device; use --cpu-smoke to check the harness on CPU", file=sys.stderr)
        return 2
    notes = []
    if not cpu:
        unsloth_path(notes)  # import unsloth before peft / transformers, as it requires
    from bench import common
    from fastft import hardware
    from fastft.kernels import lora, lora_configs

    device = "cpu" if cpu else "cuda"
    target = args.target or ("cpu" if cpu else hardware.detect_target())
    peak = hardware.get(target).bf16_tflops
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if cpu:
        dtype = torch.float32 if args.dtype == "bf16" else dtype  # the interpreter's bf16 dot is broken
        shapes, ranks, tokens = SMOKE["shapes"], SMOKE["ranks"], SMOKE["tokens"]
        if args.shapes:  # tiny ones only: the interpreter runs every program on the CPU
            shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
        notes.insert(0, "interpreter smoke, not a measurement: CPU run under TRITON_INTERPRET=1 on tiny shapes "
                        "in fp32; it shows the harness runs end to end, its timings are not claims")
    else:
        shapes = ([tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")] if args.shapes
                  else list(LLAMA3_8B_SHAPES.values()))
        ranks = [int(v) for v in args.ranks.split(",")]
        tokens = [int(v) for v in args.tokens.split(",")]
    bases = [b.strip() for b in args.bases.split(",")]
    # 5 ms warm-up, 25 ms of runs (3 to 300 runs of a 0.1-8 ms step): the whole default matrix
    # (32 cases x 5 implementations, plus Triton's first compiles) must fit bench/gpu.sh's slot
    measure = common.timer(cpu, warmup_ms=5, rep_ms=25, unit="ms")
    print(f"device: {common.device()['name']} ({device}), target {target}, dtype {str(dtype).split('.')[-1]}; "
          f"NF4 path default: {lora.NF4_PATH}")

    rows, sweeps = [], []
    config = {"shapes": [list(s) for s in shapes], "ranks": ranks, "tokens": tokens, "bases": bases,
              "dtype": str(dtype).split(".")[-1], "nf4": "double quant, blocksize 64",
              "timer": "perf_counter x3 median" if cpu else "triton.testing.do_bench median (p20, p80)",
              "flops": "4*M*K*N + 6*M*r*(K+N)", "launch_configs": list(lora_configs.CONFIGS),
              "nf4_path_default": lora.NF4_PATH, "cpu_smoke": cpu}
    command = [sys.executable, "-m", "bench.kernels", "lora", *(sys.argv[2:] if argv is None else argv)]
    out_dir = args.out or (os.environ.get("FASTFT_BENCH_RESULTS") or tempfile.mkdtemp(prefix="fastft-lora-smoke-")
                           if cpu else None)
    stamp = {}

    def document(partial: bool):
        metrics = {"rows": rows, "sweep": sweeps, "cut": cut, "summary": summarize(rows, cpu), "complete": not partial}
        doc = common.result(kind="kernel", name="lora-linear-smoke" if cpu else "lora-linear", target=target,
                            config=config, metrics=metrics, command=command, notes=notes)
        doc["created_utc"] = stamp.setdefault("utc", doc["created_utc"])  # one file, rewritten as cases finish
        return doc

    t_start = time.monotonic()
    cut = []
    config["time_budget_s"] = args.time_budget
    for base in bases:
        for (K, N) in shapes:
            for r in ranks:
                if args.time_budget is not None and time.monotonic() - t_start > args.time_budget:
                    cut += [{"base": base, "K": K, "N": N, "r": r, "M": M,
                             "reason": f"time budget {args.time_budget:g} s spent before this case started"}
                            for M in tokens]
                    print(f"bench.kernels lora: {base} {K}x{N} r{r}: cut (time budget {args.time_budget:g} s)")
                    continue
                model, layer = build_layer(torch, K, N, r, base, dtype, device)
                params = [p for p in model.parameters() if p.requires_grad]
                impls = implementations(torch, layer, base, dtype, notes, cpu)
                for M in tokens:
                    g = torch.Generator(device=device).manual_seed(1)
                    x = torch.randn(1, M, K, generator=g, device=device).to(dtype).requires_grad_()
                    dy = torch.randn(1, M, N, generator=g, device=device).to(dtype)
                    flops = 4 * M * K * N + 6 * M * r * (K + N)
                    ref = None
                    case = {"base": base, "K": K, "N": N, "r": r, "M": M}
                    for name, fn in impls.items():
                        row = dict(case, impl=name)
                        forced = NF4_PATH_OF.get(name) if name.startswith("fastft") and base == "nf4" else None
                        try:
                            step = fwd_bwd(torch, fn, x, dy, params + [x], forced)
                            if forced:  # the checked run: its routes are read from the kernel calls
                                row["nf4_path_requested"] = forced
                                with NF4PathProbe(lora) as probe:
                                    step()
                                row["nf4_path"] = probe.paths()
                                if {row["nf4_path"]["forward"], row["nf4_path"]["backward"]} != {forced}:
                                    notes.append(f"{name} {base} {K}x{N} M{M}: set to the {forced} path, the "
                                                 f"kernel calls show {row['nf4_path']}")
                            else:
                                step()
                            grads = [t.grad.clone() for t in [x] + params if t.grad is not None]
                            if name == "peft":
                                ref = grads
                            ms, p20, p80 = measure(step)
                        except Exception as e:
                            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                            rows.append(row)
                            continue
                        row.update(ms=round(ms, 4), ms_p20=round(p20, 4), ms_p80=round(p80, 4),
                                   tflops=round(flops / (ms * 1e-3) / 1e12, 2))
                        if peak:
                            row["pct_peak"] = round(100 * row["tflops"] / peak, 1)
                        row["_grads"] = grads
                        rows.append(row)
                    for row in rows:
                        if all(row.get(k) == v for k, v in case.items()) and "_grads" in row:
                            g_ = row.pop("_grads")
                            if ref is not None and not row["impl"].startswith("floor"):
                                row["max_rel_diff_vs_peft"] = float(f"{max(rel_diff(a, b) for a, b in zip(g_, ref)):.3e}")
                    floor = next((r_ for r_ in rows if all(r_.get(k) == v for k, v in case.items())
                                  and r_["impl"] == "floor_matmul" and "ms" in r_), None)
                    for row in rows:
                        if all(row.get(k) == v for k, v in case.items()) and "ms" in row and floor:
                            row["pct_floor"] = round(100 * floor["ms"] / row["ms"], 1)
                    nf4 = base == "nf4"
                    fp32 = dtype == torch.float32
                    try:
                        cfg = {"fwd": lora_configs.pick_config("mm", M, N, nf4, fp32),
                               "dx": lora_configs.pick_config("mm", M, K, nf4, fp32),
                               "xa": lora_configs.pick_config("thin", M, r, False, fp32),
                               "da_db": lora_configs.pick_config("red", r, K, False, fp32)}
                    except (AttributeError, TypeError, KeyError) as e:  # the launcher's picker changed
                        cfg = {"unknown": f"{type(e).__name__}: {e}"}
                    for row in rows:
                        if all(row.get(k) == v for k, v in case.items()) and row["impl"].startswith("fastft"):
                            row["configs"] = cfg
                    if args.sweep and not cpu:
                        sweeps += sweep(torch, lora, measure, layer, base, x.detach().reshape(M, K), dtype, case)
                    del x, dy
                    if not args.no_write:  # after every case: a run cut short still leaves what it measured
                        common.write(document(partial=True), out_dir)
                del model, layer, impls
                if not cpu:
                    torch.cuda.empty_cache()

    doc = document(partial=False)
    print_report(rows, sweeps, doc["metrics"]["summary"], cpu)
    if not args.no_write:
        print(f"result: {common.write(doc, out_dir)}")
    print(common.dumps_line(doc))
    return 0


def sweep(torch, lora, measure, layer, base, x2, dtype, case):
    """The forward base + LoRA matmul alone in every launch config (shipped and candidates)."""
    from fastft.kernels.lora_configs import CANDIDATES, CONFIGS
    from fastft.kernels.nf4_format import NF4Weight

    w = layer.get_base_layer().weight
    a = layer.lora_A["default"].weight.to(dtype)
    b = layer.lora_B["default"].weight.to(dtype)
    r = a.shape[0]
    xa = lora.lora_matmul(x2, a.t(), dtype, kind="thin", rank=r)
    q = (NF4Weight.from_quant_state(w, w.quant_state), True) if base == "nf4" else w.t()
    out = []
    for name in list(CONFIGS) + list(CANDIDATES):
        if name.startswith(("thin", "red")) or (base == "nf4") != name.startswith("nf4"):
            continue
        try:
            ms, _, _ = measure(lambda: lora.lora_matmul(x2, q, dtype, lora=(xa, b.t()), scale=1.0, rank=r,
                                                        config=name))
            out.append(dict(case, config=name, ms=round(ms, 4)))
        except Exception as e:
            out.append(dict(case, config=name, error=f"{type(e).__name__}: {str(e)[:200]}"))
    return out


def _speedups(rows, base, mine, others) -> dict:
    """{other: [other's ms / mine's ms per case]} over the cases where both were timed."""
    vs = {o: [] for o in others}
    for r in rows:
        if r["base"] != base or r["impl"] != mine or "ms" not in r:
            continue
        for other in vs:
            o = next((x for x in rows if x["impl"] == other and "ms" in x
                      and all(x[k] == r[k] for k in ("base", "K", "N", "r", "M"))), None)
            if o:
                vs[other].append(o["ms"] / r["ms"])
    return vs


def summarize(rows, cpu) -> dict:
    """fastft over Unsloth and PEFT per case, and the medians over cases, NF4 and 16-bit base; over NF4
    for both paths ("fastft": in_kernel, "fastft_dequant": dequantize, also as speedup_vs_* of its own)."""
    from fastft.kernels import lora

    out = {}
    for base in sorted({r["base"] for r in rows}):
        vs = _speedups(rows, base, "fastft", ("unsloth", "peft", "fastft_dequant"))
        s = {f"speedup_vs_{k}_median": round(statistics.median(v), 3) if v else None for k, v in vs.items()}
        s.update({f"speedup_vs_{k}": [round(x, 3) for x in v] for k, v in vs.items()})
        if base == "nf4":
            deq = _speedups(rows, base, "fastft_dequant", ("unsloth", "peft"))
            s["fastft_dequant"] = {f"speedup_vs_{k}_median": round(statistics.median(v), 3) if v else None
                                   for k, v in deq.items()}
            s["nf4_paths"] = {"fastft": NF4_PATH_OF["fastft"], "fastft_dequant": NF4_PATH_OF["fastft_dequant"],
                              "training_default": lora.NF4_PATH}
        if base == "nf4" and not cpu:
            # the targets hold for what training runs: the row on lora.NF4_PATH
            row = next(k for k, v in NF4_PATH_OF.items() if v == lora.NF4_PATH)
            med = s if row == "fastft" else s["fastft_dequant"]
            s["targets_row"] = row
            s["targets"] = {f">= {TARGETS['vs_unsloth']}x Unsloth (median, {row})":
                            (med["speedup_vs_unsloth_median"] or 0) >= TARGETS["vs_unsloth"]
                            if med["speedup_vs_unsloth_median"] is not None else None,
                            f">= {TARGETS['vs_peft']}x PEFT (median, {row})":
                            (med["speedup_vs_peft_median"] or 0) >= TARGETS["vs_peft"]
                            if med["speedup_vs_peft_median"] is not None else None}
        out[base] = s
    return out


def print_report(rows, sweeps, summary, cpu):
    if cpu:
        print("\n*** interpreter smoke on CPU: the figures below are not measurements and claim nothing ***")
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    print("\nforward + backward, ms (median) | TFLOP/s | % of the floor matmul time")
    print(f"{'base':>5} {'K->N':>12} {'r':>3} {'M':>6} " + " ".join(f"{i:>24}" for i in impls) + "  fastft configs (fwd, dx)")
    cases = list(dict.fromkeys((r["base"], r["K"], r["N"], r["r"], r["M"]) for r in rows))
    for base, K, N, r, M in cases:
        cells, cfg = [], ""
        for impl in impls:
            row = next((x for x in rows if (x["base"], x["K"], x["N"], x["r"], x["M"], x["impl"]) == (base, K, N, r, M, impl)), None)
            if row is None or "ms" not in row:
                cells.append(f"{'error' if row else '-':>24}")
                continue
            cells.append(f"{row['ms']:>9.3f} {row['tflops']:>7.1f} {row.get('pct_floor', 0):>5.0f}%")
            if impl == "fastft" and "configs" in row:
                cfg = f"{row['configs']['fwd']}, {row['configs']['dx']}"
        print(f"{base:>5} {f'{K}->{N}':>12} {r:>3} {M:>6} " + " ".join(cells) + f"  {cfg}")
    for base, s in summary.items():
        print(f"  {base}: fastft vs Unsloth median {s['speedup_vs_unsloth_median']}x, vs PEFT median "
              f"{s['speedup_vs_peft_median']}x, vs fastft_dequant median {s['speedup_vs_fastft_dequant_median']}x")
        if "fastft_dequant" in s:
            d = s["fastft_dequant"]
            print(f"  {base}: fastft_dequant vs Unsloth median {d['speedup_vs_unsloth_median']}x, vs PEFT median "
                  f"{d['speedup_vs_peft_median']}x (paths: {s['nf4_paths']})")
        for k, v in s.get("targets", {}).items():
            print(f"    [{'ok' if v else ('--' if v is None else 'MISS')}] {k}")
    if cpu:
        print("    (speed targets are not evaluated on an interpreter smoke run)")
    diffs = [r["max_rel_diff_vs_peft"] for r in rows if "max_rel_diff_vs_peft" in r and r["impl"].startswith("fastft")]
    if diffs:
        print(f"  fastft vs PEFT, largest relative difference over dX, dA, dB: {max(diffs):.2e}")
    if sweeps:
        print("\nforward matmul launch-config sweep (ms):")
        for s in sweeps:
            print(f"  {s['base']} {s['K']}->{s['N']} r{s['r']} M{s['M']}: {s['config']}="
                  + (f"{s['ms']:.3f}" if "ms" in s else s["error"]))
    for r in rows:
        if "error" in r:
            print(f"  error: {r['impl']} {r['base']} {r['K']}->{r['N']} r{r['r']} M{r['M']}: {r['error']}")


if __name__ == "__main__":
    sys.exit(main())
