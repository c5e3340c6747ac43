"""Gemma 3 270M: fastft's conversion against llama.cpp on the same GGUF file, token for token.

    make gguf                                        # llama-cpp-python, once
    python -m bench.gemma_llamacpp                   # -> bench/results/gemma3-llamacpp-gemma-3-270m-cpu-<time>.json

llama.cpp (llama-cpp-python) runs the pinned Q4_K_M file as it is; fastft runs its converted
checkpoint (``model.name: gemma-3-270m``: the same weights dequantized to fp32, the tokenizer built
from the file's vocabulary). For each prompt (plain text after ``<bos>``, and chat prompts through
Gemma 3's template) both answer greedily, one token at a time, and the result records:

- the prompt's token ids from both tokenizers (and those of further texts: the demo's rendered
  rows, whitespace runs, scripts, emoji), which must be identical;
- both continuations, where they first differ, and at every step llama.cpp's margin between its
  first and second choice (the difference of their logits): where that margin is small,
  llama.cpp's 8-bit activations (its k-quant dot products quantize them) can swap the two, so a
  divergence there is a near tie, not a wrong conversion;
- teacher forced on llama.cpp's continuation, how often fastft's first choice is llama.cpp's token,
  and the largest absolute logit difference over the positions.

The same file is what ``tests/test_gemma3.py`` checks the conversion against on every CI run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench import common

MAX_NEW = 24
# margin (logits) under which llama.cpp's first and second choice count as a near tie
NEAR_TIE = 0.5
PLAIN = [
    "The capital of France is", "Water boils at a temperature of", "The three primary colors are",
    "def fibonacci(n):", "The largest planet in the solar system is", "Once upon a time, in a small village,",
    "The chemical symbol for gold is", "In 1492, Christopher Columbus", "A haiku about autumn:\n",
    "import numpy as np\n\n", "The opposite of hot is", "Photosynthesis is the process by which",
]
CHAT = [
    "What is the capital of Japan?", "Name three colours of the rainbow.", "Translate 'good morning' into French.",
    "How many legs does a spider have?", "Write one sentence about the sea.", "What is 12 plus 30?",
]
EXTRA_TEXTS = ["Hello  world\n\n\tfoo   bar \U0001f680 \u6211\u60f3\u5728apple\u5de5\u4f5c1314\u5929 x\u0301",
               "   leading spaces, trailing   ", "\n\n\n\n\nnewlines\r\nand CRLF", "<start_of_turn>user\nHi<end_of_turn>\n",
               "na\u00efve caf\u00e9 \u00fcber \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 \u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u0939\u093f\u0928\u094d\u0926\u0940",
               "{\"name\": \"Ada\", \"city\": \"Lyon\", \"quantity\": 3}", "0123456789 3.14159 1e-5 $1,000,000"]


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.gemma_llamacpp", description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", help="the .gguf (default: the pinned file, joined from its PyPI chunks)")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW)
    p.add_argument("--no-f32", action="store_true",
                   help="skip the round trip through an unquantized GGUF made by llama.cpp's converter")
    p.add_argument("--demo-rows", type=int, default=40, help="rendered demo rows whose tokenization is compared")
    p.add_argument("--out", help="result file (default: bench/results/gemma3-llamacpp-gemma-3-270m-cpu-<time>.json)")
    return p.parse_args(argv)


def _prompts(tok) -> list[dict]:
    rows = [{"kind": "plain", "prompt": p, "text": tok.bos_token + p} for p in PLAIN]
    for q in CHAT:
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        rows.append({"kind": "chat", "prompt": q, "text": text})
    return rows


def _demo_texts(tok, n: int) -> list[str]:
    from fastft.models.named import ASSETS

    out = []
    with open(ASSETS / "data" / "order-extraction.jsonl", encoding="utf-8") as f:
        for line in f:
            if len(out) >= n:
                break
            row = json.loads(line)
            msgs = [{"role": "user", "content": row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "")},
                    {"role": "assistant", "content": row["output"]}]
            out.append(tok.apply_chat_template(msgs, tokenize=False))
    return out


def _llama_greedy(llm, ids: list[int], max_new: int, stops: set[int]):
    import numpy as np

    llm.reset()
    llm.eval(ids)
    tokens, margins, logits = [], [], []
    for _ in range(max_new):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        top2 = np.argpartition(-row, 2)[:2]
        first, second = sorted(top2, key=lambda i: -row[i])
        tokens.append(int(first))
        margins.append(round(float(row[first] - row[second]), 4))
        logits.append(row)
        if int(first) in stops:
            break
        llm.eval([int(first)])
    return tokens, margins, logits


def _ours_greedy(model, ids: list[int], max_new: int, stops: set[int]) -> list[int]:
    import torch

    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new, do_sample=False, eos_token_id=sorted(stops), pad_token_id=0)
    return out[0, len(ids):].tolist()


def _forced(model, ids: list[int], cont: list[int], ll_logits) -> tuple[int, float]:
    """fastft's first choices along llama.cpp's continuation: (how many equal it, max |logit diff|)."""
    import numpy as np
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids + cont])).logits[0, len(ids) - 1:len(ids) - 1 + len(cont)].float().numpy()
    same = int(sum(int(np.argmax(logits[k])) == cont[k] for k in range(len(cont))))
    diff = max(float(np.abs(logits[k] - ll_logits[k]).max()) for k in range(len(cont)))
    return same, diff


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first step where two token lists differ (a length difference counts); None when equal."""
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return k
    return None if len(a) == len(b) else min(len(a), len(b))


