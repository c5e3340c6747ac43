"""fastft report: the HTML page (every section, embedded figures, the run's own numbers) and report.md."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fastft import cli, registry, registry_meta, report


def fabricate_run(path: Path, lr: float = 3e-3, shift: float = 0.0, status: str = "rejected") -> Path:
    """A small finished run folder: fastft.json, metrics.jsonl, eval.json, export.json, adapter/."""
    path.mkdir(parents=True)
    rows = []
    for step in range(1, 13, 3):
        rows.append({"loss": 3.0 / step + shift, "grad_norm": 1.5, "learning_rate": lr * (1 - step / 13),
                     "tokens_per_second": 900.0 + 10 * step, "peak_rss_gb": 1.0 + step / 100, "step": step,
                     "tokens_seen": 300 * step})
        if step == 7:
            rows.append({"eval_loss": 1.25 + shift, "step": 7, "peak_rss_gb": 1.07, "tokens_seen": 2100})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = {"schema_version": 1, "metric": "exact_match", "json_fields": None,
          "task": {"source": "held-out split", "n": 20, "loss_tokens": 80, "gain": 0.35, "references_not_json": 0,
                   "base": {"exact_match": 0.25, "loss": 2.5, "perplexity": 12.18,
                            "slices": {"animals": {"exact_match": 0.2, "n": 10}, "colors": {"exact_match": 0.3, "n": 10}}},
                   "adapter": {"exact_match": 0.6, "loss": 1.1 + shift, "perplexity": 3.0,
                               "slices": {"animals": {"exact_match": 0.5, "n": 10},
                                          "colors": {"exact_match": 0.7, "n": 10}}},
                   "examples": [{"prompt": "What kind of thing is a cat?", "reference": "animal", "base": "thing",
                                 "adapter": "animal", "slice": "animals"}]},
          "regression": {"source": "asset:regression/x.jsonl", "n": 10, "metric": "contains",
                         "base": {"accuracy": 0.8, "loss": 1.9}, "adapter": {"accuracy": 0.7, "loss": 2.05},
                         "forgotten": 0.125, "forgotten_count": 1, "base_correct": 8, "loss_delta": 0.15,
                         "forgotten_items": [{"prompt": "What is the capital of France?", "reference": "Paris",
                                              "base": "Paris.", "adapter": "animal"}]},
          "gates": {"passed": False, "results": [
              {"gate": "task.exact_match", "condition": ">= 0.5", "value": 0.6, "passed": True},
              {"gate": "regression.forgotten", "condition": "<= 0.05", "value": 0.125, "passed": False}],
              "failed": ["gate regression.forgotten <= 0.05 failed: measured 0.125"]},
          "seconds": 12.5}
    (path / "eval.json").write_text(json.dumps(ev))
    summary = {k: v for k, v in ev.items() if k != "gates"}
    info = {"schema_version": 1, "recipe": {"model": {"name": "fastft-tiny", "load_in_4bit": True},
                                            "train": {"lr": lr, "max_steps": 12}, "lora": {"r": 8}},
            "recipe_source": "recipes/tiny-demo.yaml", "backend": {"name": "hf", "dtype": "float32"},
            "versions": {"python": "3.11.7", "torch": "2.13.0+cpu", "transformers": "5.17.0"},
            "data": {"hash": "sha256:abc"},
            "metrics": {"train": {"train_tokens": 3600, "train_step_seconds": 4.0, "tokens_per_second": 900.0,
                                  "peak_rss_gb": 1.1},
                        "steps": 12, "before": {"eval_loss": 3.5}, "after": {"eval_loss": 1.2 + shift},
                        "wall_seconds": 30.0},
            "command": "fastft train recipes/tiny-demo.yaml", "eval": summary, "gates": ev["gates"],
            "status": status, "source": {"git_commit": "0123abc", "git_dirty": False}}
    (path / "fastft.json").write_text(json.dumps(info))
    (path / "export.json").write_text(json.dumps({"run_dir": str(path), "seconds": 3.0, "exports": [
        {"file": str(path / "export" / "run-q8_0.gguf"), "quant": "q8_0", "bytes": 5_000_000,
         "verification": {"passed": True, "gated": True, "relative_to_scale": 0.004, "argmax_agreement": 0.99}}]}))
    (path / "adapter").mkdir()
    (path / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (path / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    return path


class _Cells(HTMLParser):
    """Rows of every <table class=NAME>: {NAME: [[cell text, ...], ...]}."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._cls, self._row, self._cell = None, None, None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._cls = dict(attrs).get("class", "")
            self.tables.setdefault(self._cls, [])
        elif tag == "tr" and self._cls is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._cls].append(self._row)
            self._row = None
        elif tag == "table":
            self._cls = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _tables(html_text: str) -> dict:
    p = _Cells()
    p.feed(html_text)
    return p.tables


