import json

import pytest

from fastft import data, recipe
from fastft.data import IGNORE, DataError


def _recipe(tmp_path, train, **data_kw):
    return recipe.from_dict({"model": {"name": "fastft-tiny", "max_seq_length": 64},
                             "data": {"train": str(train), **data_kw}, "output": {"dir": str(tmp_path / "o")}})


def _build(r, tokenizer, log):
    return data.build(r.data, tokenizer, seed=r.train.seed, max_length=r.model.max_seq_length, log=log)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _trained(tok, ids, labels):
    """The text of the tokens that carry a label, and a check that labels copy their input ids."""
    assert len(ids) == len(labels)
    for i, l in zip(ids, labels):
        assert l == IGNORE or l == i
    return tok.convert_ids_to_tokens([i for i, l in zip(ids, labels) if l != IGNORE])


def test_alpaca_masks_prompt_token_by_token(tokenizer):
    ex = data.to_messages({"instruction": "Classify : red , blue .", "input": "", "output": "color"}, "alpaca", "r1")
    t = data.tokenize(ex, tokenizer, responses_only=True)
    toks = tokenizer.convert_ids_to_tokens(t["input_ids"])
    assert toks == ["<s>", "<|user|>", "classify", ":", "red", ",", "blue", ".", "<|end|>", "<|assistant|>",
                    "color", "<|end|>"]
    assert t["labels"] == [IGNORE] * 10 + t["input_ids"][10:]


def test_alpaca_input_joins_instruction(tokenizer):
    ex = data.to_messages({"instruction": "Classify the words.", "input": "red , blue", "output": "color"},
                          "alpaca", "r1")
    assert ex[0]["content"] == "Classify the words.\n\nred , blue"


def test_messages_multi_turn_only_assistant_tokens_trained(tokenizer):
    ex = data.to_messages({"messages": [
        {"role": "system", "content": "answer with one word"},
        {"role": "user", "content": "classify red"},
        {"role": "assistant", "content": "color"},
        {"role": "user", "content": "and mango ?"},
        {"role": "assistant", "content": "fruit"},
    ]}, "messages", "r1")
    t = data.tokenize(ex, tokenizer, responses_only=True)
    assert _trained(tokenizer, t["input_ids"], t["labels"]) == ["color", "<|end|>", "fruit", "<|end|>"]


def test_without_response_masking_every_token_is_trained(tokenizer):
    ex = data.to_messages({"instruction": "hi", "output": "hello"}, "alpaca", "r1")
    t = data.tokenize(ex, tokenizer, responses_only=False)
    assert t["labels"] == t["input_ids"]


def test_text_format_adds_bos_and_eos(tokenizer):
    t = data.tokenize("hello , the answer is yes", tokenizer, responses_only=False)
    toks = tokenizer.convert_ids_to_tokens(t["input_ids"])
    assert toks[0] == "<s>" and toks[-1] == "<|end|>" and t["labels"] == t["input_ids"]


@pytest.mark.parametrize("row, fmt, expected", [
    ({"instruction": "x"}, "alpaca", "row 3: missing column 'output' (format alpaca needs instruction, output"),
    ({"prompt": "x", "output": "y"}, "alpaca", "missing column 'instruction'"),
    ({"instruction": "x", "output": "  "}, "alpaca", "empty 'output'"),
    ({"instruction": 5, "output": "y"}, "alpaca", "column 'instruction' must be text, got int"),
    ({"conversation": []}, "messages", "missing column 'messages'"),
    ({"messages": []}, "messages", "'messages' must be a non-empty list"),
    ({"messages": [{"role": "human", "content": "hi"}]}, "messages",
     "messages[0] has role 'human'; allowed roles: system, user, assistant"),
    ({"messages": [{"role": "user"}]}, "messages", "messages[0] must be an object with 'role' and 'content'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant message"),
    ({"body": "x"}, "text", "missing text column 'text' (data.text_field; found body)"),
])
def test_bad_rows_name_row_and_column(row, fmt, expected):
    with pytest.raises(DataError) as e:
        data.to_messages(row, fmt, "f.jsonl row 3")
    assert expected in str(e.value)


def test_file_errors(tmp_path, tokenizer):
    with pytest.raises(DataError, match="data file not found: .*missing.jsonl"):
        data.read_rows(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        data.read_rows(str(bad))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"instruction": "caf\xe9", "output": "b"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        data.read_rows(str(latin))
    empty = _jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match="no rows"):
        _build(_recipe(tmp_path, empty), tokenizer, log=lambda m: None)
    other = tmp_path / "x.txt"
    other.write_text("hi")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        data.read_rows(str(other))


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_local_file_types(tmp_path, suffix):
    import pandas as pd

    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(5)]
    path = tmp_path / f"d.{suffix}"
    df = pd.DataFrame(rows)
    {"jsonl": lambda: _jsonl(path, rows), "json": lambda: path.write_text(json.dumps(rows)),
     "csv": lambda: df.to_csv(path, index=False), "parquet": lambda: df.to_parquet(path)}[suffix]()
    got = data.read_rows(str(path))
    assert [r["instruction"] for r in got] == [r["instruction"] for r in rows]


def test_build_splits_hashes_and_truncates(tmp_path, tokenizer):
    rows = [{"instruction": f"classify red , blue {i}", "output": "color"} for i in range(40)]
    src = _jsonl(tmp_path / "d.jsonl", rows)
    b = _build(_recipe(tmp_path, src, eval_fraction=0.25), tokenizer, log=lambda m: None)
    assert (len(b.train), len(b.eval)) == (30, 10)
    assert len(b.eval_pairs) == 10 and b.eval_pairs[0][1] == "color"
    b2 = _build(_recipe(tmp_path, src, eval_fraction=0.25), tokenizer, log=lambda m: None)
    assert b.data_hash == b2.data_hash and b.data_hash.startswith("sha256:")
    _jsonl(src, rows[:-1] + [{"instruction": "changed", "output": "color"}])
    b3 = _build(_recipe(tmp_path, src, eval_fraction=0.25), tokenizer, log=lambda m: None)
    assert b3.data_hash != b.data_hash
    # a separate eval file wins over the fraction
    ev = _jsonl(tmp_path / "e.jsonl", rows[:3])
    b4 = _build(_recipe(tmp_path, src, eval=str(ev)), tokenizer, log=lambda m: None)
    assert (len(b4.train), len(b4.eval)) == (40, 3)


def test_prompt_longer_than_max_len_is_skipped_with_a_count(tmp_path, tokenizer):
    long_prompt = " ".join(["red"] * 100)
    src = _jsonl(tmp_path / "d.jsonl", [{"instruction": long_prompt, "output": "color"},
                                         {"instruction": "classify red", "output": "color"}])
    logs = []
    b = _build(_recipe(tmp_path, src, eval_fraction=0.0), tokenizer, log=logs.append)
    assert len(b.train) == 1
    assert any("1 train examples longer than model.max_seq_length=64 were truncated" in m for m in logs)
    assert any("no response tokens left" in m for m in logs)


def test_shipped_dataset_is_large_and_fully_in_vocabulary(tokenizer):
    rows = data.read_rows(recipe.resolve_path("asset:data/word-categories.jsonl"))
    assert len(rows) >= 1000
    for r in rows[:200]:
        ids = tokenizer(r["instruction"] + " " + r["input"] + " " + r["output"])["input_ids"]
        assert tokenizer.unk_token_id not in ids, r


def test_assets_match_their_generator():
    from fastft.assets import build_assets

    assert build_assets.main(["--check"]) == 0
