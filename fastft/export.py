"""GGUF export for llama.cpp (and the tools built on it: Ollama, LM Studio), verified every time.

    fastft export outputs/run --gguf q8_0                  # -> outputs/run/export/run-q8_0.gguf
    fastft export outputs/run --gguf f16 --gguf q4_k_m     # several at once (or --gguf f16,q4_k_m)
    fastft export outputs/run --gguf q8_0 --out model.gguf # one type: a file; several: a folder or {quant}

    from fastft import export
    report = export.export("outputs/run", ["f16", "q8_0"])
    report["exports"][0]["verification"]["passed"]

What happens, for one run directory:

1. **Merge** (``fastft.merge``): the adapter is added into the original 16-bit base in fp32 and
   saved into a temporary folder (fp32 for models up to ``FP32_MERGE_MAX_PARAMS``, bf16 above, to
   keep the temporary copy at 2 bytes per parameter) with the run's tokenizer and chat template.
2. **Convert** with llama.cpp's own converter (``convert_hf_to_gguf.py`` with its ``gguf-py``),
   not a rewrite of it: the ``llama-cpp-python`` sdist on PyPI vendors llama.cpp, so the pinned
   sdist (``CONVERTER_VERSION``) is downloaded once (``pip download --no-binary :all:``) and only
   the converter is unpacked into ``$FASTFT_CACHE/llama.cpp-converter/`` (file-locked, sha256 of the
   sdist recorded). ``$FASTFT_LLAMA_CPP_DIR`` points at a llama.cpp checkout to use its converter
   instead. It runs in a subprocess; its output is kept in ``RUN_DIR/export/logs/``. f16, bf16
   and q8_0 come straight out of it. k-quants (q4_k_m, q5_k_m, q6_k, ...) are made from the f16
   file by llama.cpp's quantizer, ``llama_model_quantize`` from the ``llama-cpp-python`` binding (the
   optional ``gguf`` extra: it builds llama.cpp from source, about 9 minutes once on 2 cores).
3. **Check the written file** with the gguf reader before it gets its name: the architecture is
   set, the chat template is the run's, the end-of-sequence token is the model's (id and text),
   and each stop token of the model's generation config is one llama.cpp ends generation on. The
   file is written under a ``.partial`` name and renamed only after these checks pass, so a file
   with the final name is always complete.
4. **Verify** that the file answers like the merged model, on a fixed prompt set: the run's
   held-out prompts (at most ``--max-prompts``) and ``GENERAL_PROMPTS``; the merged transformers
   model answers greedily as the reference (in its merged dtype, on the GPU when there is one).
   - With ``llama-cpp-python`` installed, llama.cpp loads the file and answers the same prompt
     tokens greedily. Reported: the share of identical answers, whether it stops at EOS wherever
     the merged model does, whether llama.cpp's tokenizer gives the same ids for every prompt, and
     the recipe's task metric (``eval.metric``) on the held-out prompts for both. Gates (``GATES``):
     f16 needs identical answers on >= 90% of prompts and every stop kept; bf16 and q8_0 keep the
     task metric within 5 points; k-quants are reported, not gated (a small model loses much in
     4 bits); identical tokenization is required of every type.
   - Without it, transformers' GGUF loader reads the file back (dequantized to the reference's
     dtype: for an 8B model that is a second 16 GB copy in memory) and its logits
     on the prompts followed by the merged model's answers are compared with the merged model's:
     max difference relative to the logit scale, and greedy (argmax) agreement, against
     ``LOGIT_TOLERANCE``; k-quants are not gated here either.
   The result is printed as a table, written to ``RUN_DIR/export.json`` (every prompt and answer),
   and recorded in ``RUN_DIR/fastft.json`` under ``exports`` (file, type, size, sha256, converter
   version, verification summary). A failed verification keeps the file (it is a correct GGUF of
   the merged model; it does not behave like it) and exits ``VERIFY_EXIT_CODE``.

Errors name the cause and the fix and leave no partial file: a run without an adapter, an unknown
type, an output path that cannot be written, a k-quant without llama-cpp-python, a model the
converter does not support (architecture, or a BPE pre-tokenizer it does not recognize).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from .files import file_sha256 as _sha256
from .errors import EXIT_GATE, FastftError

CONVERTER_PACKAGE = "llama-cpp-python"
CONVERTER_VERSION = "0.3.36"
CONVERTER_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CONVERTER_FORMAT = 1  # bump when the unpacked layout changes
LLAMA_CPP_DIR_ENV = "FASTFT_LLAMA_CPP_DIR"
CONVERTER_MARKER = "fastft-converter.json"
# What the converter writes itself (--outtype), and the k-quants llama.cpp's quantizer makes from f16.
DIRECT = ("f16", "bf16", "q8_0")
K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
QUANTS = DIRECT + K_QUANTS
FP32_MERGE_MAX_PARAMS = 2_000_000_000
VERIFY_EXIT_CODE = EXIT_GATE  # 3: the export was written but does not answer like the merged model
EXPORT_FILE = "export.json"
SCHEMA_VERSION = 1
# Tokens llama.cpp ends generation on when they are in the vocabulary, besides the eos/eot/eom
# ids in the metadata (llama.cpp's src/llama-vocab.cpp, end-of-generation token detection).
LLAMA_CPP_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
                       "<EOT>", "_<EOT>", "[EOT]", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>",
                       "<|eom_id|>")
GENERAL_PROMPTS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "What is 12 + 7?",
    "Translate 'good morning' into Spanish.",
    "Write one sentence about the sea.",
    "Which planet is closest to the sun?",
    "List the days of the week.",
    "What do bees make?",
]
# Gates on the llama.cpp comparison, by type: (same-answer share, stops kept, task-metric points).
GATES = {"f16": {"same_answer": 0.90, "stops_kept": 1.0}, "bf16": {"metric_points": 5.0},
         "q8_0": {"metric_points": 5.0}}
# Without llama.cpp: transformers-loaded GGUF vs merged model, teacher-forced on the merged answers:
# (max |diff| / max(1, max |merged logit|), argmax agreement). Measured on the SmolLM2 demo, 38
# prompts (bench/results/export-smollm2-demo-transformers-*.json): f16 0.0012 / 100%, bf16 0.013 /
# 99.8%, q8_0 0.028 / 99.6% (q4_k_m 0.16 / 97.6%, not gated); the limits leave about 3x.
LOGIT_TOLERANCE = {"f16": (5e-3, 0.99), "bf16": (4e-2, 0.97), "q8_0": (8e-2, 0.97)}


class ExportError(FastftError, RuntimeError):
    """An export that cannot be made; nothing with the final name was written."""

    def __init__(self, msg: str, exit_code: int = 1):
        super().__init__(msg)
        self.exit_code = exit_code


def _say(msg: str) -> None:
    print(f"fastft: {msg}", file=sys.stderr, flush=True)


# --- arguments --------------------------------------------------------------------------------

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


def _check_writable(paths: dict[str, Path], overwrite: bool) -> None:
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


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


def _need_llama_cpp(quants: list[str]) -> None:
    kq = [q for q in quants if q in K_QUANTS]
    if kq and _llama_cpp() is None:
        raise ExportError(
            f"--gguf {','.join(kq)}: k-quants are made by llama.cpp's quantizer, which comes with llama-cpp-python "
            f"(not installed). Install the optional extra: pip install 'fastft[gguf]' (or `make gguf`; it builds "
            f"llama.cpp from source, about 9 minutes once on 2 cores), or export {', '.join(DIRECT)} only, which "
            "need no extra.", 2)


# --- the converter ------------------------------------------------------------------------------

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

    from .files import cache_dir

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
    from .downloads import download_dir, pip_download

    return pip_download(f"{CONVERTER_PACKAGE}=={CONVERTER_VERSION}", f"llama_cpp_python-{CONVERTER_VERSION}.tar.gz",
                        CONVERTER_SDIST_SHA256, what="llama.cpp's converter, in the sdist: 77 MB, once",
                        error=ExportError, pip_args=("--no-binary", ":all:"),
                        fix=f"put the sdist in {download_dir()}, or set {LLAMA_CPP_DIR_ENV} to a llama.cpp checkout.")


def _unpack_converter(dst: Path) -> None:
    from .files import install_dir

    sdist = _fetch_sdist()
    prefix = f"llama_cpp_python-{CONVERTER_VERSION}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "LICENSE", "conversion/", "gguf-py/gguf/")
    tmp = Path(tempfile.mkdtemp(prefix=dst.name + ".", dir=dst.parent))
    try:
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
        install_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _converter_error(log_text: str, rc: int, log_path: Path, conv: dict, model_dir: Path) -> ExportError:
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
        raise _converter_error(log_path.read_text(encoding="utf-8", errors="replace"), proc.returncode, log_path,
                               conv, model_dir)
    return seconds


QUANTIZE_SCRIPT = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3].upper())
params.nthread = int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


def quantize(src: Path, dst: Path, quant: str, log_path: Path) -> float:
    """llama.cpp's quantizer (through llama-cpp-python, in a subprocess): ``src`` (f16 GGUF) -> ``dst``."""
    threads = str(max(1, os.cpu_count() or 1))
    cmd = [sys.executable, "-c", QUANTIZE_SCRIPT, str(src), str(dst), quant, threads]
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


