"""Gates end to end: `python -m fastft train` with eval.gates exits 3 on a failed gate (0 with
--no-gate-exit), marks the run rejected or accepted, and `fastft eval` re-scores a finished run."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from support import ROOT, tiny_recipe_dict
from fastft import cli

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "fastft"]
ASSET = ROOT / "fastft" / "assets" / "data" / "word-categories.jsonl"

@pytest.fixture(autouse=True, scope="module")
def one_thread(one_torch_thread):
    """One torch thread for this module (see conftest.one_torch_thread)."""
    yield



def _rows(n, start=0):
    return [json.loads(line) for line in ASSET.read_text().splitlines()[start:start + n]]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(tmp, *extra, name="out", subprocess_=True):
    """A few QLoRA steps on the tiny model; a gate on exact match it cannot reach in 5 steps.
    One test runs the real command line in a fresh process; the others call fastft.cli.main here
    (the same code path, without paying the HF stack's import time again on a busy 2-core box)."""
    reg = _write(tmp / "regression.jsonl", _rows(4, start=900))
    cfg = tiny_recipe_dict(tmp / name, data={"max_examples": 80, "eval_fraction": 0.2},
                           train={"max_steps": 5, "logging_every": 5},
                           eval={"max_new_tokens": 4, "regression": str(reg),
                                 "gates": {"task.exact_match": ">= 0.99", "task.loss": "<= 1000",
                                           "regression.loss_delta": "<= 1000"}})
    path = tmp / "r.yaml"
    path.write_text(yaml.safe_dump(cfg))
    if subprocess_:
        return subprocess.run(CLI + ["train", str(path), *extra], capture_output=True, text=True, cwd=tmp,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}), tmp / name
    return cli.main(["train", str(path), *extra]), tmp / name


@pytest.fixture(scope="module")
def rejected(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("gates"))


def test_failed_gate_exits_3_and_marks_the_run_rejected(rejected):
    p, out = rejected
    assert p.returncode == 3, p.stderr[-3000:]
    assert "fastft: gate task.exact_match >= 0.99 failed: measured" in p.stderr
    assert "gates failed (exit 3; --no-gate-exit only reports)" in p.stderr
    assert "FAIL  task.exact_match >= 0.99" in p.stdout and "pass  task.loss <= 1000" in p.stdout
    info = json.loads((out / "fastft.json").read_text())
    assert info["status"] == "rejected"
    rows = {r["gate"]: r for r in info["gates"]["results"]}
    assert not rows["task.exact_match"]["passed"] and rows["task.exact_match"]["value"] < 0.99
    assert rows["task.loss"]["passed"] and rows["regression.loss_delta"]["passed"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()  # a rejected run is still saved
    ev = json.loads((out / "eval.json").read_text())
    t = ev["task"]
    assert t["n"] == 16 and set(t["base"]) >= {"exact_match", "loss", "perplexity"}
    # the adapter learned something in 5 steps: its held-out loss is far below the base's
    assert t["adapter"]["loss"] < 0.7 * t["base"]["loss"]
    # the end-of-training held-out loss and the eval's adapter loss are the same number
    assert t["adapter"]["loss"] == pytest.approx(info["metrics"]["after"]["eval_loss"], rel=1e-4)
    # the random tiny base answers no general question: nothing it knew can be forgotten (None, not 0)
    assert ev["regression"]["n"] == 4 and ev["regression"]["base_correct"] == 0 and ev["regression"]["forgotten"] is None
    assert info["eval"]["task"]["adapter"]["loss"] == t["adapter"]["loss"] and "examples" not in info["eval"]["task"]


def test_no_gate_exit_reports_only(tmp_path, capsys):
    code, out = _train(tmp_path, "--no-gate-exit", subprocess_=False)
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert "gate task.exact_match >= 0.99 failed" in err and "--no-gate-exit" in err
    assert json.loads((out / "fastft.json").read_text())["status"] == "rejected"


def test_passing_gates_mark_the_run_accepted(tmp_path, capsys):
    # the override replaces the recipe's gate
    code, out = _train(tmp_path, "--set", "eval.gates.task.exact_match=>= 0", subprocess_=False)
    assert code == 0, capsys.readouterr().err[-3000:]
    info = json.loads((out / "fastft.json").read_text())
    assert info["status"] == "accepted" and info["gates"]["passed"]
    assert {r["gate"]: r["condition"] for r in info["gates"]["results"]}["task.exact_match"] == ">= 0"


def test_eval_cli_rescores_a_run_with_slices_and_a_regression_set(rejected, tmp_path, capsys):
    _, out = rejected
    rows = _rows(12, start=1000)
    for r in rows:
        r["slice"] = "with-input" if r["input"] else "no-input"
    data_file = _write(tmp_path / "test.jsonl", rows)
    reg = _write(tmp_path / "reg.jsonl", _rows(3, start=1100))
    (out / "eval.json").unlink()
    code = cli.main(["eval", str(out), "--data", str(data_file), "--regression", str(reg)])
    p = capsys.readouterr()
    assert code == 3, p.err[-3000:]  # the recipe's exact-match gate still fails
    ev = json.loads((out / "eval.json").read_text())
    t = ev["task"]
    assert t["n"] == 12 and t["source"] == str(data_file)
    assert set(t["adapter"]["slices"]) == set(t["base"]["slices"]) == {"with-input", "no-input"}
    assert sum(s["n"] for s in t["adapter"]["slices"].values()) == 12
    assert ev["regression"]["n"] == 3 and ev["regression"]["source"] == str(reg)
    assert [len(ex) for ex in t["examples"]] and {"base", "adapter", "reference", "slice"} <= set(t["examples"][0])
    for line in ("base     adapter", "task exact_match (n=12)", "slice no-input", "task loss", "regression contains (n=3)",
                 "regression forgotten", "FAIL  task.exact_match >= 0.99"):
        assert line in p.out, p.out
    # fastft.json is the training record: eval does not change it
    assert json.loads((out / "fastft.json").read_text())["eval"]["task"]["n"] == 16

    assert cli.main(["eval", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert cli.main(["eval", str(out), "--no-gate-exit", "--data", str(data_file)]) == 0
