"""Datasets: rows from a file or the hub -> chat messages -> token ids with loss labels.

    from fastft import data
    bundle = data.build(recipe.data, tokenizer, seed=recipe.train.seed, max_length=recipe.model.max_seq_length)
    bundle.train[0]   # {"input_ids": [...], "labels": [... -100 on prompt tokens ...]}

Formats (``data.format``):
- ``alpaca``: columns ``instruction``, ``output`` and optional ``input``; becomes one user turn
  (instruction, a blank line, input) and one assistant turn (output).
- ``messages``: a ``messages`` column holding a list of ``{role, content}`` with roles system / user
  / assistant and at least one assistant turn.
- ``sharegpt``: a ``conversations`` column holding a list of ``{from, value}`` with ``from`` human /
  gpt / system (user / assistant are accepted too); becomes the same turns as ``messages``.
- ``text``: one ``text_field`` column, trained on every token.
- ``preference`` (dpo, orpo) and grpo's prompts with references: ``fastft.data.preference``.

The tokenizer's chat template renders the turns. With ``train_on_responses_only`` only the tokens of
assistant turns (their content and the end-of-turn token that follows) carry labels; everything
else is -100. Packing is done by TRL's best-fit packer, which restarts position ids per example so
packed examples do not attend to each other.

``build`` is the fast path (streaming reads, batched tokenization across processes: ``batched``,
``encode``, ``template``, ``rows``; an on-disk cache: ``cache``); ``build_reference`` is the
per-example method (``per_example``), kept as the reference the fast path is tested against and as
its fallback. Both read with ``sources``, turn rows into messages with ``formats`` and split with
``split`` and ``mixing``. Importing this package loads none of datasets, pyarrow or transformers.
"""
from __future__ import annotations

from .bundle import IGNORE, DataBundle, DataError
from .formats import to_messages
from .mixing import mix, mix_counts
from .per_example import build_reference, content_hash, tokenize
from .sources import read_rows

__all__ = ["IGNORE", "DataBundle", "DataError", "build", "build_reference", "content_hash", "mix", "mix_counts",
           "prepare", "read_rows", "to_messages", "tokenize"]


def build(d, tokenizer, *, seed: int, max_length: int, log=print) -> DataBundle:
    """Read, validate, split and tokenize a recipe's data section ``d`` (its paths already resolved
    by ``fastft.recipe``); ``seed`` (train.seed) orders the held-out split and the mix, and
    ``max_length`` (model.max_seq_length) truncates each example. The result is cached under
    ``$FASTFT_CACHE/data/`` and loaded from there by the next call with the same data, tokenizer,
    seed and max_length; it is the same, token for token, as ``build_reference``'s."""
    import resource
    import time

    from ..files import building, cache_dir
    from . import batched, cache

    t0 = time.perf_counter()
    key, doc = cache.cache_key(d, tokenizer, seed, max_length)
    entry = cache_dir() / "data" / key
    with cache.locked(entry, log):
        bundle = cache.load(entry, log)
        hit = bundle is not None
        if not hit:
            with building(entry, prefix=f".{key}.", suffix=".tmp") as tmp:
                meta = batched.build_into(tmp, d, tokenizer, seed, max_length, log, key)
                meta["key"] = doc
                meta["info"]["build_seconds"] = round(time.perf_counter() - t0, 3)
                cache.write_meta(tmp, meta)
            bundle, _ = cache.read_entry(entry)
    ru = resource.getrusage
    bundle.info.update(seconds=round(time.perf_counter() - t0, 3), cache={"path": str(entry), "hit": hit},
                       peak_rss_gb=round(ru(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
                       worker_peak_rss_gb=round(ru(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 3))
    return bundle


def prepare(d, tokenizer, *, seed: int, max_length: int, log=print, started: float | None = None) -> dict:
    """``fastft data``: ``build`` (or load) the data and report it as a dict; ``seconds`` counts from
    ``started`` (a ``time.perf_counter()`` reading; the CLI's is from before it loaded the tokenizer)."""
    import time

    t0 = time.perf_counter() if started is None else started
    b = build(d, tokenizer, seed=seed, max_length=max_length, log=log)
    eval_tokens = sum(len(x) for x in b.eval.data.column("input_ids").to_pylist()) if b.eval is not None else 0
    return {"rows": b.info.get("rows"), "train_examples": b.stats["train_examples"],
            "eval_examples": b.stats["eval_examples"], "tokens": b.stats["train_tokens"] + eval_tokens,
            "train_tokens": b.stats["train_tokens"], "train_label_tokens": b.stats["train_label_tokens"],
            "skipped_rows": b.stats["skipped_rows"], "data_hash": b.data_hash,
            "seconds": round(time.perf_counter() - t0, 3), "build_seconds": b.info.get("build_seconds"),
            "peak_rss_gb": b.info["peak_rss_gb"], "worker_peak_rss_gb": b.info["worker_peak_rss_gb"],
            "num_proc": b.info.get("num_proc"), "tokenizer_path": b.info.get("tokenizer_path"),
            "per_example_rows": b.info.get("per_example_rows"), "cache": b.info["cache"]}