def test_single_run_report_has_every_section_and_the_run_numbers(tmp_path):
    run = fabricate_run(tmp_path / "tiny-run")
    html_path, md_path = report.write([run])
    assert html_path == run / "report.html" and md_path == run / "report.md"
    page = html_path.read_text()
    for sid in report.SECTIONS:
        assert f'<section id="{sid}">' in page, sid
    # self-contained: inline SVG figures, no script, no external resource
    assert page.count("<svg") >= 4 and "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) <= {"http://www.w3.org/2000/svg"}

    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ev = json.loads((run / "eval.json").read_text())
    tables = _tables(page)
    name = run.name
    for m in [m for m in metrics if "loss" in m]:  # every logged value, step by step, as plotted
        assert [name, str(m["step"]), f"{m['loss']:.4f}"] in tables["values-training-loss"]
        assert [name, str(m["step"]), f"{m['learning_rate']:.4g}"] in tables["values-learning-rate"]
        assert [name, str(m["step"]), f"{m['tokens_per_second']:.1f}"] in tables["values-tokens-s"]
        assert [name, str(m["step"]), f"{m['peak_rss_gb']:.3f}"] in tables["values-peak-rss-gb"]
    assert len(tables["values-training-loss"]) == 1 + sum("loss" in m for m in metrics)
    # the figures draw those values: one marked point per logged step, on one line per series
    loss_svg = page.split('<section id="loss">')[1].split("</svg>")[0]
    for m in [m for m in metrics if "loss" in m]:
        assert f"<title>train: step {m['step']}, {m['loss']:.6g}</title>" in loss_svg
    assert loss_svg.count("<polyline") == 2  # training loss, held-out loss
    # held-out loss: before (step 0), during (step 7), after (last step)
    for step, v in ((0, 3.5), (7, 1.25), (12, 1.2)):
        assert [name, str(step), f"{v:.4f}"] in tables["values-held-out-loss"]
    # base vs adapter with slices, equal to eval.json
    eval_rows = {r[0]: r for r in tables["eval"][1:]}
    t = ev["task"]
    assert eval_rows["overall"][1:5] == ["20", f"{100 * t['base']['exact_match']:.1f}%",
                                         f"{100 * t['adapter']['exact_match']:.1f}%", f"{100 * t['gain']:.1f}%"]
    for sl in ("animals", "colors"):
        assert eval_rows[f"slice {sl}"][2:4] == [f"{100 * t['base']['slices'][sl]['exact_match']:.1f}%",
                                                 f"{100 * t['adapter']['slices'][sl]['exact_match']:.1f}%"]
    # forgetting and the forgotten item, gates and status, exports, recipe, versions
    reg = ev["regression"]
    assert tables["regression"][1][1:] == [f"{100 * reg['base']['accuracy']:.1f}%",
                                           f"{100 * reg['adapter']['accuracy']:.1f}%"]
    assert "12.5%" in page and tables["forgotten"][1][0] == "What is the capital of France?"
    gates = {r[0]: r for r in tables["gates"][1:]}
    assert gates["regression.forgotten"][2:] == ["0.1250", "FAIL"] and gates["task.exact_match"][3] == "pass"
    assert "rejected" in page
    assert tables["exports"][1][:3] == ["q8_0", "run-q8_0.gguf", "5.0 MB"] and tables["exports"][1][4] == "pass"
    assert ["train.lr", "0.003000"] in tables["recipe"] and ["torch", "2.13.0+cpu"] in tables["versions"]

    md = md_path.read_text()
    assert "| overall | 20 | 25.0% | 60.0% |" in md and "| slice colors | 10 | 30.0% | 70.0% |" in md
    assert "| regression.forgotten | <= 0.05 | 0.1250 | FAIL |" in md and "forgotten 12.5%" in md
    assert "| q8_0 | run-q8_0.gguf | 5.0 MB | pass |" in md


