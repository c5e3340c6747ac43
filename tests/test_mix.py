"""data.mix: general data mixed into the training split at a share of the final training set."""
from __future__ import annotations

import json
import re

import pytest
from support import tiny_recipe_dict

from fastft import data, recipe

GENERAL = "asset:data/general-instructions.jsonl"


def _recipe(tmp_path, mix, seed=3407, **data_keys):
    d = tiny_recipe_dict(tmp_path / "out", data={"mix": mix, **data_keys}, train={"seed": seed})
    return recipe.from_dict(d)


def _fake_load(n_general):
    rows = [{"general": i} for i in range(n_general)]
    return lambda src, what, slices, fmt: list(rows)


@pytest.mark.parametrize("n_task,fractions,want", [
    (500, [0.15], [88]),            # 88 / 588 = 14.97%
    (360, [0.15], [64]),            # 64 / 424 = 15.09%
    (100, [0.1, 0.2], [14, 29]),    # N = 100 / 0.7 = 142.9
    (7, [0.5], [7]),
])
def test_mix_counts(n_task, fractions, want):
    assert data.mix_counts(n_task, fractions) == want


@pytest.mark.parametrize("fraction", [0.05, 0.15, 0.3, 0.6])
@pytest.mark.parametrize("n_task", [37, 360, 1000])
def test_share_of_final_training_set(tmp_path, fraction, n_task):
    r = _recipe(tmp_path, [{"name": "general", "fraction": fraction}])
    task = [{"task": i} for i in range(n_task)]
    out, mixed, stats = data.mix(r.data, r.train.seed, task, _fake_load(5000))
    n_general = sum(1 for x in out if "general" in x)
    assert n_general == len(mixed) == stats["sources"][0]["rows"]
    assert sum(1 for x in out if "task" in x) == n_task  # every task example kept, none duplicated
    assert len(out) == n_task + n_general == stats["train_examples"]
    # within rounding: one row either way of the exact share
    assert abs(n_general - fraction * len(out)) <= 1.0 / (1 - fraction)
    assert stats["sources"][0]["share"] == pytest.approx(n_general / len(out))
    assert len({x["general"] for x in mixed}) == n_general  # drawn without replacement


def test_same_seed_same_set_other_seed_differs(tmp_path):
    task = [{"task": i} for i in range(300)]
    mix = [{"name": "general", "fraction": 0.15}]
    a, _, _ = data.mix(_recipe(tmp_path, mix, seed=1).data, 1, task, _fake_load(400))
    b, _, _ = data.mix(_recipe(tmp_path, mix, seed=1).data, 1, task, _fake_load(400))
    c, _, _ = data.mix(_recipe(tmp_path, mix, seed=2).data, 2, task, _fake_load(400))
    assert a == b
    assert a != c
    picked = lambda rows: sorted(x["general"] for x in rows if "general" in x)  # noqa: E731
    assert picked(a) != picked(c)  # other rows drawn, not only another order


def test_small_source_repeats_and_says_so(tmp_path):
    r = _recipe(tmp_path, [{"name": "general", "fraction": 0.5}])
    out, mixed, stats = data.mix(r.data, r.train.seed, [{"task": i} for i in range(100)], _fake_load(30))
    assert len(mixed) == 100 and stats["sources"][0]["repeated"]
    assert sorted({x["general"] for x in mixed}) == list(range(30))  # every row used before any repeats


