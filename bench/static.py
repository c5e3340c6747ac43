"""Static kernel evidence, no GPU needed: every shipped Triton config compiled for sm_80, sm_89 and
sm_90 as the JIT builds it, and what its machine code says.

    python -m bench.kernels static                       # this checkout, the installed triton
    python -m bench.kernels static --tree /tmp/before    # another checkout's kernels (e.g. a worktree)
    PYTHONPATH=.venv/triton36 python -m bench.kernels static   # under the side triton 3.6 (make triton36)

For every config in the tree's tests/kernel_specs.py (COMPILE_CONFIGS: name, kernel, signature,
constexprs, options, divisible_by_16) and every target, `triton.compile` with a GPUTarget builds the
cubin on the CPU; `cuobjdump -res-usage` gives registers, spills (LOCAL bytes) and static shared
memory, the compile metadata the dynamic shared memory, and `nvdisasm` (both ship inside the triton
wheel) the SASS. Loops are found by their back edges (a branch to a label above it); the K loop is
the loop holding the most MMA instructions (HMMA on sm_80/89, HGMMA on sm_90), else the largest
loop. Its static instruction count is "per K step" (one iteration's straight-line body, branches
inside it counted once), divided by its MMA count "per MMA".

LoRA configs compile at r = 16, 64 and 128 (BLOCK_R 16, 64, 128: lora.MAX_FUSED_RANK is the largest)
in bf16 and fp32 (tests/kernel_specs.py LORA_RANKS, LORA_DTYPES). A config over a target's shared
memory that the launcher refuses (`lora_configs.fit_config`: it runs the next config of
lora_configs.SMALLER that fits) shows "over: runs <fallback>" and counts as refused, not as an
overflow, for --check.

Beside the compiles: bytes moved and FLOPs per call for the benchmark shapes (Llama-3-8B: NF4
dequantization of each projection; the LoRA layer forward and backward at M=4096, r=16, NF4 base,
for the in-kernel and the dequantize + matmul paths) and the roofline lower bound on an H200, one of
the GPUs the GPU suite runs on (by default --bandwidth 4.3 TB/s, --flops 790 TFLOP/s dense bf16;
pass both for another device).

Compiles run in a pool of --jobs worker processes (default 2), each with a --timeout per compile
(a worker past it is killed and replaced; the compile is recorded as timed out). One JSON goes to
--out (default bench/results/), written by this program with the triton version, the command line
and the tree's git commit; a compact table goes to stdout.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib.util
import json
import multiprocessing as mp
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import wait
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAPS = (80, 89, 90)
SHARED_LIMIT = {80: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # max shared memory per block (opt-in)
H200_BYTES_PER_S = 4.3e12
H200_FLOPS = 790e12
MMA_OPS = ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "DMMA")

LLAMA3_8B = {  # projection -> (out_features N, in_features K)
    "q_proj/o_proj": (4096, 4096),
    "k_proj/v_proj": (1024, 4096),
    "gate/up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
    "lm_head": (128256, 4096),
}


# -- work per call: bytes and FLOPs ------------------------------------------------------------------

def nf4_bytes(n: int, k: int, blocksize: int = 64, blocksize2: int = 256) -> int:
    """An NF4 weight in HBM, nested (double-quantized) as the hub checkpoints hold it: packed codes,
    uint8 absmax per block, fp32 absmax2 per 256 blocks, the 256-entry fp32 code table."""
    blocks = -(-n * k // blocksize)
    return n * k // 2 + blocks + 4 * -(-blocks // blocksize2) + 256 * 4


def roofline(nbytes: float, flops: float, bw: float, peak: float) -> dict:
    t_mem, t_math = nbytes / bw, flops / peak
    return {"bytes": int(nbytes), "flops": int(flops), "lower_bound_us": round(max(t_mem, t_math) * 1e6, 2),
            "bound": "memory" if t_mem >= t_math else "compute",
            "memory_us": round(t_mem * 1e6, 2), "compute_us": round(t_math * 1e6, 2)}


def workloads(bw: float, peak: float, tokens: int = 4096, rank: int = 16, elt: int = 2) -> list[dict]:
    """The benchmark shapes' work per call and their roofline lower bound (bf16 activations)."""
    rows = []
    for proj, (n, k) in LLAMA3_8B.items():
        # dequantize: read the NF4 weight, write it in bf16; ~3 flops per element (scale, nested
        # scale and offset), counted for completeness: it never binds
        rows.append(dict(kind="nf4_dequant", shape=proj, N=n, K=k,
                         **roofline(nf4_bytes(n, k) + elt * n * k, 3 * n * k, bw, peak)))
    m, r = tokens, rank
    for proj, (n, k) in LLAMA3_8B.items():
        if proj == "lm_head":
            continue
        w4, w16 = nf4_bytes(n, k), elt * n * k
        lora_w = elt * r * (k + n)  # A [r, K] and B [N, r]
        # forward: Y = X W^T + s (X A^T) B^T; reads X, W, A, B; writes Y and XA (kept for backward)
        f_flops = 2 * m * n * k + 2 * m * k * r + 2 * m * r * n
        f_bytes = elt * m * k + lora_w + elt * m * n + elt * m * r
        # backward: dX = dY W + s (dY B) A; dA = s (dY B)^T X; dB = s dY^T (XA)
        b_flops = 2 * m * n * k + 2 * m * n * r + 2 * m * r * k + 2 * r * m * k + 2 * n * m * r
        b_bytes = elt * m * n + elt * m * k + elt * m * r + lora_w + elt * m * k + lora_w
        for path, w_read in (("in_kernel", w4), ("dequantize", w4 + 2 * w16)):  # dequant: write + read W
            for phase, fl, by in (("forward", f_flops, f_bytes), ("backward", b_flops, b_bytes)):
                rows.append(dict(kind="lora_layer", shape=proj, N=n, K=k, M=m, r=r, path=path, phase=phase,
                                 **roofline(by + w_read, fl, bw, peak)))
    return rows


