"""train.method dpo / orpo / grpo: recipe checks, data, rewards and the planner (fast), then real
4-bit runs of the tiny model on CPU (DPO fresh, GRPO chained from the DPO run's adapter, `fastft eval` on
the DPO run; DPO and GRPO on the unsloth backend in .venv-unsloth)."""
import importlib.util
import json
import math

import pytest
from support import tiny_recipe_dict

from fastft import recipe, rewards
from fastft.data import preference
from fastft.data import DataError
from fastft.recipe import RecipeError


def _recipe(tmp_path, **sections):
    return recipe.from_dict(tiny_recipe_dict(tmp_path / "out", **sections))


def _problems(tmp_path, **sections) -> str:
    with pytest.raises(RecipeError) as e:
        _recipe(tmp_path, **sections)
    return str(e.value)


# --- recipe ------------------------------------------------------------------------------------

def test_recipe_method_errors_name_the_fix(tmp_path):
    msg = _problems(tmp_path, train={"method": "dpo"})
    assert "train.method: dpo trains on preference pairs; set data.format: preference" in msg
    msg = _problems(tmp_path, data={"format": "preference"})
    assert "data.format: preference rows train with train.method dpo or orpo, not sft" in msg
    msg = _problems(tmp_path, train={"method": "grpo", "reward": "json_macth"})
    assert "train.reward: unknown metric 'json_macth' (did you mean 'json_match'?)" in msg
    msg = _problems(tmp_path, train={"method": "grpo", "num_generations": 3})
    assert "train.num_generations: 3 answers per prompt must divide train.batch_size x train.grad_accum = 8" in msg
    msg = _problems(tmp_path, train={"method": "grpo", "reward": "my rewards:score"})
    assert "train.reward: 'my rewards:score' is not module:function" in msg
    msg = _problems(tmp_path, train={"method": "grpo", "reward_fields": ["city"]})
    assert "train.reward_fields: only used by the json_match reward (the reward is exact_match)" in msg
    msg = _problems(tmp_path, train={"num_generations": 8})
    assert "train.num_generations: only used by train.method: grpo (method is sft)" in msg
    msg = _problems(tmp_path, train={"method": "orpo"}, data={"format": "preference", "mix": [{"name": "general", "fraction": 0.1}]})
    assert "data.mix: mixes supervised rows into SFT; with train.method orpo set data.mix: null" in msg
    r = _recipe(tmp_path, train={"method": "grpo", "reward": "my_rewards:score"})
    assert (r.train.method, r.train.reward, r.train.num_generations) == ("grpo", "my_rewards:score", 4)


def test_dpo_sft_weight_adds_the_chosen_answers_cross_entropy(tmp_path):
    from fastft import methods

    class SFTArgs:  # the shared arguments fastft.train's SFTConfig would carry
        def to_dict(self):
            return {"output_dir": str(tmp_path / "out"), "learning_rate": 1e-4, "max_steps": 2, "report_to": [],
                    "use_cpu": True, "bf16": False}

    r = _recipe(tmp_path, train={"method": "dpo", "sft_weight": 0.5}, data={"format": "preference"})
    cfg = methods.config(r, SFTArgs(), None, has_eval=False)
    assert (cfg.loss_type, cfg.loss_weights, cfg.beta, cfg.learning_rate) == (["sigmoid", "sft"], [1.0, 0.5], 0.1, 1e-4)
    assert methods.describe(r, None, None)["sft_weight"] == 0.5
    plain = methods.config(_recipe(tmp_path, train={"method": "dpo"}, data={"format": "preference"}), SFTArgs(), None,
                           has_eval=False)
    assert plain.loss_type == ["sigmoid"]
    msg = _problems(tmp_path, train={"method": "orpo", "sft_weight": 1.0}, data={"format": "preference"})
    assert "train.sft_weight: only used by train.method: dpo (method is orpo); remove it (orpo has its own SFT term)" in msg