def test_build_mixes_training_split_only(tmp_path, tokenizer):
    base = recipe.from_dict(tiny_recipe_dict(tmp_path / "a"))
    mixed = _recipe(tmp_path, [{"name": "general", "fraction": 0.15}])
    logs: list[str] = []
    b0 = data.build(base.data, tokenizer, seed=base.train.seed, max_length=base.model.max_seq_length, log=lambda m: None)
    b1 = data.build(mixed.data, tokenizer, seed=mixed.train.seed, max_length=mixed.model.max_seq_length, log=logs.append)
    n_task = b0.stats["train_examples"]
    want = data.mix_counts(n_task, [0.15])[0]
    assert b1.stats["train_examples"] == n_task + want
    assert b1.stats["mix"]["sources"][0]["rows"] == want
    assert b1.stats["mix"]["task_examples"] == n_task
    # the held-out split is the same with and without mixing
    assert b1.eval_pairs == b0.eval_pairs
    assert b1.eval["input_ids"] == b0.eval["input_ids"]
    assert b1.data_hash != b0.data_hash
    line = next(m for m in logs if m.startswith("data: mixed"))
    assert re.search(rf"{n_task} task examples \+ {want} from general \(15\.\d%, asked 15%\)", line), line
    # the task rows are all still there, and exactly `want` rows were added
    from collections import Counter

    task_rows, all_rows = Counter(map(tuple, b0.train["input_ids"])), Counter(map(tuple, b1.train["input_ids"]))
    assert not task_rows - all_rows
    assert (all_rows - task_rows).total() == want


def test_mix_by_path_and_format(tmp_path, tokenizer):
    f = tmp_path / "extra.jsonl"
    f.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"say {i}"},
                                                    {"role": "assistant", "content": f"{i}"}]})
                           for i in range(50)) + "\n")
    r = _recipe(tmp_path, [{"path": str(f), "fraction": 0.2, "format": "messages"}])
    b = data.build(r.data, tokenizer, seed=r.train.seed, max_length=r.model.max_seq_length, log=lambda m: None)
    assert b.stats["mix"]["sources"][0]["format"] == "messages"
    assert b.stats["mix"]["sources"][0]["rows"] == data.mix_counts(b.stats["mix"]["task_examples"], [0.2])[0]


@pytest.mark.parametrize("mix,needle", [
    ([{"path": "x.jsonl", "name": "general", "fraction": 0.1}], "data.mix[0]: give exactly one of path"),
    ([{"fraction": 0.1}], "got neither"),
    ([{"name": "generl", "fraction": 0.1}], "data.mix[0].name: unknown shipped set 'generl' (did you mean 'general'?)"),
    ([{"name": "general"}], "data.mix[0].fraction: required"),
    ([{"name": "general", "fraction": 0}], "data.mix[0].fraction: must be > 0 and < 1"),
    ([{"name": "general", "fraction": 1.0}], "data.mix[0].fraction: must be > 0 and < 1"),
    ([{"name": "general", "fraction": "15%"}], "data.mix[0].fraction: expected a number"),
    ([{"name": "general", "fraction": 0.6}, {"path": "x.jsonl", "fraction": 0.5}], "data.mix: fractions sum to 1.1"),
    ([{"name": "general", "fracton": 0.1}], "data.mix[0].fracton: unknown key; did you mean 'fraction'?"),
    ([{"name": "general", "fraction": 0.1, "format": "chat"}], "data.mix[0].format: must be one of"),
    ("general", "data.mix: expected a non-empty list of mappings"),
])
def test_bad_mix_entries(tmp_path, mix, needle):
    with pytest.raises(recipe.RecipeError) as e:
        _recipe(tmp_path, mix)
    assert needle in str(e.value)


def test_missing_mix_file_names_it(tmp_path, tokenizer):
    r = _recipe(tmp_path, [{"path": str(tmp_path / "nope.jsonl"), "fraction": 0.1}])
    with pytest.raises(data.DataError, match="nope.jsonl"):
        data.build(r.data, tokenizer, seed=r.train.seed, max_length=r.model.max_seq_length, log=lambda m: None)


def test_shipped_general_set_is_disjoint_from_the_task_and_regression_sets():
    from pathlib import Path

    import fastft

    assets = Path(fastft.__file__).parent / "assets"
    general = {json.loads(x)["instruction"] for x in (assets / "data/general-instructions.jsonl").open()}
    task = {json.loads(x)["instruction"] for x in (assets / "data/order-extraction.jsonl").open()}
    assert len(general) > 200 and not general & task
    for reg in (assets / "regression").glob("*.jsonl") if (assets / "regression").is_dir() else []:
        prompts = set()
        for line in reg.open():
            row = json.loads(line)
            prompts.add(row.get("instruction") or row.get("prompt") or json.dumps(row.get("messages")))
        assert not general & prompts, f"general mix data overlaps the regression set {reg.name}"
