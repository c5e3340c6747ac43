"""Data preparation at scale: fastft cold and cached, TRL's own SFTTrainer preparation, and the
tokenizer-alone ceiling, on the same generated rows.

    python -m bench.data --alpaca-rows 1000000 --chat-rows 200000 --trl-rows 50000 --trl-chat-rows 10000
    python -m bench.data --alpaca-rows 5000 --chat-rows 2000          # a quick check
    python -m bench.data --table bench/results/data-smollm2-....json  # the README table of a result

Generates deterministic alpaca rows (~480 bytes, one user and one assistant turn) and multi-turn
``messages`` rows (optional system prompt, 2-4 assistant turns, some non-ASCII) into a temporary
folder (never committed), then runs each method in its own process and samples the resident memory
of that process and its children (``peak_rss_gb``: the peak of the PSS summed over the process tree,
so pages the forked workers share count once; ``peak_rss_main_gb``: the main process's RSS). Per set:
- ``fastft-cold``: ``fastft.data.build`` into an empty cache (read, tokenize with ``data.num_proc``
  processes, split 1% held out, write the cache entry);
- ``fastft-cached``: the same call again in a new process (a second run / resume / eval);
- ``trl-1`` and ``trl-2`` (dataset_num_proc 1 and 2): TRL's ``SFTTrainer._prepare_dataset`` (what its
  trainer runs before training) on the same rows loaded by ``datasets``: alpaca as prompt /
  completion chats (completion-only loss, the same labels as fastft's), multi-turn as ``messages``;
- ``ceiling``: the Rust tokenizer alone, batched, on the rendered texts (rendering not timed),
  with as many threads as fastft has processes (``RAYON_NUM_THREADS`` = ``--num-proc``).
Every method is timed from after its imports (fastft, datasets, trl) to its result; tokens are
every example's (train and held-out), as the ceiling tokenizes every row.
``--trl-rows`` / ``--trl-chat-rows`` run TRL on the first N rows only (a rate compares; the JSON's
notes say so).
Rates are rows/s and tokens/s, and tokens per CPU-second (``cpu_seconds``: user + system time of
the method's process, its workers and threads, a figure a busy machine disturbs far less than the
wall clock); the result JSON goes under bench/results/ and records what else
ran: the load average before and after each method, the CPU model, the cores and the git commit
(``-dirty`` when the tree has uncommitted changes).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WORDS = ["the", "a", "of", "and", "to", "in", "is", "for", "on", "with", "that", "by", "this", "be", "are", "from", "or", "as", "at", "an", "it", "not", "which", "can", "your", "data", "model", "train", "learn", "value", "system", "user", "answer", "question", "order", "city", "name", "number", "list", "item", "first", "second", "third", "health", "diet", "water", "sleep", "exercise", "balance", "plan", "write", "code", "python", "function", "return", "error", "file", "line", "table", "column", "row", "example", "result", "test", "check", "build", "fast", "slow", "memory"]
NON_ASCII = ["café", "naïve", "Straße", "東京", "日本語", "Ελληνικά", "русский", "🙂"]


def _sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    if rng.random() < 0.1:
        words[rng.randrange(n)] = rng.choice(NON_ASCII)
    if rng.random() < 0.2:
        words.append(str(rng.randint(1, 99999)))
    return " ".join(words).capitalize() + rng.choice([".", "?", "!", ":"])


def _para(rng: random.Random, chars: int) -> str:
    out = []
    while sum(len(s) + 1 for s in out) < chars:
        out.append(_sentence(rng, rng.randint(5, 14)))
    return " ".join(out)


def alpaca_rows(n: int, seed: int = 0):
    rng = random.Random(f"bench-data-alpaca:{seed}")
    for _ in range(n):
        yield {"instruction": _para(rng, rng.randint(60, 140)), "input": _para(rng, 80) if rng.random() < 0.4 else "",
               "output": _para(rng, rng.randint(200, 420))}


def chat_rows(n: int, seed: int = 0):
    rng = random.Random(f"bench-data-chat:{seed}")
    for _ in range(n):
        msgs = [{"role": "system", "content": _para(rng, 60)}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(2, 4)):
            msgs.append({"role": "user", "content": _para(rng, rng.randint(40, 200))})
            msgs.append({"role": "assistant", "content": _para(rng, rng.randint(80, 400))})
        yield {"messages": msgs}


def write_set(kind: str, n: int, folder: Path) -> Path:
    path = folder / f"{kind}-{n}.jsonl"
    if not path.is_file():
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in (alpaca_rows if kind == "alpaca" else chat_rows)(n))
        os.replace(tmp, path)
    return path


def tokenizer_path(which: str) -> str:
    from fastft.models import named

    if which == "tiny":
        return str(named.EMBEDDED["fastft-tiny"])
    return named.resolve("smollm2-135m-instruct")


# --- one method, in its own process --------------------------------------------------------------

def _d(path: Path, kind: str, num_proc: int):
    from fastft import recipe

    r = recipe.from_dict({"model": {"name": "x", "max_seq_length": 2048},
                          "data": {"train": str(path), "format": "alpaca" if kind == "alpaca" else "messages",
                                   "eval_fraction": 0.01, "num_proc": num_proc}, "output": {"dir": "x"}})
    return r


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its ended children: the pool's workers once
    joined, the tokenizer's threads. On a shared machine it moves far less than the wall clock."""
    import resource

    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def run_method(method: str, path: Path, kind: str, tok_path: str, num_proc: int) -> dict:
    res = _run_method(method, path, kind, tok_path, num_proc)
    res["cpu_seconds"] = round(_cpu_seconds() - res.pop("cpu0"), 3)
    return res