# --- checking the written file --------------------------------------------------------------------

def read_metadata(path: Path) -> dict:
    """The fields fastft checks, read back from a GGUF with the gguf package's reader."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    f = r.fields

    def get(key):
        return f[key].contents() if key in f else None

    tokens = f["tokenizer.ggml.tokens"].contents() if "tokenizer.ggml.tokens" in f else []
    return {"architecture": get("general.architecture"), "name": get("general.name"),
            "file_type": get("general.file_type"), "tensors": len(r.tensors),
            "tokenizer_model": get("tokenizer.ggml.model"), "tokenizer_pre": get("tokenizer.ggml.pre"),
            "chat_template": get("tokenizer.chat_template"), "eos_token_id": get("tokenizer.ggml.eos_token_id"),
            "eot_token_id": get("tokenizer.ggml.eot_token_id"), "eom_token_id": get("tokenizer.ggml.eom_token_id"),
            "bos_token_id": get("tokenizer.ggml.bos_token_id"), "tokens": tokens}


def check_metadata(meta: dict, tokenizer, stop_ids: list[int]) -> list[str]:
    """Problems with a GGUF's metadata against the model's tokenizer (empty: good)."""
    problems = []
    if not meta["architecture"]:
        problems.append("no general.architecture")
    template = getattr(tokenizer, "chat_template", None)
    if template and meta["chat_template"] != template:
        problems.append("tokenizer.chat_template is " + ("missing" if meta["chat_template"] is None else
                                                         "not the run's chat template"))
    eos_id = tokenizer.eos_token_id
    tokens = meta["tokens"]
    if eos_id is not None:
        if meta["eos_token_id"] != eos_id:
            problems.append(f"tokenizer.ggml.eos_token_id is {meta['eos_token_id']}, the model's eos is {eos_id} "
                            f"({tokenizer.eos_token!r})")
        elif eos_id >= len(tokens) or tokens[eos_id] != tokenizer.eos_token:
            got = tokens[eos_id] if eos_id < len(tokens) else "out of range"
            problems.append(f"token {eos_id} is {got!r} in the GGUF vocabulary, {tokenizer.eos_token!r} in the model's")
    stops_in_file = {meta[k] for k in ("eos_token_id", "eot_token_id", "eom_token_id") if meta[k] is not None}
    for i in stop_ids:
        text = tokens[i] if i < len(tokens) else None
        if i not in stops_in_file and text not in LLAMA_CPP_EOG_TEXTS:
            problems.append(f"the model stops at token {i} ({text!r}) but llama.cpp would not end generation on it")
    return problems


def stop_token_ids(model_dir: Path, tokenizer) -> list[int]:
    """Token ids the model ends generation on: its generation config's eos ids and the tokenizer's eos."""
    ids = []
    gc = model_dir / "generation_config.json"
    if gc.is_file():
        v = json.loads(gc.read_text()).get("eos_token_id")
        ids += v if isinstance(v, list) else ([] if v is None else [v])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(int(i) for i in ids))


# --- verification -----------------------------------------------------------------------------

def prompt_set(recipe, tokenizer, max_prompts: int, log=print) -> list[dict]:
    """``[{"messages", "reference", "slice", "kind"}]``: held-out prompts of the run (at most
    ``max_prompts``, in the split's order), then GENERAL_PROMPTS (reference None)."""
    from . import data

    rows: list[dict] = []
    try:
        bundle = data.build(recipe, tokenizer, log=lambda m: None)
        slices = bundle.eval_slices or [None] * len(bundle.eval_pairs)
        for (messages, ref), sl in list(zip(bundle.eval_pairs, slices))[:max_prompts]:
            rows.append({"messages": messages, "reference": ref, "slice": sl, "kind": "held-out"})
    except data.DataError as e:
        log(f"fastft: export: the run's held-out prompts are unavailable ({e}); verifying on general prompts only")
    rows += [{"messages": [{"role": "user", "content": p}], "reference": None, "slice": None, "kind": "general"}
             for p in GENERAL_PROMPTS]
    return rows


def render(tokenizer, messages: list[dict]) -> tuple[str, list[int]]:
    """The prompt text (chat template with the generation prompt) and its token ids."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n".join(m["content"] for m in messages) + "\n"
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


def reference_answers(model, tokenizer, prompts: list[list[int]], stop_ids: list[int], max_new_tokens: int,
                      batch_size: int = 16) -> list[dict]:
    """Greedy answers of the merged model: ``{"ids", "text", "stopped"}`` per prompt (ids end at the
    first stop token, which is kept)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        width = max(len(p) for p in chunk)
        device = next(model.parameters()).device
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=stop_ids)
        for row in gen[:, width:].tolist():
            stop = next((j for j, t in enumerate(row) if t in stop_ids), None)
            kept = row if stop is None else row[:stop + 1]
            text = tokenizer.decode(kept if stop is None else kept[:-1], skip_special_tokens=True)
            out.append({"ids": kept, "text": text, "stopped": stop is not None})
    return out


