"""What ``fastft export`` is asked for: GGUF types, output paths, the verification engine; each
refusal is an ``ExportError`` with exit code 2, raised before anything slow runs."""
from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

from ..errors import FastftError

# What the converter writes itself (--outtype), and the k-quants llama.cpp's quantizer makes from f16.
DIRECT = ("f16", "bf16", "q8_0")
K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
QUANTS = DIRECT + K_QUANTS
ENGINES = ("auto", "llama.cpp", "transformers")


class ExportError(FastftError, RuntimeError):
    """An export that cannot be made; nothing with the final name was written."""

    def __init__(self, msg: str, exit_code: int = 1):
        super().__init__(msg)
        self.exit_code = exit_code


def parse_quants(values: list[str]) -> list[str]:
    """``["f16,q8_0", "q4_k_m"]`` -> ``["f16", "q8_0", "q4_k_m"]`` (lower case, no repeats, f16 first:
    k-quants are made from it)."""
    out: list[str] = []
    for v in values:
        for q in v.split(","):
            q = q.strip().lower().replace("-", "_")
            if not q:
                continue
            if q not in QUANTS:
                raise ExportError(f"--gguf {q!r}: unknown type; choose from {', '.join(QUANTS)} "
                                  "(f16, bf16 and q8_0 need only the converter; k-quants need llama-cpp-python)", 2)
            if q not in out:
                out.append(q)
    if not out:
        raise ExportError("--gguf: give at least one type, e.g. --gguf q8_0", 2)
    return sorted(out, key=lambda q: (q != "f16", QUANTS.index(q)))


def output_paths(run_dir: Path, quants: list[str], out: str | None) -> dict[str, Path]:
    """Where each type goes: ``RUN_DIR/export/<run>-<quant>.gguf`` by default; ``--out`` a file (one
    type), a folder, or a name with ``{quant}``."""
    name = run_dir.resolve().name
    if out is None:
        return {q: run_dir / "export" / f"{name}-{q}.gguf" for q in quants}
    o = Path(out).expanduser()
    if "{quant}" in out:
        return {q: Path(str(o).replace("{quant}", q)) for q in quants}
    if o.is_dir() or out.endswith(("/", os.sep)):
        return {q: o / f"{name}-{q}.gguf" for q in quants}
    if len(quants) > 1:
        raise ExportError(f"--out {out}: {len(quants)} types need a folder (ending in /) or a name with "
                          "{quant}, e.g. --out model-{quant}.gguf", 2)
    if o.suffix.lower() != ".gguf":
        raise ExportError(f"--out {out}: name the file *.gguf (or give a folder ending in /)", 2)
    return {quants[0]: o}


def check_writable(paths: dict[str, Path], overwrite: bool) -> None:
    """Each output can be created (its folder made, a probe file written) and does not exist unless
    ``overwrite``."""
    for q, p in paths.items():
        if p.is_dir():
            raise ExportError(f"{p} is a folder; give a file name for --out", 2)
        if p.exists() and not overwrite:
            raise ExportError(f"{p} exists; pass --overwrite to replace it (or choose another --out)", 2)
        parent = p.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=parent)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise ExportError(f"cannot write the {q} export to {p}: {e.strerror or e} ({parent}); choose a writable "
                              "--out", 2) from None


def llama_cpp():
    """The ``llama_cpp`` module of llama-cpp-python, or None when it does not import."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


def need_llama_cpp(quants: list[str]) -> None:
    kq = [q for q in quants if q in K_QUANTS]
    if kq and llama_cpp() is None:
        raise ExportError(
            f"--gguf {','.join(kq)}: k-quants are made by llama.cpp's quantizer, which comes with llama-cpp-python "
            f"(not installed). Install the optional extra: pip install 'fastft[gguf]' (or `make gguf`; it builds "
            f"llama.cpp from source once: several minutes on 2 cores), or export {', '.join(DIRECT)} only, which "
            "need no extra.", 2)


def choose_engine(engine: str) -> tuple[bool, str]:
    """(verify in llama.cpp, why): llama.cpp when llama-cpp-python imports, unless ``--engine
    transformers``; ``why`` is recorded with a transformers verification."""
    if engine not in ENGINES:
        raise ExportError(f"--engine {engine!r}: choose auto, llama.cpp or transformers", 2)
    module = llama_cpp()
    if engine == "llama.cpp" and module is None:
        raise ExportError("--engine llama.cpp: llama-cpp-python is not installed (pip install 'fastft[gguf]')", 2)
    if engine == "transformers":
        return False, "--engine transformers"
    if module is not None:
        return True, "llama-cpp-python installed"
    if importlib.util.find_spec("llama_cpp") is None:
        return False, "llama-cpp-python not installed"
    return False, "llama-cpp-python installed but its import fails"