def _run_method(method: str, path: Path, kind: str, tok_path: str, num_proc: int) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_path)
    if method.startswith("fastft"):
        import datasets  # noqa: F401 - imported before the clock starts, as the other methods' imports

        from fastft import data  # noqa: F401
        from fastft.data import batched  # noqa: F401

        r = _d(path, kind, num_proc)
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        b = data.build(r.data, tok, seed=r.train.seed, max_length=r.model.max_seq_length, log=lambda m: None)
        seconds = time.perf_counter() - t0
        eval_tokens = sum(len(x) for x in b.eval.data.column("input_ids").to_pylist()) if b.eval is not None else 0
        return {"seconds": seconds, "cpu0": cpu0, "rows": b.info["rows"], "tokens": b.stats["train_tokens"] + eval_tokens,
                "train_tokens": b.stats["train_tokens"], "cache_hit": b.info["cache"]["hit"],
                "tokenizer_path": b.info["tokenizer_path"], "per_example_rows": b.info["per_example_rows"]}
    if method.startswith("trl"):
        import types

        import datasets
        from trl import SFTConfig, SFTTrainer

        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        n_proc = int(method.rsplit("-", 1)[1])
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
        if kind == "alpaca":
            def to_pc(r):
                p = r["instruction"].strip() + (f"\n\n{r['input'].strip()}" if r["input"].strip() else "")
                return {"prompt": [{"role": "user", "content": p}],
                        "completion": [{"role": "assistant", "content": r["output"].strip()}]}
            ds = ds.map(to_pc, remove_columns=ds.column_names, num_proc=n_proc)
        with tempfile.TemporaryDirectory() as out:
            cfg = SFTConfig(output_dir=out, dataset_num_proc=n_proc, max_length=2048, report_to=[], bf16=False,
                            use_cpu=True)
            # the attributes SFTTrainer.__init__ sets that _prepare_dataset reads: prompt/completion rows
            # get completion-only loss (as fastft's response-only labels); messages rows train every token
            # (SmolLM2's template has no {% generation %} markers for TRL's assistant_only_loss)
            fake = types.SimpleNamespace(_tokenizer=tok, chat_template=None, completion_only_loss=kind == "alpaca")
            ds = SFTTrainer._prepare_dataset(fake, ds, tok, cfg, False, None, "train")
        seconds = time.perf_counter() - t0
        tokens = sum(len(x) for x in ds.data.column("input_ids").to_pylist())
        return {"seconds": seconds, "cpu0": cpu0, "rows": len(ds), "tokens": tokens}
    if method == "ceiling":
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
        from fastft import data

        texts = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                ex = data.to_messages(r, "alpaca" if kind == "alpaca" else "messages", "bench")
                texts.append(tok.apply_chat_template(ex, tokenize=False))
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        tokens = 0
        for i in range(0, len(texts), 1000):
            tokens += sum(len(e.ids) for e in tok.backend_tokenizer.encode_batch(texts[i:i + 1000],
                                                                                 add_special_tokens=False))
        return {"seconds": time.perf_counter() - t0, "cpu0": cpu0, "rows": len(texts), "tokens": tokens,
                "note": "tokenization only; rendering the texts is not timed"}
    raise ValueError(method)


