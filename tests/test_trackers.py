"""train.report_to: the trainer's integrations plus fastft's figures; TensorBoard read back from its event files."""
from __future__ import annotations

import json
import os

import pytest

from fastft import recipe, trackers


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_unknown_or_missing_tracker_is_a_clear_error(monkeypatch):
    with pytest.raises(trackers.TrackerError, match="unknown tracker 'tensorbord'"):
        trackers.require(["tensorbord"])
    monkeypatch.setattr(trackers, "_installed", lambda module: module not in ("wandb", "mlflow", "trackio"))
    for name in ("wandb", "mlflow", "trackio"):
        with pytest.raises(trackers.TrackerError, match=f"pip install {name}"):
            trackers.require(["tensorboard", name])
    assert trackers.require(["tensorboard"]) == ["tensorboard"]
    assert trackers.require(None) == []
    with pytest.raises(recipe.RecipeError, match="train.report_to: unknown tracker 'comet'"):
        recipe.from_dict({"model": {"name": "x"}, "data": {"train": "x"}, "output": {"dir": "x"},
                          "train": {"report_to": ["comet"]}})


def test_trainer_args(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    monkeypatch.setattr(trackers, "_USER_TB_DIR", None)
    assert trackers.trainer_args(None, tmp_path) == "none"
    assert trackers.trainer_args(["tensorboard"], tmp_path) == ["tensorboard"]
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "tensorboard")


def test_tensorboard_round_trip_of_fastft_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(trackers, "_USER_TB_DIR", None)
    history = [{"loss": 2.0, "tokens_per_second": 1000.5, "peak_rss_gb": 1.25, "step": 5, "tokens_seen": 500},
               {"eval_loss": 1.9, "step": 5},
               {"loss": 1.5, "tokens_per_second": 1100.25, "peak_rss_gb": 1.5, "step": 10, "tokens_seen": 1000}]
    ev = {"metric": "exact_match",
          "task": {"gain": 0.25, "base": {"exact_match": 0.5, "loss": 2.0, "slices": {"a": {"exact_match": 0.4, "n": 5}}},
                   "adapter": {"exact_match": 0.75, "loss": 1.0, "slices": {"a": {"exact_match": 0.8, "n": 5}}}},
          "regression": {"base": {"accuracy": 0.9}, "adapter": {"accuracy": 0.8}, "forgotten": 0.125,
                         "forgotten_count": 1, "loss_delta": 0.05}}
    info = {"metrics": {"train": {"tokens_per_second": 1050.0, "train_tokens": 1000, "peak_rss_gb": 1.5},
                        "before": {"eval_loss": 3.0}, "after": {"eval_loss": 1.75}, "wall_seconds": 12.0},
            "gates": {"passed": False, "results": [{"gate": "regression.forgotten", "condition": "<= 0.05",
                                                    "value": 0.125, "passed": False}]}}
    said = []
    trackers.log_run(["tensorboard"], tmp_path, history, info, ev, step=10, log=said.append)
    got = _scalars(tmp_path / "tensorboard")
    assert got["fastft/tokens_per_second"] == [(5, 1000.5), (10, 1100.25)]
    assert got["fastft/peak_rss_gb"] == [(5, 1.25), (10, 1.5)]
    expected = {"eval/task/exact_match/base": 0.5, "eval/task/exact_match/adapter": 0.75,
                "eval/task/exact_match/gain": 0.25, "eval/task/slice/a/exact_match/adapter": 0.8,
                "eval/task/slice/a/exact_match/base": 0.4, "eval/regression/forgotten": 0.125,
                "eval/heldout_loss_after": 1.75, "eval/heldout_loss_before": 3.0, "gates/passed": 0.0,
                "gates/regression.forgotten/value": 0.125, "gates/regression.forgotten/passed": 0.0,
                "fastft/run/tokens_per_second": 1050.0}
    for tag, value in expected.items():
        assert got[tag] == [(10, pytest.approx(value, rel=1e-6))], tag
    assert "tensorboard" in said[0]


@pytest.mark.slow
def test_train_logs_to_tensorboard_and_writes_the_report(tmp_path, monkeypatch):
    """A short run with report_to: [tensorboard]: transformers' callback logs the loss, fastft its
    figures, into the same event directory; the run ends with report.html and report.md."""
    from support import tiny_recipe_dict

    from fastft import train

    monkeypatch.setattr(trackers, "_USER_TB_DIR", None)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "")
    r = recipe.from_dict(tiny_recipe_dict(tmp_path / "run", train={"max_steps": 4, "logging_every": 2,
                                                                   "report_to": ["tensorboard"]},
                                          data={"max_examples": 80},
                                          eval={"max_examples": 4, "max_new_tokens": 2}))
    result = train.run(r, log=lambda m: None)
    got = _scalars(tmp_path / "run" / "tensorboard")
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {m["step"]: m for m in metrics if "loss" in m}
    assert {s for s, _ in got["train/loss"]} == set(logged)  # the trainer's own integration
    for step, v in got["train/loss"]:
        assert v == pytest.approx(logged[step]["loss"], rel=1e-5)
    for step, v in got["fastft/tokens_per_second"]:
        assert v == pytest.approx(logged[step]["tokens_per_second"], rel=1e-5)
    adapter = result.info["eval"]["task"]["adapter"]["exact_match"]
    assert got["eval/task/exact_match/adapter"] == [(4, pytest.approx(adapter))]
    assert (tmp_path / "run" / "report.html").is_file() and (tmp_path / "run" / "report.md").is_file()
    # the report of this real run shows its own numbers: every logged loss, the evaluation's figures
    from test_report import _tables

    tables = _tables((tmp_path / "run" / "report.html").read_text())
    for step, m in logged.items():
        assert ["run", str(step), f"{m['loss']:.4f}"] in tables["values-training-loss"]
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    overall = next(r for r in tables["eval"] if r[0] == "overall")
    assert overall[1:4] == [str(ev["task"]["n"]), f"{100 * ev['task']['base']['exact_match']:.1f}%",
                            f"{100 * adapter:.1f}%"]
