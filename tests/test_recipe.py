from pathlib import Path

import pytest

from fastft import recipe
from fastft.recipe import RecipeError

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"model": {"name": "fastft-tiny"}, "data": {"train": "d.jsonl"}, "output": {"dir": "out"}}


def _with(**patch):
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in GOOD.items()}
    for path, value in patch.items():
        section, _, key = path.partition("__")
        if key:
            d.setdefault(section, {})[key] = value
        else:
            d[section] = value
    return d


def test_defaults_fill_in():
    r = recipe.from_dict(GOOD)
    assert r.lora.r == 16 and r.lora.target_modules == "all-linear"
    assert r.train.optim == "adamw_8bit" and r.backend == "auto" and r.kernels == "auto"
    assert r.model.load_in_4bit is True


@pytest.mark.parametrize("raw, expected", [
    (_with(lora__rank=8), "lora.rank: unknown key; did you mean 'lora.r'?"),
    (_with(trian={"lr": 1}), "trian: unknown key; did you mean 'train'?"),
    (_with(train__lr=-1e-4), "train.lr: must be > 0.0, got -0.0001"),
    (_with(train__lr="fast"), "train.lr: expected a number, got a string 'fast'"),
    (_with(lora__r=0), "lora.r: must be >= 1, got 0"),
    (_with(lora__r=8.5), "lora.r: expected an integer, got a number 8.5"),
    (_with(lora__dropout=1.0), "lora.dropout: must be < 1.0, got 1.0"),
    (_with(backend="unsloht"), "backend: must be one of 'auto', 'unsloth', 'hf', got 'unsloht' (did you mean 'unsloth'?)"),
    (_with(kernels="triton"), "kernels: must be one of 'auto', 'fastft', 'unsloth', 'none', got 'triton'"),
    (_with(data__format="chatml"), "data.format: must be one of 'alpaca', 'messages', 'text', 'preference', 'sharegpt', got 'chatml'"),
    (_with(model__load_in_4bit="yes"), "model.load_in_4bit: expected true or false, got a string 'yes'"),
    (_with(train__optim="adamw8bit"), "(did you mean 'adamw_8bit'?)"),
    (_with(lora__target_modules="q_proj"), "lora.target_modules: a string must be 'all-linear'"),
    (_with(lora__target_modules=[]), "lora.target_modules: expected a string or a non-empty list of strings, got a list []"),
    (_with(data__eval_fraction=1.5), "data.eval_fraction: must be < 1.0, got 1.5"),
    (_with(model={"max_seq_length": 512}), "model.name: required, but missing or empty"),
    (_with(output=None), "output.dir: required, but missing or empty"),
    (_with(train=[1, 2]), "train: expected a mapping of keys, got a list [1, 2]"),
    (_with(train__gradient_checkpointing="offload"), "train.gradient_checkpointing: expected true or false or 'unsloth', got a string 'offload'"),
    (_with(backend="hf", train__gradient_checkpointing="unsloth"), "'unsloth' needs backend unsloth or auto"),
    (_with(data__format="text"), "data.train_on_responses_only: format 'text' has no responses"),
    ([1, 2], "the top level must be a mapping of sections"),
])
def test_bad_recipes_name_the_key(raw, expected):
    with pytest.raises(RecipeError) as e:
        recipe.from_dict(raw)
    assert expected in str(e.value), str(e.value)


def test_all_problems_reported_at_once():
    with pytest.raises(RecipeError) as e:
        recipe.from_dict(_with(lora__rr=1, train__lr=0, backend="x"))
    assert len(e.value.problems) == 3


def test_overrides_any_key_with_typed_values():
    r = recipe.from_dict(GOOD, ["train.lr=1e-4", "lora.r=32", "lora.use_dora=true",
                                "lora.target_modules=[q_proj, v_proj]", "train.max_steps=7", "backend=hf"])
    assert r.train.lr == 1e-4 and r.lora.r == 32 and r.lora.use_dora is True
    assert r.lora.target_modules == ["q_proj", "v_proj"] and r.train.max_steps == 7 and r.backend == "hf"


@pytest.mark.parametrize("item, expected", [
    ("train.lr", "expected KEY=VALUE"),
    ("train..lr=1", "empty key part"),
    ("train.lr=abc", "train.lr: expected a number"),
    ("lora.r.x=1", "lora.r is not a section"),
])
def test_bad_overrides(item, expected):
    with pytest.raises(RecipeError) as e:
        recipe.from_dict(_with(lora__r=4), [item])
    assert expected in str(e.value)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipe not found"):
        recipe.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        recipe.load(bad)