# --- data --------------------------------------------------------------------------------------

def test_preference_rows_validate_and_normalize():
    row = preference.preference_row(
        {"prompt": "Capital of France?", "chosen": "Paris", "rejected": [{"role": "assistant", "content": "Lyon"}],
         "slice": "geo"}, "f row 1")
    assert row == {"prompt": [{"role": "user", "content": "Capital of France?"}],
                   "chosen": [{"role": "assistant", "content": "Paris"}],
                   "rejected": [{"role": "assistant", "content": "Lyon"}], "slice": "geo"}
    with pytest.raises(DataError, match=r"f row 2: missing column 'rejected' \(data.format preference needs prompt, "
                                        r"chosen and rejected; found chosen, prompt\)"):
        preference.preference_row({"prompt": "q", "chosen": "a"}, "f row 2")
    with pytest.raises(DataError, match="'chosen' and 'rejected' are the same answer"):
        preference.preference_row({"prompt": "q", "chosen": "a  b", "rejected": "a b"}, "f row 3")
    with pytest.raises(DataError, match="the prompt's last message must be the user's"):
        preference.preference_row({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a",
                                        "rejected": "b"}, "f row 4")


def test_grpo_rows_need_a_reference():
    row = preference.reference_row({"instruction": "Sum?", "input": "2 3", "output": "5"}, "alpaca", "f row 1")
    assert row["prompt"] == [{"role": "user", "content": "Sum?\n\n2 3"}] and row["reference"] == "5"
    with pytest.raises(DataError, match="no reference answer .*train.method grpo scores sampled answers"):
        preference.reference_row({"instruction": "Sum?"}, "alpaca", "f row 2")
    with pytest.raises(DataError, match="last message must be the assistant's reference answer"):
        preference.reference_row({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                       "content": "x"}, {"role": "user", "content": "?"}]}, "messages", "f row 3")


# --- rewards -----------------------------------------------------------------------------------

REF = '{"name": "Ana Silva", "city": "Porto", "quantity": 12}'


@pytest.mark.parametrize("answer, fields, expected", [
    (REF, None, 1.0),
    ('{"name": "Ana Silva", "city": "Lyon", "quantity": 12}', None, 2 / 3),  # wrong city
    ('{"name": "Ana Silva", "city": "Porto", "quantity": 21}', ["city", "quantity"], 0.5),  # wrong quantity
    ("Ana Silva ordered 12 from Porto.", None, 0.0),  # prose does not parse
    ('```json\n{"city": "Porto"}\n```', ["city"], 1.0),
])
def test_json_match_reward_gives_partial_credit_per_field(answer, fields, expected):
    assert rewards.task_score(answer, REF, "json_match", fields) == pytest.approx(expected)


def test_reward_from_recipe_weights_format_and_length(tmp_path):
    r = _recipe(tmp_path, train={"method": "grpo", "reward": "json_match", "reward_format": 0.5,
                                 "reward_length_penalty": 0.1})
    funcs, weights, described = rewards.from_recipe(r, [REF])
    assert [f.__name__ for f in funcs] == ["json_match", "format", "length_penalty"] and weights == [1.0, 0.5, 0.1]
    completions = [[{"role": "assistant", "content": REF}], [{"role": "assistant", "content": "Porto " * 12}]]
    scores = [f(prompts=[None] * 2, completions=completions, reference=[REF] * 2) for f in funcs]
    assert scores[0] == [1.0, 0.0] and scores[1] == [1.0, 0.0]
    assert scores[2][0] == 0.0 and scores[2][1] == -5.0  # 12 words vs the reference's 7
    assert described == {"task": "json_match", "kind": "metric", "fields": None, "partial_credit": True,
                         "format_weight": 0.5, "length_penalty": 0.1}


