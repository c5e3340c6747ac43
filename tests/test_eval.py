"""Metrics on crafted answers, gate syntax in recipes, and the slice column through data loading.

No model is trained here (see test_gates.py and test_generate.py for the CLI on a trained run)."""
import json
import re

import pytest

from support import tiny_recipe_dict
from fastft import data, errors, evaluate, gates, metrics, recipe
from fastft.recipe import RecipeError
from fastft.schema import EvalConfig


# --- metrics -----------------------------------------------------------------------------------

@pytest.mark.parametrize("answer,reference,hit", [
    ("fruit", "fruit", True),
    ("  Fruit \n", "fruit", True),  # case and surrounding whitespace
    ("a  fruit", "A fruit", True),  # repeated spaces
    ("fruits", "fruit", False),
    ("fruit.", "fruit", False),
])
def test_exact_match(answer, reference, hit):
    assert metrics.score(answer, reference, "exact_match") is hit


@pytest.mark.parametrize("answer,reference,hit", [
    ("The capital of France is Paris.", "Paris", True),
    ("2 + 2 = 4", "4", True),
    ("It is 14.", "4", False),  # whole words: "4" is not in "14"
    ("new york city", "New York", True),
    ("a newyork story", "new york", False),
    ("", "x", False),
])
def test_contains_is_whole_words(answer, reference, hit):
    assert metrics.score(answer, reference, "contains") is hit


REF = '{"name": "Ada", "year": 1815, "city": "London"}'


@pytest.mark.parametrize("answer,fields,hit", [
    ('{"name": "Ada", "year": 1815, "city": "London"}', None, True),
    ('{"year": 1815, "city": "London", "name": "Ada"}', None, True),  # key order does not matter
    ('{"name": "Ada", "year": 1815, "city": "Paris"}', None, False),  # whole object by default
    ('{"name": "Ada", "year": 1815, "city": "Paris"}', ["name", "year"], True),  # only the named fields
    ('{"name": "Ada", "year": "1815"}', ["name", "year"], False),  # types count: "1815" is not 1815
    ('{"name": "Ada"}', ["name", "year"], False),  # a missing field is a miss
    ('```json\n{"name": "Ada", "year": 1815}\n```', ["name", "year"], True),  # one fence allowed
    ('name: Ada, year: 1815', ["name"], False),  # unparsable: a miss, not an error
    ('{"name": "Ada", "year": 1815', ["name"], False),  # truncated JSON
    ('["Ada", 1815]', ["name"], False),  # not an object
])
def test_json_match(answer, fields, hit):
    assert metrics.score(answer, REF, "json_match", fields) is hit


def test_json_match_reference_that_is_not_json_is_a_miss():
    # compare() warns and counts such rows; a finished training run is never lost to a bad row
    assert metrics.score("not json", "not json", "json_match") is False


def test_task_scores_per_slice_and_overall():
    answers = ["fruit", "animal", "color", "x", "tool", "fruit"]
    refs = ["fruit", "animal", "color", "color", "tool", "sport"]
    slices = ["easy", "easy", "hard", "hard", None, "hard"]
    s = evaluate.task_scores(answers, refs, slices, "exact_match")
    assert s["n"] == 6 and s["exact_match"] == pytest.approx(4 / 6)
    assert s["slices"] == {"(none)": {"exact_match": 1.0, "n": 1}, "easy": {"exact_match": 1.0, "n": 2},
                           "hard": {"exact_match": pytest.approx(1 / 3), "n": 3}}
    assert evaluate.task_scores(answers, refs, [None] * 6, "exact_match")["slices"] == {}
    empty = evaluate.task_scores([], [], [], "contains")
    assert empty["contains"] is None and empty["n"] == 0


# --- gates -------------------------------------------------------------------------------------

def _recipe(tmp_path, **eval_section):
    return recipe.from_dict(tiny_recipe_dict(tmp_path, eval=eval_section))


