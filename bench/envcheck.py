"""What the GPU machine has, without importing it, and whether the carried wheelhouse imports there:
the `env` and `imports` steps of bench/gpu.sh.

    python -m bench.envcheck versions                   # metadata and find_spec only: imports nothing heavy
    python -m bench.envcheck imports .whl --budget 30   # Requires-Dist of every carried wheel, then each import
    python -m bench.envcheck imports .whl --dry-run     # on the CPU machine: the same against this venv, and a
                                                        # prediction against the GPU image (bench/gpu-image.txt)

`versions` reads package metadata (fastft.info's matrix report) and asks `importlib.util.find_spec`
where each module would load from, without running it: `fastft info` imports unsloth through
backends.choose on a CUDA machine (15-25 s there), far too slow for a step that says what is there.

`imports`, in two parts:
  1. every wheel in the folder: its Requires-Dist (markers evaluated for the machine: the running
     one, or in a dry run the GPU machine's Python 3.12 on x86-64 Linux; extras left out) against
     what is carried (the folder's wheels) and what is installed. A requirement neither carried nor
     installed is listed with the wheels that declare it, an installed version outside a specifier
     too. Listed, not fatal: Unsloth declares packages its training path never imports (xformers,
     diffusers, its CLI's structlog), so only an import can say whether one is needed.
  2. the verdict: each carried top-level module imported in its own subprocess, `--jobs` at a time,
     all within `--budget` seconds. The first of SUITE_MODULES (or --require) that fails ends the
     check at once (exit 1), naming it and, for a ModuleNotFoundError, the module missing and whether
     a carried wheel declares it. Other carried modules that fail are listed (exit 0).
In a dry run part 2 imports what this venv has and lists the rest as not installed here.
"""
from __future__ import annotations

import argparse
import email.parser
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from fastft import info

GPU_IMAGE = Path(__file__).with_name("gpu-image.txt")
# What bench/gpu.sh's steps import that the GPU image lacks (the wheelhouse carries them), lightest
# first: unsloth imports all the others, so a broken one is named by its own import before unsloth's.
SUITE_MODULES = ("bitsandbytes", "datasets", "trl", "unsloth_zoo", "unsloth")
# (module, distribution) reported by `versions`
REPORTED = (("torch", "torch"), ("triton", "triton"), ("transformers", "transformers"), ("peft", "peft"),
            ("accelerate", "accelerate"), ("bitsandbytes", "bitsandbytes"), ("trl", "trl"),
            ("datasets", "datasets"), ("unsloth", "unsloth"), ("unsloth_zoo", "unsloth_zoo"),
            ("xformers", "xformers"), ("xdist", "pytest-xdist"), ("pytest_timeout", "pytest-timeout"))
# The GPU machine's interpreter and platform (/opt/torch/.venv: Python 3.12.3, x86-64 Linux), which
# ../shared/gpu/wheelhouse.sh builds the wheelhouse for
GPU_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_version": "3.12.3",
               "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
               "os_name": "posix", "implementation_name": "cpython", "platform_python_implementation": "CPython",
               "platform_release": "", "platform_version": ""}
MISSING_MODULE = re.compile(r"No module named '([^']+)'")


# -- the wheelhouse ---------------------------------------------------------------------------------

@dataclass
class Wheel:
    path: Path
    name: str
    version: str
    requires: list[str]
    modules: list[str]  # top-level importable modules it installs


