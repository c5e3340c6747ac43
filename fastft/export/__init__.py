"""GGUF export for llama.cpp (and the tools built on it: Ollama, LM Studio), verified every time.

    fastft export outputs/run --gguf q8_0                  # -> outputs/run/export/run-q8_0.gguf
    fastft export outputs/run --gguf f16 --gguf q4_k_m     # several at once (or --gguf f16,q4_k_m)
    fastft export outputs/run --gguf q8_0 --out model.gguf # one type: a file; several: a folder or {quant}

    from fastft import export
    report = export.export("outputs/run", ["f16", "q8_0"])
    report["exports"][0]["verification"]["passed"]

What happens, for one run directory (``options`` checks the request first):

1. **Merge** (``fastft.merge``): the adapter is added into the original 16-bit base in fp32 and
   saved into a temporary folder (fp32 for models up to ``FP32_MERGE_MAX_PARAMS`` parameters,
   counted by ``fastft.models.shapes``; bf16 above, to keep the temporary copy at 2 bytes per
   parameter) with the run's tokenizer and chat template.
2. **Convert** with llama.cpp's own converter, not a rewrite of it (``llamacpp``): f16, bf16 and
   q8_0 come straight out of it; k-quants (q4_k_m, q5_k_m, q6_k, ...) are made from the f16 file by
   llama.cpp's quantizer (the optional ``gguf`` extra, llama-cpp-python, which builds llama.cpp from
   source). Their output is kept in ``RUN_DIR/export/logs/``.
3. **Check the written file** (``checks``) before it gets its name: the file is written under a
   ``.partial`` name and renamed only after the checks pass, so a file with the final name is
   always complete.
4. **Verify** (``verify``) that the file answers like the merged model on a fixed prompt set, in
   llama.cpp when llama-cpp-python is installed, else through transformers' GGUF loader. The
   merged model's reference answers come from ``fastft.generate.greedy`` (in its merged dtype, on
   the GPU when there is one).
The result is printed as a table, written to ``RUN_DIR/export.json`` (every prompt and answer), and
recorded in ``RUN_DIR/fastft.json`` under ``exports`` (file, type, size, sha256, converter version,
verification summary). A failed verification keeps the file (it is a correct GGUF of the merged
model; it does not behave like it) and exits ``VERIFY_EXIT_CODE``.

Errors name the cause and the fix and leave no partial file: a run without an adapter, an unknown
type, an output path that cannot be written, a k-quant without llama-cpp-python, a model the
converter does not support (architecture, or a BPE pre-tokenizer it does not recognize).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .. import generate
from ..errors import EXIT_GATE
from ..files import file_sha256
from ..progress import progress
from ..rundir import RunDir
from .checks import check_metadata, read_metadata, stop_token_ids
from .llamacpp import converter, convert, quantize
from .options import (DIRECT, K_QUANTS, QUANTS, ExportError, check_writable, choose_engine, llama_cpp, need_llama_cpp,
                      output_paths, parse_quants)
from .verify import GENERAL_PROMPTS, LOGIT_TOLERANCE, prompt_set, task_metric, verify_llama_cpp, verify_transformers

__all__ = ["QUANTS", "GENERAL_PROMPTS", "LOGIT_TOLERANCE", "VERIFY_EXIT_CODE", "ExportError", "export", "passed",
           "summary", "format_table", "parse_quants", "output_paths"]

FP32_MERGE_MAX_PARAMS = 2_000_000_000
VERIFY_EXIT_CODE = EXIT_GATE  # 3: the export was written but does not answer like the merged model
SCHEMA_VERSION = 1


def export(run_dir: str | Path, quants: list[str], out: str | None = None, base: str | None = None,
           force: bool = False, overwrite: bool = False, verify: bool = True, engine: str = "auto",
           max_prompts: int = 32, max_new_tokens: int | None = None, record: bool = True, log=None) -> dict:
    """Export ``run_dir``'s model (base + adapter, merged) to GGUF, one file per type in ``quants``;
    returns the report, also written to ``run_dir/export.json`` and fastft.json (unless not ``record``)."""
    from transformers import AutoTokenizer

    from .. import merge, recipe as recipe_mod, rundir
    from ..info import versions

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    quants = parse_quants(quants)
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise ExportError(f"{run_dir}: no such run directory (give the output.dir of a finished run; for a registry "
                          "version, export its run directory and attach the file with `fastft registry attach`)", 2)
    info = rundir.read_run_info(run)
    if not (RunDir(run).adapter / "adapter_config.json").is_file():
        raise ExportError(f"{run}: no adapter (adapter/adapter_config.json missing): the run did not finish; train "
                          "it to the end (or --resume it) before exporting", 2)
    in_llama_cpp, why = choose_engine(engine)
    use_llama = verify and in_llama_cpp
    need_llama_cpp(quants)
    paths = output_paths(run, quants, out)
    check_writable(paths, overwrite)
    r = recipe_mod.from_record(info)
    conv = converter()  # fetched before the (slow) merge, so a network problem shows at once
    work = Path(tempfile.mkdtemp(prefix=".export.", dir=run))
    logs = run / "export" / "logs"
    report: dict = {"schema_version": SCHEMA_VERSION, "run_dir": str(run), "exports": []}
    try:
        # 1. merge (fp32 for small models, else bf16), with the run's tokenizer
        n_params = _parameters((info.get("base_model") or {}).get("architecture"))
        dtype = "fp32" if not n_params or n_params <= FP32_MERGE_MAX_PARAMS else "bf16"
        t = time.perf_counter()
        merged_dir = work / "merged"
        mrep = merge.merge(str(run), merged_dir, dtype=dtype, base=base, force=force, verify=verify,
                           compare_4bit=False, log=log)
        merge_s = time.perf_counter() - t
        tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
        stop_ids = stop_token_ids(merged_dir, tokenizer)

        # 2. reference answers of the merged model
        ref = None
        if verify:
            ref = _reference(r, merged_dir, mrep["dtype"], tokenizer, stop_ids, max_prompts, max_new_tokens,
                             keep_model=not use_llama, log=log)
            report["reference"] = ref.summary

        # 3. convert / quantize each type, check the file, rename it into place, verify it
        f16_file = None
        for quant in progress(quants, desc="export: GGUF files (convert / quantize, check, verify)", unit="files"):
            dst = paths[quant]
            seconds: dict = {}
            meta, f16_file = _write(quant, dst, merged_dir, f16_file, work, logs, conv, tokenizer, stop_ids,
                                    run.resolve().name, seconds, log)
            if quant == "f16" and any(q in K_QUANTS for q in quants):
                f16_file = dst  # the quantizer reads the finished f16 file
            entry = {"file": str(dst.resolve()), "quant": quant, "bytes": dst.stat().st_size,
                     "sha256": file_sha256(dst),
                     "converter": {k: conv.get(k) for k in ("source", "version", "sdist_sha256")},
                     "llama_cpp_python": getattr(llama_cpp(), "__version__", None) if quant in K_QUANTS else None,
                     "metadata": {k: v for k, v in meta.items() if k != "tokens"} | {
                         "chat_template": bool(meta["chat_template"]), "vocab_size": len(meta["tokens"]),
                         "eos_token": tokenizer.eos_token},
                     "merge": {"dtype": mrep["dtype"], "verify": (mrep.get("verify") or {}).get("passed")},
                     "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            if verify:
                t = time.perf_counter()
                log(f"fastft: export: verifying {dst.name} ({'llama.cpp' if use_llama else 'transformers GGUF loader'}"
                    f", {len(ref.rows)} prompts)")
                if use_llama:
                    v = verify_llama_cpp(dst, quant, ref.rows, ref.prompts, ref.texts, ref.answers,
                                         ref.summary["max_new_tokens"], r.eval)
                else:
                    v = verify_transformers(dst, quant, ref.model, ref.prompts, ref.answers, why)
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
    report["versions"] = versions()
    if record:
        _record(run, report)
        from ..report import refresh

        refresh(run, log)  # the run's report.html shows the exports and their verification
    log(format_table(report))
    return report


def _parameters(arch: dict | None) -> int | None:
    """Parameters of the base, from the architecture fastft.json records (None: not recorded, or not
    a model transformers can build from it)."""
    from ..models import shapes

    config = {k: v for k, v in (arch or {}).items() if k != "class"}
    if "model_type" not in config:
        return None
    try:
        return shapes.shapes(config).total_params
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


@dataclass
class _Reference:
    """The merged model's greedy answers on the prompt set, and what export.json records of them."""

    rows: list[dict]  # prompt_set's rows
    texts: list[str]  # each prompt rendered with the chat template
    prompts: list[list[int]]  # its token ids
    answers: list[dict]  # generate.greedy's {"ids", "text", "stopped"}
    model: object  # the merged model, kept for the transformers engine (else None)
    summary: dict


