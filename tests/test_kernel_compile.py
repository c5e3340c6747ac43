"""Every shipped Triton launch config compiles for the GPUs fastft targets, without a GPU.

tests/kernel_specs.py lists, per kernel module, how each config it ships compiles
(``COMPILE_CONFIGS[module]``): dicts with
    name         unique, e.g. "nf4_dequant-B1024_w4-bs64-nested-bf16"
    kernel       "module:attribute" of the @triton.jit function
    signature    {arg: "*fp32" | "i32" | ...} for the non-constexpr arguments
    constexprs   {arg: value}
    options      as triton.compile takes them (num_warps, num_stages, enable_fp_fusion, ...)
    divisible_by_16  (optional) args the launcher's tensors/ints are 16-divisible for (what Triton's JIT
                 specializes on); default: every argument in the signature
    ptx_require / ptx_forbid  (optional) substrings the PTX must / must not contain
A module joins by being named in kernel_specs.COMPILE_CONFIGS. For each config
and each target (sm_80 A100, sm_89 RTX 4090, sm_90 H100) `triton.compile` builds PTX and a cubin on
the CPU; `cuobjdump -res-usage` must report LOCAL:0 (no register spills) and static + dynamic shared
memory must fit the target's per-block limit, unless the spec carries a "refusal" (the launcher's
fit function and the chain of configs it falls back to, per launch, rank and dtype): then the fit
function, run on the chain's compiled needs for that target, must pick a smaller config that fits. The compiles run in subprocesses without TRITON_INTERPRET (under the interpreter,
@triton.jit hands out interpreter functions that cannot be compiled).

Two triton versions: the installed one (CI: 3.9) and the GPU machine's 3.6, from a side install
(`make triton36`: `pip install --target .venv/triton36 --no-deps triton==3.6.0`, put first on the
worker's PYTHONPATH; FASTFT_TRITON36 names another folder). One worker per (version, module) starts
when the first test needs them, all at once, each compiling what the selected tests check (so a
`-k` run compiles only its configs), each under its own time budget (COMPILE_BUDGET_S; the
LoRA workers take minutes on 2 cores). The 3.6 tests skip, saying so, only when the side install
is absent; when it is there, every config must compile under it.

    python tests/test_kernel_compile.py --worker fastft.kernels.nf4   # JSON report on stdout (--wanted
                                                                      # '[[name, cap], ...]': only those)
    PYTHONPATH=.venv/triton36 python tests/test_kernel_compile.py --worker fastft.kernels.nf4
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kernel_specs import COMPILE_CONFIGS

KERNEL_MODULES = list(COMPILE_CONFIGS)  # every module kernel_specs lists

ROOT = Path(__file__).resolve().parents[1]
# version label -> the folder put first on the worker's PYTHONPATH ("" = the installed triton)
SIDE_TRITON = os.environ.get("FASTFT_TRITON36") or str(ROOT / ".venv" / "triton36")
VERSIONS = {"installed": "", "3.6": SIDE_TRITON}
COMPILE_BUDGET_S = {"fastft.kernels.nf4": 600}  # per worker, wall clock; other modules (LoRA): DEFAULT_BUDGET_S
DEFAULT_BUDGET_S = 1500

# Max shared memory per block (opt-in), bytes: A100 163 KB, RTX 4090 99 KB, H100 227 KB.
TARGETS = {80: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _configs():
    out = []
    for mod in KERNEL_MODULES:
        for cfg in COMPILE_CONFIGS[mod]:
            out.append((mod, cfg["name"]))
    return out


# -- the worker (a subprocess: no TRITON_INTERPRET) ------------------------------------------------

def _compile_one(cfg: dict, cap: int, cuobjdump: str) -> dict:
    import tempfile

    if str(ROOT) not in sys.path:  # the worker runs as a script from tests/
        sys.path.insert(0, str(ROOT))
    from bench.static import compile_spec

    res = {"name": cfg["name"], "cap": cap}
    try:
        kernel = compile_spec(cfg, cap)
    except Exception as e:  # noqa: BLE001  (reported, and failed, by the test)
        res["error"] = f"{type(e).__name__}: {e}"[:2000]
        return res
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True,
                               check=False).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    ptx = kernel.asm["ptx"]
    res.update(regs=int(fields.get("REG", -1)), local=int(fields.get("LOCAL", -1)),
               stack=int(fields.get("STACK", -1)), shared_static=int(fields.get("SHARED", -1)),
               shared_dynamic=int(kernel.metadata.shared), usage=usage.strip()[-300:],
               ptx_missing=[s for s in cfg.get("ptx_require", []) if s not in ptx],
               ptx_present=[s for s in cfg.get("ptx_forbid", []) if s in ptx])
    return res


def _worker(modules: list[str], wanted: set[tuple[str, int]] | None = None) -> list[dict]:
    """Compile every config of `modules` for every target, or only the (name, cap) pairs `wanted`."""
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    results = []
    for mod in modules:
        for cfg in COMPILE_CONFIGS[mod]:
            for cap in TARGETS:
                if wanted is None or (cfg["name"], cap) in wanted:
                    results.append(_compile_one(cfg, cap, cuobjdump))
    return results


# -- the tests -------------------------------------------------------------------------------------

def side_triton_version(folder: str) -> str | None:
    """The triton version installed in `folder` (a pip --target install), None when there is none."""
    dist = sorted(Path(folder).glob("triton-*.dist-info")) if folder and Path(folder).is_dir() else []
    if not dist or not (Path(folder) / "triton" / "__init__.py").is_file():
        return None
    return dist[-1].name[len("triton-"):-len(".dist-info")]


class _Workers:
    """One compile worker per (version, module), all started together, each with its own deadline."""

    def __init__(self):
        self.procs, self.results = {}, {}

    def start(self, needed: dict[tuple[str, str], list]):
        """needed: (version, module) -> the [name, cap] pairs the selected tests check (a -k run
        compiles only those)."""
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        for (version, mod), pairs in needed.items():
            folder = VERSIONS[version]
            if version != "installed" and side_triton_version(folder) is None:
                continue
            e = dict(env)
            if folder:
                e["PYTHONPATH"] = os.pathsep.join([folder, *filter(None, [env.get("PYTHONPATH")])])
            proc = subprocess.Popen([sys.executable, __file__, "--worker", mod, "--wanted", json.dumps(pairs)],
                                    env=e, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            self.procs[(version, mod)] = (proc, time.monotonic() + COMPILE_BUDGET_S.get(mod, DEFAULT_BUDGET_S))

    def get(self, version: str, mod: str) -> dict:
        key = (version, mod)
        if key not in self.results:
            proc, deadline = self.procs[key]
            try:
                out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                self.results[key] = {"error": f"the {mod} compile worker under triton {version} ran past its "
                                              f"{COMPILE_BUDGET_S.get(mod, DEFAULT_BUDGET_S)} s budget (COMPILE_BUDGET_S):\n{err[-3000:]}"}
                return self.results[key]
            if proc.returncode != 0:
                self.results[key] = {"error": f"the {mod} compile worker under triton {version} failed "
                                              f"(rc {proc.returncode}):\n{err[-4000:]}"}
            else:
                report = json.loads(out.strip().splitlines()[-1])
                self.results[key] = {"triton": report["triton"],
                                     "by": {(r["name"], r["cap"]): r for r in report["results"]}}
        return self.results[key]

    def stop(self):
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.fixture(scope="module")
def workers(request):
    pytest.importorskip("triton")
    needed: dict[tuple[str, str], list] = {}
    specs = {c["name"]: c for cs in COMPILE_CONFIGS.values() for c in cs}
    for item in request.session.items:  # the selected tests of this module
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.module is request.module and {"version", "module", "name", "cap"} <= set(params):
            # with the configs the launcher falls back to: a refused config is checked against them
            chain = (specs[params["name"]].get("refusal") or {}).get("chain", {}).values()
            pairs = needed.setdefault((params["version"], params["module"]), [])
            pairs += [[n, params["cap"]] for n in [params["name"], *chain] if [n, params["cap"]] not in pairs]
    w = _Workers()
    w.start(needed)
    yield w
    w.stop()


@pytest.mark.parametrize("cap", list(TARGETS), ids=lambda c: f"sm_{c}")
@pytest.mark.parametrize("module,name", _configs(), ids=lambda v: v.split(".")[-1] if "." in v else v)
@pytest.mark.parametrize("version", list(VERSIONS), ids=lambda v: f"triton-{v}")
def test_launch_config_compiles_without_spills(workers, version, module, name, cap):
    if version != "installed" and side_triton_version(VERSIONS[version]) is None:
        pytest.skip(f"no triton {version} side install at {VERSIONS[version]} (make triton36 installs it; "
                    f"FASTFT_TRITON36 names another folder)")
    report = workers.get(version, module)
    assert "error" not in report, report.get("error")
    if version != "installed":
        assert report["triton"].startswith(version + "."), \
            f"{VERSIONS[version]} gave triton {report['triton']}, not {version}: reinstall it (make triton36)"
    r = report["by"][(name, cap)]
    assert "error" not in r, f"{name} does not compile for sm_{cap} (triton {report['triton']}): {r['error']}"
    assert r["local"] == 0, f"{name} spills {r['local']} bytes to local memory on sm_{cap} ({r['regs']} registers)"
    shared = r["shared_static"] + r["shared_dynamic"]
    if shared > TARGETS[cap]:
        refusal = next(c for c in COMPILE_CONFIGS[module] if c["name"] == name).get("refusal")
        assert refusal, f"{name} needs {shared} bytes of shared memory, sm_{cap} has {TARGETS[cap]}"
        _refused_for(refusal, report, cap)  # fails when no config of the chain fits
    assert not r["ptx_missing"], f"{name}: PTX for sm_{cap} lacks {r['ptx_missing']}"
    assert not r["ptx_present"], f"{name}: PTX for sm_{cap} contains {r['ptx_present']}"


def _refused_for(refusal: dict, report: dict, cap: int) -> str:
    """The spec the launcher runs instead of a config over `cap`'s shared memory: its fit function
    (`lora_configs.fit_config`) on the compiled needs of the chain's specs for that target. Fails, with the
    launcher's own message, when no config of the chain fits."""
    import importlib

    import torch

    mod, attr = refusal["fit"].split(":")
    fit = getattr(importlib.import_module(mod), attr)
    need = {}
    for config, spec in refusal["chain"].items():
        r = report["by"][(spec, cap)]
        assert "error" not in r, f"{spec} (a fallback) does not compile for sm_{cap}: {r['error']}"
        need[config] = r["shared_static"] + r["shared_dynamic"]
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    try:
        config = fit(next(iter(refusal["chain"])), need.__getitem__, TARGETS[cap], rank=refusal["rank"],
                     dtype=dtypes[refusal["dtype"]])
    except ValueError as e:
        pytest.fail(f"sm_{cap}: {e}")
    return refusal["chain"][config]