def _same(a: str, b: str) -> bool:
    return a.strip() == b.strip()


def _task_metric(answers: list[str], references: list[str | None], cfg) -> float | None:
    """The recipe's eval.metric over the prompts that have a reference (None: there are none)."""
    from .evaluate import task_scores

    pairs = [(a, ref) for a, ref in zip(answers, references) if ref is not None]
    if not pairs:
        return None
    return task_scores([a for a, _ in pairs], [ref for _, ref in pairs], None, cfg.metric, cfg.json_fields)[cfg.metric]


def verify_llama_cpp(path: Path, quant: str, rows: list[dict], prompts: list[list[int]], texts: list[str],
                     merged: list[dict], max_new_tokens: int, cfg) -> dict:
    """llama.cpp (llama-cpp-python) loads the file and answers each prompt greedily."""
    llama_cpp = _llama_cpp()
    n_ctx = max(len(p) for p in prompts) + max_new_tokens + 16
    llm = llama_cpp.Llama(str(path), n_ctx=max(256, n_ctx), n_threads=max(1, os.cpu_count() or 1), seed=0,
                          verbose=False)
    per, gen_tokens, gen_seconds = [], 0, 0.0
    try:
        for row, ids, text, ref in zip(rows, prompts, texts, merged):
            ll_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            t0 = time.perf_counter()
            res = llm.create_completion(ids, max_tokens=max_new_tokens, temperature=0.0, repeat_penalty=1.0)
            gen_seconds += time.perf_counter() - t0
            choice = res["choices"][0]
            gen_tokens += res["usage"]["completion_tokens"]
            per.append({"kind": row["kind"], "slice": row["slice"], "prompt": row["messages"][-1]["content"],
                        "reference": row["reference"], "merged": ref["text"], "merged_stopped": ref["stopped"],
                        "gguf": choice["text"], "gguf_stopped": choice["finish_reason"] == "stop",
                        "same_answer": _same(choice["text"], ref["text"]), "same_tokens": ll_ids == ids})
    finally:
        llm.close()
    v = _answer_summary(per, cfg)
    v.update(engine=f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
             tokens_per_s=round(gen_tokens / gen_seconds, 1) if gen_seconds else None)
    gates = GATES.get(quant, {})
    checks = [_check("tokenization identical", v["same_tokens"], "= 1", v["same_tokens"] == 1.0)]
    if "same_answer" in gates:
        checks.append(_check("same greedy answer", v["same_answer"], f">= {gates['same_answer']:g}",
                             v["same_answer"] >= gates["same_answer"]))
    if "stops_kept" in gates and v["stops_kept"] is not None:
        checks.append(_check("stops at EOS where merged does", v["stops_kept"], "= 1", v["stops_kept"] >= 1.0))
    if "metric_points" in gates and v["metric_merged"] is not None:
        pts = 100 * abs(v["metric_gguf"] - v["metric_merged"])
        checks.append(_check(f"{cfg.metric} vs merged (points)", round(pts, 2), f"<= {gates['metric_points']:g}",
                             pts <= gates["metric_points"]))
    v["checks"], v["per_prompt"] = checks, per
    v["passed"] = all(c["passed"] for c in checks)
    v["gated"] = bool(gates)
    return v