def test_eval_section_defaults_and_gates(tmp_path):
    r = _recipe(tmp_path)
    assert r.eval == EvalConfig() and r.eval.gates == {} and r.eval.metric == "exact_match"
    r = _recipe(tmp_path, metric="json_match", json_fields=["name"], regression="asset:x.jsonl",
                gates={"task.json_match": ">= 0.8", "regression.forgotten": "<=0.05",
                       "task.slice.hard.json_match": "> 0.5", "task.gain": ">= 0.2", "task.loss": "< 2"})
    assert r.eval.gates["regression.forgotten"] == "<=0.05" and r.to_dict()["eval"]["json_fields"] == ["name"]


def test_nested_gates_and_overrides_flatten_to_paths(tmp_path):
    r = _recipe(tmp_path, gates={"task": {"exact_match": ">= 0.5", "loss": "<= 3"}})
    assert r.eval.gates == {"task.exact_match": ">= 0.5", "task.loss": "<= 3"}
    # YAML cannot read a bare ">= 0.8"; the override keeps the text as given
    r = recipe.from_dict(tiny_recipe_dict(tmp_path), overrides=["eval.gates.task.exact_match=>= 0.8"])
    assert r.eval.gates == {"task.exact_match": ">= 0.8"}


@pytest.mark.parametrize("gates,expected", [
    ({"task.exact_match": 0.8},
     "eval.gates.task.exact_match: expected a string, got a number 0.8"),
    ({"task.exact_match": "at least 0.8"},
     "eval.gates.task.exact_match: cannot read the condition 'at least 0.8': write an operator (>=, <=, >, <)"),
    ({"task.exact_match": ">= high"}, "eval.gates.task.exact_match: cannot read the condition '>= high'"),
    ({"task.exact_match": "== 1"}, "eval.gates.task.exact_match: cannot read the condition '== 1'"),
    ({"task.accuracy": ">= 0.8"}, "eval.gates.task.accuracy: unknown metric path 'task.accuracy'; valid: task.exact_match"),
    ({"task.contains": ">= 0.8"},
     "eval.gates.task.contains: the held-out set is scored with eval.metric 'exact_match', not 'contains'"),
    ({"task.slice.hard.contains": ">= 0.8"}, "eval.gates.task.slice.hard.contains: the held-out set is scored"),
    ({"task.slice.exact_match": ">= 0.8"}, "eval.gates.task.slice.exact_match: unknown metric path"),
    ({"exact_match": ">= 0.8"}, "eval.gates.exact_match: unknown metric path 'exact_match': it starts with task. or regression."),
    ({"regression.forgotten": "<= 0.05"}, "eval.gates.regression.forgotten: a regression gate needs a regression set: set eval.regression"),
    ({"regression.recall": "<= 0.05"}, "eval.gates.regression.recall: unknown metric path"),
])
def test_bad_gates_name_the_gate_and_the_fix(tmp_path, gates, expected):
    with pytest.raises(RecipeError) as e:
        _recipe(tmp_path, gates=gates)
    assert expected in str(e.value), str(e.value)


def test_bad_eval_section(tmp_path):
    with pytest.raises(RecipeError) as e:
        _recipe(tmp_path, metric="f1", gates=["task.exact_match >= 0.8"], json_fields=["a"], max_new_tokens=0)
    msg = str(e.value)
    assert "eval.metric: must be one of 'exact_match', 'contains', 'json_match', got 'f1'" in msg
    assert "eval.gates: expected a mapping, got a list" in msg
    assert "eval.max_new_tokens: must be >= 1, got 0" in msg
    with pytest.raises(RecipeError, match="eval.json_fields: only used by metric json_match"):
        _recipe(tmp_path, json_fields=["a"])
    with pytest.raises(RecipeError, match="eval.gatez: unknown key; did you mean 'eval.gates'"):
        _recipe(tmp_path, gatez={})


