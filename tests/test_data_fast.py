"""fastft.data.build (batched, cached: fastft.data.batched) against fastft.data.build_reference (one
example at a time): the same input_ids and labels, token for token, the same split and data hash."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from support import tiny_recipe_dict

from fastft import data, recipe
from fastft.data import cache, encode, rows as data_rows, split, template

CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
          "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    """A byte-level BPE (SmolLM2's pre-tokenizer: single digits, then byte-level) trained on the
    fly, with a ChatML template that adds a default system prompt: token boundaries that fall
    inside words and whitespace, unlike the tiny model's word-level tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_text(random.Random(i)) for i in range(400)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML
    path = tmp_path_factory.mktemp("bpe")
    fast.save_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


WORDS = ["the", "order", "of", "red", "blue", "apple", "Straße", "naïve", "café", "東京", "日本語", "emoji", "🙂",
         "12345", "x2", "don't", "it's", "well-known", "(maybe)", "[list]", "{json:", "1}", "—", "ok?", "yes!",
         "\t", "tab"]


def _text(rng: random.Random, n: int | None = None) -> str:
    n = n or rng.randint(3, 30)
    parts = []
    for _ in range(n):
        w = rng.choice(WORDS)
        parts.append(w + rng.choice([" ", " ", " ", "  ", "\n", ", ", ".\n\n", ""]))
    return "".join(parts)


def multi_turn_rows(n: int, seed: int = 0) -> list[dict]:
    """Generated chats: optional system prompt, 1-4 assistant turns, non-ASCII, leading spaces, and
    some rows much longer than max_seq_length."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        msgs = [{"role": "system", "content": _text(rng, 6)}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 4)):
            msgs.append({"role": "user", "content": _text(rng)})
            reply = _text(rng, 200 if rng.random() < 0.1 else None)
            msgs.append({"role": "assistant", "content": (" " if rng.random() < 0.2 else "") + reply})
        rows.append({"messages": msgs})
    return rows


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _same(fast, ref):
    """Token for token: both splits, the eval pairs and slices, the data hash and the stats."""
    assert fast.data_hash == ref.data_hash
    assert fast.stats == ref.stats
    assert fast.train["input_ids"][:] == ref.train["input_ids"][:]
    assert fast.train["labels"][:] == ref.train["labels"][:]
    assert (fast.eval is None) == (ref.eval is None)
    if ref.eval is not None:
        assert fast.eval["input_ids"][:] == ref.eval["input_ids"][:]
        assert fast.eval["labels"][:] == ref.eval["labels"][:]
    assert fast.eval_pairs == ref.eval_pairs
    assert fast.eval_slices == ref.eval_slices


def _both(r, tok, logs=None):
    kw = {"seed": r.train.seed, "max_length": r.model.max_seq_length}
    fast = data.build(r.data, tok, log=(logs.append if logs is not None else lambda m: None), **kw)
    ref = data.build_reference(r.data, tok, log=lambda m: None, **kw)
    return fast, ref


@pytest.mark.parametrize("data_keys", [
    {"train": "asset:data/word-categories.jsonl", "eval_fraction": 0.1, "max_examples": 400},
    {"train": "asset:data/order-extraction.jsonl", "eval": "asset:data/order-extraction-eval.jsonl",
     "eval_fraction": 0.05},
    {"train": "asset:data/word-categories.jsonl", "mix": [{"name": "general", "fraction": 0.15}],
     "max_examples": 300},
    {"train": "asset:data/general-instructions.jsonl", "train_on_responses_only": False, "num_proc": 1},
])
def test_shipped_sets_same_as_reference(tmp_path, tokenizer, data_keys):
    r = recipe.from_dict(tiny_recipe_dict(tmp_path / "o", data=data_keys, model={"max_seq_length": 48}))
    fast, ref = _both(r, tokenizer)
    _same(fast, ref)
    assert fast.info["tokenizer_path"] == "batched" and fast.info["per_example_rows"] == 0


@pytest.mark.parametrize("num_proc", [1, 2])
def test_multi_turn_bpe_same_as_reference(tmp_path, bpe_tokenizer, num_proc):
    src = _jsonl(tmp_path / "chats.jsonl", multi_turn_rows(300))
    r = recipe.from_dict(tiny_recipe_dict(tmp_path / "o", model={"max_seq_length": 160},
                                          data={"train": str(src), "format": "messages", "max_examples": None,
                                                "eval_fraction": 0.1, "num_proc": num_proc}))
    logs = []
    fast, ref = _both(r, bpe_tokenizer, logs)
    _same(fast, ref)
    assert any("were truncated" in m for m in logs)  # rows longer than max_seq_length are in the set
    assert fast.info["tokenizer_path"] == "batched"
    # leading-space replies start inside a byte-level token: those rows (and only rare others) take
    # the per-example method; most go through the batch
    assert 0 < fast.info["per_example_rows"] < 0.5 * fast.info["rows"]


def test_sharegpt_and_text_same_as_reference(tmp_path, bpe_tokenizer):
    rows = [{"conversations": [{"from": "human" if m["role"] == "user" else "gpt" if m["role"] == "assistant"
                                else "system", "value": m["content"]} for m in r["messages"]]}
            for r in multi_turn_rows(60, seed=1)]
    for fmt, src in [("sharegpt", _jsonl(tmp_path / "s.jsonl", rows)),
                     ("text", _jsonl(tmp_path / "t.jsonl", [{"text": _text(random.Random(i))} for i in range(60)]))]:
        r = recipe.from_dict(tiny_recipe_dict(tmp_path / "o", model={"max_seq_length": 128},
                                              data={"train": str(src), "format": fmt, "max_examples": None,
                                                    "train_on_responses_only": fmt != "text"}))
        _same(*_both(r, bpe_tokenizer))


def test_sharegpt_rows():
    ex = data.to_messages({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                                             {"from": "gpt", "value": "a"}]}, "sharegpt", "f row 1")
    assert ex == [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                  {"role": "assistant", "content": "a"}]
    with pytest.raises(data.DataError, match=r"f row 1: conversations\[0\] has from 'bot'; allowed: human, gpt"):
        data.to_messages({"conversations": [{"from": "bot", "value": "x"}]}, "sharegpt", "f row 1")
    with pytest.raises(data.DataError, match="missing column 'conversations'"):
        data.to_messages({"messages": []}, "sharegpt", "f row 1")


def test_template_the_batch_cannot_match_falls_back_per_example(tmp_path, bpe_tokenizer):
    """A template that glues the reply onto the generation prompt ("...Bot:" + "Paris") puts the span
    start inside a token; such rows go one at a time, and the result is still the reference's."""
    tok = bpe_tokenizer
    old = tok.chat_template
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}<|im_end|>{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    try:
        src = _jsonl(tmp_path / "c.jsonl", multi_turn_rows(80, seed=2))
        r = recipe.from_dict(tiny_recipe_dict(tmp_path / "o", model={"max_seq_length": 256},
                                              data={"train": str(src), "format": "messages", "max_examples": None}))
        fast, ref = _both(r, tok)
        _same(fast, ref)
        assert fast.info["per_example_rows"] > 0
    finally:
        tok.chat_template = old


CONTENT_TEMPLATES = {
    # renders every content as it is: each conversation shape is rendered once, with placeholders
    "verbatim": CHATML,
    # trims contents (as Llama 3's template does): rows with surrounding spaces fail the shape check
    "trim": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    # branches on a content: a placeholder never takes the branch, the rows that do fail the check
    "branch": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'].startswith('the') %}[the] "
               "{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
               "{% endif %}"),
}