def _reference(r, merged_dir: Path, dtype: str, tokenizer, stop_ids: list[int], max_prompts: int,
               max_new_tokens: int | None, keep_model: bool, log) -> _Reference:
    """``dtype``: the merged checkpoint's torch dtype name (merge's report), which the reference keeps."""
    import torch
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    max_new = max_new_tokens or max(r.eval.max_new_tokens, 48)
    rows = prompt_set(r, tokenizer, max_prompts, log)
    texts, prompts = map(list, zip(*(generate.render(tokenizer, row["messages"]) for row in rows)))
    # the reference in the merged dtype (fp32 up to FP32_MERGE_MAX_PARAMS, else bf16), on the GPU if any
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=getattr(torch, dtype),
                                                 device_map={"": device}).eval()
    with progress(total=len(prompts), desc="export: reference answers (merged model)", unit="prompts") as bar:
        answers = generate.greedy(model, tokenizer, prompts, max_new, stop_ids=stop_ids, batch_size=16, progress=bar)
    summary = {"model": f"merged ({dtype}, transformers on {device})", "prompts": len(rows),
               "held_out": sum(row["reference"] is not None for row in rows), "max_new_tokens": max_new,
               "stop_ids": stop_ids, "metric": r.eval.metric,
               "metric_merged": task_metric([a["text"] for a in answers], [row["reference"] for row in rows], r.eval),
               "seconds": round(time.perf_counter() - t, 2)}
    return _Reference(rows, texts, prompts, answers, model if keep_model else None, summary)