def test_reward_errors_name_the_field_and_the_module(tmp_path):
    r = _recipe(tmp_path, train={"method": "grpo", "reward": "json_match", "reward_fields": ["name", "citty"]})
    with pytest.raises(rewards.RewardError, match=r"train.reward_fields: unknown field 'citty': not in the reference "
                                                  r"of data.train row 1 \(its fields: name, city, quantity\)"):
        rewards.from_recipe(r, [REF])
    r = _recipe(tmp_path, train={"method": "grpo", "reward": "json_match"})
    with pytest.raises(rewards.RewardError, match="row 2: the reference is not JSON"):
        rewards.from_recipe(r, [REF, "vehicle"])
    r = _recipe(tmp_path, train={"method": "grpo", "reward": "no_such_module_h19:score"})
    with pytest.raises(rewards.RewardError, match="cannot import module 'no_such_module_h19'"):
        rewards.from_recipe(r, [REF])


# --- planner -----------------------------------------------------------------------------------

def test_plan_counts_each_methods_extra_memory(tmp_path):
    import shutil

    from fastft.models import plan
    from fastft.recipe import ASSETS

    (tmp_path / "tiny").mkdir()
    shutil.copy(ASSETS / "tiny-llama" / "config.json", tmp_path / "tiny" / "config.json")  # shapes from the config

    def total(**train):
        method = train.get("method", "sft")
        data = {"format": "preference"} if method in ("dpo", "orpo") else {}
        r = _recipe(tmp_path, model={"name": str(tmp_path / "tiny")},
                    train={"gradient_checkpointing": True, **train}, data=data)
        p = plan.plan(r, "rtx4090", search=False)
        return p, p.train_bytes

    _, sft_b = total()
    dpo, dpo_b = total(method="dpo")
    grpo, grpo_b = total(method="grpo", max_completion_length=64)
    assert dpo_b > 1.5 * sft_b  # chosen and rejected: two rows per pair
    assert grpo_b > sft_b
    names = [t.name for t in grpo.train]
    assert "GRPO generation KV cache" in names and "GRPO reference (KL)" in names
    ref = next(t for t in dpo.train if t.name == "DPO reference")
    assert ref.bytes == 0 and "adapter disabled" in ref.note


def test_methods_bench_names_mistakes_and_reuses_only_the_same_sft_side(tmp_path):
    from bench import methods as bench_methods

    ref = '{"name": "Ana Li", "city": "Lyon", "quantity": 3}'
    assert bench_methods.mistake_kind(ref, ref) is None
    assert bench_methods.mistake_kind('{"name": "Ana Li", "city": "Nice", "quantity": 3}', ref) == "wrong city"
    assert bench_methods.mistake_kind("Ana Li from Lyon wants 3.", ref) == "prose"
    for name in ("Ahmed Tanaka", "Li Wu", "Noor Lopez", "Bo"):
        spelled = {bench_methods.misspelled(name, i) for i in range(12)}
        assert name not in spelled and len(spelled) >= 3
        assert all(s.split(" ")[1:] == name.split(" ")[1:] for s in spelled)  # the surname is kept
    kinds = [bench_methods.made_up(i, ref, ["Lyon", "Nice"]) for i in range(12)]
    assert [k for k, _ in kinds].count("wrong name") == 6
    assert all(bench_methods.mistake_kind(a, ref) == k for k, a in kinds)
    r = _recipe(tmp_path)
    prev = tmp_path / "prev.json"
    prev.write_text(json.dumps({"kind": "methods", "config": r.to_dict(),
                                "metrics": {"sft": {"score": 0.5}, "sft_eval_seconds": 12.0}}))
    assert bench_methods.reused_sft_side(str(prev), r) == ({"score": 0.5}, 12.0)
    with pytest.raises(SystemExit, match=r"not a methods demo of the same SFT side \(differs: eval\)"):
        bench_methods.reused_sft_side(str(prev), _recipe(tmp_path, eval={"max_new_tokens": 8}))