# -- SASS: loops and MMAs ----------------------------------------------------------------------------

_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);", re.DOTALL)
_LABEL = re.compile(r"^\s*(\.L_x_\d+):", re.MULTILINE)
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def sass_loops(sass: str) -> dict:
    """Parse nvdisasm output: every instruction (address, opcode), labels, back edges -> loops."""
    insns, labels = [], {}
    pos_label = [(m.start(), m.group(1)) for m in _LABEL.finditer(sass)]
    for m in _INSN.finditer(sass):
        insns.append((int(m.group(1), 16), m.group(2), m.group(3), m.start()))
    # a label names the first instruction after it
    j = 0
    for pos, name in pos_label:
        while j < len(insns) and insns[j][3] < pos:
            j += 1
        if j < len(insns):
            labels[name] = j
    loops = []
    for i, (addr, op, rest, _) in enumerate(insns):
        if not op.startswith(("BRA", "BRX", "JMP")):
            continue
        t = _TARGET.search(rest)
        # a back edge; a lone `BRA` to itself is the padding trap after EXIT, not a loop
        if t and t.group(1) in labels and labels[t.group(1)] < i:
            body = insns[labels[t.group(1)]:i + 1]
            mma = sum(1 for b in body if b[1].split(".")[0] in MMA_OPS)
            loops.append({"start": f"{body[0][0]:#06x}", "end": f"{addr:#06x}", "instructions": len(body),
                          "mma": mma})
    total_mma = sum(1 for b in insns if b[1].split(".")[0] in MMA_OPS)
    if loops:
        with_mma = [lp for lp in loops if lp["mma"]]
        k_loop = (max(with_mma, key=lambda lp: (lp["mma"], -lp["instructions"])) if with_mma
                  else max(loops, key=lambda lp: lp["instructions"]))
    else:
        k_loop = None
    return {"instructions": len(insns), "mma_total": total_mma, "loops": loops, "k_loop": k_loop,
            "per_k_step": k_loop["instructions"] if k_loop else None,
            "per_mma": round(k_loop["instructions"] / k_loop["mma"], 1) if k_loop and k_loop["mma"] else None}


# -- the worker side (a spawned process: the tree's kernels, no TRITON_INTERPRET) ----------------------