@pytest.mark.parametrize("name", list(CONTENT_TEMPLATES))
def test_spans_by_shape_or_rendered_same_as_reference(tmp_path, bpe_tokenizer, monkeypatch, name):
    """Spans come from one rendering per conversation shape where the template puts contents in
    verbatim, from real prefix renderings where it does not; both give the reference's tokens."""
    tok = bpe_tokenizer
    old = tok.chat_template
    tok.chat_template = CONTENT_TEMPLATES[name]
    calls = []
    real = template.spans_rendered
    monkeypatch.setattr(template, "spans_rendered", lambda ex, full: calls.append(1) or real(ex, full))
    try:
        src = _jsonl(tmp_path / "c.jsonl", multi_turn_rows(120, seed=3))
        r = recipe.from_dict(tiny_recipe_dict(tmp_path / "o", model={"max_seq_length": 256},
                                              data={"train": str(src), "format": "messages", "max_examples": None,
                                                    "num_proc": 1}))
        fast, ref = _both(r, tok)
        _same(fast, ref)
        assert fast.info["tokenizer_path"] == "batched"
        if name == "verbatim":
            assert not calls  # every row through its shape
        else:  # the rows the shape cannot describe (nearly every row has a content ending in a space)
            assert calls and (name == "trim" or len(calls) < fast.info["rows"])
    finally:
        tok.chat_template = old