def read_wheel(path: Path) -> Wheel:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        meta = next(n for n in names if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(z.read(meta).decode("utf-8", "replace"), headersonly=True)
    return Wheel(Path(path), msg["Name"], msg["Version"], msg.get_all("Requires-Dist") or [], top_level_modules(names))


def top_level_modules(names: list[str]) -> list[str]:
    """Public top-level modules among a wheel's members: packages (with an __init__.py), .py modules
    and extension modules; private ones (a leading underscore) are imported by their public package."""
    members = set(names)
    out = set()
    for n in names:
        head, sep, _ = n.partition("/")
        if head.startswith("_") or head.endswith((".dist-info", ".data")):
            continue
        if sep:
            if f"{head}/__init__.py" in members:
                out.add(head)
        elif head.endswith(".py"):
            out.add(head[:-3])
        elif head.endswith((".so", ".pyd")):
            out.add(head.split(".", 1)[0])
    return sorted(out)


def carried_wheels(folder: Path) -> list[Wheel]:
    return [read_wheel(p) for p in sorted(Path(folder).glob("*.whl"))]


@dataclass
class Unmet:
    requirement: str  # name and specifier, as declared
    found: str | None  # the version there (outside the specifier), or None: missing
    required_by: list[str] = field(default_factory=list)


def unmet_requirements(wheels: list[Wheel], installed, markers: dict) -> list[Unmet]:
    """Requires-Dist entries (extras left out, markers evaluated with ``markers``) that neither a
    carried wheel nor ``installed(name) -> version | "" (there, version unknown) | None`` meets."""
    from packaging.requirements import InvalidRequirement, Requirement

    carried = {info.canonical(w.name): w.version for w in wheels}
    out: dict[tuple, Unmet] = {}
    for w in wheels:
        for line in w.requires:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                key = (line, None)
                out.setdefault(key, Unmet(f"{line} (unparsable)", None)).required_by.append(w.name)
                continue
            if req.marker is not None and not req.marker.evaluate({**markers, "extra": ""}):
                continue
            name = info.canonical(req.name)
            have = carried.get(name)
            if have is None:
                have = installed(name)
            if have is not None and (have == "" or not req.specifier or req.specifier.contains(have, prereleases=True)):
                continue
            key = (name + str(req.specifier), have)
            out.setdefault(key, Unmet(req.name + str(req.specifier), have)).required_by.append(w.name)
    return sorted(out.values(), key=lambda u: (u.found is not None, u.requirement.lower()))


def gpu_image() -> dict[str, str]:
    """{canonical name: version, or "" where unknown} of the GPU image (bench/gpu-image.txt)."""
    out = {}
    for line in GPU_IMAGE.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[info.canonical(name)] = version
    return out


def print_unmet(unmet: list[Unmet], where: str) -> None:
    missing = [u for u in unmet if u.found is None]
    other = [u for u in unmet if u.found is not None]
    if not unmet:
        print(f"  every requirement is carried or installed ({where})")
    if missing:
        print(f"  neither carried nor installed ({where}): a lead, not a verdict (the imports decide)")
        for u in missing:
            print(f"    {u.requirement:<40} declared by {', '.join(u.required_by)}")
    if other:
        print(f"  installed outside the declared range ({where}; pip --no-deps did not check):")
        for u in other:
            print(f"    {u.requirement:<40} {u.found} there; declared by {', '.join(u.required_by)}")


# -- the imports ------------------------------------------------------------------------------------

@dataclass
class Imported:
    module: str
    ok: bool
    seconds: float
    detail: str = ""  # the error's last line, or why it did not run


def import_each(modules: list[str], python: str, budget: float, jobs: int, fatal: set[str],
                env: dict | None = None, say=print) -> tuple[list[Imported], Imported | None]:
    """Import every module in its own ``python`` subprocess, ``jobs`` at a time, all within ``budget``
    seconds. Returns (results, the first failure among ``fatal``, which stopped the others)."""
    deadline = time.monotonic() + budget
    queue = list(modules)
    running: dict[str, tuple[subprocess.Popen, float, object]] = {}
    done: list[Imported] = []

    def stop_all(reason: str) -> None:
        for m, (p, t0, log) in running.items():
            p.kill()
            p.wait()
            log.close()
            done.append(Imported(m, False, time.monotonic() - t0, reason))
        running.clear()

    while queue or running:
        while queue and len(running) < jobs:
            m = queue.pop(0)
            log = tempfile.TemporaryFile(mode="w+")
            p = subprocess.Popen([python, "-c", f"import {m}"], stdout=log, stderr=subprocess.STDOUT, env=env)
            running[m] = (p, time.monotonic(), log)
        time.sleep(0.05)
        for m, (p, t0, log) in list(running.items()):
            rc = p.poll()
            if rc is None and time.monotonic() < deadline:
                continue
            if rc is None:
                p.kill()
                p.wait()
                result = Imported(m, False, time.monotonic() - t0, f"did not import within the {budget:.0f} s budget")
            else:
                log.seek(0)
                lines = [ln for ln in log.read().splitlines() if ln.strip()]
                result = Imported(m, rc == 0, time.monotonic() - t0, "" if rc == 0 else
                                  (lines[-1] if lines else f"exit code {rc}, no output"))
            log.close()
            del running[m]
            done.append(result)
            say(f"  import {m}: {'ok' if result.ok else 'FAILED'} ({result.seconds:.1f} s)"
                + ("" if result.ok else f": {result.detail}"))
            if not result.ok and m in fatal:
                stop_all(f"stopped: {m} failed first")
                return done, result
    return done, None


def explain_missing(failure: Imported, unmet: list[Unmet]) -> str:
    m = MISSING_MODULE.search(failure.detail)
    if not m:
        return f"{failure.module} does not import: {failure.detail}"
    missing = m.group(1).split(".")[0]
    declared = [u for u in unmet if u.found is None and info.canonical(re.split(r"[<>=!~ ;\[]", u.requirement)[0])
                == info.canonical(missing)]
    why = (f"declared by {', '.join(declared[0].required_by)} and neither carried nor installed" if declared
           else "no carried wheel declares it")
    return (f"{failure.module} does not import: module {missing!r} is missing ({why}); add its wheel: "
            f"bash ../shared/gpu/wheelhouse.sh .whl {missing.replace('_', '-')}")


# -- commands ---------------------------------------------------------------------------------------

def cmd_versions(args) -> int:
    import platform

    print(f"python {sys.version.split()[0]} ({sys.executable}), {platform.platform()}")
    cuda = shutil.which("nvidia-smi") is not None
    try:
        print(info.format_report(info.check(cuda=cuda)))
    except info.InfoError as e:
        print(f"tested matrix: not read ({e})")
    print("modules (importlib.util.find_spec: where each would load from; none is imported here)")
    for module, dist in REPORTED:
        spec = importlib.util.find_spec(module)
        where = (spec.origin or (list(spec.submodule_search_locations or []) or ["?"])[0]) if spec else "not importable"
        print(f"  {module:<15} {info.installed(dist) or '-':<16} {where}")
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    print(f"backend auto would pick: {'unsloth' if cuda and has_unsloth else 'hf'} "
          f"({'nvidia-smi present' if cuda else 'no nvidia-smi'}, unsloth "
          f"{'importable' if has_unsloth else 'not installed'}; decided without importing it)")
    return 0


def cmd_imports(args) -> int:
    t0 = time.monotonic()
    folder = Path(args.wheelhouse)
    wheels = carried_wheels(folder) if folder.is_dir() else []
    if wheels:
        print(f"carried: {len(wheels)} wheels in {folder}: " + ", ".join(f"{w.name} {w.version}" for w in wheels))
    else:
        print(f"carried: no wheels in {folder} (build them: bash ../shared/gpu/wheelhouse.sh {folder})")
    if args.dry_run:
        here = print_check(wheels, info.installed, GPU_MARKERS, "this venv")
        image = gpu_image()
        print_check(wheels, lambda n: image.get(n), GPU_MARKERS, "the GPU image, predicted from bench/gpu-image.txt")
    else:
        from packaging.markers import default_environment

        here = print_check(wheels, info.installed, default_environment(), "this machine")
    carried_modules = [m for w in wheels for m in w.modules]
    required = [m.strip() for m in args.require.split(",") if m.strip()] if args.require else list(SUITE_MODULES)
    fatal = set(required)
    if not wheels and not args.dry_run:
        print(f"bench.envcheck: nothing carried: {', '.join(required)} cannot come from the wheelhouse",
              file=sys.stderr)
    modules = required + sorted(set(carried_modules) - fatal)
    if args.dry_run:
        absent = [m for m in modules if importlib.util.find_spec(m) is None]
        if absent:
            print(f"  not installed in this venv, not imported here (the GPU call imports them): {', '.join(absent)}")
        modules = [m for m in modules if m not in absent]
    left = args.budget - (time.monotonic() - t0)
    print(f"importing {len(modules)} modules, {args.jobs} at a time, within {left:.0f} s: {', '.join(modules)}")
    results, failure = import_each(modules, args.python or sys.executable, left, args.jobs, fatal)
    if failure is not None:
        print(f"bench.envcheck: {explain_missing(failure, here)}", file=sys.stderr)
        return 1
    bad = [r for r in results if not r.ok]
    slow = max(results, key=lambda r: r.seconds, default=None)
    print(f"imports: {len(results) - len(bad)} of {len(results)} import"
          + (f" (slowest: {slow.module} {slow.seconds:.1f} s)" if slow else "")
          + ("; carried but not importing (nothing in the suite imports them directly): "
             + "; ".join(f"{r.module}: {r.detail}" for r in bad) if bad else ""))
    return 0


def print_check(wheels: list[Wheel], installed, markers: dict, where: str) -> list[Unmet]:
    unmet = unmet_requirements(wheels, installed, markers)
    if wheels:
        print_unmet(unmet, where)
    return unmet


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.envcheck", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("versions", help="versions and where each module would load from; imports nothing heavy")
    im = sub.add_parser("imports", help="Requires-Dist of the carried wheels, then each carried module imported")
    im.add_argument("wheelhouse", nargs="?", default=".whl", help="the carried wheel folder (default .whl)")
    im.add_argument("--budget", type=float, default=60.0, help="seconds for the whole check (default 60)")
    im.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="imports at a time")
    im.add_argument("--python", help="interpreter to import with (default this one)")
    im.add_argument("--require", help="comma-separated modules whose failure fails the check, in this order "
                                      f"(default: {','.join(SUITE_MODULES)}, what bench/gpu.sh's steps import)")
    im.add_argument("--dry-run", action="store_true", help="CPU machine: check against this venv and the GPU image list")
    args = p.parse_args(argv)
    return cmd_versions(args) if args.cmd == "versions" else cmd_imports(args)


if __name__ == "__main__":
    sys.exit(main())