def test_methods_bench_pairs_keep_the_adapters_mistakes_and_its_differing_general_answers(tmp_path, monkeypatch):
    """``bench.methods pairs``: a wrong answer of the adapter becomes the rejected one (source sft), a right
    one gets a made-up mistake (synthetic); with --general, a general prompt gives a pair only where the
    adapter's answer differs from the reference. The adapter is replaced by canned answers."""
    import argparse

    from bench import methods as bench_methods
    from fastft import evaluate
    from fastft.models import backends

    orders = [json.loads(line) for line in bench_methods.TRAIN.read_text().splitlines()[:4]]
    general = [json.loads(line) for line in bench_methods.GENERAL.read_text().splitlines()[:3]]
    wrong = json.dumps({**json.loads(orders[1]["output"]), "city": "Atlantis"})
    canned = {"orders": [orders[0]["output"], wrong, orders[2]["output"], "no idea"],
              "general": [general[0]["output"], "Something else.", "  " + general[2]["output"].upper() + " "]}
    monkeypatch.setattr(backends, "load_run", lambda run, log=None: ("model", "tok", None, None))
    monkeypatch.setattr(evaluate, "generate_answers",
                        lambda m, t, prompts, **k: canned["orders" if len(prompts) == 4 else "general"])
    out = tmp_path / "pairs.jsonl"
    bench_methods.pairs(argparse.Namespace(sft="RUN", n=4, general=3, out=str(out)))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["source"], r["mistake"]) for r in rows] == [
        ("synthetic", "wrong name"), ("sft", "wrong city"), ("synthetic", "wrong name"), ("sft", "prose"),
        ("general", "differs from the general answer")]
    assert rows[1]["rejected"] == wrong and rows[3]["rejected"] == "no idea"
    assert all(r["chosen"] == o["output"] for r, o in zip(rows, orders))
    assert rows[4]["chosen"] == general[1]["output"] and rows[4]["rejected"] == "Something else."
    with pytest.raises(SystemExit, match="--general needs --sft"):
        bench_methods.pairs(argparse.Namespace(sft=None, n=4, general=3, out=str(out)))


# --- real runs (tiny model, 4-bit, CPU) ----------------------------------------------------------