def load_tree(tree: Path):
    """Import `tree`'s kernels as fastft.kernels (by file path) and its tests/kernel_specs.py."""
    os.environ.pop("TRITON_INTERPRET", None)
    import fastft  # noqa: F401  (the package the kernels live under; only its namespace is used)

    kdir = tree / "kernels"
    spec = importlib.util.spec_from_file_location("fastft.kernels", kdir / "__init__.py",
                                                  submodule_search_locations=[str(kdir)])
    mod = importlib.util.module_from_spec(spec)
    for name in [n for n in sys.modules if n == "fastft.kernels" or n.startswith("fastft.kernels.")]:
        del sys.modules[name]
    sys.modules["fastft.kernels"] = mod
    spec.loader.exec_module(mod)
    sys.modules["fastft"].kernels = mod
    spec = importlib.util.spec_from_file_location("kernel_specs", tree / "tests" / "kernel_specs.py")
    specs = importlib.util.module_from_spec(spec)
    sys.modules["kernel_specs"] = specs
    spec.loader.exec_module(specs)
    return specs.COMPILE_CONFIGS


def compile_spec(cfg: dict, cap: int):
    """Compile one kernel_specs config for compute capability ``cap`` (no GPU needed): the kernel's
    signature with its constexprs and tt.divisibility 16 on ``divisible_by_16``, as the JIT would.
    Also the compile of tests/test_kernel_compile.py's worker."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod_name, attr = cfg["kernel"].split(":")
    fn = getattr(importlib.import_module(mod_name), attr)
    signature = dict(cfg["signature"])
    signature.update({k: "constexpr" for k in cfg["constexprs"]})
    divisible = cfg.get("divisible_by_16", list(cfg["signature"]))
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in divisible}
    return triton.compile(ASTSource(fn, signature, cfg["constexprs"], attrs),
                          target=GPUTarget("cuda", cap, 32), options=cfg["options"])


def compile_one(cfg: dict, cap: int) -> dict:
    import triton

    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    res = {"name": cfg["name"], "cap": cap}
    t = time.perf_counter()
    try:
        kernel = compile_spec(cfg, cap)
    except Exception as e:  # noqa: BLE001  (recorded; the table shows it)
        res["error"] = f"{type(e).__name__}: {e}"[:2000]
        return res
    res["compile_s"] = round(time.perf_counter() - t, 2)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(bindir / "cuobjdump"), "-res-usage", f.name], capture_output=True,
                               text=True, check=False).stdout
        sass = subprocess.run([str(bindir / "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=False)
    fields = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    shared = fields.get("SHARED", 0) + int(kernel.metadata.shared)
    ptx = kernel.asm["ptx"]
    res.update(registers=fields.get("REG"), spill_bytes=fields.get("LOCAL"), stack=fields.get("STACK"),
               shared_static=fields.get("SHARED"), shared_dynamic=int(kernel.metadata.shared),
               shared_fits=shared <= SHARED_LIMIT[cap], num_warps=cfg["options"].get("num_warps"),
               num_stages=cfg["options"].get("num_stages"), async_copy="cp.async" in ptx,
               ptx_missing=[s for s in cfg.get("ptx_require", []) if s not in ptx],
               ptx_present=[s for s in cfg.get("ptx_forbid", []) if s in ptx])
    if sass.returncode == 0:
        res["sass"] = sass_loops(sass.stdout)
    else:
        res["sass_error"] = sass.stderr.strip()[-500:]
    return res


def _serve(conn, tree: str) -> None:
    """Worker loop: receive (module, name, cap), answer the compile's record; None stops."""
    try:
        configs = load_tree(Path(tree))
        by_name = {c["name"]: c for cs in configs.values() for c in cs}
        import triton

        conn.send({"ready": True, "triton": triton.__version__, "triton_file": triton.__file__})
    except Exception as e:  # noqa: BLE001  (the parent reports it)
        conn.send({"ready": False, "error": f"{type(e).__name__}: {e}"})
        return
    while True:
        job = conn.recv()
        if job is None:
            return
        _, name, cap = job
        try:
            conn.send(compile_one(by_name[name], cap))
        except Exception as e:  # noqa: BLE001  (recorded as this compile's error)
            conn.send({"name": name, "cap": cap, "error": f"{type(e).__name__}: {e}"[:2000]})