# Compiled for sm_89 by triton 3.6 and 3.9 alike (the RTX 4090, 99 KB of shared memory per block): the
# fp32 dA / dBᵀ reduction at r = 128, two pipeline buffers of 128 x 64 and 64 x 128 fp32 tiles in the first.
SM89_RED_FP32_R128 = {"red_Rx128x64_w4_s3": 131072, "red_Rx64x64_w4_s3": 98304, "red_Rx64x32_w4_s2": 24576}


def test_a_config_over_the_device_limit_gives_way_to_a_smaller_one():
    import torch
    from fastft.kernels.lora_configs import fit_config

    need = SM89_RED_FP32_R128.__getitem__
    assert fit_config("red_Rx128x64_w4_s3", need, 99 * 1024, rank=128, dtype=torch.float32) == "red_Rx64x64_w4_s3"
    assert fit_config("red_Rx128x64_w4_s3", need, 163 * 1024, rank=128, dtype=torch.float32) == \
        "red_Rx128x64_w4_s3"
    assert fit_config("red_Rx128x64_w4_s3", need, 64 * 1024, rank=128, dtype=torch.float32) == "red_Rx64x32_w4_s2"
    assert fit_config("red_Rx128x64_w4_s3", need, None, rank=128, dtype=torch.float32) == "red_Rx128x64_w4_s3"
    with pytest.raises(ValueError) as e:
        fit_config("red_Rx128x64_w4_s3", need, 16 * 1024, rank=128, dtype=torch.float32)
    msg = str(e.value)
    for part in ("r=128", "torch.float32", "red_Rx128x64_w4_s3 needs 131072 bytes", "red_Rx64x32_w4_s2 needs 24576",
                 f"has {16 * 1024} per block", "bf16", "lora.SMALLER"):
        assert part in msg, (part, msg)


