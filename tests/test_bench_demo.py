"""python -m bench.demo: the result JSON holds the run's own files and what the harness measured."""
from __future__ import annotations

import json
import subprocess

from test_report import fabricate_run

from bench import demo


def test_demo_result_is_the_runs_own_figures(tmp_path, monkeypatch):
    calls, real_run = [], subprocess.run

    def fake_run(cmd, env=None, check=False, **kw):
        if cmd[0] == "git":  # bench.common.git_sha
            return real_run(cmd, check=check, **kw)
        calls.append(cmd)
        out = next(c.split("=", 1)[1] for c in cmd if c.startswith("output.dir="))
        fabricate_run(tmp_path / "src")
        for f in ("fastft.json", "eval.json", "metrics.jsonl"):
            (tmp_path / "run" / f).write_text((tmp_path / "src" / f).read_text())
        assert out == str(tmp_path / "run")
        return subprocess.CompletedProcess(cmd, 3)

    monkeypatch.setattr(demo.subprocess, "run", fake_run)
    (tmp_path / "run").mkdir()
    out = tmp_path / "res.json"
    rc = demo.main(["recipes/tiny-demo.yaml", "--set", "train.max_steps=2", "--name", "demo-x",
                    "--run-dir", str(tmp_path / "run"), "--out", str(out), "--note", "a note"])
    assert rc == 3  # the training command's exit status (3: a gate failed)
    assert calls[0][1:] == ["train", "recipes/tiny-demo.yaml", "--set", f"output.dir={tmp_path / 'run'}",
                            "--overwrite", "--set", "train.max_steps=2"]
    doc = json.loads(out.read_text())
    run = json.loads((tmp_path / "run" / "fastft.json").read_text())
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert doc["run"] == run and doc["eval"] == ev and doc["exit_code"] == 3 and doc["notes"] == ["a note"]
    s = doc["summary"]
    assert s["tokens_per_second"] == run["metrics"]["train"]["tokens_per_second"]
    assert s["adapter_exact_match"] == ev["task"]["adapter"]["exact_match"]
    assert s["regression_forgotten"] == ev["regression"]["forgotten"] and s["status"] == "rejected"
    assert doc["command"].endswith("-m bench.demo recipes/tiny-demo.yaml --set train.max_steps=2 --name demo-x "
                                   f"--run-dir {tmp_path / 'run'} --out {out} --note 'a note'")
    dev = doc["device"]
    assert dev["cores"] >= 1 and dev["name"] and len(dev["load_average_before"]) == 3
    assert doc["process_wall_seconds"] >= 0 and "process_max_rss_kb" in doc and "git_commit" in doc
