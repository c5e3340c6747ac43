"""bench.demo (the result JSON holds the run's own files and what the harness measured),
bench.readme_table (the README's measured rows come from those files) and bench.screenshot."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_report import fabricate_run

from bench import demo, readme_table, screenshot
from fastft import report

ROOT = Path(__file__).resolve().parent.parent


def test_demo_result_is_the_runs_own_figures(tmp_path, monkeypatch):
    calls = []

    class FakePopen:
        def __init__(self, cmd, env=None, stdout=None, text=None, bufsize=None):
            calls.append((cmd, env))
            out = next(c.split("=", 1)[1] for c in cmd if c.startswith("output.dir="))
            assert out == str(tmp_path / "run")
            fabricate_run(tmp_path / "src")
            for f in ("fastft.json", "eval.json", "metrics.jsonl"):
                (tmp_path / "run" / f).write_text((tmp_path / "src" / f).read_text())
            self.stdout = io.StringIO("fastft: backend hf\nfastft: eval /x\n  task exact_match\n")

        def wait(self):
            return 3

    real_popen = subprocess.Popen

    def popen(cmd, **kw):  # bench.common.git_sha runs git through subprocess too
        return real_popen(cmd, **kw) if cmd[0] == "git" else FakePopen(cmd, **kw)

    monkeypatch.setattr(demo.subprocess, "Popen", popen)
    (tmp_path / "run").mkdir()
    out = tmp_path / "res.json"
    rc = demo.main(["recipes/tiny-demo.yaml", "--set", "train.max_steps=2", "--name", "demo-x",
                    "--run-dir", str(tmp_path / "run"), "--out", str(out), "--note", "a note"])
    assert rc == 3  # the training command's exit status (3: a gate failed)
    cmd, env = calls[0]
    assert cmd[1:] == ["train", "recipes/tiny-demo.yaml", "--set", f"output.dir={tmp_path / 'run'}",
                       "--overwrite", "--set", "train.max_steps=2"]
    assert env["PYTHONUNBUFFERED"] == "1"
    doc = json.loads(out.read_text())
    run = json.loads((tmp_path / "run" / "fastft.json").read_text())
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert doc["run"] == run and doc["eval"] == ev and doc["exit_code"] == 3 and doc["notes"] == ["a note"]
    assert doc["train_stdout"] == "fastft: backend hf\nfastft: eval /x\n  task exact_match\n"
    assert doc["run_dir"] == str(tmp_path / "run")
    s = doc["summary"]
    assert s["tokens_per_second"] == run["metrics"]["train"]["tokens_per_second"]
    assert s["adapter_exact_match"] == ev["task"]["adapter"]["exact_match"]
    assert s["regression_forgotten"] == ev["regression"]["forgotten"] and s["status"] == "rejected"
    assert doc["command"].endswith("-m bench.demo recipes/tiny-demo.yaml --set train.max_steps=2 --name demo-x "
                                   f"--run-dir {tmp_path / 'run'} --out {out} --note 'a note'")
    dev = doc["device"]
    assert dev["cores"] >= 1 and dev["name"] and len(dev["load_average_before"]) == 3
    assert doc["process_wall_seconds"] >= 0 and "process_max_rss_kb" in doc and "git_commit" in doc

    # the README row of that result: every figure read back from the file
    doc["name"] = "demo-smollm2"
    line = readme_table.row(doc, "bench/results/x.json", merged=0.9)
    assert line == ("| `make demo`: task + 15% general | 25.0% -> 60.0% (90.0% merged) | **12.5%** (1 of 8) | "
                    f"900 | 1.10 GB | {readme_table.seconds(doc['process_wall_seconds'])} | "
                    "[json](bench/results/x.json) |")
    assert readme_table.block(doc) == ["fastft: backend hf", "...", "fastft: eval /x", "  task exact_match"]


def test_readme_measured_rows_are_the_result_files(capsys):
    """The rows `python -m bench.readme_table` prints are the README's rows, character for character."""
    assert readme_table.main([]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(rows) == len(readme_table.README_FILES)
    for r in rows:
        assert r in readme, f"README.md lacks the row printed from the result file:\n{r}"


def test_readme_table_errors(tmp_path, capsys):
    assert readme_table.main([str(tmp_path / "missing.json")]) == 2
    assert "no such result file" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps({"kind": "demo", "run": None}))
    assert readme_table.main([str(tmp_path / "bad.json")]) == 2
    assert "not a finished demo result" in capsys.readouterr().err


def _fake_chromium(tmp_path: Path, write: bool = True) -> Path:
    """An executable that answers --version and writes a PNG of the --window-size to --screenshot."""
    script = tmp_path / "fake-chromium"
    body = f"""#!{sys.executable}
import struct, sys, zlib
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
if "--version" in sys.argv:
    print("FakeChromium 1.0"); sys.exit(0)
w, h = map(int, args["window-size"].split(","))
if {write!r}:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    open(args["screenshot"], "wb").write(b"\\x89PNG\\r\\n\\x1a\\n" + chunk)
print(" ".join(sys.argv[1:]), file=sys.stderr)
"""
    script.write_text(body)
    script.chmod(0o755)
    return script


def test_screenshot_command_size_and_errors(tmp_path, capsys):
    run = fabricate_run(tmp_path / "run")
    report.write([run])
    fake = _fake_chromium(tmp_path)
    out = tmp_path / "img" / "r.png"
    assert screenshot.main([str(run), "--out", str(out), "--chromium", str(fake), "--width", "800",
                            "--height", "600"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["width"] == 800 and res["height"] == 600 and res["chromium"] == "FakeChromium 1.0"
    assert screenshot.png_size(out) == (800, 600)
    assert "--headless" in res["command"] and "--window-size=800,600" in res["command"]
    assert (run / "report.html").resolve().as_uri() in res["command"]

    # a browser that writes nothing: an error, and no stale picture from the run before counts
    (tmp_path / "s").mkdir()
    silent = _fake_chromium(tmp_path / "s", write=False)
    assert screenshot.main([str(run), "--out", str(out), "--chromium", str(silent)]) == 2
    assert "without writing" in capsys.readouterr().err and not out.exists()
    # no report, no browser: each error names the fix
    assert screenshot.main([str(tmp_path / "nothing"), "--out", str(out), "--chromium", str(fake)]) == 2
    assert "no such report" in capsys.readouterr().err
    assert screenshot.main([str(run), "--out", str(out), "--chromium", str(tmp_path / "no-browser")]) == 2
    assert "apt-get install -y chromium" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_screenshot_with_real_chromium(tmp_path):
    run = fabricate_run(tmp_path / "run")
    report.write([run])
    res = screenshot.screenshot(run, tmp_path / "r.png", width=900, height=700)
    assert (res["width"], res["height"]) == (900, 700)
    raw = (tmp_path / "r.png").read_bytes()
    assert len(raw) > 5_000  # a rendered page, not an empty canvas