def test_every_fallback_is_a_shipped_config():
    from fastft.kernels import lora_configs

    for big, small in lora_configs.SMALLER.items():
        assert big in lora_configs.CONFIGS and small in lora_configs.CONFIGS, (big, small)
    for n in lora_configs.SMALLER:  # every chain ends
        chain = [n]
        while n in lora_configs.SMALLER:
            n = lora_configs.SMALLER[n]
            assert n not in chain, chain
            chain.append(n)


def test_bench_static_counts_a_refused_config_apart_from_an_overflow():
    """`python -m bench.kernels static --check` applies the same rule: over the limit with a compiled
    fallback that fits is "refused" (it names what runs), over with none is an overflow."""
    from bench import static

    chain = {c: f"lora_matmul-{c}-da-r128-fp32" for c in SM89_RED_FP32_R128}
    refusals = {chain["red_Rx128x64_w4_s3"]: {"chain": chain}, chain["red_Rx64x64_w4_s3"]: {"chain": dict(
        list(chain.items())[1:])}}
    rows = [{"name": spec, "cap": 89, "shared_fits": SM89_RED_FP32_R128[c] <= static.SHARED_LIMIT[89]}
            for c, spec in chain.items()]
    static.mark_refusals(rows, refusals)
    assert rows[0]["refused_for"] == chain["red_Rx64x64_w4_s3"] and "refused_for" not in rows[1]
    # both over a smaller device's limit, red_Rx64x32_w4_s2 not compiled: nothing is known to fit
    rows = [{"name": chain[c], "cap": 89, "shared_fits": False} for c in list(chain)[:2]]
    static.mark_refusals(rows, refusals)
    assert [r["refused_for"] for r in rows] == [None, None]


