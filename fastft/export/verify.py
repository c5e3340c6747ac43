"""Does a GGUF answer like the merged model? Two engines, one fixed prompt set.

The prompts are the run's held-out prompts (at most ``--max-prompts``) and ``GENERAL_PROMPTS``; the
merged transformers model answers them greedily as the reference (``fastft.generate.greedy``).

- llama.cpp (llama-cpp-python installed): llama.cpp loads the file and answers the same prompt
  tokens greedily. Reported: the share of identical answers, whether it stops at EOS wherever the
  merged model does, whether llama.cpp's tokenizer gives the same ids for every prompt, and the
  recipe's task metric (``eval.metric``) on the held-out prompts for both. Gates (``GATES``): f16
  needs identical answers on >= 90% of prompts and every stop kept; bf16 and q8_0 keep the task
  metric within 5 points; k-quants are reported, not gated (a small model loses much in 4 bits);
  identical tokenization is required of every type.
- transformers: its GGUF loader reads the file back (dequantized to the reference's dtype: for an 8B
  model that is a second 16 GB copy in memory) and its logits on the prompts followed by the merged
  model's answers are compared with the merged model's: max difference relative to the logit scale,
  and greedy (argmax) agreement, against ``LOGIT_TOLERANCE``; k-quants are not gated here either.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from ..progress import progress
from .options import llama_cpp

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


def prompt_set(recipe, tokenizer, max_prompts: int, log=print) -> list[dict]:
    """``[{"messages", "reference", "slice", "kind"}]``: held-out prompts of the run (at most
    ``max_prompts``, in the split's order), then GENERAL_PROMPTS (reference None)."""
    from .. import data

    rows: list[dict] = []
    try:
        bundle = data.build(recipe.data, tokenizer, seed=recipe.train.seed, max_length=recipe.model.max_seq_length,
                            log=lambda m: None)
        slices = bundle.eval_slices or [None] * len(bundle.eval_pairs)
        for (messages, ref), sl in list(zip(bundle.eval_pairs, slices))[:max_prompts]:
            rows.append({"messages": messages, "reference": ref, "slice": sl, "kind": "held-out"})
    except data.DataError as e:
        log(f"fastft: export: the run's held-out prompts are unavailable ({e}); verifying on general prompts only")
    rows += [{"messages": [{"role": "user", "content": p}], "reference": None, "slice": None, "kind": "general"}
             for p in GENERAL_PROMPTS]
    return rows


def task_metric(answers: list[str], references: list[str | None], cfg) -> float | None:
    """The recipe's eval.metric over the prompts that have a reference (None: there are none)."""
    from ..evaluate import task_scores

    pairs = [(a, ref) for a, ref in zip(answers, references) if ref is not None]
    if not pairs:
        return None
    return task_scores([a for a, _ in pairs], [ref for _, ref in pairs], None, cfg.metric, cfg.json_fields)[cfg.metric]


def _check(name: str, value, limit: str, passed: bool) -> dict:
    return {"check": name, "value": value, "limit": limit, "passed": bool(passed)}


def verify_llama_cpp(path: Path, quant: str, rows: list[dict], prompts: list[list[int]], texts: list[str],
                     merged: list[dict], max_new_tokens: int, cfg) -> dict:
    """llama.cpp (llama-cpp-python) loads the file and answers each prompt greedily."""
    module = llama_cpp()
    n_ctx = max(len(p) for p in prompts) + max_new_tokens + 16
    llm = module.Llama(str(path), n_ctx=max(256, n_ctx), n_threads=max(1, os.cpu_count() or 1), seed=0,
                       verbose=False)
    per, gen_tokens, gen_seconds = [], 0, 0.0
    try:
        for row, ids, text, ref in progress(list(zip(rows, prompts, texts, merged)), desc=f"export: verify {path.name}",
                                            unit="prompts"):
            ll_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            t0 = time.perf_counter()
            res = llm.create_completion(ids, max_tokens=max_new_tokens, temperature=0.0, repeat_penalty=1.0)
            gen_seconds += time.perf_counter() - t0
            choice = res["choices"][0]
            gen_tokens += res["usage"]["completion_tokens"]
            per.append({"kind": row["kind"], "slice": row["slice"], "prompt": row["messages"][-1]["content"],
                        "reference": row["reference"], "merged": ref["text"], "merged_stopped": ref["stopped"],
                        "gguf": choice["text"], "gguf_stopped": choice["finish_reason"] == "stop",
                        "same_answer": choice["text"].strip() == ref["text"].strip(), "same_tokens": ll_ids == ids})
    finally:
        llm.close()
    v = _answer_summary(per, cfg)
    v.update(engine=f"llama.cpp (llama-cpp-python {module.__version__})",
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
        return task_metric([p[key] for p in per], refs, cfg)

    return {"prompts": n, "held_out": len(held), "same_answer": sum(p["same_answer"] for p in per) / n,
            "same_tokens": sum(p["same_tokens"] for p in per) / n,
            "merged_stops": len(stops), "gguf_stops": sum(p["gguf_stopped"] for p in per),
            "stops_kept": (sum(p["gguf_stopped"] for p in stops) / len(stops)) if stops else None,
            "stops_kept_count": sum(p["gguf_stopped"] for p in stops),
            "metric": cfg.metric, "metric_merged": metric("merged"), "metric_gguf": metric("gguf")}


def verify_transformers(path: Path, quant: str, merged_model, prompts: list[list[int]], merged: list[dict],
                        why: str) -> dict:
    """transformers' GGUF loader reads the file (dequantized to the merged model's dtype); logits on
    each prompt + the merged model's answer are compared with the merged model's. ``why``: the reason
    this engine verifies, not llama.cpp (recorded in ``engine``)."""
    import torch
    from transformers import AutoModelForCausalLM

    first = next(merged_model.parameters())
    gguf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=first.dtype,
                                                      device_map={"": first.device})
    gguf_model.eval()
    max_diff, scale, agree, total = 0.0, 1.0, 0, 0
    with torch.no_grad():
        for ids, ans in progress(list(zip(prompts, merged)), desc=f"export: verify {path.name}", unit="prompts"):
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
    v = {"engine": f"transformers GGUF loader ({why}: logits compared, no llama.cpp run)",
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