def list_configs(tree: Path) -> dict:
    """{module: [config name, ...]} of the tree's specs (in a spawned process: no triton here)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_list, args=(child, str(tree)), daemon=True)
    p.start()
    out = parent.recv() if parent.poll(300) else {"error": "listing the configs took over 300 s"}
    p.join(5)
    if "error" in out:
        raise SystemExit(f"bench.static: cannot load {tree}/tests/kernel_specs.py: {out['error']}")
    return out


def _list(conn, tree: str) -> None:
    try:
        configs = load_tree(Path(tree))
        import triton

        conn.send({"configs": {m: [c["name"] for c in cs] for m, cs in configs.items()},
                   "refusals": {c["name"]: c["refusal"] for cs in configs.values() for c in cs if c.get("refusal")},
                   "triton": triton.__version__, "triton_file": triton.__file__})
    except Exception as e:  # noqa: BLE001  (the parent reports it)
        conn.send({"error": f"{type(e).__name__}: {e}"})


class _Worker:
    def __init__(self, ctx, tree: str):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, tree), daemon=True)
        self.proc.start()
        self.job, self.deadline, self.ready = None, None, False

    def kill(self):
        self.proc.kill()
        self.proc.join(5)


def run_pool(tree: Path, jobs: list[tuple], n_workers: int, timeout: float, on_done=None) -> list[dict]:
    """Compile every (module, name, cap) job in n_workers processes, each compile under `timeout` s."""
    ctx = mp.get_context("spawn")
    todo, results = list(jobs), []
    workers = [_Worker(ctx, str(tree)) for _ in range(min(n_workers, len(jobs)) or 1)]
    startup = 300.0  # importing torch + triton + the kernels
    for w in workers:
        w.deadline = time.monotonic() + startup
    try:
        while todo or any(w.job for w in workers):
            for w in workers:
                if w.ready and w.job is None and todo:
                    w.job = todo.pop(0)
                    w.conn.send(w.job)
                    w.deadline = time.monotonic() + timeout
            live = [w.conn for w in workers if w.proc.is_alive() or w.conn.poll()]
            ready = wait(live, timeout=1.0) if live else []
            for w in list(workers):
                if w.conn in ready:
                    try:
                        msg = w.conn.recv()
                    except EOFError:
                        msg = None
                    if msg is None:  # the worker died
                        if w.job:
                            results.append({"name": w.job[1], "cap": w.job[2], "module": w.job[0],
                                            "error": f"worker exited (code {w.proc.exitcode})"})
                            w.job = None
                        w.kill()
                        workers[workers.index(w)] = nw = _Worker(ctx, str(tree))
                        nw.deadline = time.monotonic() + startup
                        continue
                    if "ready" in msg:
                        if not msg["ready"]:
                            raise SystemExit(f"bench.static: a compile worker could not start: {msg['error']}")
                        w.ready = True
                        continue
                    msg["module"] = w.job[0]
                    results.append(msg)
                    if on_done:
                        on_done(msg)
                    w.job = None
                elif w.deadline and time.monotonic() > w.deadline and (w.job or not w.ready):
                    if w.job:
                        rec = {"name": w.job[1], "cap": w.job[2], "module": w.job[0],
                               "error": f"timeout: no result after {timeout:.0f} s", "timed_out": True}
                        results.append(rec)
                        if on_done:
                            on_done(rec)
                    elif not w.ready:
                        raise SystemExit(f"bench.static: a compile worker did not start within {startup:.0f} s")
                    w.kill()
                    workers[workers.index(w)] = nw = _Worker(ctx, str(tree))
                    nw.deadline = time.monotonic() + startup
    finally:
        for w in workers:
            try:
                w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
            w.proc.join(2)
            if w.proc.is_alive():
                w.kill()
    return results


# -- the command -----------------------------------------------------------------------------------

def tree_commit(tree: Path) -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True, timeout=10,
                             check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "kernels", "tests"],
                               cwd=tree, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "") if sha.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def write_json(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def mark_refusals(rows: list[dict], refusals: dict) -> None:
    """A config over a target's shared memory whose launcher refuses it (kernel_specs "refusal": the
    chain `lora_configs.fit_config` walks, in order) gets "refused_for": the first spec of its chain compiled
    for that target that fits, the one launched instead; it then counts as no overflow. Without a
    compiled fitting fallback it keeps shared_fits False."""
    by = {(r["name"], r["cap"]): r for r in rows if "error" not in r}
    for r in rows:
        refusal = refusals.get(r["name"])
        if r.get("shared_fits") is not False or not refusal:
            continue
        for spec in list(refusal["chain"].values())[1:]:
            other = by.get((spec, r["cap"]))
            if other is None:
                r["refused_for"] = None  # the fallback was not compiled here (--only, --first)
                break
            if other.get("shared_fits"):
                r["refused_for"] = spec
                break


def table(rows: list[dict]) -> str:
    head = f"{'config':58s} {'sm':>3s} {'regs':>4s} {'spill':>5s} {'smem KB':>7s} {'K-step':>6s} {'MMA':>4s} " \
           f"{'/MMA':>6s} {'s':>5s}"
    out = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["module"], r["name"], r["cap"])):
        if "error" in r:
            out.append(f"{r['name'][:58]:58s} {r['cap']:>3d}  ERROR {r['error'][:80]}")
            continue
        s = r.get("sass") or {}
        k = s.get("k_loop") or {}
        smem = ((r.get("shared_static") or 0) + (r.get("shared_dynamic") or 0)) / 1024
        fit = "" if r.get("shared_fits", True) else (f"  over: runs {r['refused_for'][12:]}" if r.get("refused_for")
                                                     else "  OVER the limit")
        out.append(f"{r['name'][:58]:58s} {r['cap']:>3d} {r['registers']!s:>4s} {r['spill_bytes']!s:>5s} "
                   f"{smem:7.1f} {k.get('instructions', '-')!s:>6s} {k.get('mma', '-')!s:>4s} "
                   f"{s.get('per_mma') or '-'!s:>6s} {r.get('compile_s', '-')!s:>5s}{fit}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernels static", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--tree", default=str(ROOT), help="checkout whose kernels/ and tests/kernel_specs.py to "
                                                     "compile (default: this one)")
    p.add_argument("--out", help="folder for the JSON (default bench/results/)")
    p.add_argument("--name", help="label in the file name (default: the tree's short commit)")
    p.add_argument("--caps", default="80,89,90", help="compute capabilities, comma-separated")
    p.add_argument("--only", help="substring: compile only configs whose name contains it")
    p.add_argument("--modules", help="comma-separated kernel modules (default: all in COMPILE_CONFIGS)")
    p.add_argument("--first", type=int, help="only the first N configs of each module")
    p.add_argument("--check", action="store_true", help="exit 1 when a config fails to compile, spills, overflows "
                                                        "shared memory or misses its PTX checks (as the CI test)")
    p.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per compile before it is killed")
    p.add_argument("--bandwidth", type=float, default=H200_BYTES_PER_S, help="roof bytes/s (default H200 4.3e12)")
    p.add_argument("--flops", type=float, default=H200_FLOPS, help="roof FLOP/s (default H200 dense bf16 7.9e14)")
    args = p.parse_args(argv)

    tree = Path(args.tree).resolve()
    if not (tree / "kernels").is_dir() or not (tree / "tests" / "kernel_specs.py").is_file():
        print(f"bench.static: {tree} has no kernels/ or tests/kernel_specs.py; pass --tree a fastft checkout",
              file=sys.stderr)
        return 2
    caps = [int(c) for c in args.caps.split(",")]
    bad = [c for c in caps if c not in SHARED_LIMIT]
    if bad:
        print(f"bench.static: unknown capability {bad}; use some of {list(SHARED_LIMIT)}", file=sys.stderr)
        return 2
    listing = list_configs(tree)
    modules = args.modules.split(",") if args.modules else list(listing["configs"])
    unknown = [m for m in modules if m not in listing["configs"]]
    if unknown:
        print(f"bench.static: unknown module {unknown}; COMPILE_CONFIGS has {list(listing['configs'])}",
              file=sys.stderr)
        return 2
    jobs = [(m, n, c) for m in modules for n in [n for n in listing["configs"][m] if not args.only or args.only in n]
            [:args.first] for c in caps]
    if not jobs:
        print("bench.static: no config to compile (is triton installed? does --only match?)", file=sys.stderr)
        return 2
    commit = tree_commit(tree)
    label = args.name or (commit or "tree")[:7] + ("-dirty" if commit and commit.endswith("-dirty") else "")
    stamp = _dt.datetime.now(_dt.timezone.utc)
    path = Path(args.out or ROOT / "bench" / "results") / \
        f"static-kernels-{label}-triton{listing['triton']}-{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    doc = {
        "schema_version": 1, "kind": "static", "name": "kernels", "target": "sm_80,sm_89,sm_90 (compiled on CPU)",
        "versions": {"triton": listing["triton"], "python": sys.version.split()[0]},
        "tree": str(tree), "git_commit": commit,
        # what was compiled, byte for byte (a "-dirty" commit's kernels can be matched to a later commit)
        "sources_sha256": {str(f.relative_to(tree)): hashlib.sha256(f.read_bytes()).hexdigest()[:16]
                           for f in sorted([*(tree / "kernels").glob("*.py"), tree / "tests" / "kernel_specs.py"])},
        "command": shlex.join([sys.executable, "-m", "bench.kernels", "static", *(argv if argv is not None
                                                                                  else sys.argv[1:])]),
        "created_utc": stamp.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config": {"caps": caps, "jobs": args.jobs, "timeout_s": args.timeout, "only": args.only,
                   "modules": modules, "first": args.first,
                   "roof": {"name": "H200", "bytes_per_s": args.bandwidth, "flops": args.flops}},
        "notes": [("per_k_step: static SASS instructions of the K loop's body (one iteration, branches in it "
                   "counted once); per_mma: that over the loop's MMA instructions (HMMA/HGMMA); instructions "
                   "are per thread (warp-level SASS)"),
                  ("roofline lower_bound_us: max(bytes / bandwidth, flops / peak) for the ideal kernel moving "
                   "each byte once; the dequantize path adds a bf16 write + read of W")],
        "workloads": workloads(args.bandwidth, args.flops),
        "compiles": [],
        "complete": False,
    }
    t0 = time.monotonic()

    def on_done(rec):  # the JSON is rewritten after every compile
        doc["compiles"].append(rec)
        doc["elapsed_s"] = round(time.monotonic() - t0, 1)
        write_json(doc, path)
        sys.stdout.write(f"\rbench.static: {len(doc['compiles'])}/{len(jobs)} compiled")
        sys.stdout.flush()

    run_pool(tree, jobs, args.jobs, args.timeout, on_done)
    mark_refusals(doc["compiles"], listing.get("refusals", {}))
    doc["complete"] = True
    doc["elapsed_s"] = round(time.monotonic() - t0, 1)
    doc["summary"] = {"compiles": len(doc["compiles"]),
                      "errors": sum(1 for r in doc["compiles"] if "error" in r),
                      "spilling": sum(1 for r in doc["compiles"] if (r.get("spill_bytes") or 0) > 0),
                      # over the limit with no fitting fallback (a refused config runs its fallback)
                      "shared_overflow": sum(1 for r in doc["compiles"]
                                             if r.get("shared_fits") is False and not r.get("refused_for")),
                      "refused": sum(1 for r in doc["compiles"] if r.get("refused_for")),
                      "ptx_check_failures": sum(1 for r in doc["compiles"]
                                                if r.get("ptx_missing") or r.get("ptx_present"))}
    write_json(doc, path)
    print()
    print(table(doc["compiles"]))
    print()
    print(f"{'workload':13s} {'shape':14s} {'path':10s} {'phase':8s} {'MB':>8s} {'GFLOP':>8s} {'bound us':>9s}  by")
    for w in doc["workloads"]:
        print(f"{w['kind']:13s} {w['shape']:14s} {w.get('path', '-'):10s} {w.get('phase', '-'):8s} "
              f"{w['bytes'] / 1e6:8.1f} {w['flops'] / 1e9:8.1f} {w['lower_bound_us']:9.1f}  {w['bound']}")
    print(f"\nbench.static: {doc['summary']} in {doc['elapsed_s']} s (triton {listing['triton']}); wrote {path}")
    bad = doc["summary"]["errors"] or (args.check and any(v for k, v in doc["summary"].items()
                                                          if k not in ("compiles", "refused")))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
