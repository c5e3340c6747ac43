"""The version doctor: what is installed against the tested matrix (the Makefile's pins).

    fastft info            # each package: tested / newer / older / missing, and what is known to break
    fastft info --check    # the same; exits 1 when the environment is outside the matrix

The Makefile is the single source of the matrix: ``TORCH_CPU``, ``CORE_PINS``, ``HF_PINS`` (core +
trl 1.16: the plain environment), ``UNSLOTH_PINS`` (core + trl 1.15 + unsloth: the Unsloth one) and
``GGUF_PINS`` (optional: checked only where installed). The environment is matched to the Unsloth
entry when unsloth is installed, else to the plain one. Installed versions are read from package
metadata (nothing heavy is imported), so the check takes well under a second.

    from fastft import info
    report = info.check()
    report.in_matrix, [(p.name, p.mark) for p in report.packages], report.breakages
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .errors import FastftError

MAKEFILE = Path(__file__).resolve().parent.parent / "Makefile"
PYPROJECT = MAKEFILE.with_name("pyproject.toml")


class InfoError(FastftError):
    """The matrix cannot be read (no Makefile beside the package, or no pins in it)."""


def parse_pins(text: str) -> dict[str, dict[str, str]]:
    """``{VARIABLE: {package: version}}`` for every Makefile variable made of ``name==version``
    words (``$(OTHER)`` references expanded; continuation lines joined)."""
    text = re.sub(r"\\\n", " ", text)
    raw: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Z][A-Z0-9_]*)\s*:?=\s*(.*)$", line)
        if m:
            raw[m.group(1)] = m.group(2).split("#", 1)[0]
    out: dict[str, dict[str, str]] = {}

    def expand(name: str, seen: tuple = ()) -> dict[str, str] | None:
        if name in seen or name not in raw:
            return None
        pins: dict[str, str] = {}
        for word in raw[name].split():
            ref = re.fullmatch(r"\$\(([A-Z0-9_]+)\)", word)
            if ref:
                sub = expand(ref.group(1), seen + (name,))
                if sub is None:
                    return None
                pins.update(sub)
            elif "==" in word:
                pkg, ver = word.split("==", 1)
                pins[canonical(pkg)] = ver
            else:
                return None  # not a list of pins (a shell command, a path...)
        return pins

    for name in raw:
        pins = expand(name)
        if pins:
            out[name] = pins
    return out


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


STACK = ("fastft", "torch", "triton", "transformers", "peft", "trl", "datasets", "bitsandbytes", "accelerate",
         "unsloth", "unsloth_zoo", "xformers", "gguf", "llama_cpp_python")


def versions(names=STACK, python: bool = True) -> dict[str, str | None]:
    """Installed versions of ``names`` (None: not installed), read from package metadata, for
    fastft.json, converted-model records and bench results; ``python`` adds the interpreter's."""
    out = {"python": sys.version.split()[0]} if python else {}
    return {**out, **{n: installed(n) for n in names}}


def source_revision() -> dict:
    """fastft's git commit (and whether the work tree had changes), or {} outside a checkout."""
    import subprocess

    here = MAKEFILE.parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return {}
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"git_commit": sha, "git_dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {}


def _key(v: str) -> tuple:
    from packaging.version import Version

    return Version(v.split("+")[0])


@dataclass
class Package:
    name: str
    pinned: str
    installed: str | None
    optional: bool = False

    @property
    def mark(self) -> str:
        if self.installed is None:
            return "missing"
        a, b = _key(self.installed), _key(self.pinned)
        return "tested" if a == b else ("newer" if a > b else "older")


@dataclass
class Report:
    entry: str  # which matrix entry the environment is matched to
    packages: list[Package]
    breakages: list[str] = field(default_factory=list)

    @property
    def outside(self) -> list[Package]:
        return [p for p in self.packages if p.mark != "tested" and not (p.optional and p.mark == "missing")]

    @property
    def in_matrix(self) -> bool:
        return not self.outside and not self.breakages


