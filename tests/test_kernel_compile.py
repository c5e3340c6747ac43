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
A module joins by being named in KERNEL_MODULES and in kernel_specs.COMPILE_CONFIGS. For each config
and each target (sm_80 A100, sm_89 RTX 4090, sm_90 H100) `triton.compile` builds PTX and a cubin on
the CPU; `cuobjdump -res-usage` must report LOCAL:0 (no register spills) and static + dynamic shared
memory must fit the target's per-block limit. The compiles run in one subprocess without TRITON_INTERPRET (under the interpreter,
@triton.jit hands out interpreter functions that cannot be compiled).

    python tests/test_kernel_compile.py --worker fastft.kernels.nf4   # JSON report on stdout
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys

import pytest

from kernel_specs import COMPILE_CONFIGS

KERNEL_MODULES = ["fastft.kernels.nf4", "fastft.kernels.lora"]

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

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod_name, attr = cfg["kernel"].split(":")
    fn = getattr(importlib.import_module(mod_name), attr)
    signature = dict(cfg["signature"])
    signature.update({k: "constexpr" for k in cfg["constexprs"]})
    divisible = cfg.get("divisible_by_16", list(cfg["signature"]))
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in divisible}
    res = {"name": cfg["name"], "cap": cap}
    try:
        kernel = triton.compile(ASTSource(fn, signature, cfg["constexprs"], attrs),
                                target=GPUTarget("cuda", cap, 32), options=cfg["options"])
    except Exception as e:  # reported, and failed, by the test
        res["error"] = f"{type(e).__name__}: {e}"[:2000]
        return res
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    ptx = kernel.asm["ptx"]
    res.update(regs=int(fields.get("REG", -1)), local=int(fields.get("LOCAL", -1)),
               stack=int(fields.get("STACK", -1)), shared_static=int(fields.get("SHARED", -1)),
               shared_dynamic=int(kernel.metadata.shared), usage=usage.strip()[-300:],
               ptx_missing=[s for s in cfg.get("ptx_require", []) if s not in ptx],
               ptx_present=[s for s in cfg.get("ptx_forbid", []) if s in ptx])
    return res


def _worker(modules: list[str]) -> list[dict]:
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    results = []
    for mod in modules:
        for cfg in COMPILE_CONFIGS[mod]:
            for cap in TARGETS:
                results.append(_compile_one(cfg, cap, cuobjdump))
    return results


# -- the tests -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__, "--worker", *KERNEL_MODULES], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"compile worker failed:\n{proc.stderr[-4000:]}"
    return {(r["name"], r["cap"]): r for r in json.loads(proc.stdout.strip().splitlines()[-1])}


@pytest.mark.parametrize("cap", list(TARGETS), ids=lambda c: f"sm_{c}")
@pytest.mark.parametrize("module,name", _configs(), ids=lambda v: v.split(".")[-1] if "." in v else v)
def test_launch_config_compiles_without_spills(compiled, module, name, cap):
    r = compiled[(name, cap)]
    assert "error" not in r, f"{name} does not compile for sm_{cap}: {r['error']}"
    assert r["local"] == 0, f"{name} spills {r['local']} bytes to local memory on sm_{cap} ({r['regs']} registers)"
    shared = r["shared_static"] + r["shared_dynamic"]
    assert shared <= TARGETS[cap], f"{name} needs {shared} bytes of shared memory, sm_{cap} has {TARGETS[cap]}"
    assert not r["ptx_missing"], f"{name}: PTX for sm_{cap} lacks {r['ptx_missing']}"
    assert not r["ptx_present"], f"{name}: PTX for sm_{cap} contains {r['ptx_present']}"


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    print(json.dumps(_worker(sys.argv[2:])))