def test_template_check_failure_uses_the_per_example_method(tmp_path, tokenizer, monkeypatch):
    real = encode.encode_fast

    def wrong(exs):  # a batched path that mislabels: the probe check must catch it
        out = real(exs)
        return [None if o is None else (o[0], [data.IGNORE] * len(o[1])) for o in out]

    monkeypatch.setattr(encode, "encode_fast", wrong)
    r = recipe.from_dict(tiny_recipe_dict(tmp_path / "o", data={"num_proc": 1}))
    logs = []
    fast, ref = _both(r, tokenizer, logs)
    _same(fast, ref)
    assert fast.info["tokenizer_path"] == "per-example"
    assert any("tokenizing one example at a time" in m and "probe conversation" in m for m in logs)


def test_cache_hit_damage_and_invalidation(tmp_path, tokenizer):
    import datasets

    src = _jsonl(tmp_path / "d.jsonl", [{"instruction": f"classify red , blue {i}", "output": "color"}
                                        for i in range(50)])
    r = recipe.from_dict(tiny_recipe_dict(tmp_path / "o", data={"train": str(src), "max_examples": None}))
    kw = {"seed": r.train.seed, "max_length": r.model.max_seq_length}
    logs: list[str] = []
    a = data.build(r.data, tokenizer, log=logs.append, **kw)
    assert a.info["cache"]["hit"] is False
    b = data.build(r.data, tokenizer, log=logs.append, **kw)
    assert b.info["cache"] == {"path": a.info["cache"]["path"], "hit": True}
    _same(b, a)
    entry = Path(a.info["cache"]["path"])
    train = datasets.load_from_disk(str(entry / "train"))
    assert train.column_names == ["input_ids", "labels"] and len(train) == a.stats["train_examples"]
    want = (a.train["input_ids"][:], a.train["labels"][:], a.data_hash)
    # a damaged entry (a truncated Arrow file) is detected and rebuilt, never loaded
    arrow = next((entry / "train").glob("*.arrow"))
    arrow.unlink()  # (not rewritten in place: `a` still maps it)
    arrow.write_bytes(b"\0" * 100)
    c = data.build(r.data, tokenizer, log=logs.append, **kw)
    assert c.info["cache"]["hit"] is False and any("is damaged" in m for m in logs)
    assert (c.train["input_ids"][:], c.train["labels"][:], c.data_hash) == want
    (entry / cache.MANIFEST).unlink()  # an interrupted build: no manifest
    assert "no manifest" in cache.check_entry(entry)
    assert data.build(r.data, tokenizer, log=logs.append, **kw).info["cache"]["hit"] is False
    # other data, seed or max_length: another entry
    _jsonl(src, [{"instruction": "changed", "output": "color"}] * 50)
    d = data.build(r.data, tokenizer, log=logs.append, **kw)
    assert d.info["cache"]["path"] != a.info["cache"]["path"] and d.data_hash != a.data_hash
    e = data.build(r.data, tokenizer, log=logs.append, seed=kw["seed"] + 1, max_length=kw["max_length"])
    assert e.info["cache"]["path"] != d.info["cache"]["path"]