def known_breakages(get=installed, cuda: bool | None = None) -> list[str]:
    """What is known to break with the installed versions (``get(name)`` -> version or None)."""
    out = []
    torch_v, trl_v, unsloth_v = get("torch"), get("trl"), get("unsloth")
    if cuda is None:
        cuda = bool(torch_v) and "+cpu" not in torch_v and _has_cuda()
    if trl_v and trl_v.startswith("1.15.") and not cuda and not unsloth_v:
        out.append(f"trl {trl_v}: SFTTrainer's fused LM-head loss has no CPU path, so training fails on a CPU "
                   "(unsloth patches it; without unsloth use trl 1.16: pip install trl==1.16.0)")
    tv = get("torchvision")
    if unsloth_v and tv and torch_v and "+cpu" in torch_v and "+cpu" not in tv:
        out.append(f"torchvision {tv} (PyPI's build) beside torch {torch_v} (CPU build) breaks `import unsloth`: "
                   "pip uninstall torchvision (fastft does not need it)")
    tf = get("transformers")
    if unsloth_v and tf and unsloth_v.startswith("2026.10.") and _key(tf) > _key("5.17.0"):
        out.append(f"unsloth {unsloth_v} supports transformers up to 5.17; transformers {tf} is newer: "
                   "pip install transformers==5.17.0")
    if unsloth_v and trl_v and unsloth_v.startswith("2026.10.") and _key(trl_v) >= _key("1.16.0"):
        out.append(f"unsloth {unsloth_v} caps trl at 1.15; trl {trl_v} is newer: pip install trl==1.15.0")
    return out


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - a broken torch is reported by its version line, not here
        return False


def check(makefile: str | Path | None = None, get=installed, cuda: bool | None = None) -> Report:
    path = Path(makefile) if makefile else MAKEFILE
    if not path.is_file():
        raise InfoError(f"{path}: the Makefile with the tested pins is not there (fastft info reads the matrix from "
                        "a source checkout); pass --makefile PATH")
    pins = parse_pins(path.read_text(encoding="utf-8"))
    missing = [v for v in ("CORE_PINS", "HF_PINS", "UNSLOTH_PINS") if v not in pins]
    if missing:
        raise InfoError(f"{path}: no {', '.join(missing)} pins found; the matrix is defined by those variables")
    unsloth = get("unsloth") is not None
    entry = "UNSLOTH_PINS" if unsloth else "HF_PINS"
    want = dict(pins[entry])
    torch_pin = pins.get("TORCH_CPU", {}).get("torch")
    if torch_pin:
        want = {"torch": torch_pin, **want}
    required = core_dependencies(path.with_name("pyproject.toml")) | {"torch", "unsloth", "unsloth-zoo", "trl"}
    # pinned packages that fastft itself does not need (test / bench extras: matplotlib, tensorboard)
    # are checked when installed and may be missing
    packages = [Package(n, v, get(n), optional=required is not None and n not in required) for n, v in want.items()]
    packages += [Package(n, v, get(n), optional=True) for n, v in pins.get("GGUF_PINS", {}).items() if n not in want]
    return Report(entry, packages, known_breakages(get, cuda))


def core_dependencies(pyproject: Path) -> set[str]:
    """Names in pyproject.toml's [project].dependencies (empty when there is no pyproject.toml)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        return set()
    if not pyproject.is_file():
        return set()
    deps = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {}).get("dependencies", [])
    return {canonical(re.split(r"[\s;<>=!~\[]", d, maxsplit=1)[0]) for d in deps}


def format_report(r: Report) -> str:
    label = {"HF_PINS": "core + trl (the plain environment)",
             "UNSLOTH_PINS": "core + unsloth (the Unsloth environment)"}.get(r.entry, r.entry)
    lines = [f"tested matrix: Makefile {r.entry}, {label}"]
    width = max(len(p.name) for p in r.packages)
    for p in r.packages:
        mark = p.mark + (" (optional)" if p.optional and p.mark == "missing" else "")
        lines.append(f"  {p.name:<{width}}  {p.installed or '-':<16} tested {p.pinned:<12} {mark}")
    for b in r.breakages:
        lines.append(f"  known to break: {b}")
    if r.in_matrix:
        lines.append("environment: inside the tested matrix")
    else:
        out = ", ".join(f"{p.name} {p.mark}" for p in r.outside)
        lines.append("environment: OUTSIDE the tested matrix" + (f" ({out})" if out else "")
                     + (f"; {len(r.breakages)} known breakage(s)" if r.breakages else "")
                     + ". `make setup` installs the tested versions.")
    return "\n".join(lines)