def _write(quant: str, dst: Path, merged_dir: Path, f16_file: Path | None, work: Path, logs: Path, conv: dict,
           tokenizer, stop_ids: list[int], name: str, seconds: dict, log) -> tuple[dict, Path | None]:
    """Make the ``quant`` GGUF at ``dst`` (through a ``.partial`` name, renamed once its metadata
    checks pass); returns its metadata and the f16 file the quantizer reads (made here when needed).
    Each step's seconds go into ``seconds``."""
    part = dst.with_name(f".{dst.name}.{os.getpid()}.partial")
    log_name = f"convert-{quant}.log" if quant in DIRECT else f"quantize-{quant}.log"
    try:
        if quant in DIRECT:
            log(f"fastft: export: converting to {quant} with llama.cpp's converter ({conv['version']})")
            seconds["convert"] = convert(merged_dir, part, quant, logs / log_name, name)
        else:
            if f16_file is None:
                f16_file = work / "f16.gguf"
                log("fastft: export: converting to f16 for the quantizer")
                seconds["convert"] = convert(merged_dir, f16_file, "f16", logs / "convert-f16.log", name)
            log(f"fastft: export: quantizing to {quant} with llama.cpp's quantizer")
            seconds["quantize"] = quantize(f16_file, part, quant, logs / log_name)
        meta = read_metadata(part)
        problems = check_metadata(meta, tokenizer, stop_ids)
        if problems:
            made_by = "converter" if quant in DIRECT else "quantizer"
            raise ExportError(f"the {quant} GGUF written by llama.cpp's {made_by} is not usable: "
                              + "; ".join(problems) + f". Nothing was written to {dst}. Log: {logs / log_name}")
        os.replace(part, dst)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return meta, f16_file


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
    from .. import files, rundir

    path = RunDir(run).export
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