def test_check_gates_reports_each_gate_and_value(tmp_path):
    cfg = _recipe(tmp_path, regression="r.jsonl", gates={"task.exact_match": ">= 0.8", "regression.forgotten": "<= 0.05",
                                                        "task.slice.hard.exact_match": ">= 0.5",
                                                        "task.gain": "> 0.1"}).eval
    result = {"task": {"adapter": {"exact_match": 0.9, "loss": 1.0, "slices": {"hard": {"exact_match": 0.4, "n": 5}}},
                       "base": {"exact_match": 0.1}, "gain": 0.8},
              "regression": {"adapter": {"accuracy": 0.9}, "forgotten": 0.1}}
    g = gates.check_gates(cfg.gates, result, cfg)
    assert not g["passed"]
    assert [(r["gate"], r["value"], r["passed"]) for r in g["results"]] == [
        ("task.exact_match", 0.9, True), ("regression.forgotten", 0.1, False),
        ("task.slice.hard.exact_match", 0.4, False), ("task.gain", 0.8, True)]
    assert g["failed"] == ["gate regression.forgotten <= 0.05 failed: measured 0.1",
                           "gate task.slice.hard.exact_match >= 0.5 failed: measured 0.4"]
    keys = evaluate.run_info_keys({**result, "gates": g, "metric": "exact_match"})
    assert keys["status"] == "rejected" and keys["gates"] == g
    # an unmeasured gate fails and says why
    g = gates.check_gates({"task.slice.easy.exact_match": ">= 0.5", "regression.forgotten": "<= 0.05"},
                             {"task": result["task"], "regression": None}, cfg)
    assert g["failed"] == ["gate task.slice.easy.exact_match >= 0.5 failed: not measured (no slice 'easy' in "
                           "the held-out data; slices: hard)",
                           "gate regression.forgotten <= 0.05 failed: not measured (no regression set)"]
    none_right = {"regression": {"adapter": {"accuracy": 0.0}, "forgotten": None, "base_correct": 0}}
    assert gates.check_gates({"regression.forgotten": "<= 0.05"}, none_right, cfg)["failed"] == [
        "gate regression.forgotten <= 0.05 failed: not measured (the base answered no regression item correctly: "
        "nothing to forget; check the set)"]
    # every gate passing: accepted; no gates: no status at all
    ok = gates.check_gates({"task.exact_match": ">= 0.8"}, result, cfg)
    assert ok == {"passed": True, "results": [{"gate": "task.exact_match", "condition": ">= 0.8", "value": 0.9,
                                               "passed": True}], "failed": []}
    assert evaluate.run_info_keys({**result, "gates": ok})["status"] == "accepted"
    assert "status" not in evaluate.run_info_keys(result)


def test_after_training_false_skips_the_evaluation(tmp_path):
    r = _recipe(tmp_path, after_training=False, gates={"task.loss": "<= 1"})
    assert evaluate.after_training(None, None, r, None, tmp_path) == {}
    assert not (tmp_path / "eval.json").exists()


def test_gate_exit_codes(capsys):
    failed = {"gates": {"passed": False, "failed": ["gate task.loss <= 1 failed: measured 2"], "results": []}}
    assert gates.gate_exit(failed, no_gate_exit=False) == errors.EXIT_GATE == 3
    assert "gate task.loss <= 1 failed: measured 2" in capsys.readouterr().err
    assert gates.gate_exit(failed, no_gate_exit=True) == 0
    assert "--no-gate-exit" in capsys.readouterr().err
    assert gates.gate_exit({"gates": {"passed": True, "failed": []}}, False) == 0
    assert gates.gate_exit({}, False) == 0


# --- the slice column through data loading -----------------------------------------------------

