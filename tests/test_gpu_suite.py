"""bench/gpu.sh (bench/suite.py): the GPU suite's order, its time budget, and its CPU rehearsal.

The budget test runs the real scheduler with every step replaced by a sleeping stub
(FASTFT_SUITE_STUB_SLEEP, dry runs only): a step whose share is under its minimum is "cut", one that
outlives its limit gets SIGINT and is "timeout". The slow test runs the whole `--dry-run` as CI does.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support import ROOT

ORDER = ["install", "env", "compile", "nf4", "lora", "synthetic-8b", "e2e", "plan", "gpu-tests"]


def _env(**extra):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the compile step must build real cubins
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def _suite():
    sys.path.insert(0, str(ROOT))
    from bench import suite

    return suite


def test_steps_come_in_the_issue_order_most_decisive_first(tmp_path):
    suite = _suite()
    steps = suite.steps("python", tmp_path, cpus=16)
    assert ["install"] + [s.name for s in steps] == ORDER
    real = {s.name: s.cmd for s in steps}
    assert "bench.kernels static --check" in real["compile"]
    assert "--dtypes bf16" in real["nf4"]
    assert "--bases nf4 --ranks 16 --tokens 4096 --shapes 4096x4096,4096x14336,14336x4096" in real["lora"]
    runs = real["e2e"].split("--run ")[1:]
    assert [r.split()[0] for r in runs] == ["unsloth:unsloth", "unsloth:fastft", "hf"]
    assert "--steps 17 --warmup 3" in real["e2e"]  # ~20 steps each
    assert "-n 8" in real["gpu-tests"] and "--timeout-method signal" in real["gpu-tests"]
    assert "--junitxml=" in real["gpu-tests"]
    # every step's dry stand-in differs from the real command (nothing real runs on CPU)
    assert all(s.dry != s.cmd for s in steps if s.name != "plan")


def test_step_limit_is_a_share_of_what_is_left():
    suite = _suite()
    usable = 300 - suite.STOP_RESERVE
    assert suite.step_limit(300, 1, 0) == pytest.approx(usable)  # the last step takes the rest
    assert suite.step_limit(300, 1, 3) == pytest.approx(usable / 4)
    assert suite.step_limit(10, 5, 5) == 0  # nothing left beyond the reserve
    # the real weights: with the whole default budget every step gets at least its minimum
    steps = suite.steps("python", ROOT, cpus=16)
    left = suite.DEFAULT_BUDGET
    for i, s in enumerate(steps):
        limit = suite.step_limit(left, s.weight, sum(t.weight for t in steps[i + 1:]))
        assert limit >= s.minimum, (s.name, limit)
        left -= limit  # each step using all of its share
    assert left == pytest.approx(suite.STOP_RESERVE)


def test_budget_cuts_steps_that_cannot_fit_and_stops_an_overrun_with_sigint(tmp_path):
    # budget 30: 10 s usable after the stop reserve; env's share (0.9 s) and nf4's (7.7 s) are under
    # their minimums (cut); plan gets the 10 s left, sleeps 30 and is stopped with SIGINT
    env = _env(FASTFT_SUITE_STUB_SLEEP="30")
    proc = subprocess.run(["bash", "bench/gpu.sh", "--dry-run", "--budget", "30", "--only", "env,nf4,plan",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a step that timed out fails the call
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert doc["dry_run"] and doc["complete"]
    status = {s["step"]: s for s in doc["steps"]}
    assert [s["step"] for s in doc["steps"]] == ["install", "env", "nf4", "plan"]
    assert status["env"]["status"] == "cut" and status["nf4"]["status"] == "cut"
    assert "under its minimum" in status["nf4"]["what"]
    assert status["plan"]["status"] == "timeout"
    assert 9 <= status["plan"]["seconds"] <= 10 + 2, status["plan"]
    log = (tmp_path / "logs" / "plan.log").read_text()
    assert "sending SIGINT" in log and "stub: SIGINT" in log  # the step saw SIGINT first
    assert "SIGTERM" not in log
    assert doc["elapsed_s"] <= 30
    assert "DRY RUN" in (tmp_path / "summary.md").read_text()


def test_stub_is_refused_outside_a_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.suite", "--out", str(tmp_path)], cwd=ROOT,
                          env=_env(FASTFT_SUITE_STUB_SLEEP="1"), capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "--dry-run only" in proc.stderr


def test_unknown_step_names_the_steps(tmp_path):
    proc = subprocess.run(["bash", "bench/gpu.sh", "--dry-run", "--only", "nf4,bogus", "--out", str(tmp_path)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "unknown step(s) ['bogus']" in proc.stderr and "gpu-tests" in proc.stderr


@pytest.mark.slow
def test_gpu_suite_dry_run_walks_every_step_on_cpu(tmp_path):
    """The whole rehearsal: ~2-4 minutes on 2 shared cores (one real NF4 compile under triton 3.6 when
    the side install is there, the NF4 and LoRA benchmarks under the interpreter, bench.train --dry-run,
    fastft plan, the GPU tests' collection with pytest-xdist and pytest-timeout loaded)."""
    env = _env(OUT=str(tmp_path))
    proc = subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    summary = (tmp_path / "summary.md").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:]
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert doc["dry_run"] and doc["complete"] and "not measurements" in doc["notes"][0]
    assert [s["step"] for s in doc["steps"]] == ORDER
    for s in doc["steps"][1:]:
        assert s["status"] == "ok", (s, summary)
        assert s["dry_run"] and s["seconds"] <= s["limit_s"] + 1
    results = {p.name: p for p in (tmp_path / "results").glob("*.json")}
    static = [p for n, p in results.items() if n.startswith("static-kernels-dry-run-")]
    assert len(static) == 1, sorted(results)
    st = json.loads(static[0].read_text())
    assert st["complete"] and st["summary"]["errors"] == 0 and st["compiles"][0]["cap"] == 90
    side = ROOT / ".venv" / "triton36" / "triton"
    if side.is_dir():
        assert st["versions"]["triton"] == "3.6.0"
    for name in ("kernel-nf4-dequant-smoke-cpu-", "kernel-lora-linear-smoke-cpu-", "plan-plan-vs-measured-"):
        docs = [json.loads(p.read_text()) for n, p in results.items() if n.startswith(name)]
        assert len(docs) == 1, (name, sorted(results))
    nf4, lora = (next(json.loads(p.read_text()) for n, p in results.items() if n.startswith(k))
                 for k in ("kernel-nf4-dequant-smoke", "kernel-lora-linear-smoke"))
    for d in (nf4, lora):
        assert d["notes"][0].startswith("interpreter smoke, not a measurement") and d["metrics"]["complete"]
    assert all(r["nf4_path"]["forward"] == r["nf4_path"]["backward"] for r in lora["metrics"]["rows"]
               if r["impl"].startswith("fastft"))
    assert "8,030,261,248 parameters" in (tmp_path / "logs" / "e2e.log").read_text()
    collected = (tmp_path / "logs" / "gpu-tests.log").read_text()
    assert "tests collected" in collected or "test collected" in collected