def _pairs(path, n=48):
    """Preference rows from the shipped word-categories set: the right category vs another one."""
    from fastft.recipe import ASSETS

    rows = [json.loads(line) for line in (ASSETS / "data/word-categories.jsonl").read_text().splitlines()[:n]]
    cats = sorted({r["output"] for r in rows})
    with open(path, "w") as f:
        for r in rows:
            wrong = cats[(cats.index(r["output"]) + 1) % len(cats)]
            f.write(json.dumps({"prompt": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else ""),
                                "chosen": r["output"], "rejected": wrong}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    from fastft import train

    tmp = tmp_path_factory.mktemp("dpo")
    r = recipe.from_dict(tiny_recipe_dict(
        tmp / "out", model={"max_seq_length": 48},
        data={"train": _pairs(tmp / "pairs.jsonl"), "format": "preference", "max_examples": None,
              "eval_fraction": 0.1},
        train={"method": "dpo", "max_steps": 3, "batch_size": 4, "logging_every": 1},
        eval={"max_examples": 3, "max_new_tokens": 4, "gates": {"task.loss": "<= 1000"}}))
    return r, train.run(r, log=lambda m: None)


@pytest.mark.slow
def test_dpo_run_records_method_margins_and_a_plain_adapter(dpo_run):
    _, result = dpo_run
    info = json.loads((result.out_dir / "fastft.json").read_text())
    assert info["method"] == {"name": "dpo", "beta": 0.1, "reference": "base (adapter disabled)", "start_from": None}
    figures = info["metrics"]["method"]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(figures)
    assert info["metrics"]["steps"] == 3 and info["metrics"]["train"]["train_tokens"] > 0
    # held-out DPO loss: log(2) before training (the adapter starts at zero), measured again after
    assert info["metrics"]["before"]["eval_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert info["metrics"]["after"]["eval_loss"] != info["metrics"]["before"]["eval_loss"]
    # the same evaluation and gates as SFT: prompts answered against the chosen answer
    assert info["eval"]["task"]["n"] == 3 and info["status"] == "accepted"
    adapter = result.out_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "ref").exists()
    assert list(result.model.peft_config) == ["default"]


@pytest.mark.slow
def test_eval_on_a_dpo_run_repeats_its_end_of_training_evaluation(dpo_run, tmp_path):
    from fastft import cli

    r, result = dpo_run
    recorded = json.loads((result.out_dir / "fastft.json").read_text())["eval"]["task"]
    logs = []
    ev = cli.eval_run(result.out_dir, log=logs.append)["task"]
    # the same held-out rows (the recipe's eval_fraction split of the pairs), prompts vs chosen answers
    assert ev["n"] == recorded["n"] == 3 and ev["source"] == f"held-out rows of {r.data.train}"
    assert ev["adapter"]["exact_match"] == recorded["adapter"]["exact_match"]
    assert ev["adapter"]["loss"] == pytest.approx(recorded["adapter"]["loss"], rel=1e-3)
    assert not any("no held-out" in m for m in logs)
    # --data: the task's alpaca rows (prompt vs reference) or preference rows (prompt vs chosen)
    alpaca = tmp_path / "held.jsonl"
    alpaca.write_text("".join(json.dumps({"instruction": "Classify: red, blue", "input": "", "output": "colors",
                                          "slice": "s"}) + "\n" for _ in range(2)))
    ev = cli.eval_run(result.out_dir, data_file=str(alpaca), log=logs.append)["task"]
    assert ev["n"] == 2 and ev["source"] == str(alpaca) and set(ev["adapter"]["slices"]) == {"s"}
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": "Classify: red", "chosen": "colors", "rejected": "animals"}) + "\n")
    assert cli.eval_run(result.out_dir, data_file=str(prefs), log=logs.append)["task"]["n"] == 1
    prefs.write_text(json.dumps({"prompt": "Classify: red", "chosen": "colors"}) + "\n")
    with pytest.raises(DataError, match="missing column 'rejected'"):
        cli.eval_run(result.out_dir, data_file=str(prefs), log=logs.append)


def test_method_runs_say_why_there_is_no_held_out_loss():
    from fastft import summary
    from fastft.data import DataBundle

    held = DataBundle(train=None, eval=None, eval_pairs=[([{"role": "user", "content": "q"}], "a")] * 30,
                      data_hash="x", stats={})
    assert summary.fmt_scores({}, held, "dpo") == ("no held-out dpo loss (the held-out rows are not preference "
                                                    "pairs); its 30 held-out prompts are evaluated after training")
    assert "grpo has no loss on fixed answers" in summary.fmt_scores({}, held, "grpo")
    assert summary.fmt_scores({}, None, "sft").startswith("no held-out data")


@pytest.mark.slow
def test_grpo_starts_from_the_previous_runs_adapter_and_records_its_reward(dpo_run, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from fastft import methods, train

    _, prev_result = dpo_run
    (tmp_path / "short_rewards.py").write_text(
        "def short(prompts, completions, reference, **kw):\n"
        "    return [1.0 / (1 + len(c[0]['content'])) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    d = tiny_recipe_dict(tmp_path / "out", model={"max_seq_length": 48, "adapter": str(prev_result.out_dir)},
                         data={"max_examples": 24},
                         train={"method": "grpo", "reward": "short_rewards:short", "max_steps": 2, "batch_size": 4,
                                "num_generations": 4, "max_completion_length": 4, "logging_every": 1},
                         eval={"max_examples": 2, "max_new_tokens": 4})
    r = recipe.from_dict(d)
    # start_from puts the DPO run's weights into the fresh adapter
    from fastft.models import backends

    model, _, _ = backends.load(r)
    methods.start_from(model, r, log=lambda m: None)
    saved = load_file(str(prev_result.out_dir / "adapter/adapter_model.safetensors"))
    mine = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    key = next(k for k in saved if "lora_B" in k)
    match = [p for n, p in mine.items() if n.replace(".default", "").endswith(key.split("base_model.model.")[-1])]
    assert match and torch.equal(match[0].detach().cpu(), saved[key])
    del model

    result = train.run(r, log=lambda m: None)
    info = json.loads((result.out_dir / "fastft.json").read_text())
    m = info["method"]
    assert m["name"] == "grpo" and m["reference"] == "frozen copy of the starting adapter"
    assert m["start_from"]["adapter"] == str(prev_result.out_dir)
    assert m["reward"] == {"task": "short_rewards:short", "kind": "python", "format_weight": 0.0,
                           "length_penalty": 0.0}
    assert {"reward", "reward_std", "kl"} <= set(info["metrics"]["method"])
    assert info["metrics"]["method"]["reward"]["mean"] > 0
    assert not (result.out_dir / "adapter" / "ref").exists() and list(result.model.peft_config) == ["default"]


@pytest.mark.slow
def test_method_errors_at_run_time(tmp_path):
    from fastft import train

    r = _recipe(tmp_path, model={"adapter": str(tmp_path / "nowhere")})
    with pytest.raises(Exception, match="nowhere"):
        train.run(r, log=lambda m: None)


@pytest.mark.slow
def test_orpo_trains_reference_free_and_counts_both_answers(tmp_path):
    from fastft import train

    r = recipe.from_dict(tiny_recipe_dict(
        tmp_path / "out", model={"max_seq_length": 48},
        data={"train": _pairs(tmp_path / "pairs.jsonl", n=24), "format": "preference", "max_examples": None,
              "eval_fraction": 0.0},
        train={"method": "orpo", "max_steps": 2, "batch_size": 4, "logging_every": 1},
        eval={"after_training": False}))
    info = train.run(r, log=lambda m: None).info
    assert info["method"]["name"] == "orpo" and info["method"]["reference"] == "none (reference-free)"
    assert {"rewards/margins", "nll_loss"} <= set(info["metrics"]["method"])
    assert info["metrics"]["train"]["train_tokens"] > 0  # prompt+chosen and prompt+rejected rows


@pytest.mark.slow
@pytest.mark.unsloth
@pytest.mark.skipif(importlib.util.find_spec("unsloth") is None,
                    reason="unsloth not installed here; `make test` runs these in .venv-unsloth")
@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_methods_run_on_the_unsloth_backend(tmp_path, method):
    """Unsloth's CPU backend keeps TRL's preference and GRPO trainers stock: they train as under hf."""
    from fastft import train

    if method == "dpo":
        data = {"train": _pairs(tmp_path / "pairs.jsonl", n=16), "format": "preference", "max_examples": None,
                "eval_fraction": 0.0}
        extra = {}
    else:
        data = {"max_examples": 16}
        extra = {"reward": "exact_match", "num_generations": 4, "max_completion_length": 4}
    r = recipe.from_dict(tiny_recipe_dict(
        tmp_path / "out", backend="unsloth", model={"max_seq_length": 48}, data=data,
        train={"method": method, "max_steps": 2, "batch_size": 4, "logging_every": 1, **extra},
        eval={"after_training": False}))
    info = train.run(r, log=lambda m: None).info
    assert info["backend"]["name"] == "unsloth" and info["method"]["name"] == method
    assert info["metrics"]["steps"] == 2 and all(math.isfinite(x) for x in info["metrics"]["losses"])
    wanted = {"rewards/margins"} if method == "dpo" else {"reward", "kl"}
    assert wanted <= set(info["metrics"]["method"])
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