@pytest.mark.parametrize("dtype", ["float32", "float16"])  # the interpreter has no bf16 arithmetic
def test_the_launch_plan_takes_the_fallback_before_launching(monkeypatch, dtype):
    """The launcher on a stubbed 99 KB device with the compiled sm_89 needs: the fp32 reduction at
    r = 128 runs red_Rx64x64_w4_s3, in the interpreter, with the reference's result; fp16 (half the
    bytes) keeps red_Rx128x64_w4_s3; and a device below every config gets the error, not a launch."""
    import torch
    from fastft.kernels import lora_configs, lora_kernel, nf4_format

    if not nf4_format.interpreted():
        pytest.skip("runs the kernel under TRITON_INTERPRET=1 (conftest sets it on CPU)")
    ty = getattr(torch, dtype)
    by_tiles = {lora_configs.CONFIGS[n][1:3] + lora_configs.CONFIGS[n][-1:]: b for n, b in SM89_RED_FP32_R128.items()}
    elt = torch.finfo(ty).bits // 8
    launched = []

    def need(grid, args, kwargs):  # the compiled fp32 needs; 16-bit tiles take half the bytes
        launched.append((kwargs["BLOCK_N"], kwargs["BLOCK_K"], kwargs["num_stages"]))
        return by_tiles[launched[-1]] * elt // 4

    monkeypatch.setattr(lora_kernel, "_FITTED", {})
    monkeypatch.setattr(lora_kernel, "smem_limit", lambda device: 99 * 1024)
    monkeypatch.setattr(lora_kernel, "_shared_need", need)
    g = torch.Generator().manual_seed(0)
    r, M, K = 128, 96, 80
    dyb, x = torch.randn(M, r, generator=g).to(ty), torch.randn(M, K, generator=g).to(ty)
    out, grid, args, kwargs = lora_kernel.launch_plan(dyb.t(), x, torch.float32, alpha=0.5, kind="red", rank=r,
                                                      config="red_Rx128x64_w4_s3")
    want = (128, 64, 3) if ty == torch.float16 else (64, 64, 3)
    assert (kwargs["BLOCK_N"], kwargs["BLOCK_K"], kwargs["num_stages"]) == want
    got = lora_kernel.lora_matmul(dyb.t(), x, torch.float32, alpha=0.5, kind="red", rank=r, config="red_Rx128x64_w4_s3")
    ref = 0.5 * (dyb.t().double() @ x.double())
    tol = {torch.float32: 1e-5, torch.float16: 1e-5}[ty]  # fp32 accumulation, fp32 out: no 16-bit rounding
    torch.testing.assert_close(got.double(), ref, atol=tol * K ** 0.5, rtol=tol)
    monkeypatch.setattr(lora_kernel, "_FITTED", {})
    monkeypatch.setattr(lora_kernel, "smem_limit", lambda device: 8 * 1024)
    with pytest.raises(ValueError, match="no launch config fits this GPU's shared memory at r=128"):
        lora_kernel.lora_matmul(dyb.t(), x, torch.float32, kind="red", rank=r, config="red_Rx128x64_w4_s3")


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    import triton

    argv = sys.argv[2:]
    wanted = None
    if "--wanted" in argv:
        i = argv.index("--wanted")
        wanted = {(name, cap) for name, cap in json.loads(argv[i + 1])}
        argv = argv[:i] + argv[i + 2:]
    print(json.dumps({"triton": triton.__version__, "results": _worker(argv, wanted)}))