def _compare(llm, tok, model, rows: list[dict], max_new: int, stops: set[int]) -> tuple[list[dict], dict]:
    """Both engines on every prompt: (per prompt, summary)."""
    per = []
    for row in rows:
        ll_ids = llm.tokenize(row["text"].encode("utf-8"), add_bos=False, special=True)
        ids = tok.encode(row["text"], add_special_tokens=False)
        ll_tokens, margins, ll_logits = _llama_greedy(llm, ll_ids, max_new, stops)
        ours = _ours_greedy(model, ids, max_new, stops)
        forced_same, logit_diff = _forced(model, ids, ll_tokens, ll_logits)
        k = first_difference(ll_tokens, ours)
        per.append({**row, "prompt_ids_llama_cpp": ll_ids, "prompt_ids_same": ll_ids == ids,
                    "llama_cpp": ll_tokens, "fastft": ours, "llama_cpp_text": tok.decode(ll_tokens),
                    "fastft_text": tok.decode(ours), "identical": k is None, "first_difference": k,
                    "llama_cpp_margins": margins,
                    "near_tie_at_difference": None if k is None or k >= len(margins) else margins[k] < NEAR_TIE,
                    "forced_same_top1": forced_same, "forced_positions": len(ll_tokens),
                    "max_abs_logit_diff": round(logit_diff, 4)})
        print(f"  {row['kind']:5s} {'same' if k is None else f'differs at {k}':14s} {row['prompt'][:40]!r}: "
              f"{tok.decode(ll_tokens)[:60]!r}", flush=True)
    positions = sum(p["forced_positions"] for p in per)
    summary = {
        "prompts": len(per), "identical": sum(p["identical"] for p in per),
        "differing_only_at_near_ties": all(p["identical"] or p["near_tie_at_difference"] for p in per),
        "prompt_tokenization_identical": all(p["prompt_ids_same"] for p in per),
        "forced_top1_agreement": round(sum(p["forced_same_top1"] for p in per) / positions, 4),
        "max_abs_logit_diff": max(p["max_abs_logit_diff"] for p in per),
    }
    return per, summary


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastft.export import llamacpp
    from fastft.export.options import llama_cpp
    from fastft.models import gemma3

    module = llama_cpp()
    if module is None:
        print("bench.gemma_llamacpp: llama-cpp-python is not installed; run `make gguf` (builds llama.cpp once)",
              file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    path = gemma3.resolve()
    with tempfile.TemporaryDirectory(prefix="gemma3-gguf-") as tmp:
        gguf = Path(args.gguf) if args.gguf else gemma3.fetch_gguf(Path(tmp))
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        threads = max(1, len(os.sched_getaffinity(0)))
        stops = {tok.eos_token_id, tok.convert_tokens_to_ids(gemma3.END_OF_TURN)}
        rows = _prompts(tok)
        files = {"q4_k_m": gguf}
        if not args.no_f32:
            # the converted checkpoint back through llama.cpp's own converter, unquantized: what is
            # left between the two engines is arithmetic, not weights or architecture
            files["f32"] = Path(tmp) / "gemma-3-270m-f32.gguf"
            llamacpp.convert(Path(path), files["f32"], "f32", Path(tmp) / "convert.log", "gemma-3-270m")
        texts = [{"text": t} for t in EXTRA_TEXTS + _demo_texts(tok, args.demo_rows)]
        engines = {}
        for name, file in files.items():
            print(f"bench.gemma_llamacpp: llama.cpp on {file.name}", flush=True)
            llm = module.Llama(str(file), n_ctx=1024, n_threads=threads, seed=0, logits_all=True, verbose=False)
            if name == "q4_k_m":
                for t in texts:
                    t["llama_cpp"] = llm.tokenize(t["text"].encode("utf-8"), add_bos=False, special=True)
                    t["fastft"] = tok.encode(t["text"], add_special_tokens=False)
                    t["same"] = t["llama_cpp"] == t["fastft"]
            per, summary = _compare(llm, tok, model, rows, args.max_new_tokens, stops)
            llm.close()
            engines[name] = {"file": file.name, "summary": summary, "prompts": per}
    summary = {name: e["summary"] for name, e in engines.items()}
    summary["texts_tokenization_identical"] = sum(t["same"] for t in texts)
    summary["texts"] = len(texts)
    summary["near_tie_margin"] = NEAR_TIE
    config = {"gguf": gguf.name, "gguf_sha256": gemma3.GGUF_SHA256, "checkpoint": path,
              "checkpoint_record": json.loads((Path(path) / gemma3.MARKER).read_text()),
              "engine": f"llama.cpp (llama-cpp-python {module.__version__}), {threads} threads",
              "max_new_tokens": args.max_new_tokens, "near_tie_margin": NEAR_TIE}
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    doc = common.result("gemma3-llamacpp", "gemma-3-270m", "cpu", config, summary)
    doc["versions"]["llama_cpp_python"] = module.__version__
    doc.update(texts=texts, engines=engines)
    out = Path(args.out) if args.out else None
    if out is not None:
        common.write_json(out, doc)
    else:
        out = common.write(doc)
    print(json.dumps(summary, indent=1))
    print(f"bench.gemma_llamacpp: wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
