"""fastft.sweep: a recipe with sweep: (the product of some keys' values) or adapters: (named
overrides) expands into one validated recipe per adapter; `fastft train` trains each into its own
run directory, skips finished ones when run again, and writes the set's table and comparison."""
import json

import pytest
import yaml

from support import ROOT, tiny_recipe_dict
from fastft import cli, recipe, sweep


def _write(tmp_path, extra: dict, **sections) -> str:
    raw = tiny_recipe_dict(tmp_path / "out", **sections)
    raw.update(extra)
    path = tmp_path / "set.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_sweep_is_the_product_in_order(tmp_path):
    s = sweep.load(_write(tmp_path, {"sweep": {"lora.r": [4, 8], "train": {"lr": [1e-3, 3e-3, 0.01]}}}))
    assert s.kind == "sweep"
    assert [a.name for a in s.adapters] == ["r4-lr0.001", "r4-lr0.003", "r4-lr0.01", "r8-lr0.001", "r8-lr0.003",
                                            "r8-lr0.01"]
    a = s.adapters[4]
    assert a.overrides == {"lora.r": 8, "train.lr": 3e-3}
    assert (a.recipe.lora.r, a.recipe.train.lr) == (8, 3e-3)
    assert a.recipe.output.dir == str(tmp_path / "out" / "r8-lr0.003")
    assert a.recipe.lora.alpha == 16 and a.recipe.model.name == "fastft-tiny"  # the rest is the base's


def test_adapters_bring_their_own_data(tmp_path):
    rows = tmp_path / "other.jsonl"
    rows.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    s = sweep.load(_write(tmp_path, {"adapters": [{"name": "words"},
                                                  {"name": "other", "data.train": "other.jsonl", "lora": {"r": 16}}]}),
                   overrides=["train.max_steps=3"])
    words, other = s.adapters
    assert other.recipe.data.train == str(rows)  # relative to the recipe file
    assert other.recipe.lora.r == 16 and words.recipe.lora.r == 8
    assert words.recipe.train.max_steps == other.recipe.train.max_steps == 3  # --set applies to the base


@pytest.mark.parametrize("extra, message", [
    ({"sweep": {"model.max_seq_length": [64, 128]}}, r"sweep: model.max_seq_length: the adapters share one frozen base"),
    ({"adapters": [{"name": "a", "backend": "hf"}]}, r"adapters\[1\] \(a\): backend: the adapters share"),
    ({"adapters": [{"name": "a", "output.dir": "x"}]}, r"output.dir: the adapters share"),
    ({"sweep": {"lora.r": 8}}, r"sweep: lora.r: give a non-empty list of values \(got 8\)"),
    ({"sweep": {"lora.r": [8, 8]}}, r"the same value twice"),
    ({"adapters": [{"name": "a"}, {"name": "a"}]}, r"adapters\[2\]: name 'a' twice"),
    ({"adapters": [{"name": "a/b"}]}, r"name 'a/b': letters, digits"),
    ({"adapters": [{"lora.r": 4}]}, r"each adapter is a mapping with a name"),
    ({"sweep": {"lora.r": [4]}, "adapters": [{"name": "a"}]}, r"sweep: and adapters: together"),
])
def test_bad_sets_name_the_key(tmp_path, extra, message):
    with pytest.raises(sweep.SweepError, match=message):
        sweep.load(_write(tmp_path, extra))


def test_every_adapter_is_validated_before_anything_trains(tmp_path):
    path = _write(tmp_path, {"adapters": [{"name": "ok"}, {"name": "bad", "lora.rr": 4, "train.lr": -1}]})
    with pytest.raises(recipe.RecipeError) as e:
        sweep.load(path)
    msg = str(e.value)
    assert "adapter bad: lora.rr: unknown key" in msg and "did you mean 'lora.r'" in msg
    assert "adapter bad: train.lr" in msg and not (tmp_path / "out").exists()


def test_a_set_is_not_one_recipe(tmp_path):
    with pytest.raises(recipe.RecipeError, match=r"sweep: / adapters: make this a set of adapters"):
        recipe.load(_write(tmp_path, {"sweep": {"lora.r": [4, 8]}}))