def test_slices_follow_their_rows_into_the_held_out_split(tmp_path, tokenizer):
    rows = [json.loads(line) for line in
            (evaluate.Path(recipe.__file__).parent / "assets/data/word-categories.jsonl").read_text().splitlines()[:60]]
    for r in rows:
        r["slice"] = "long" if r["instruction"].count(",") >= 3 else "short"
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = recipe.from_dict(tiny_recipe_dict(tmp_path / "o", data={"train": str(path), "eval_fraction": 0.25,
                                                                "max_examples": None}))
    b = data.build(r.data, tokenizer, seed=r.train.seed, max_length=r.model.max_seq_length, log=lambda m: None)
    assert len(b.eval_slices) == len(b.eval_pairs) == 15
    by_prompt = {data.to_messages(x, "alpaca", "")[0]["content"]: x["slice"] for x in rows}
    assert [by_prompt[p[-1]["content"]] for p, _ in b.eval_pairs] == b.eval_slices
    assert set(b.eval_slices) == {"long", "short"}
    # a separate eval file keeps its slices too; rows without one are None
    rows[0].pop("slice")
    (tmp_path / "e.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows[:5]))
    r = recipe.from_dict(tiny_recipe_dict(tmp_path / "o", data={"train": str(path), "eval": str(tmp_path / "e.jsonl"),
                                                                "eval_fraction": 0.05}))
    assert data.build(r.data, tokenizer, seed=r.train.seed, max_length=r.model.max_seq_length,
                      log=lambda m: None).eval_slices == [None] + [x["slice"] for x in rows[1:5]]
    s = evaluate.eval_set_from_file(str(tmp_path / "e.jsonl"), tokenizer, "alpaca", 64)
    assert s.slices == [None] + [x["slice"] for x in rows[1:5]] and len(s.rows) == len(s.pairs) == 5


def test_shipped_regression_set_is_what_its_builder_kept():
    from fastft.assets import build_regression

    path = evaluate.Path(build_regression.DEFAULT_OUT)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    record = json.loads(path.with_suffix(".build.json").read_text())
    assert len(rows) == record["kept"] >= 40 and record["candidates"] == len(build_regression.candidates())
    candidates = {(c["instruction"], c["output"]) for c in build_regression.candidates()}
    assert all((r["instruction"], r["output"]) in candidates for r in rows)
    assert all(data.to_messages(r, "alpaca", "row")[-1]["content"] == r["output"] for r in rows)
    # none of it is in the general data mixed into training
    general = {json.loads(x)["instruction"] for x in
               (path.parents[1] / "data" / "general-instructions.jsonl").read_text().splitlines()}
    assert not general & {r["instruction"] for r in rows}
    assert build_regression.MAX_NEW_TOKENS <= EvalConfig().max_new_tokens


def test_completion_rows_are_asked_without_the_template(tmp_path, tokenizer):
    """A base model's regression rows (prompt + completion): <bos> and the text, loss on the completion."""
    from fastft import generate
    from fastft.data.formats import COMPLETION

    (tmp_path / "c.jsonl").write_text(json.dumps({"prompt": "red green", "completion": " blue", "slice": "s"}) + "\n"
                                      + json.dumps({"instruction": "red", "output": "green"}) + "\n")
    s = evaluate.eval_set_from_file(str(tmp_path / "c.jsonl"), tokenizer, None, 64)
    (prompt, ref), (chat, ref2) = s.pairs
    assert prompt == [{"role": COMPLETION, "content": "red green"}] and ref == "blue" and s.slices == ["s", None]
    assert chat[0]["role"] == "user" and ref2 == "green"
    p = [tokenizer.bos_token_id] + tokenizer("red green", add_special_tokens=False)["input_ids"]
    c = tokenizer(" blue", add_special_tokens=False)["input_ids"]
    assert generate._prompt_ids(tokenizer, prompt) == p
    assert s.rows[0] == {"input_ids": p + c, "labels": [data.IGNORE] * len(p) + c}
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "red", "completion": "  "}) + "\n")
    with pytest.raises(data.DataError, match=r"bad.jsonl row 1: 'prompt' and 'completion' must be non-empty text"):
        evaluate.eval_set_from_file(str(tmp_path / "bad.jsonl"), tokenizer, None, 64)


def test_shipped_gemma_regression_set_is_what_its_builder_kept():
    from fastft.assets import build_regression

    path = evaluate.Path(build_regression.HERE / "regression" / "gemma-3-270m.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    record = json.loads(path.with_suffix(".build.json").read_text())
    assert record["style"] == "completion" and record["model"] == "gemma-3-270m"
    assert len(rows) == record["kept"] >= 40 and record["candidates"] == len(build_regression.candidates("completion"))
    candidates = {(c["prompt"], c["completion"]) for c in build_regression.candidates("completion")}
    assert all((r["prompt"], r["completion"]) in candidates for r in rows)
    # none of the general mix's kinds (arithmetic, opposites, plurals, tenses, days, months)
    mix_kinds = re.compile(r"\b(plus|minus|times|opposite|plural|tense|monday|tuesday|wednesday|thursday|friday|"
                           r"saturday|sunday|january|february|march|april|may|june|july|august|september|october|"
                           r"november|december)\b", re.I)
    assert not [r["prompt"] for r in rows if mix_kinds.search(r["prompt"] + r["completion"])]