def test_yaml_is_safe_loaded(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        recipe.load(p)


def test_asset_and_relative_paths(tmp_path):
    (tmp_path / "d.jsonl").write_text("{}\n")
    p = tmp_path / "r.yaml"
    p.write_text("model: {name: fastft-tiny}\ndata: {train: d.jsonl}\noutput: {dir: o}\n")
    r = recipe.load(p)
    assert r.resolve_path(r.data.train) == r.data.train == str(tmp_path / "d.jsonl")  # resolved once, at load
    assert Path(r.resolve_path("asset:data/word-categories.jsonl")).is_file()
    assert Path(recipe.resolve_path("asset:data/word-categories.jsonl")).is_file()


def test_paths_resolve_at_load_and_reload_from_the_record(tmp_path, monkeypatch):
    (tmp_path / "d.jsonl").write_text("{}\n")
    (tmp_path / "reg.jsonl").write_text("{}\n")
    p = tmp_path / "r.yaml"
    p.write_text("model: {name: fastft-tiny}\noutput: {dir: o}\n"
                 "data: {train: d.jsonl, eval: asset:data/word-categories.jsonl, "
                 "mix: [{name: general, fraction: 0.1}, {path: d.jsonl, fraction: 0.1}]}\n"
                 "eval: {regression: reg.jsonl}\n")
    monkeypatch.chdir(tmp_path.parent)
    r = recipe.load(p)
    assets = Path(recipe.__file__).resolve().parent / "assets"
    assert r.data.train == str(tmp_path / "d.jsonl") and r.eval.regression == str(tmp_path / "reg.jsonl")
    assert r.data.eval == str(assets / "data" / "word-categories.jsonl")
    assert [e["path"] for e in r.data.mix] == [str(assets / "data" / "general-instructions.jsonl"),
                                               str(tmp_path / "d.jsonl")]
    d = r.to_dict()  # what fastft.json records: resolved paths; a shipped set stays a name
    assert d["data"]["mix"] == [{"name": "general", "fraction": 0.1}, {"path": str(tmp_path / "d.jsonl"), "fraction": 0.1}]
    assert d["data"]["train"] == str(tmp_path / "d.jsonl")
    again = recipe.from_dict(d, source=str(p))
    assert again.to_dict() == d and again.data.mix == r.data.mix
    monkeypatch.chdir(tmp_path)  # re-loaded elsewhere, without its source: the same files
    assert recipe.from_dict(d).data == r.data


def test_paths_not_beside_the_recipe_are_kept_as_given(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: {name: fastft-tiny}\noutput: {dir: o}\ndata: {train: org/dataset, eval: elsewhere.jsonl}\n")
    r = recipe.load(p)
    assert (r.data.train, r.data.eval) == ("org/dataset", "elsewhere.jsonl")  # a hub id; the working directory


RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    from fastft import sweep

    if sweep.is_set(path):  # a set of adapters: each one's recipe
        assert all(a.recipe.model.name and a.recipe.output.dir for a in sweep.load(path).adapters)
        return
    r = recipe.load(path)
    assert r.model.name and r.output.dir


def test_recipes_found():
    assert RECIPES, "recipes/ has no .yaml files"


def test_removed_train_keys_name_the_eval_keys_that_replace_them(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: {name: fastft-tiny}\ndata: {train: d.jsonl}\noutput: {dir: o}\n"
                 "train: {eval_generate: 120, max_new_tokens: 16}\n")
    with pytest.raises(recipe.RecipeError) as e:
        recipe.load(p)
    msg = str(e.value)
    assert ("train.eval_generate was removed: the evaluation at the end of fastft train answers the held-out "
            "prompts with the base and the adapter (eval.*); set eval.max_examples (how many prompts; default all) "
            "and eval.max_new_tokens instead") in msg
    assert "train.max_new_tokens was removed: set eval.max_new_tokens" in msg
    with pytest.raises(recipe.RecipeError, match="train.eval_generate was removed"):
        recipe.load(tmp_path / "r.yaml", ["train.max_new_tokens=null", "train.eval_generate=0"])
    # a run recorded by an older fastft (its fastft.json holds both keys) still loads
    raw = {"model": {"name": "fastft-tiny"}, "data": {"train": "d.jsonl"}, "output": {"dir": "o"},
           "train": {"eval_generate": 0, "max_new_tokens": 16, "lr": 1e-4}}
    assert recipe.from_dict(recipe.without_removed_keys(raw)).train.lr == 1e-4
    assert raw["train"]["eval_generate"] == 0  # the record itself is left as it was
    r = recipe.from_record({"recipe": raw, "recipe_source": str(p)})  # what fastft eval / export load
    assert r.train.lr == 1e-4 and r.source == str(p)