def test_bad_rows_name_line_and_skip_counts_match(tmp_path, tokenizer):
    src = tmp_path / "bad.jsonl"
    good = json.dumps({"instruction": "classify red", "output": "color"})
    lines = [good, good, '{"instruction": "a", "output": ', good, "", '{"instruction": 5, "output": "x"}', good, good]
    src.write_text("".join(x + "\n" for x in lines))
    r = recipe.from_dict(tiny_recipe_dict(tmp_path / "o", data={"train": str(src), "max_examples": None,
                                                                "eval_fraction": 0.0}))
    with pytest.raises(data.DataError, match=r"bad.jsonl:3: malformed JSON"):
        data.build(r.data, tokenizer, seed=1, max_length=64, log=lambda m: None)
    r.data.skip_bad_rows = True
    fast, ref = _both(r, tokenizer)
    _same(fast, ref)
    assert fast.stats["skipped_rows"] == 2
    r.data.skip_bad_rows = False
    src.write_text(good + "\n" + '{"instruction": 5, "output": "x"}\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl line 2: column 'instruction' must be text"):
        data.build(r.data, tokenizer, seed=1, max_length=64, log=lambda m: None)


def _rows_files(tmp_path, sizes: list[list[int]]) -> tuple[data_rows.RowStore, list]:
    """RowStore over one Arrow stream file per entry of ``sizes`` (each: the lengths of its batches);
    row k holds input_ids [k, k+1, ...] of length 1 + k % 5. Returns it and the rows as lists."""
    import pyarrow as pa

    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("ex", pa.string())])
    rows, k, parts = [], 0, []
    for f, batches in enumerate(sizes):
        path = tmp_path / f"src-{f}.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as w:
            for n in batches:
                ids = [list(range(j, j + 1 + j % 5)) for j in range(k, k + n)]
                labs = [[-100] + x[1:] for x in ids]
                w.write_batch(pa.record_batch([pa.array(ids, pa.list_(pa.int32())), pa.array(labs, pa.list_(pa.int32())),
                                               pa.array([f"row {j}" for j in range(k, k + n)])], schema=schema))
                rows += [(i, l, f"row {j}") for j, i, l in zip(range(k, k + n), ids, labs)]
                k += n
        parts.append(data_rows.RowStore.open(path))
    out = parts[0]
    for p in parts[1:]:
        out = out + p
    assert len(out) == len(rows)
    return out, rows


def test_rows_gather_any_order_and_write_split_loads(tmp_path, monkeypatch):
    """Rows gathered batch by batch in any order (repeats too, as data.mix repeats a small source),
    across files and batch boundaries, and written in chunks smaller than the split, come back from
    datasets.load_from_disk exactly, in order."""
    import datasets
    import numpy as np

    rows, want = _rows_files(tmp_path, [[7, 1, 13], [5], [9, 2]])
    rng = np.random.default_rng(0)
    for idx in ([], [0], [36], list(range(37)), list(range(37))[::-1], sorted(rng.integers(0, 37, 60).tolist()),
                rng.integers(0, 37, 60).tolist(), rng.permutation(37).tolist()):
        got = rows.gather(idx, ["input_ids", "ex"])
        assert got.column_names == ["input_ids", "ex"] and got.column("input_ids").num_chunks <= 1
        assert got.column("input_ids").to_pylist() == [want[i][0] for i in idx]
        assert got.column("ex").to_pylist() == [want[i][2] for i in idx]
        rows.release()  # the pages come back on the next read
    with pytest.raises(IndexError):
        rows.gather([37], ["ex"])
    monkeypatch.setattr(split, "SPLIT_ROWS", 4)
    idx = rng.permutation(37)[:23]
    seen = []
    split.write_split(rows, idx, tmp_path / "train", "0123456789abcdef", seen.append)
    assert seen == [4, 4, 4, 4, 4, 3]
    ds = datasets.load_from_disk(str(tmp_path / "train"))
    assert ds.column_names == ["input_ids", "labels"] and len(ds) == 23
    assert ds["input_ids"][:] == [want[i][0] for i in idx] and ds["labels"][:] == [want[i][1] for i in idx]
    assert ds.features["input_ids"] == datasets.List(datasets.Value("int32"))
    assert json.loads((tmp_path / "train" / "state.json").read_text())["_fingerprint"] == "0123456789abcdef"