def test_shipped_sweep_recipe_expands_and_plans(capsys):
    path = ROOT / "recipes" / "smollm2-sweep.yaml"
    s = sweep.load(path)
    assert [a.overrides["lora.r"] for a in s.adapters] == [8, 16, 32]
    assert all(a.recipe.model.name == "smollm2-135m-instruct" for a in s.adapters)
    assert cli.main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "the largest" in out and "3 adapters, trained one after another" in out and out.count(" fits") == 3


@pytest.mark.slow
def test_train_a_set_then_run_it_again(tmp_path, capsys, one_torch_thread):
    path = _write(tmp_path, {"sweep": {"lora.r": [4, 8]}}, train={"max_steps": 6, "logging_every": 3},
                  data={"max_examples": 96})
    assert cli.main(["train", path]) == 0
    out_dir = tmp_path / "out"
    table = json.loads((out_dir / sweep.SWEEP_JSON).read_text())
    assert [r["status"] for r in table["adapters"]] == ["trained", "trained"]
    scores = [r["score"] for r in table["adapters"]]
    assert scores == sorted(scores, reverse=True) and table["best"] == table["adapters"][0]["name"]
    for name, r in (("r4", 4), ("r8", 8)):
        run = out_dir / name
        info = json.loads((run / "fastft.json").read_text())
        assert info["recipe"]["lora"]["r"] == r and (run / "adapter" / "adapter_config.json").is_file()
        assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == r
    assert (out_dir / "compare.html").is_file() and "| r4 |" in (out_dir / sweep.SWEEP_MD).read_text()
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in out_dir.glob("*/adapter/adapter_model.safetensors")}
    assert cli.main(["train", path]) == 0  # again: both finished, nothing retrains
    err = capsys.readouterr().out
    assert err.count("finished earlier, kept") == 2
    assert {p: p.stat().st_mtime_ns for p in out_dir.glob("*/adapter/adapter_model.safetensors")} == before


@pytest.mark.slow
def test_a_set_killed_mid_adapter_resumes_every_adapter_to_the_same_result(tmp_path, one_torch_thread):
    """kill -9 during the second adapter: the same command again keeps the first, resumes the second
    from its checkpoint, trains the third, and every adapter's losses and weights equal those of an
    uninterrupted set (exact on CPU: same data order, RNG, optimizer and schedule)."""
    import signal
    import time

    from test_faults import _adapter, _fastft, _finish, _losses

    from fastft import checkpoints

    def set_file(folder):
        cfg = tiny_recipe_dict(folder / "out", backend="hf")
        cfg["train"].update({"max_steps": 30, "save_every": 10, "logging_every": 1})
        cfg["data"].update({"max_examples": 240})
        cfg["eval"] = {"after_training": False}
        cfg["sweep"] = {"lora.r": [4, 8, 12]}
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "set.yaml").write_text(yaml.safe_dump(cfg))
        return folder / "set.yaml", folder / "out"

    ref_path, ref_out = set_file(tmp_path / "ref")
    rc, log = _finish(_fastft("train", ref_path))
    assert rc == 0, log[-3000:]
    path, out = set_file(tmp_path / "killed")
    proc = _fastft("train", path)
    marker = out / "r8" / "checkpoints" / "checkpoint-10" / checkpoints.MARKER
    t0 = time.time()
    while not marker.is_file():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() - t0 < 300, "no checkpoint of the second adapter appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert _finish(proc)[0] == -9
    assert checkpoints.inspect(out / "r4").kind == "finished"
    assert checkpoints.inspect(out / "r8").kind == "unfinished" and not (out / "r12").exists()
    rc, log = _finish(_fastft("train", path))
    assert rc == 0, log[-3000:]
    assert "r4 (lora.r=4): finished earlier, kept" in log and "resuming the unfinished run" in log
    for name in ("r4", "r8", "r12"):
        assert _losses(out / name) == _losses(ref_out / name), name
        got, want = _adapter(out / name), _adapter(ref_out / name)
        assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got), name
    table = json.loads((out / sweep.SWEEP_JSON).read_text())
    assert {r["name"]: r["status"] for r in table["adapters"]} == {"r4": "finished earlier", "r8": "trained",
                                                                   "r12": "trained"}
