"""Base model vs adapter: task metrics by slice, a regression (forgetting) set, and gates.

    fastft eval outputs/run                                  # held-out split of the run's recipe
    fastft eval outputs/run --data my-test.jsonl --regression asset:regression/smollm2-135m-instruct.jsonl

    from fastft import evaluate
    result = evaluate.compare(model, tokenizer, task, cfg, regression)   # a PEFT model: base = adapter disabled
    result["task"]["adapter"]["exact_match"], result["regression"]["forgotten"]

The base is the same loaded model with its adapter switched off (PEFT's ``disable_adapter()``), so
base and adapter differ by the adapter alone: same weights, same quantization, same prompts.

Task metrics (recipe ``eval.metric``: exact_match, contains, json_match; see fastft.metrics), each
per ``slice`` column value and overall; a json_match reference that is not JSON is a miss, counted
in ``references_not_json`` with a warning.
Loss is the mean cross-entropy per answer token on the held-out rows (the labels training used);
perplexity is exp(loss).

Regression set (``eval.regression``): general prompts with reference answers that the base model
answers correctly (``python -m fastft.assets.build_regression`` builds the shipped ones). Rows are
questions (alpaca or messages, asked through the chat template) or, for a base model that has not
learnt a chat format, texts to continue: ``{"prompt": "The capital of France is", "completion":
" Paris"}`` (``<bos>`` and the text, no template). Reported: accuracy
of base and adapter (``eval.regression_metric``, default contains), ``forgotten`` = the share of
the items the base got right that the adapter gets wrong, and ``loss_delta`` = adapter loss minus
base loss on the reference answers (general text).

Gates (recipe ``eval.gates``): ``{metric path: condition}``; a condition is an operator (>=, <=, >,
<) and a number. Metric paths (adapter values unless named otherwise):
    task.<metric>                    the recipe's eval.metric, overall
    task.slice.<name>.<metric>       one slice
    task.gain                        adapter minus base, eval.metric
    task.loss, task.perplexity       held-out loss / perplexity
    regression.accuracy              regression-set accuracy
    regression.forgotten             share of base-correct items the adapter gets wrong
    regression.loss_delta            adapter minus base loss on the regression answers
``fastft train`` evaluates at the end (``eval.after_training``); a failed gate marks the run
``rejected`` in fastft.json (``accepted`` when every gate passes) and the command exits 3
(``fastft.gates``) unless ``--no-gate-exit``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from .eval_table import format_table
from .gates import check_gates
from .generate import greedy
from .metrics import parse_json, score
from .progress import progress
from .rundir import EVAL as EVAL_FILE
SCHEMA_VERSION = 1


# --- scoring the answers ----------------------------------------------------------------------

def task_scores(answers: list[str], references: list[str], slices: list[str | None] | None, metric: str,
                json_fields: list[str] | None = None) -> dict:
    """``{metric: overall fraction, "n": count, "hits": [bool...], "slices": {name: {metric, n}}}``;
    slices only when some row has one (rows without a slice count as "(none)")."""
    hits = [score(a, r, metric, json_fields) for a, r in zip(answers, references)]
    out: dict = {metric: (sum(hits) / len(hits)) if hits else None, "n": len(hits), "hits": hits, "slices": {}}
    if slices and any(s is not None for s in slices):
        groups: dict[str, list[bool]] = {}
        for h, s in zip(hits, slices):
            groups.setdefault("(none)" if s is None else s, []).append(h)
        out["slices"] = {k: {metric: sum(v) / len(v), "n": len(v)} for k, v in sorted(groups.items())}
    return out


# --- generation and loss -----------------------------------------------------------------------

def generate_answers(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 16,
                     batch_size: int = 32, progress=None) -> list[str]:
    """Greedy answers for chat prompts (each a list of messages ending before the assistant turn)."""
    return [a["text"] for a in greedy(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size,
                                      progress=progress)]


def answer_loss(model, rows: list[dict], pad_id: int, batch_size: int = 16, progress=None) -> dict:
    """Mean cross-entropy per labelled token over ``rows`` ({input_ids, labels}), and its exp.
    ``progress``: a fastft.progress bar, advanced by the rows of each batch."""
    import torch

    if not rows:
        return {"loss": None, "perplexity": None, "tokens": 0}
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    total, count = 0.0, 0
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            width = max(len(r["input_ids"]) for r in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, r in enumerate(chunk):
                n = len(r["input_ids"])
                ids[j, :n] = torch.tensor(r["input_ids"])
                labels[j, :n] = torch.tensor(r["labels"])
                mask[j, :n] = 1
            n_tok = int((labels[:, 1:] != -100).sum())  # the model shifts labels by one
            if n_tok:
                with torch.no_grad():
                    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
                total += float(out.loss) * n_tok
                count += n_tok
            if progress is not None:
                progress.update(len(chunk))
    finally:
        model.train(was_training)
    if not count:
        return {"loss": None, "perplexity": None, "tokens": 0}
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}


# --- the evaluation ----------------------------------------------------------------------------

@dataclass
class EvalSet:
    """Prompts with references (for generation) and tokenized rows (for loss)."""

    name: str  # where it came from, for messages and eval.json
    pairs: list[tuple[list[dict], str]]
    slices: list[str | None]
    rows: list[dict]  # {"input_ids", "labels"}


def eval_set_from_bundle(bundle, source: str) -> EvalSet:
    rows = [] if bundle.eval is None else [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in bundle.eval]
    slices = bundle.eval_slices or [None] * len(bundle.eval_pairs)
    return EvalSet(source, list(bundle.eval_pairs), list(slices), rows)


def eval_set_from_file(path: str, tokenizer, fmt: str | None, max_len: int, text_field: str = "text") -> EvalSet:
    """Rows of a .jsonl/.json/.csv/.parquet file in ``fmt`` (alpaca | messages; None: each row's own
    shape), kept with their ``slice`` column. Bad rows stop with the file and row."""
    from . import data

    raw = data.read_rows(path)
    if not raw:
        raise data.DataError(f"{path}: no rows")
    pairs, slices, rows = [], [], []
    for i, r in enumerate(raw, 1):
        where = f"{path} row {i}"
        if fmt is None and "prompt" in r and "completion" in r:
            t, pair = _completion_row(r, tokenizer, where)
            rows.append({k: v[:max_len] for k, v in t.items()})
            pairs.append(pair)
            slices.append(None if r.get("slice") is None else str(r["slice"]))
            continue
        f = fmt or ("messages" if "messages" in r else "alpaca")
        ex = data.to_messages(r, f, where, text_field)
        if not isinstance(ex, list) or ex[-1]["role"] != "assistant":
            raise data.DataError(f"{where}: the last message must be the assistant's reference answer")
        t = data.tokenize(ex, tokenizer, True, where)
        rows.append({k: v[:max_len] for k, v in t.items()})
        pairs.append((ex[:-1], ex[-1]["content"]))
        slices.append(None if r.get("slice") is None else str(r["slice"]))
    return EvalSet(path, pairs, slices, rows)


def _completion_row(r: dict, tokenizer, where: str) -> tuple[dict, tuple[list[dict], str]]:
    """A text-continuation row (``prompt``, ``completion``; how a base model is asked): its loss
    row (labels on the completion's tokens) and its (prompt, reference) pair."""
    from . import data
    from .data.formats import COMPLETION
    from .generate import completion_ids

    prompt, completion = r["prompt"], r["completion"]
    if not isinstance(prompt, str) or not isinstance(completion, str) or not prompt.strip() or not completion.strip():
        raise data.DataError(f"{where}: 'prompt' and 'completion' must be non-empty text")
    p = completion_ids(tokenizer, prompt)
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    row = {"input_ids": p + c, "labels": [data.IGNORE] * len(p) + c}
    return row, ([{"role": COMPLETION, "content": prompt}], completion.strip())


def _both(model, fn):
    """(adapter result, base result): ``fn(model)`` with the adapter on, then switched off."""
    adapter = fn(model)
    with model.disable_adapter():
        base = fn(model)
    return adapter, base


def compare(model, tokenizer, task: EvalSet | None, cfg, regression: EvalSet | None = None, log=print,
            loss_batch_size: int | None = None) -> dict:
    """Base vs adapter on the held-out set and the regression set; ``cfg`` is recipe.eval. Loss
    batches hold ``loss_batch_size`` rows (default cfg.batch_size): full rows, not just prompts."""
    result: dict = {"schema_version": SCHEMA_VERSION, "metric": cfg.metric, "json_fields": cfg.json_fields,
                    "task": None, "regression": None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def gen(pairs, what: str):
        """(adapter answers, base answers), with a progress bar over both passes."""
        with progress(total=2 * len(pairs), desc=f"eval: {what} answers (adapter, then base)",
                      unit="prompts") as bar:
            return _both(model, lambda m: generate_answers(m, tokenizer, [p for p, _ in pairs], cfg.max_new_tokens,
                                                           cfg.batch_size, progress=bar))

    def loss(rows, what: str):
        with progress(total=2 * len(rows), desc=f"eval: {what} loss (adapter, then base)", unit="rows") as bar:
            return _both(model, lambda m: answer_loss(m, rows, pad, loss_batch_size or cfg.batch_size, progress=bar))

    t0 = time.perf_counter()
    if task is not None and (task.pairs or task.rows):
        n = len(task.pairs) if cfg.max_examples is None else min(cfg.max_examples, len(task.pairs))
        pairs, slices = task.pairs[:n], task.slices[:n]
        log(f"fastft: eval: {n} held-out prompts ({task.name}), base and adapter, greedy, "
            f"up to {cfg.max_new_tokens} new tokens")
        ans_a, ans_b = gen(pairs, "held-out") if pairs else ([], [])
        loss_a, loss_b = loss(task.rows, "held-out")
        refs = [r for _, r in pairs]
        bad = [i + 1 for i, r in enumerate(refs) if cfg.metric == "json_match" and not parse_json(r)[0]]
        if bad:
            log(f"fastft: eval: warning: {len(bad)} held-out references are not JSON (eval pairs {bad[:5]}), "
                "so they count as misses; fix those rows or use eval.metric exact_match / contains")
        sa = task_scores(ans_a, refs, slices, cfg.metric, cfg.json_fields)
        sb = task_scores(ans_b, refs, slices, cfg.metric, cfg.json_fields)
        side = {}
        for name, s, lo in (("adapter", sa, loss_a), ("base", sb, loss_b)):
            side[name] = {cfg.metric: s[cfg.metric], "loss": lo["loss"], "perplexity": lo["perplexity"],
                          "slices": s["slices"]}
        gain = (sa[cfg.metric] - sb[cfg.metric]) if n else None
        result["task"] = {
            "source": task.name, "n": n, "loss_tokens": loss_a["tokens"], **side, "gain": gain,
            "references_not_json": len(bad),
            "examples": [{"prompt": p[-1]["content"], "reference": r, "base": b.strip(), "adapter": a.strip(),
                          "slice": s} for (p, r), a, b, s in list(zip(pairs, ans_a, ans_b, slices))[:8]],
        }
    if regression is not None and regression.pairs:
        rm = cfg.regression_metric
        log(f"fastft: eval: regression set {regression.name}: {len(regression.pairs)} general prompts, "
            "base and adapter")
        ans_a, ans_b = gen(regression.pairs, "regression")
        loss_a, loss_b = loss(regression.rows, "regression")
        refs = [r for _, r in regression.pairs]
        ha = task_scores(ans_a, refs, None, rm, cfg.json_fields)["hits"]
        hb = task_scores(ans_b, refs, None, rm, cfg.json_fields)["hits"]
        base_right = [i for i, h in enumerate(hb) if h]
        lost = [i for i in base_right if not ha[i]]
        delta = (loss_a["loss"] - loss_b["loss"]) if loss_a["loss"] is not None else None
        result["regression"] = {
            "source": regression.name, "n": len(refs), "metric": rm,
            "base": {"accuracy": sum(hb) / len(hb), "loss": loss_b["loss"]},
            "adapter": {"accuracy": sum(ha) / len(ha), "loss": loss_a["loss"]},
            "forgotten": (len(lost) / len(base_right)) if base_right else None,
            "forgotten_count": len(lost), "base_correct": len(base_right), "loss_delta": delta,
            "forgotten_items": [{"prompt": regression.pairs[i][0][-1]["content"], "reference": refs[i],
                                 "base": ans_b[i].strip(), "adapter": ans_a[i].strip()} for i in lost[:10]],
        }
    result["seconds"] = time.perf_counter() - t0
    return result


def evaluate(model, tokenizer, recipe, task: EvalSet | None, regression_path: str | None = None,
             log=print) -> dict:
    """``compare`` plus the recipe's gates: the document written to eval.json."""
    cfg = recipe.eval
    regression = None
    path = regression_path or cfg.regression  # both resolved already (recipe load / evaluate_run)
    if path:
        regression = eval_set_from_file(path, tokenizer, None, recipe.model.max_seq_length)
    # loss rows are whole training rows: batch them as training's held-out evaluation does
    loss_batch = recipe.train.eval_batch_size or max(recipe.train.batch_size, 8)
    result = compare(model, tokenizer, task, cfg, regression, log, loss_batch_size=loss_batch)
    if cfg.gates:
        result["gates"] = check_gates(cfg.gates, result, cfg)
    return result


def after_training(model, tokenizer, recipe, bundle, out_dir: Path, log=print) -> dict:
    """The end-of-training evaluation (``eval.after_training``): writes eval.json and returns the
    keys for fastft.json: ``eval`` (the summary), and with gates ``status`` and ``gates``."""
    if not recipe.eval.after_training:
        return {}
    if bundle.eval is None and not bundle.eval_pairs and not recipe.eval.regression:
        if recipe.eval.gates:
            log("fastft: eval: no held-out data and no regression set: every gate is unmeasured")
        else:
            return {}
    result = evaluate(model, tokenizer, recipe, eval_set_from_bundle(bundle, "held-out split"), log=log)
    write_eval(out_dir, result)
    log(format_table(result, str(out_dir)))
    return run_info_keys(result)


def run_info_keys(result: dict) -> dict:
    """What fastft.json records of an evaluation: the numbers (no examples), gates and status."""
    summary = json.loads(json.dumps(result))
    for section in ("task", "regression"):
        if summary.get(section):
            summary[section].pop("examples", None)
            summary[section].pop("forgotten_items", None)
    gates = summary.pop("gates", None)
    out: dict = {"eval": summary}
    if gates is not None:
        out["gates"] = gates
        out["status"] = "accepted" if gates["passed"] else "rejected"
    return out


def write_eval(out_dir: Path, result: dict) -> Path:
    from .files import atomic_write_text

    path = Path(out_dir) / EVAL_FILE
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return path


# --- a finished run (fastft eval) -------------------------------------------------------------

def evaluate_run(model, tokenizer, r, run_dir: str | Path, data_file: str | None = None,
                 regression: str | None = None, log=print) -> dict:
    """``fastft eval``'s evaluation of a loaded run (``r``: its recipe): its held-out set (or
    ``data_file``), the regression set, gates; writes eval.json and returns the result."""
    task = run_eval_set(r, tokenizer, data_file, log)
    result = evaluate(model, tokenizer, r, task, r.resolve_path(regression) if regression else None, log)
    result["run_dir"] = str(run_dir)
    write_eval(Path(run_dir), result)
    return result


def run_eval_set(r, tokenizer, data_file: str | None = None, log=print) -> EvalSet:
    """The held-out set a run is scored on: ``data_file``, else its recipe's held-out split, rebuilt."""
    from . import data

    if r.train.method != "sft":  # dpo / orpo / grpo: the held-out rows the run evaluated at its end
        return _method_eval_set(r, tokenizer, data_file, log)
    if data_file:
        return eval_set_from_file(data_file, tokenizer, r.data.format if r.data.format != "text" else None,
                                  r.model.max_seq_length, r.data.text_field)
    try:
        bundle = data.build(r.data, tokenizer, seed=r.train.seed, max_length=r.model.max_seq_length,
                            log=lambda m: log(f"fastft: {m}"))
    except data.DataError as e:
        raise data.DataError(f"{e}\n(fastft eval rebuilds the run's held-out split from its recipe's data; "
                             "give the held-out file with --data FILE)") from None
    return eval_set_from_bundle(bundle, "held-out split of " + (r.data.eval or r.data.train))


def _method_eval_set(r, tokenizer, data_file: str | None, log) -> EvalSet:
    """A dpo / orpo / grpo run's held-out set, built as its training built it (fastft.data.preference):
    its prompts with the chosen answer (preference rows) or the reference (alpaca / messages rows)."""
    from . import data
    from .data import preference

    if data_file:
        return eval_set_from_bundle(preference.eval_file(r, tokenizer, data_file), data_file)
    try:
        bundle = preference.build(r, tokenizer, log=lambda m: log(f"fastft: {m}")).held_out
    except data.DataError as e:
        raise data.DataError(f"{e}\n(fastft eval rebuilds the {r.train.method} run's held-out rows from its "
                             "recipe's data; give the held-out file with --data FILE)") from None
    if not bundle.eval_pairs:
        log(f"fastft: eval: the {r.train.method} run held out no rows (data.eval unset, data.eval_fraction 0); "
            "give a held-out file with --data FILE (preference, alpaca or messages rows)")
    return eval_set_from_bundle(bundle, "held-out rows of " + (r.data.eval or r.data.train))