def test_cli_data_json(tmp_path, fastft_cache, capsys):
    src = _jsonl(tmp_path / "d.jsonl", [{"instruction": f"classify red , blue {i}", "output": "color"}
                                        for i in range(40)])
    rec = tmp_path / "r.yaml"
    rec.write_text(f"model: {{name: fastft-tiny, max_seq_length: 64}}\ndata: {{train: {src}}}\n"
                   f"output: {{dir: {tmp_path / 'o'}}}\n")
    from fastft import cli, progress

    def run():
        try:
            assert cli.main(["--quiet", "data", str(rec), "--json", "--set", "data.num_proc=1"]) == 0
        finally:
            progress.set_quiet(False)
        return capsys.readouterr().out

    first = json.loads(run().strip().splitlines()[-1])
    for k in ("rows", "train_examples", "eval_examples", "tokens", "seconds", "peak_rss_gb", "cache"):
        assert k in first
    assert (first["rows"], first["train_examples"], first["eval_examples"]) == (40, 38, 2)
    assert first["cache"]["hit"] is False
    second = json.loads(run().strip().splitlines()[-1])
    assert second["cache"] == {"path": first["cache"]["path"], "hit": True}
    import datasets

    train = datasets.load_from_disk(second["cache"]["path"] + "/train")
    assert len(train) == 38 and set(train.column_names) == {"input_ids", "labels"}


RANK_WORKER = '''
import hashlib, json, os, sys
import torch.distributed as dist
from transformers import AutoTokenizer
from fastft import data, recipe

dist.init_process_group("gloo")
r = recipe.from_dict(json.loads(sys.argv[1]))
logs = []
b = data.build(r.data, AutoTokenizer.from_pretrained(sys.argv[2]), seed=r.train.seed,
               max_length=r.model.max_seq_length, log=logs.append)
h = hashlib.sha256(json.dumps([b.train["input_ids"][:], b.train["labels"][:], b.eval["input_ids"][:],
                               b.eval["labels"][:], b.data_hash]).encode()).hexdigest()
got = [None, None]
dist.all_gather_object(got, {"rank": dist.get_rank(), "hit": b.info["cache"]["hit"], "digest": h, "logs": logs})
if dist.get_rank() == 0:
    print("RESULT " + json.dumps(got))
dist.destroy_process_group()
'''


def test_two_ranks_build_once_and_load_the_same(tmp_path, tiny_path, tokenizer):
    """Two processes as torchrun starts them (RANK, LOCAL_RANK, WORLD_SIZE; gloo) build the same
    data into one cache: rank 0 builds it, rank 1 waits for it and loads the same tokens."""
    import hashlib
    import os
    import socket
    import subprocess
    import sys

    d = tiny_recipe_dict(tmp_path / "o", data={"train": "asset:data/word-categories.jsonl", "eval_fraction": 0.1,
                                               "max_examples": 300, "num_proc": 1})
    script = tmp_path / "rank.py"
    script.write_text(RANK_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "FASTFT_CACHE": str(tmp_path / "cache"), "FASTFT_QUIET": "1", "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, str(script), json.dumps(d), str(tiny_path)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**env, "RANK": str(k), "LOCAL_RANK": str(k)}) for k in (1, 0)]  # rank 1 first
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    got = json.loads(next(line for line in outs[1].splitlines() if line.startswith("RESULT "))[7:])
    assert [g["hit"] for g in got] == [False, True]  # exactly one build, by rank 0
    assert got[0]["digest"] == got[1]["digest"]
    assert any("loaded from the cache" in m for m in got[1]["logs"])
    assert len([p for p in (tmp_path / "cache" / "data").iterdir() if p.is_dir()]) == 1
    # and it is the per-example method's data
    r = recipe.from_dict(d)
    ref = data.build_reference(r.data, tokenizer, seed=r.train.seed, max_length=r.model.max_seq_length,
                               log=lambda m: None)
    want = hashlib.sha256(json.dumps([ref.train["input_ids"][:], ref.train["labels"][:], ref.eval["input_ids"][:],
                                      ref.eval["labels"][:], ref.data_hash]).encode()).hexdigest()
    assert got[0]["digest"] == want
