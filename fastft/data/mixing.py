"""``data.mix``: general data mixed into the training split at a share of the final training set.

    mix_counts(500, [0.15])     # [88]: 88 of 588 examples = 15.0%
"""
from __future__ import annotations

import random


def mix_counts(n_task: int, fractions: list[float]) -> list[int]:
    """Rows to take from each ``data.mix`` source. A fraction is a share of the *final* training set
    (task examples + every mixed row), not of data.train: with T task examples and fractions f_i the
    final set has N = T / (1 - sum f) examples, and source i gives round(f_i * N) of them. So
    ``fraction: 0.15`` over 500 task examples adds 88 general rows: 88 of 588 = 15.0%. Only the
    training split is mixed; held-out data is never touched."""
    rest = 1.0 - sum(fractions)
    if not fractions or rest <= 0 or any(not 0 < f < 1 for f in fractions):
        raise ValueError(f"mix fractions must each be in (0, 1) and sum below 1, got {fractions}")
    return [round(f * n_task / rest) for f in fractions]


def mix(d, seed: int, train_examples: list, load) -> tuple[list, list, dict]:
    """Mix the ``d.mix`` sources (``d``: a recipe's data section, each entry's ``path`` resolved) into
    the training examples (``load(src, what, None, fmt)`` reads one source as examples). Rows are drawn
    without replacement from each source, in an order shuffled by ``seed`` (a source smaller than its
    count is repeated, reshuffled each pass); the result is shuffled by the same seed, so one seed
    always gives the same training set and another seed a different one. Returns (training examples,
    the mixed rows, one stats entry per source)."""
    counts = mix_counts(len(train_examples), [float(e["fraction"]) for e in d.mix])
    mixed, stats = [], []
    for i, (entry, n) in enumerate(zip(d.mix, counts)):
        src = entry["path"]
        fmt = entry.get("format") or ("alpaca" if entry.get("name") is not None else d.format)
        rows = load(src, f"data.mix[{i}]", None, fmt)
        rng = random.Random(f"fastft-mix:{seed}:{i}")
        picked: list = []
        while len(picked) < n:
            order = list(range(len(rows)))
            rng.shuffle(order)
            picked += [rows[j] for j in order[: n - len(picked)]]
        mixed += picked
        stats.append({"source": entry.get("name") or entry["path"], "path": src, "format": fmt,
                      "fraction": float(entry["fraction"]), "rows": n, "available": len(rows),
                      "repeated": n > len(rows)})
    out = list(train_examples) + mixed
    random.Random(f"fastft-mix:{seed}:order").shuffle(out)
    for s in stats:
        s["share"] = s["rows"] / len(out)
    stats_all = {"task_examples": len(train_examples), "train_examples": len(out), "sources": stats}
    return out, mixed, stats_all


def describe(mix_stats: dict) -> str:
    """The log line for a mix: each source's rows and share next to the share asked for."""
    return (f"data: mixed into training: {mix_stats['task_examples']} task examples + "
            + " + ".join(f"{m['rows']} from {m['source']} ({100 * m['share']:.1f}%, asked {100 * m['fraction']:g}%"
                         + (f"; its {m['available']} rows repeat" if m["repeated"] else "") + ")"
                         for m in mix_stats["sources"])
            + f" = {mix_stats['train_examples']} examples")