def test_several_runs_overlay_curves_and_sit_side_by_side(tmp_path):
    a = fabricate_run(tmp_path / "lr-high", lr=3e-3)
    b = fabricate_run(tmp_path / "lr-low", lr=1e-3, shift=0.5, status="accepted")
    html_path, md_path = report.write([a, b])
    assert html_path == a / "compare.html" and not (a / "report.html").exists()
    page = html_path.read_text()
    for sid in report.SECTIONS:
        assert f'<section id="{sid}">' in page, sid
    loss_svg = page.split('<section id="loss">')[1].split("</svg>")[0]
    assert loss_svg.count("<polyline") == 4  # training + held-out loss of each run, in one figure
    assert "lr-high train" in loss_svg and "lr-low held-out" in loss_svg
    tables = _tables(page)
    side = {r[0]: r[1:] for r in tables["summary"]}
    assert side[""] == ["lr-high", "lr-low"] and side["status"] == ["rejected", "accepted"]
    assert side["held-out loss after"] == ["1.2000", "1.7000"]
    assert ["train.lr", "0.003000", "0.001000"] in tables["recipe-diff"]
    md = md_path.read_text()
    assert "| held-out loss after | 1.2000 | 1.7000 |" in md and "| train.lr | 0.003000 | 0.001000 |" in md


def test_a_run_without_eval_or_exports_still_reports(tmp_path):
    run = fabricate_run(tmp_path / "bare")
    for f in ("eval.json", "export.json"):
        (run / f).unlink()
    info = json.loads((run / "fastft.json").read_text())
    for k in ("eval", "gates", "status"):
        info.pop(k)
    (run / "fastft.json").write_text(json.dumps(info))
    page = report.write([run])[0].read_text()
    assert "no held-out evaluation" in page and "no exports" in page and "no gates" in page


def test_cli_report_and_errors(tmp_path, capsys):
    run = fabricate_run(tmp_path / "run")
    assert cli.main(["report", str(run)]) == 0
    assert (run / "report.html").is_file() and (run / "report.md").is_file()
    out = tmp_path / "ab"
    assert cli.main(["report", str(run), str(run), "--out", str(out)]) == 0
    assert (out / "compare.html").is_file()
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    assert cli.main(["report", str(tmp_path / "empty")]) == 2
    assert "no fastft.json" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text("{not json\n")
    with pytest.raises(report.ReportError, match="metrics.jsonl line 1"):
        report.write([run])


def test_registry_push_stores_the_report_and_show_names_it(tmp_path):
    run = fabricate_run(tmp_path / "run")
    report.write([run])
    reg = registry.Registry(tmp_path / "reg")
    e = reg.push(run, "demo")
    assert "report.html" in e.manifest and "report.md" in e.manifest
    shown = registry_meta.format_show(reg, reg.get("demo@v1"))
    stored = reg._object(e.manifest["report.html"])
    assert f"report       report.html: {stored}" in shown
    assert stored.read_text() == (run / "report.html").read_text()


def test_refresh_rewrites_an_existing_report_only(tmp_path):
    run = fabricate_run(tmp_path / "run")
    report.refresh(run, log=lambda m: None)
    assert not (run / "report.html").exists()  # no report yet: nothing written
    report.write([run])
    ev = json.loads((run / "eval.json").read_text())
    ev["task"]["adapter"]["exact_match"] = 0.9
    (run / "eval.json").write_text(json.dumps(ev))
    said = []
    report.refresh(run, log=said.append)
    assert "90.0%" in (run / "report.html").read_text() and "report updated" in said[0]
