"""Merge a LoRA / DoRA adapter into a 16-bit (or fp32) copy of its base: a plain transformers checkpoint.

    fastft merge outputs/run --out merged/ --dtype bf16          # a run directory
    fastft merge support-bot@production --out merged/            # or a registry reference
    fastft merge outputs/run --out merged/ --base /path/to/16-bit/original   # pre-quantized hub bases

    from fastft import merge
    report = merge.merge("outputs/run", "merged", dtype="bf16")
    report["verify"]["max_abs_diff"]   # merged logits vs base + adapter, on a few prompts

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("merged")       # no fastft, no PEFT

How: the base is loaded *unquantized* in fp32 on the CPU (4 bytes per parameter: 32 GB for an 8B
model), the adapter is applied with PEFT and ``merge_and_unload`` adds it into the weights in fp32
(DoRA: the magnitude-rescaled direction), then the model is cast once to ``--dtype`` and saved as
safetensors with the run's tokenizer and chat template, written to a temporary folder and renamed.

4-bit runs: QLoRA trained the adapter against the NF4-rounded base, yet the merge uses the original
16-bit weights, which is what the adapter will run on in deployment; the merged model therefore
differs from the 4-bit training model by the NF4 rounding error (measured and reported as
``vs_4bit_training_model``), and equals the 16-bit base + adapter. ``--from-quantized`` merges into
the dequantized NF4 weights instead (equal to the 4-bit base + adapter; needed when only a
pre-quantized checkpoint exists) and warns that every base weight then carries the rounding.

Verification (default on): logits of the saved checkpoint, reloaded with plain
``AutoModelForCausalLM`` in its dtype, against the unmerged base + adapter in fp32 on a few prompts.
The check passes when ``max |merged - reference| <= TOLERANCE[dtype] * max(1, max |reference|)``;
the tolerances cover the output dtype's rounding of weights and arithmetic (bf16 has 8 mantissa
bits, fp16 11); the merge itself is done in fp32, whose rounding is far smaller.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .errors import FastftError
from .progress import progress

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# max |merged - reference| / max(1, max |reference|), reference = fp32 base + adapter unmerged.
# Each limit follows the output dtype's precision: relative spacing 2^-7 for bf16 (8 mantissa bits), 2^-10
# for fp16 (11), 2^-23 for fp32; logits gather rounding over every layer, so a limit is a few times the
# spacing (fp32: far more). tests/test_merge.py checks LoRA and DoRA, 4-bit and 16-bit runs, in each dtype.
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 3e-2}
VERIFY_PROMPTS = [
    [{"role": "user", "content": "classify red , blue , green"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What is the capital of France ? Answer in one word ."}],
]
VERIFY_TEXT = "The quick brown fox jumps over the lazy dog . 1 2 3 4 5"


class MergeError(FastftError, RuntimeError):
    """A merge that cannot be done, or whose result failed verification; nothing was written."""

    exit_code = 1


def _sample_batch(tokenizer):
    texts = []
    if getattr(tokenizer, "chat_template", None):
        texts += [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in VERIFY_PROMPTS]
    texts.append(VERIFY_TEXT)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _logits(model, batch):
    import torch

    model.eval()
    with torch.no_grad():
        out = model(**batch).logits.float()
    return out * batch["attention_mask"].unsqueeze(-1)  # padding positions do not count


def _compare(got, ref, mask) -> dict:
    diff = (got - ref).abs()
    scale = max(1.0, ref.abs().max().item())
    m = mask.bool()
    agree = (got.argmax(-1) == ref.argmax(-1))[m].float().mean().item()
    return {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff[m].mean().item(),
            "reference_max_abs": ref.abs().max().item(), "relative_to_scale": diff.max().item() / scale,
            "argmax_agreement": agree}


def merge(ref: str, out: str | Path, dtype: str = "bf16", base: str | None = None, from_quantized: bool = False,
          force: bool = False, verify: bool = True, overwrite: bool = False, registry: str | None = None,
          compare_4bit: bool = True, log=print) -> dict:
    """Merge the adapter of ``ref`` (run dir or registry reference) into its base and save it to
    ``out``. Returns the report also written to ``out/fastft-merge.json``. ``compare_4bit``: for a
    4-bit run, also load the 4-bit training model to measure its gap from the merged one."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import files, registry as registry_mod, rundir
    from .models import backends, provenance
    from .info import versions

    if dtype not in DTYPES:
        raise MergeError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MergeError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")
    t0 = time.perf_counter()
    run_dir = registry_mod.resolve_ref(ref, registry)
    info = rundir.read_run_info(run_dir)
    adapter_dir = rundir.RunDir(run_dir).adapter
    trained_4bit = bool(info["recipe"]["model"].get("load_in_4bit"))
    compute_dtype = info.get("backend", {}).get("dtype") or "float32"
    base_path = provenance.base_path_for(info, base)
    for note in provenance.check_compatible(info, base_path, force=force):
        log(f"fastft: warning: {note}")
    fp = provenance.base_fingerprint(base_path, model_id=(info.get("base_model") or {}).get("model_id"))
    if from_quantized and not trained_4bit:
        raise MergeError("--from-quantized: this run trained on a 16-bit base; there is no 4-bit base to merge into")
    if fp.get("quantized_checkpoint") and not from_quantized:
        raise MergeError(f"the base {base_path} is a pre-quantized 4-bit checkpoint: its original 16-bit weights "
                         "are not in it. Give the 16-bit checkpoint it was made from with --base PATH, or pass "
                         "--from-quantized to merge into the dequantized 4-bit weights (with their rounding error).")
    out_dtype = getattr(torch, DTYPES[dtype])
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if (adapter_dir / "tokenizer_config.json").is_file()
                                              else base_path)
    batch = _sample_batch(tokenizer)
    # load, merge, save (+ reference logits and the reloaded check when verifying)
    bar = progress(total=5 if verify else 3, desc="merge", unit="stages")

    # 1. base in fp32 (original 16-bit weights, or the dequantized NF4 ones), adapter on top, reference logits
    if from_quantized:
        log("fastft: warning: --from-quantized: merging into the dequantized 4-bit (NF4) base weights. Every base "
            "weight then carries NF4's rounding error (about 1/16 of each 64-weight block's largest value); the "
            "merged model equals the 4-bit base + adapter, not the original model + adapter. Use the 16-bit base "
            "(the default, or --base PATH) unless it is unavailable.")
        kwargs = {} if fp.get("quantized_checkpoint") else {"quantization_config": backends.nf4_config(compute_dtype)}
        base_model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, device_map={"": "cpu"}, **kwargs)
        base_model = base_model.dequantize().float()
        what = "dequantized 4-bit NF4 weights"
    else:
        base_model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, device_map={"": "cpu"})
        what = "original 16-bit weights" + (" (the run trained on them quantized to 4-bit NF4)" if trained_4bit else "")
    peft_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    kind = "DoRA" if peft_cfg.get("use_dora") else "LoRA"
    log(f"fastft: merging the {kind} adapter of {run_dir} (r={peft_cfg.get('r')}) into {base_path}: {what}, "
        f"merged in fp32, saved as {DTYPES[dtype]}")
    model = PeftModel.from_pretrained(base_model, str(adapter_dir))
    bar.update(1)
    report: dict = {"ref": str(ref), "run_dir": str(run_dir), "adapter": kind, "base": fp, "dtype": DTYPES[dtype],
                    "from_quantized": from_quantized, "trained_4bit": trained_4bit}
    if verify:
        reference = _logits(model, batch)
        with model.disable_adapter():
            bare = _logits(model, batch)
        report["adapter_effect"] = _compare(bare, reference, batch["attention_mask"])
        bar.update(1)
    merged = model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaN/Inf instead of writing them
    merged = merged.to(out_dtype)
    bar.update(1)
    del model, base_model

    # 2. save into a temporary folder beside --out, verify the saved files, then rename into place
    with files.building(out, prefix=f".{out.name}.merging.") as tmp:
        merged.config.dtype = out_dtype
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        del merged
        bar.update(1)
        if verify:
            reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=out_dtype, device_map={"": "cpu"})
            got = _logits(reloaded, batch)
            del reloaded
            v = _compare(got, reference, batch["attention_mask"])
            v["tolerance"] = f"max_abs_diff <= {TOLERANCE[dtype]:g} x max(1, reference_max_abs)"
            v["passed"] = v["relative_to_scale"] <= TOLERANCE[dtype]
            report["verify"] = v
            bar.update(1)
            log(f"fastft: verify: merged ({DTYPES[dtype]}, reloaded with plain transformers) vs base + adapter "
                f"(fp32): max |diff| {v['max_abs_diff']:.3g} on logits up to {v['reference_max_abs']:.3g} "
                f"(limit {TOLERANCE[dtype]:g} x that), greedy tokens agree {100 * v['argmax_agreement']:.1f}%; "
                f"the adapter itself moves logits by up to {report['adapter_effect']['max_abs_diff']:.3g}")
            if trained_4bit and compare_4bit:
                q = AutoModelForCausalLM.from_pretrained(base_path, dtype=getattr(torch, compute_dtype),
                                                         device_map={"": "cpu"},
                                                         **({} if fp.get("quantized_checkpoint")
                                                            else {"quantization_config": backends.nf4_config(compute_dtype)}))
                backends.keep_4bit_trainable_on_cpu(q)  # no bf16 inference repacking: the training layout
                q = PeftModel.from_pretrained(q, str(adapter_dir))
                report["vs_4bit_training_model"] = _compare(got, _logits(q, batch), batch["attention_mask"])
                del q
                g = report["vs_4bit_training_model"]
                log(f"fastft: the 4-bit training model (NF4 base + adapter) differs from the merged model by up to "
                    f"{g['max_abs_diff']:.3g} (greedy tokens agree {100 * g['argmax_agreement']:.1f}%)"
                    + ("" if from_quantized else ": NF4 rounding of the base, not a merge error"))
            if not v["passed"]:
                raise MergeError(f"verification failed: merged logits differ from base + adapter by "
                                 f"{v['max_abs_diff']:.3g} (limit {v['tolerance']}); nothing was written to {out}")
        report["seconds"] = time.perf_counter() - t0
        report["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        report["versions"] = versions()
        (tmp / "fastft-merge.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    bar.close()
    log(f"fastft: merged checkpoint in {out} ({report['seconds']:.1f} s): "
        f"AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return report