def _answer_summary(per: list[dict], cfg) -> dict:
    n = len(per)
    stops = [p for p in per if p["merged_stopped"]]
    held = [p for p in per if p["reference"] is not None]
    refs = [p["reference"] for p in per]

    def metric(key):
        return _task_metric([p[key] for p in per], refs, cfg)

    return {"prompts": n, "held_out": len(held), "same_answer": sum(p["same_answer"] for p in per) / n,
            "same_tokens": sum(p["same_tokens"] for p in per) / n,
            "merged_stops": len(stops), "gguf_stops": sum(p["gguf_stopped"] for p in per),
            "stops_kept": (sum(p["gguf_stopped"] for p in stops) / len(stops)) if stops else None,
            "stops_kept_count": sum(p["gguf_stopped"] for p in stops),
            "metric": cfg.metric, "metric_merged": metric("merged"), "metric_gguf": metric("gguf")}


def _check(name: str, value, limit: str, passed: bool) -> dict:
    return {"check": name, "value": value, "limit": limit, "passed": bool(passed)}


def verify_transformers(path: Path, quant: str, merged_model, tokenizer, prompts: list[list[int]],
                        merged: list[dict]) -> dict:
    """Without llama.cpp: transformers' GGUF loader reads the file (dequantized, fp32); logits on each
    prompt + the merged model's answer are compared with the merged model's."""
    import torch
    from transformers import AutoModelForCausalLM

    first = next(merged_model.parameters())
    gguf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=first.dtype,
                                                      device_map={"": first.device})
    gguf_model.eval()
    max_diff, scale, agree, total = 0.0, 1.0, 0, 0
    with torch.no_grad():
        for ids, ans in zip(prompts, merged):
            seq = torch.tensor([ids + ans["ids"]], device=first.device)
            ref = merged_model(input_ids=seq).logits.float()[0]
            got = gguf_model(input_ids=seq).logits.float()[0]
            max_diff = max(max_diff, (got - ref).abs().max().item())
            scale = max(scale, ref.abs().max().item())
            start = len(ids) - 1  # positions that predict the answer tokens
            agree += (got[start:].argmax(-1) == ref[start:].argmax(-1)).sum().item()
            total += got.shape[0] - start
    del gguf_model
    rel, argmax = max_diff / scale, agree / max(1, total)
    v = {"engine": "transformers GGUF loader (llama-cpp-python not installed: logits compared, no llama.cpp run)",
         "prompts": len(prompts), "max_abs_diff": max_diff, "logit_scale": scale, "relative_to_scale": rel,
         "argmax_agreement": argmax, "answer_positions": total}
    tol = LOGIT_TOLERANCE.get(quant)
    checks = []
    if tol:
        checks = [_check("max |logit diff| / scale", rel, f"<= {tol[0]:g}", rel <= tol[0]),
                  _check("greedy (argmax) agreement", argmax, f">= {tol[1]:g}", argmax >= tol[1])]
    v["checks"], v["gated"] = checks, bool(tol)
    v["passed"] = all(c["passed"] for c in checks)
    return v


