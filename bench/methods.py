"""Does preference training pay after SFT? The shipped pairs, and the measured SFT -> DPO demo.

    # the pairs: the SFT adapter's own wrong answers on training prompts as the rejected answers
    python -m bench.methods pairs --sft outputs/smollm2-demo --n 160 [--general 80]
    # the demo: the SFT run's adapter vs DPO started from it, same held-out set, same regression set
    python -m bench.methods demo --sft outputs/smollm2-demo [--set train.max_steps=20]
    # a further try of the same SFT adapter: reuse the SFT side of an earlier result (checked)
    python -m bench.methods demo --sft outputs/smollm2-demo --set train.method=orpo --sft-from bench/results/methods-dpo-...json

``pairs`` answers the first ``--n`` training prompts of the order-extraction task with the SFT run's
adapter (greedy, as the evaluation answers) and writes fastft/assets/data/order-preference.jsonl:
chosen = the reference, rejected = the adapter's answer where it is wrong (``source: sft``, with
the kind of mistake: wrong city / quantity / name, or prose that is not JSON); where the adapter is
right, a made-up mistake (``source: synthetic``), so every prompt has a pair: every other one a
misspelled first name (the adapter's one kind of mistake on the held-out orders), the rest a wrong
city, a wrong quantity or prose.

``demo`` scores the SFT adapter on the DPO recipe's held-out set and regression set (json_match on
name, city, quantity; forgetting), trains recipes/smollm2-dpo.yaml from that adapter, and writes
one result JSON (bench/results/methods-dpo-...) with both sides, the differences, the wall times,
the load average and the command. The last line of stdout is the result as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench import common

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "fastft/assets/data/order-extraction.jsonl"
PAIRS = ROOT / "fastft/assets/data/order-preference.jsonl"
GENERAL = ROOT / "fastft/assets/data/general-instructions.jsonl"  # the SFT demo's data.mix: general
FIELDS = ["name", "city", "quantity"]


def _prompt(row: dict) -> str:
    """The user turn fastft.data builds from an alpaca row (instruction, blank line, input)."""
    return row["instruction"].strip() + (f"\n\n{row['input'].strip()}" if (row.get("input") or "").strip() else "")


def mistake_kind(answer: str, reference: str) -> str | None:
    """None when the answer is right (json_match on name, city, quantity); else what is wrong."""
    from fastft.metrics import parse_json

    ok, got = parse_json(answer)
    want = json.loads(reference)
    if not ok or not isinstance(got, dict):
        return "prose"
    for f in ("city", "quantity", "name"):
        if got.get(f) != want[f]:
            return f"wrong {f}"
    return None


def misspelled(name: str, i: int) -> str:
    """``name`` with its first name garbled as the SFT adapter garbles the names it has not seen
    ("Amen Tanaka" for "Ahmed Tanaka", "Dígos Kowalski" for "Diego Kowalski"): a letter dropped,
    two swapped, a vowel changed or an ending added, by ``i``; never the name itself."""
    orig, _, rest = name.partition(" ")
    first = orig if len(orig) >= 3 else orig + "a"
    k = 1 + i % (len(first) - 2)  # never the first letter
    how = i % 4
    if how == 0:
        new = first[:k] + first[k + 1:]
    elif how == 1:
        new = first[:k] + first[k + 1] + first[k] + first[k + 2:]
    elif how == 2:
        vowels = "aeiou"
        j = next((j for j in range(k, len(first)) if first[j].lower() in vowels), k)
        c = first[j].lower()
        new = first[:j] + (vowels[(vowels.index(c) + 1) % 5] if c in vowels else "i") + first[j + 1:]
    else:
        new = first + ("o", "as", "ina")[i % 3]
    if new == orig:
        new = orig + "o"
    return f"{new} {rest}".strip()


def made_up(i: int, reference: str, cities: list[str]) -> tuple[str, str]:
    """A deterministic mistake of the SFT adapter's kinds for row ``i``. Every other one is a
    misspelled name (its only kind of mistake on the held-out orders, whose names it never saw);
    the rest rotate through wrong city, wrong quantity and prose."""
    want = json.loads(reference)
    if i % 2 == 0:
        return "wrong name", json.dumps({**want, "name": misspelled(want["name"], i // 2)})
    kind = ("wrong city", "wrong quantity", "prose")[(i // 2) % 3]
    if kind == "wrong city":
        others = [c for c in cities if c != want["city"]]
        return kind, json.dumps({**want, "city": others[(i * 7) % len(others)]})
    if kind == "wrong quantity":
        delta = (1 + i % 3) * (1 if i % 2 else -1)
        q = want["quantity"] + delta if want["quantity"] + delta > 0 else want["quantity"] - delta
        return kind, json.dumps({**want, "quantity": q})
    return kind, f"{want['name']} from {want['city']} would like to order {want['quantity']} items."


def pairs(args) -> int:
    from fastft import evaluate
    from fastft.models import backends
    from fastft.files import atomic_write_text

    rows = [json.loads(line) for line in TRAIN.read_text().splitlines() if line.strip()][: args.n]
    cities = sorted({json.loads(r["output"])["city"] for r in rows})
    answers: list[str | None] = [None] * len(rows)
    if args.sft:
        model, tok, _, _ = backends.load_run(args.sft, log=lambda m: print(m, file=sys.stderr))
        prompts = [[{"role": "user", "content": _prompt(r)}] for r in rows]
        answers = evaluate.generate_answers(model, tok, prompts, max_new_tokens=32, batch_size=32)
    out, kinds = [], {}
    for i, (r, a) in enumerate(zip(rows, answers)):
        kind = mistake_kind(a, r["output"]) if a is not None else None
        source = "sft"
        rejected = (a or "").strip()
        if kind is None:
            kind, rejected = made_up(i, r["output"], cities)
            source = "synthetic"
        kinds[f"{source}: {kind}"] = kinds.get(f"{source}: {kind}", 0) + 1
        out.append({"prompt": _prompt(r), "chosen": r["output"], "rejected": rejected, "slice": r.get("slice"),
                    "mistake": kind, "source": source})
    if args.general:  # general prompts: the reference answer over the adapter's own, where they differ
        from fastft.metrics import normalize

        gen_rows = [json.loads(line) for line in GENERAL.read_text().splitlines() if line.strip()][: args.general]
        if not args.sft:
            raise SystemExit("--general needs --sft: its pairs reject the SFT adapter's own general answers")
        prompts = [[{"role": "user", "content": _prompt(r)}] for r in gen_rows]
        answers = evaluate.generate_answers(model, tok, prompts, max_new_tokens=64, batch_size=32)
        for r, a in zip(gen_rows, answers):
            if normalize(a) == normalize(r["output"]):
                continue
            kinds["general: differs"] = kinds.get("general: differs", 0) + 1
            out.append({"prompt": _prompt(r), "chosen": r["output"], "rejected": a.strip(), "slice": "general",
                        "mistake": "differs from the general answer", "source": "general"})
    atomic_write_text(Path(args.out), "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in out))
    print(f"wrote {len(out)} pairs to {args.out}: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    return 0


def _side(ev: dict) -> dict:
    task, reg = ev.get("task") or {}, ev.get("regression") or {}
    m = ev["metric"]
    return {"metric": m, "score": (task.get("adapter") or {}).get(m), "base_score": (task.get("base") or {}).get(m),
            "slices": {k: v[m] for k, v in ((task.get("adapter") or {}).get("slices") or {}).items()},
            "task_loss": (task.get("adapter") or {}).get("loss"), "n": task.get("n"),
            "forgotten": reg.get("forgotten"), "forgotten_count": reg.get("forgotten_count"),
            "regression_accuracy": (reg.get("adapter") or {}).get("accuracy"), "regression_n": reg.get("n")}


def reused_sft_side(path: str, r) -> tuple[dict, float]:
    """The SFT side of an earlier demo result, refused unless it evaluated the same adapter on the
    same held-out file with the same eval settings (answers are greedy, so it would measure the same)."""
    doc = json.loads(Path(path).read_text())
    cfg, mine = doc.get("config") or {}, r.to_dict()
    same = {"model.adapter": (cfg.get("model", {}).get("adapter"), mine["model"]["adapter"]),
            "data.eval": (cfg.get("data", {}).get("eval"), mine["data"]["eval"]),
            "eval": (cfg.get("eval"), mine["eval"]), "model.name": (cfg.get("model", {}).get("name"), mine["model"]["name"])}
    differ = [k for k, (a, b) in same.items() if a != b]
    if doc.get("kind") != "methods" or differ:
        raise SystemExit(f"--sft-from {path}: not a methods demo of the same SFT side (differs: "
                         f"{', '.join(differ) or 'kind'}); run without --sft-from to measure it")
    return doc["metrics"]["sft"], doc["metrics"]["sft_eval_seconds"]


def demo(args) -> int:
    import gc

    from fastft import evaluate, recipe, train
    from fastft.models import backends

    load_before = os.getloadavg()
    run_dir = args.run_dir or tempfile.mkdtemp(prefix="fastft-methods-demo-")
    r = recipe.load(args.recipe, [f"model.adapter={args.sft}", f"output.dir={run_dir}", *args.overrides])
    t0 = time.perf_counter()
    if args.sft_from:  # the SFT side measured by an earlier demo of the same adapter and evaluation
        sft, sft_seconds = reused_sft_side(args.sft_from, r)
    else:
        model, tok, _, _ = backends.load_run(args.sft, log=lambda m: print(m, file=sys.stderr))
        task = evaluate.eval_set_from_file(r.data.eval, tok, None, r.model.max_seq_length)
        sft = _side(evaluate.evaluate(model, tok, r, task, log=lambda m: print(m, file=sys.stderr)))
        sft_seconds = time.perf_counter() - t0
        del model
        gc.collect()
    t1 = time.perf_counter()
    result = train.run(r, log=lambda m: print(m, file=sys.stderr), overwrite=True)
    dpo_seconds = time.perf_counter() - t1
    dpo = _side(result.info["eval"])
    gain = dpo["score"] - sft["score"]
    forgot_delta = (dpo["forgotten"] or 0.0) - (sft["forgotten"] or 0.0)
    metrics = {
        "sft": sft, r.train.method: dpo,
        "score_gain": gain, "forgotten_delta": forgot_delta,
        "pays": gain > 0 and forgot_delta <= 0,
        "method_figures": result.info["metrics"]["method"], "steps": result.info["metrics"]["steps"],
        "held_out_pair_loss": {"before": result.info["metrics"]["before"].get("eval_loss"),
                               "after": result.info["metrics"]["after"].get("eval_loss")},
        "sft_eval_seconds": sft_seconds, "sft_side_from": args.sft_from, "method_run_seconds": dpo_seconds,
        "method_train_tokens_per_second": result.info["metrics"]["train"]["tokens_per_second"],
        "peak_rss_gb": result.info["metrics"]["train"].get("peak_rss_gb"),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
    }
    notes = [(f"the SFT side is {args.sft} (its adapter evaluated with the {r.train.method} recipe's eval section); "
             f"the {r.train.method} run started from that adapter and wrote {run_dir}"),
             "forgotten: share of the regression items the base model answers right that the adapter gets wrong"]
    if args.sft_from:
        notes.append(f"the SFT side was measured by {args.sft_from} (same adapter, held-out set, regression set "
                     "and eval settings, checked; greedy decoding), not again by this command")
    doc = common.result(kind="methods", name=f"{r.train.method}-{Path(r.model.name).name}", target="cpu", config=r.to_dict(),
                        metrics=metrics, notes=notes)
    path = common.write(doc, args.out_dir)
    for name, side in (("SFT", sft), (r.train.method, dpo)):
        print(f"{name} adapter: {side['metric']} {100 * side['score']:.1f}%  forgotten {side['forgotten']}",
              file=sys.stderr)
    print(f"result: {path}", file=sys.stderr)
    print(common.dumps_line(doc))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.methods", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pairs", help="build the shipped preference pairs")
    a.add_argument("--sft", help="a finished SFT run whose wrong answers become the rejected ones")
    a.add_argument("--n", type=int, default=160, help="training prompts used (default 160)")
    a.add_argument("--general", type=int, default=0, metavar="N",
                   help="also the first N general instructions (the SFT demo's mix set): chosen = its answer, "
                        "rejected = the SFT adapter's where they differ (keeps general answers in place)")
    a.add_argument("--out", default=str(PAIRS))
    b = sub.add_parser("demo", help="SFT adapter vs the method started from it; writes the result JSON")
    b.add_argument("--sft", required=True, help="the SFT run directory (or registry NAME@vN)")
    b.add_argument("--recipe", default=str(ROOT / "recipes/smollm2-dpo.yaml"))
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    b.add_argument("--sft-from", metavar="RESULT_JSON",
                   help="take the SFT side from an earlier demo result of the same adapter (checked) instead of "
                        "evaluating it again (~4 min on 2 cores)")
    b.add_argument("--run-dir", help="output.dir of the method's run (default: a temporary folder, kept)")
    b.add_argument("--out-dir", help="folder for the result JSON (default bench/results)")
    args = p.parse_args(argv)
    return pairs(args) if args.cmd == "pairs" else demo(args)


if __name__ == "__main__":
    sys.exit(main())
