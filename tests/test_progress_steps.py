"""Progress on the long steps: the evaluation's progress is on stderr before its first prompt is answered."""
from __future__ import annotations

import contextlib

import pytest

from fastft import evaluate, generate, progress
from fastft.schema import EvalConfig


class _Tokenizer:
    chat_template = None
    eos_token_id = 0
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(w) + 1 for w in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join("yes" for _ in ids)


class _Model:
    @contextlib.contextmanager
    def disable_adapter(self):
        yield


def test_eval_progress_is_printed_before_the_first_prompt_finishes(monkeypatch, capsys):
    monkeypatch.setattr(progress, "_QUIET", False)
    seen_before_each_batch: list[str] = []

    def fake_continue(model, tokenizer, prompts, stops, max_new_tokens, **options):
        # what stderr holds when a batch of prompts is handed to the model, before any answer exists
        seen_before_each_batch.append(capsys.readouterr().err)
        return [[5, 0] for _ in prompts]

    monkeypatch.setattr(generate, "_continue", fake_continue)
    pairs = [([{"role": "user", "content": f"question {i}"}], "yes") for i in range(5)]
    task = evaluate.EvalSet("held-out", pairs, [None] * 5, [])
    cfg = EvalConfig(metric="exact_match", batch_size=2, max_new_tokens=4)
    result = evaluate.compare(_Model(), _Tokenizer(), task, cfg, log=lambda m: None)
    assert result["task"]["n"] == 5 and result["task"]["adapter"]["exact_match"] == 1.0
    first = seen_before_each_batch[0]
    assert "eval: held-out answers (adapter, then base): started (10 prompts)" in first
    rest = "".join(seen_before_each_batch[1:]) + capsys.readouterr().err
    # the closing line counts every prompt of both passes, with a rate
    assert "eval: held-out answers (adapter, then base): 10/10 prompts" in rest and "prompts/s" in rest


def test_eval_progress_bar_on_a_terminal_is_drawn_before_the_first_prompt(monkeypatch):
    """On a terminal the tqdm bar (0/total) is on screen before the model answers anything: the user
    sees the evaluation start at once, not after its first batch."""
    import io
    import sys

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    monkeypatch.setattr(progress, "_QUIET", False)
    monkeypatch.setattr(sys, "stderr", tty)
    screen_at_first_batch: list[str] = []

    def fake_continue(model, tokenizer, prompts, stops, max_new_tokens, **options):
        if not screen_at_first_batch:
            screen_at_first_batch.append(tty.getvalue())
        return [[5, 0] for _ in prompts]

    monkeypatch.setattr(generate, "_continue", fake_continue)
    pairs = [([{"role": "user", "content": f"question {i}"}], "yes") for i in range(3)]
    evaluate.compare(_Model(), _Tokenizer(), evaluate.EvalSet("held-out", pairs, [None] * 3, []),
                     EvalConfig(metric="exact_match", batch_size=8, max_new_tokens=4), log=lambda m: None)
    first = screen_at_first_batch[0]
    assert "eval: held-out answers (adapter, then base)" in first and "0/6" in first
    assert "6/6" in tty.getvalue()


def test_quiet_turns_eval_progress_off(monkeypatch, capsys):
    monkeypatch.setattr(progress, "_QUIET", True)
    monkeypatch.setattr(generate, "_continue", lambda m, t, prompts, *a, **k: [[5, 0] for _ in prompts])
    pairs = [([{"role": "user", "content": "q"}], "yes")]
    evaluate.compare(_Model(), _Tokenizer(), evaluate.EvalSet("x", pairs, [None], []),
                     EvalConfig(max_new_tokens=2), log=lambda m: None)
    assert capsys.readouterr().err == ""


def test_quiet_also_silences_datasets_bars(monkeypatch):
    """TRL packs through datasets.map, which draws its own bar: --quiet turns that off too."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(progress, "_QUIET", False)
    try:
        progress.set_quiet(True)
        assert not datasets.is_progress_bar_enabled()
        progress.set_quiet(False)
        assert datasets.is_progress_bar_enabled()
    finally:
        datasets.enable_progress_bars()


def test_cli_quiet_sets_progress_off(monkeypatch, capsys):
    from fastft import cli

    monkeypatch.setattr(progress, "_QUIET", False)
    assert cli.main(["--quiet", "validate", "recipes/tiny-demo.yaml"]) == 0
    assert progress.quiet()


def test_registry_shows_progress_hashing_and_storing_large_files(tmp_path, monkeypatch, capsys):
    from test_report import fabricate_run

    from fastft import registry

    monkeypatch.setattr(progress, "_QUIET", False)
    monkeypatch.setattr(registry, "BIG_FILE", 1000)  # "large" for the test: the 7-byte adapter stays silent
    run = fabricate_run(tmp_path / "run")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"w" * 5000)
    registry.Registry(tmp_path / "reg").push(run, "demo")
    err = capsys.readouterr().err
    assert "sha256 adapter_model.safetensors: started (5,000 B)" in err
    assert "store adapter_model.safetensors: 5,000/5,000 B" in err
    assert "adapter_config.json" not in err


@pytest.mark.slow
def test_data_preparation_and_merge_print_progress(tmp_path, monkeypatch, capsys):
    """A real (4-step) tiny run and its merge: each long step announces itself on stderr with its total."""
    import json

    from support import tiny_recipe_dict

    from fastft import merge, recipe, train

    monkeypatch.setattr(progress, "_QUIET", False)
    rows = [{"instruction": f"classify red , blue , item {i}", "output": "color"} for i in range(40)]
    src = tmp_path / "fresh.jsonl"  # data never seen before: no cache hit, so it is read and tokenized
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = recipe.from_dict(tiny_recipe_dict(tmp_path / "run", data={"train": str(src), "eval_fraction": 0.0,
                                                                  "max_examples": None},
                                          train={"max_steps": 2, "batch_size": 4},
                                          eval={"after_training": False}))
    train.run(r, log=lambda m: None)
    err = capsys.readouterr().err
    assert "data: read + tokenize fresh.jsonl: started" in err  # a JSONL's row count is known at its end
    assert "data: read + tokenize fresh.jsonl: 40 rows" in err
    assert "data: write train split: started (40 rows)" in err
    merge.merge(str(tmp_path / "run"), tmp_path / "merged", dtype="fp32", log=lambda m: None)
    err = capsys.readouterr().err
    assert "merge: started (5 stages)" in err and "merge: 5/5 stages" in err