# --- the export ---------------------------------------------------------------------------------

def export(run_dir: str | Path, quants: list[str], out: str | None = None, base: str | None = None,
           force: bool = False, overwrite: bool = False, verify: bool = True, engine: str = "auto",
           max_prompts: int = 32, max_new_tokens: int | None = None, record: bool = True, log=None) -> dict:
    """Export ``run_dir``'s model (base + adapter, merged) to GGUF, one file per type in ``quants``;
    returns the report, also written to ``run_dir/export.json`` and fastft.json (unless not ``record``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import backends, merge, recipe as recipe_mod, rundir

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    quants = parse_quants(quants)
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise ExportError(f"{run_dir}: no such run directory (give the output.dir of a finished run; for a registry "
                          "version, export its run directory and attach the file with `fastft registry attach`)", 2)
    info = rundir.read_run_info(run)
    if not (run / "adapter" / "adapter_config.json").is_file():
        raise ExportError(f"{run}: no adapter (adapter/adapter_config.json missing): the run did not finish; train "
                          "it to the end (or --resume it) before exporting", 2)
    if engine not in ("auto", "llama.cpp", "transformers"):
        raise ExportError(f"--engine {engine!r}: choose auto, llama.cpp or transformers", 2)
    if engine == "llama.cpp" and _llama_cpp() is None:
        raise ExportError("--engine llama.cpp: llama-cpp-python is not installed (pip install 'fastft[gguf]')", 2)
    _need_llama_cpp(quants)
    paths = output_paths(run, quants, out)
    _check_writable(paths, overwrite)
    use_llama = verify and engine != "transformers" and _llama_cpp() is not None
    r = recipe_mod.from_dict(info["recipe"], source=info.get("recipe_source"))
    conv = converter()  # fetched before the (slow) merge, so a network problem shows at once
    work = Path(tempfile.mkdtemp(prefix=".export.", dir=run))
    logs = run / "export" / "logs"
    report: dict = {"schema_version": SCHEMA_VERSION, "run_dir": str(run), "exports": []}
    try:
        # 1. merge (fp32 for small models, else bf16), with the run's tokenizer
        n_params = _approx_parameters((info.get("base_model") or {}).get("architecture") or {})
        dtype = "fp32" if not n_params or n_params <= FP32_MERGE_MAX_PARAMS else "bf16"
        t = time.perf_counter()
        merged_dir = work / "merged"
        mrep = merge.merge(str(run), merged_dir, dtype=dtype, base=base, force=force, verify=verify,
                           compare_4bit=False, log=log)
        merge_s = time.perf_counter() - t
        tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
        stop_ids = stop_token_ids(merged_dir, tokenizer)
        name = run.resolve().name

        # 2. reference answers of the merged model
        rows, prompts, texts, merged = [], [], [], []
        if verify:
            t = time.perf_counter()
            max_new = max_new_tokens or max(r.eval.max_new_tokens, 48)
            rows = prompt_set(r, tokenizer, max_prompts, log)
            texts, prompts = map(list, zip(*(render(tokenizer, row["messages"]) for row in rows)))
            # the reference in the merged dtype (fp32 up to FP32_MERGE_MAX_PARAMS, else bf16), on the GPU if any
            device = "cuda:0" if torch.cuda.is_available() else "cpu"
            merged_model = AutoModelForCausalLM.from_pretrained(
                str(merged_dir), dtype=torch.float32 if dtype == "fp32" else torch.bfloat16,
                device_map={"": device}).eval()
            merged = reference_answers(merged_model, tokenizer, prompts, stop_ids, max_new)
            if use_llama:
                del merged_model
            report["reference"] = {"model": f"merged ({mrep['dtype']}, transformers on {device})",
                                   "prompts": len(rows),
                                   "held_out": sum(r_["reference"] is not None for r_ in rows),
                                   "max_new_tokens": max_new, "stop_ids": stop_ids,
                                   "metric": r.eval.metric,
                                   "metric_merged": _task_metric([m["text"] for m in merged],
                                                                 [r_["reference"] for r_ in rows], r.eval),
                                   "seconds": round(time.perf_counter() - t, 2)}

        # 3. convert / quantize each type, check the file, rename it into place, verify it
        f16_file = None
        for quant in quants:
            dst = paths[quant]
            part = dst.with_name(f".{dst.name}.{os.getpid()}.partial")
            seconds = {}
            try:
                if quant in DIRECT:
                    log(f"fastft: export: converting to {quant} with llama.cpp's converter ({conv['version']})")
                    seconds["convert"] = convert(merged_dir, part, quant, logs / f"convert-{quant}.log", name)
                else:
                    if f16_file is None:
                        f16_file = work / "f16.gguf"
                        log("fastft: export: converting to f16 for the quantizer")
                        seconds["convert"] = convert(merged_dir, f16_file, "f16", logs / "convert-f16.log", name)
                    log(f"fastft: export: quantizing to {quant} with llama.cpp's quantizer")
                    seconds["quantize"] = quantize(f16_file, part, quant, logs / f"quantize-{quant}.log")
                meta = read_metadata(part)
                problems = check_metadata(meta, tokenizer, stop_ids)
                if problems:
                    made_by = "converter" if quant in DIRECT else "quantizer"
                    raise ExportError(f"the {quant} GGUF written by llama.cpp's {made_by} is not usable: "
                                      + "; ".join(problems) + f". Nothing was written to {dst}. Log: "
                                      + str(logs / (f"convert-{quant}.log" if quant in DIRECT
                                                    else f"quantize-{quant}.log")))
                os.replace(part, dst)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
            if quant == "f16" and any(q in K_QUANTS for q in quants):
                f16_file = dst  # the quantizer reads the finished f16 file
            entry = {"file": str(dst.resolve()), "quant": quant, "bytes": dst.stat().st_size, "sha256": _sha256(dst),
                     "converter": {k: conv.get(k) for k in ("source", "version", "sdist_sha256")},
                     "llama_cpp_python": getattr(_llama_cpp(), "__version__", None) if quant in K_QUANTS else None,
                     "metadata": {k: v for k, v in meta.items() if k != "tokens"} | {
                         "chat_template": bool(meta["chat_template"]), "vocab_size": len(meta["tokens"]),
                         "eos_token": tokenizer.eos_token},
                     "merge": {"dtype": mrep["dtype"], "verify": (mrep.get("verify") or {}).get("passed")},
                     "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            if verify:
                t = time.perf_counter()
                log(f"fastft: export: verifying {dst.name} ({'llama.cpp' if use_llama else 'transformers GGUF loader'}"
                    f", {len(rows)} prompts)")
                if use_llama:
                    v = verify_llama_cpp(dst, quant, rows, prompts, texts, merged,
                                         report["reference"]["max_new_tokens"], r.eval)
                else:
                    v = verify_transformers(dst, quant, merged_model, tokenizer, prompts, merged)
                seconds["verify"] = time.perf_counter() - t
                entry["verification"] = v
            seconds["merge (shared)"] = merge_s
            entry["seconds"] = {k: round(s, 2) for k, s in seconds.items()}
            report["exports"].append(entry)
    except BaseException:
        if record and report["exports"]:  # the files finished before the failure stay on record
            report["seconds"] = round(time.perf_counter() - t_start, 2)
            report["incomplete"] = True
            _record(run, report)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - t_start, 2)
    report["versions"] = backends.versions()
    if record:
        _record(run, report)
    log(format_table(report))
    return report


def _approx_parameters(arch: dict) -> int | None:
    """Parameters of a Llama-shaped decoder from the architecture fastft.json records (None: unknown)."""
    try:
        h, i, n = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]
        heads, kv, vocab = arch["num_attention_heads"], arch.get("num_key_value_heads") or arch["num_attention_heads"], \
            arch["vocab_size"]
    except (KeyError, TypeError):
        return None
    attn = 2 * h * h + 2 * h * (h // heads) * kv
    return n * (attn + 3 * h * i) + vocab * h * (1 if arch.get("tie_word_embeddings") else 2)


def passed(report: dict) -> bool:
    return all(e.get("verification", {}).get("passed", True) for e in report["exports"])


def summary(entry: dict) -> dict:
    """An export as fastft.json records it: everything but the per-prompt answers."""
    out = {k: v for k, v in entry.items() if k != "verification"}
    if "verification" in entry:
        out["verification"] = {k: v for k, v in entry["verification"].items() if k != "per_prompt"}
    return out


def _record(run: Path, report: dict) -> None:
    """Merge this export into RUN_DIR/export.json and fastft.json's ``exports`` (one entry per file)."""
    from . import files, rundir

    path = run / EXPORT_FILE
    old = json.loads(path.read_text()) if path.is_file() else {}
    names = {e["file"] for e in report["exports"]}
    kept = [e for e in old.get("exports", []) if e["file"] not in names]
    doc = dict(report, exports=kept + report["exports"])
    files.atomic_write_text(path, json.dumps(doc, indent=2, default=str) + "\n")
    info = rundir.read_run_info(run)
    info.pop("schema_version", None)
    info["exports"] = [e for e in info.get("exports", []) if e["file"] not in names] + \
        [summary(e) for e in report["exports"]]
    rundir.write_run_info(run, info)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def format_table(report: dict) -> str:
    ref = report.get("reference")
    lines = [f"GGUF export of {report['run_dir']} ({report['seconds']:.1f} s)"]
    if ref:
        m = ref["metric_merged"]
        lines.append(f"  reference: {ref['model']}, {ref['prompts']} prompts ({ref['held_out']} held-out), greedy, "
                     f"up to {ref['max_new_tokens']} tokens" + (f"; {ref['metric']} {100 * m:.1f}%" if m is not None
                                                                else ""))
    rows = [("type", "size", "time", "verified with", "result", "")]
    for e in report["exports"]:
        v = e.get("verification")
        t = sum(s for k, s in e["seconds"].items() if k != "merge (shared)")
        if v is None:
            rows.append((e["quant"], _mb(e["bytes"]), f"{t:.1f} s", "-", "not verified (--no-verify)", ""))
            continue
        if "same_answer" in v:
            res = (f"same answer {100 * v['same_answer']:.1f}%, stops at EOS where merged does "
                   f"{v['stops_kept_count']}/{v['merged_stops']}, same prompt tokens {100 * v['same_tokens']:.0f}%")
            if v["metric_gguf"] is not None:
                res += f", {v['metric']} {100 * v['metric_gguf']:.1f}%"
            how = "llama.cpp"
        else:
            res = (f"logits max diff {v['relative_to_scale']:.2g} of scale, argmax agree "
                   f"{100 * v['argmax_agreement']:.1f}%")
            how = "transformers"
        verdict = ("pass" if v["passed"] else "FAIL") if v["gated"] else "reported (not gated)"
        rows.append((e["quant"], _mb(e["bytes"]), f"{t:.1f} s", how, res, verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    for r in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    for e in report["exports"]:
        for c in e.get("verification", {}).get("checks", []):
            if not c["passed"]:
                lines.append(f"  FAIL {e['quant']}: {c['check']} = {c['value']} (needs {c['limit']})")
        lines.append(f"  {e['quant']}: {e['file']}")
    return "\n".join(lines)