def check_same(path: Path, kind: str, tok_path: str, rows: int, num_proc: int, work: Path) -> dict:
    """fastft's batched build against the per-example reference on the set's first ``rows`` rows:
    every input_id and label, the held-out split and the data hash (in a scratch cache)."""
    from transformers import AutoTokenizer

    from fastft import data

    tok = AutoTokenizer.from_pretrained(tok_path)
    head = work / f"check-{kind}-{rows}.jsonl"
    with open(path, encoding="utf-8") as f, open(head, "w", encoding="utf-8") as g:
        g.writelines(line for _, line in zip(range(rows), f))
    r = _d(head, kind, num_proc)
    old = os.environ.get("FASTFT_CACHE")
    os.environ["FASTFT_CACHE"] = tempfile.mkdtemp(prefix="check-cache-", dir=work)
    try:
        kw = {"seed": r.train.seed, "max_length": r.model.max_seq_length, "log": lambda m: None}
        fast, ref = data.build(r.data, tok, **kw), data.build_reference(r.data, tok, **kw)
    finally:
        if old is None:
            os.environ.pop("FASTFT_CACHE", None)
        else:
            os.environ["FASTFT_CACHE"] = old
    same = (fast.data_hash == ref.data_hash and fast.train["input_ids"][:] == ref.train["input_ids"][:]
            and fast.train["labels"][:] == ref.train["labels"][:] and fast.eval["input_ids"][:] == ref.eval["input_ids"][:]
            and fast.eval["labels"][:] == ref.eval["labels"][:] and fast.eval_pairs == ref.eval_pairs)
    return {"rows": rows, "same_as_reference": same, "tokenizer_path": fast.info["tokenizer_path"],
            "per_example_rows": fast.info["per_example_rows"]}


def _tree_memory(pid: int) -> tuple[int, int]:
    """(PSS summed over the process and its children, the main process's RSS). PSS counts a page
    shared by forked workers once, split between them; summed RSS would count it once per worker."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
        main_rss = p.memory_info().rss
    except psutil.NoSuchProcess:
        return 0, 0
    total = 0
    for q in procs:
        try:
            total += q.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total, main_rss


def measure(method: str, path: Path, kind: str, tok: str, num_proc: int, cache: Path) -> dict:
    # tok: the tokenizer's folder (the children's FASTFT_CACHE is the bench's own, without the model)
    """Run one method in a child process; its result plus the peak RSS of its process tree."""
    # each method its own datasets cache: trl-2 would otherwise load the map results trl-1 cached
    env = {**os.environ, "FASTFT_CACHE": str(cache), "FASTFT_QUIET": "1",
           "HF_DATASETS_CACHE": str(cache / f"hf-{method}")}
    if method == "ceiling":  # the tokenizer's own threads, as many as fastft's processes
        env["RAYON_NUM_THREADS"] = str(num_proc)
    load_before = [round(x, 2) for x in os.getloadavg()]
    cmd = [sys.executable, "-m", "bench.data", "--one", method, str(path), kind, tok, str(num_proc)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0, 0]

    def sample():
        while proc.poll() is None:
            pss, rss = _tree_memory(proc.pid)
            peak[0], peak[1] = max(peak[0], pss), max(peak[1], rss)
            time.sleep(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    th.join()
    load = {"load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()]}
    if proc.returncode != 0:
        return {"method": method, **load,
                "error": err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"}
    res = json.loads(out.strip().splitlines()[-1])
    res.update(method=method, **load, peak_rss_gb=round(peak[0] / 2**30, 3), peak_rss_main_gb=round(peak[1] / 2**30, 3),
               rows_per_s=round(res["rows"] / res["seconds"], 1),
               tokens_per_s=round(res["tokens"] / res["seconds"], 1), seconds=round(res["seconds"], 2),
               tokens_per_cpu_s=round(res["tokens"] / max(res["cpu_seconds"], 1e-9), 1))
    return res


def readme_table(doc: dict) -> str:
    """The README's table (markdown) from a result document: every method of every set, then the
    target ratios. Nothing is computed beyond rounding and the ratios already in the document."""
    names = {"fastft-cold": "fastft, cold (no cache)", "fastft-cached": "fastft, cached", "trl-1": "TRL SFTTrainer, "
             "dataset_num_proc=1", "trl-2": "TRL SFTTrainer, dataset_num_proc=2", "ceiling": "Rust tokenizer alone"}
    out = ["| set | method | rows | seconds | rows/s | tokens/s | tokens/CPU-s | peak RSS (GB) |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    ratios = []
    for kind, st in doc["metrics"].items():
        for m in st["methods"]:
            label = names.get(m["method"], m["method"])
            if "error" in m:
                out.append(f"| {kind} | {label} | error: {m['error']} | | | | | |")
                continue
            per_cpu = f"{m['tokens_per_cpu_s']:,.0f}" if "tokens_per_cpu_s" in m else "-"
            out.append(f"| {kind} | {label} | {m['rows']:,} | {m['seconds']:,.1f} | {m['rows_per_s']:,.0f} | "
                       f"{m['tokens_per_s']:,.0f} | {per_cpu} | {m['peak_rss_gb']:.2f} |")
        for k, v in st.get("ratios", {}).items():
            ratios.append(f"{kind}: {k} = {v}")
    return "\n".join(out + ([""] + ratios if ratios else []))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--table":  # python -m bench.data --table bench/results/data-....json
        print(readme_table(json.loads(Path(argv[1]).read_text())))
        return 0
    if argv and argv[0] == "--one":
        method, path, kind, tok, num_proc = argv[1:]
        print(json.dumps(run_method(method, Path(path), kind, tok, int(num_proc))))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--alpaca-rows", type=int, default=1_000_000)
    p.add_argument("--chat-rows", type=int, default=200_000)
    p.add_argument("--trl-rows", type=int, default=None, help="alpaca rows for the TRL runs (default: all); fewer "
                   "keeps a slow baseline within the time at hand, the JSON says so")
    p.add_argument("--trl-chat-rows", type=int, default=None, help="multi-turn rows for the TRL runs (default: all)")
    p.add_argument("--num-proc", type=int, default=2, help="fastft's data.num_proc")
    p.add_argument("--tokenizer", choices=["smollm2", "tiny"], default="smollm2")
    p.add_argument("--methods", default="fastft-cold,fastft-cached,trl-1,trl-2,ceiling")
    p.add_argument("--check-rows", type=int, default=500, help="rows compared token for token with the "
                   "per-example reference before timing")
    p.add_argument("--work", help="folder for the generated sets and caches (default: a temporary one)")
    p.add_argument("--out", help="results folder (default bench/results)")
    args = p.parse_args(argv)
    from bench import common

    load_start = [round(x, 2) for x in os.getloadavg()]
    tok_path = tokenizer_path(args.tokenizer)  # SmolLM2 converted once, before anything is timed
    work = Path(args.work or tempfile.mkdtemp(prefix="fastft-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    sets, notes = {}, []
    for kind, n in (("alpaca", args.alpaca_rows), ("chat", args.chat_rows)):
        if n <= 0:
            continue
        path = write_set(kind, n, work)
        cache = Path(tempfile.mkdtemp(prefix=f"cache-{kind}-", dir=work))
        check = check_same(path, kind, tok_path, min(n, args.check_rows), args.num_proc, work)
        print(f"{kind:7} check: {check}", file=sys.stderr)
        rows = []
        for m in methods:
            src = path
            cap = args.trl_rows if kind == "alpaca" else args.trl_chat_rows
            if m.startswith("trl") and cap and cap < n:
                src = write_set(kind, cap, work)
                notes.append(f"{kind}: {m} ran on the first {cap:,} of the {n:,} rows (rates compare; totals do not)")
            res = measure(m, src, kind, tok_path, args.num_proc, cache)
            print(f"{kind:7} {m:14} " + (f"{res['rows']:>9,} rows {res['seconds']:>9.2f} s {res['rows_per_s']:>10,.1f} rows/s "
                                         f"{res['tokens_per_s']:>12,.0f} tok/s {res['cpu_seconds']:>8.1f} cpu-s  peak RSS {res['peak_rss_gb']:.2f} GB"
                                         if "error" not in res else f"ERROR {res['error']}"), file=sys.stderr)
            rows.append(res)
        sets[kind] = {"rows": n, "methods": rows, "check": check}
        by = {r["method"]: r for r in rows if "error" not in r}
        cold = by.get("fastft-cold")
        if cold:
            ratios = {}
            if "trl-2" in by:
                ratios["cold_vs_trl2_rows_per_s"] = round(cold["rows_per_s"] / by["trl-2"]["rows_per_s"], 2)
            if "ceiling" in by:
                ratios["cold_vs_ceiling_tokens_per_s"] = round(cold["tokens_per_s"] / by["ceiling"]["tokens_per_s"], 3)
                # CPU time: what a busy machine disturbs least (the wall-clock ratio above is the target's)
                ratios["cold_vs_ceiling_tokens_per_cpu_s"] = round(
                    cold["tokens_per_cpu_s"] / by["ceiling"]["tokens_per_cpu_s"], 3)
            sets[kind]["ratios"] = ratios
    load = os.getloadavg()
    config = {"alpaca_rows": args.alpaca_rows, "chat_rows": args.chat_rows, "trl_rows": args.trl_rows,
              "trl_chat_rows": args.trl_chat_rows,
              "num_proc": args.num_proc, "tokenizer": args.tokenizer, "eval_fraction": 0.01, "max_seq_length": 2048,
              "cpu_model": common.cpu_model(), "cores": len(os.sched_getaffinity(0)),
              "git_commit": common.git_sha(), "load_average_start": load_start,
              "load_average": [round(x, 2) for x in load]}
    doc = common.result(kind="data", name=f"{args.tokenizer}-alpaca{args.alpaca_rows}-chat{args.chat_rows}",
                        target="cpu", config=config, metrics=sets, notes=notes)
    path = common.write(doc, args.out)
    print(readme_table(doc), file=sys.stderr)
    print(f"wrote {path} (its README table again: python -m bench.data --table {path})", file=sys.stderr)
    print(common.dumps_line(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
