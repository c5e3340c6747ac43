"""bench/gpu.sh (bench/suite.py): the two GPU calls' steps, their plans against each step's floor, the
run-time cuts and SIGINT, and the CPU rehearsal (--dry-run), which fails on a plan that cannot measure.

The slow tests stop a real tiny bench.train run mid-way, and run the whole `--dry-run` of both calls
as CI does.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from support import ROOT

CALL_1 = ["env", "imports", "nf4", "lora", "synthetic-8b", "e2e"]
CALL_2 = ["env", "synthetic-8b", "e2e-hf", "e2e-rtx4090", "plan", "gpu-tests"]


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def _suite():
    sys.path.insert(0, str(ROOT))
    from bench import suite

    return suite


def test_each_call_holds_its_steps_most_decisive_first(tmp_path):
    suite = _suite()
    one, two = (suite.steps("python", tmp_path, cpus=16, call=c) for c in (1, 2))
    assert [s.name for s in one] == CALL_1 and [s.name for s in two] == CALL_2
    real = {s.name: s.cmd for s in one + two}
    dry = {s.name: s.dry for s in one + two}
    assert "bench.envcheck versions" in real["env"] and "fastft info" not in real["env"]
    assert "bench.envcheck imports .whl" in real["imports"] and "--dry-run" in dry["imports"]
    assert "--dtypes bf16" in real["nf4"]
    assert "--bases nf4 --ranks 16 --tokens 4096 --shapes 4096x4096,4096x14336,14336x4096" in real["lora"]
    # call 1's end-to-end step is the one pair, both sides on Unsloth (the same compile regime)
    assert [r.split()[0] for r in real["e2e"].split("--run ")[1:]] == ["unsloth:unsloth", "unsloth:fastft"]
    assert [r.split()[0] for r in real["e2e-hf"].split("--run ")[1:]] == ["hf"]
    assert "--target rtx4090 --run unsloth:fastft " in real["e2e-rtx4090"]
    assert all("--budget" in real[n] and "--dry-run" in dry[n] for n in ("e2e", "e2e-hf", "e2e-rtx4090"))
    assert "-n 8" in real["gpu-tests"] and "--timeout-method signal" in real["gpu-tests"]
    assert "--junitxml=" in real["gpu-tests"]
    assert not [s for s in one + two if "static --check" in s.cmd]  # CI compiles every config already
    assert all(s.dry != s.cmd for s in one + two if s.name != "env")  # nothing real runs on CPU


def test_the_plan_of_each_call_gives_every_step_at_least_its_floor(tmp_path):
    suite = _suite()
    from bench import train

    for call, names in ((1, CALL_1), (2, CALL_2)):
        todo = suite.steps("python", tmp_path, cpus=16, call=call)
        plan = suite.plan_call(todo, suite.CALL_BUDGETS[call])
        assert [r["step"] for r in plan] == ["install"] + names
        for r in plan:
            assert r["plan"] == "ok" and r["limit_s"] >= r["floor_s"] > 0, (call, r)
        # each limit assumes the ones before it were used up: together they fit the call
        assert sum(r["limit_s"] for r in plan) <= suite.CALL_BUDGETS[call] - suite.STOP_RESERVE + 0.5
    floors = {s.name: s for s in suite.steps("python", tmp_path, cpus=16, call=1)}
    assert floors["synthetic-8b"].floor >= 40
    pair = train.invocation_floor(["h100"], [("unsloth", "unsloth"), ("unsloth", "fastft")],
                                  suite.E2E_STEPS + suite.E2E_WARMUP)
    assert floors["e2e"].floor == pytest.approx(pair + suite.TRAIN_STOP_S)
    assert pair > 2 * (train.FLOORS["unsloth"].imports + train.FLOORS["unsloth"].first_step)  # imports + compile each
    # the per-test timeout outlasts a cold first compile on a busy worker
    assert suite.PER_TEST_TIMEOUT >= 60


@pytest.mark.parametrize("call, budget", [(1, 300), (2, 250)])
def test_dry_run_fails_naming_the_step_when_the_budget_is_below_a_floor(tmp_path, call, budget):
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "bench/gpu.sh", "--dry-run", "--call", str(call), "--budget", str(budget),
                           "--out", str(tmp_path)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert time.monotonic() - t0 < 30  # found before any stand-in runs
    doc = json.loads((tmp_path / "summary.json").read_text())
    below = [r["step"] for r in doc["plan"] if r["plan"] == "BELOW FLOOR"]
    assert below and doc["steps"] == [] and not doc["complete"]
    for name in below:
        assert f"call {call}, step {name}: its planned limit" in proc.stderr and "below its floor" in proc.stderr
    assert "| BELOW FLOOR |" in (tmp_path / "summary.md").read_text()


def test_bench_train_dry_run_names_the_run_whose_share_is_below_its_floor():
    proc = subprocess.run([sys.executable, "-m", "bench.train", "recipes/bench-llama3-8b.yaml", "--target", "h100",
                           "--run", "unsloth:unsloth", "--run", "unsloth:fastft", "--steps", "8", "--warmup", "2",
                           "--budget", "100", "--dry-run"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=180, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "run h100 unsloth:fastft: its share of --budget 100 s" in proc.stderr
    assert "BELOW ITS FLOOR" in proc.stdout


def test_a_step_is_cut_at_run_time_when_its_share_of_what_is_left_is_under_its_floor():
    suite = _suite()
    todo = suite.steps("python", ROOT, cpus=16, call=1)
    e2e, before = todo[-1], todo[-2]
    limit, why = suite.start_or_cut(200.0, e2e, [])  # earlier steps overran: 180 s usable
    assert why is None and limit == pytest.approx(200.0 - suite.STOP_RESERVE)
    limit, why = suite.start_or_cut(150.0, e2e, [])
    assert limit < e2e.floor and f"under its floor {e2e.floor:.0f} s" in why
    limit, why = suite.start_or_cut(220.0, before, [e2e])  # shares in proportion to the floors
    assert limit == pytest.approx(200.0 * before.floor / (before.floor + e2e.floor)) and why is None


def test_a_step_past_its_limit_gets_sigint_first(tmp_path):
    suite = _suite()
    child = ("import signal, sys, time; signal.signal(signal.SIGINT, lambda *a: (print('child: SIGINT', flush=True), "
             "sys.exit(130))); print('child: started', flush=True); time.sleep(30)")
    t0 = time.monotonic()
    rc, stopped = suite.run_step(f"{sys.executable} -c \"{child}\"", 1.5, tmp_path / "log", _env())
    assert stopped and rc == 130 and time.monotonic() - t0 < 10
    log = (tmp_path / "log").read_text()
    assert "sending SIGINT" in log and "child: SIGINT" in log and "SIGTERM" not in log
    assert suite.step_status(rc, stopped, "x") == "timeout"
    assert suite.step_status(3, False, "x") == "partial"  # bench.common.EXIT_CUT: stayed inside by cutting


def test_unknown_step_names_the_steps_of_both_calls(tmp_path):
    proc = subprocess.run(["bash", "bench/gpu.sh", "--dry-run", "--only", "nf4,gpu-tests", "--out", str(tmp_path)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "unknown step(s) ['gpu-tests'] in call 1" in proc.stderr
    assert "call 2: env, synthetic-8b" in proc.stderr


def test_env_step_finds_modules_without_importing_them():
    code = ("import sys; from bench import envcheck; rc = envcheck.main(['versions']); "
            "heavy = sorted(m for m in ('torch', 'triton', 'transformers', 'peft', 'trl', 'unsloth', 'bitsandbytes', "
            "'datasets') if m in sys.modules); print('HEAVY', heavy); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
    assert "torch" in proc.stdout and "find_spec" in proc.stdout


def _fake_wheel(folder, name, requires, init):
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-0.1-py3-none-any.whl"
    dist = f"{name}-0.1.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", init)
        z.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: " + name + "\nVersion: 0.1\n"
                   + "".join(f"Requires-Dist: {r}\n" for r in requires))
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return path


def test_envcheck_imports_names_the_missing_module_and_who_declares_it(tmp_path):
    """A carried package whose dependency is neither carried nor installed: listed from Requires-Dist,
    then its import fails at once, naming the module missing and the wheel to add."""
    import zipfile

    whl = tmp_path / "whl"
    _fake_wheel(whl, "fastftprobe", ["fastft-absent-dep>=1.0"], "import fastft_absent_dep\n")
    site = tmp_path / "site"  # installed, as bench/gpu.sh's install step leaves it
    for w in whl.glob("*.whl"):
        zipfile.ZipFile(w).extractall(site)
    env = _env(PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))
    proc = subprocess.run([sys.executable, "-m", "bench.envcheck", "imports", str(whl), "--require", "fastftprobe",
                           "--budget", "60"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "fastft-absent-dep>=1.0" in proc.stdout and "declared by fastftprobe" in proc.stdout
    assert "import fastftprobe: FAILED" in proc.stdout
    assert ("fastftprobe does not import: module 'fastft_absent_dep' is missing (declared by fastftprobe and "
            "neither carried nor installed)") in proc.stderr
    assert "wheelhouse.sh .whl fastft-absent-dep" in proc.stderr


@pytest.mark.slow
def test_bench_train_run_stopped_mid_run_keeps_its_steps_and_is_marked_cut(tmp_path):
    """A real tiny run on CPU, stopped by SIGINT to its process group (as bench/gpu.sh stops a step)
    once its result JSON shows two finished steps: the steps stay, the run says cut."""
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "bench.train", "recipes/bench-tiny-cpu.yaml", "--target", "cpu", "--steps", "300",
           "--warmup", "1", "--set", "model.name=synthetic:fastft-tiny", "--set", "model.max_seq_length=32",
           "--out", str(out), "--no-chart"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline, seen = time.monotonic() + 240, None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            docs = list(out.glob("train-*.json"))
            if docs:
                try:
                    seen = json.loads(docs[0].read_text())
                except json.JSONDecodeError:  # written atomically: never half a document
                    pytest.fail("the result JSON was read half-written")
                if seen["metrics"]["runs"][0].get("steps_done", 0) >= 2:
                    break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be stopped: " + proc.communicate()[1][-2000:]
        assert seen is not None and seen["metrics"]["runs"][0]["status"] == "cut"  # until it finishes
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-2000:]
    doc = json.loads(next(out.glob("train-*.json")).read_text())
    (run,) = doc["metrics"]["runs"]
    assert run["status"] == "cut" and run["cut"] and "SIGINT" in run["cut_reason"], run.get("cut_reason")
    assert 2 <= run["steps_done"] == len(run["steps"]) < run["steps_planned"] == 301
    assert all(s["tokens"] == 4 * 32 and s["seconds"] > 0 for s in run["steps"])
    assert run["metrics"]["measured_steps"] == run["steps_done"] - 1 and run["metrics"]["tokens_per_second"] > 0
    assert doc["metrics"]["complete"]
    assert "cut (" in (out / next(out.glob("train-*.md")).name).read_text()


def test_bench_train_worker_past_its_limit_is_sent_sigint():
    from bench import train

    child = ("import signal, sys, time; signal.signal(signal.SIGINT, lambda *a: sys.exit(130)); time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", child])
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc, why = train.wait_worker(proc, 1.0, train.Stop())
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert (rc, why) == (130, "limit")


@pytest.mark.slow
@pytest.mark.parametrize("call, names", [(1, CALL_1), (2, CALL_2)])
def test_gpu_suite_dry_run_walks_every_step_on_cpu(tmp_path, call, names):
    """The whole rehearsal of one call: ~1-2 minutes each on 2 shared cores (the NF4 and LoRA
    benchmarks under the interpreter, bench.train --dry-run against the plan's budget, fastft plan, the
    GPU tests' collection with pytest-xdist and pytest-timeout loaded)."""
    env = _env(OUT=str(tmp_path))
    proc = subprocess.run(["bash", "bench/gpu.sh", "--dry-run", "--call", str(call)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    summary = (tmp_path / "summary.md").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:]
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert doc["dry_run"] and doc["complete"] and doc["call"] == call and "not measurements" in doc["notes"][0]
    assert [s["step"] for s in doc["steps"]] == ["install"] + names
    assert [r["step"] for r in doc["plan"]] == ["install"] + names and all(r["plan"] == "ok" for r in doc["plan"])
    for s in doc["steps"][1:]:
        assert s["status"] == "ok", (s, summary)
        assert s["dry_run"] and s["seconds"] <= s["limit_s"] + 1
    results = {p.name: p for p in (tmp_path / "results").glob("*.json")}
    if call == 1:
        lora = next(json.loads(p.read_text()) for n, p in results.items() if n.startswith("kernel-lora-linear-smoke"))
        nf4 = next(json.loads(p.read_text()) for n, p in results.items() if n.startswith("kernel-nf4-dequant-smoke"))
        for d in (nf4, lora):
            assert d["notes"][0].startswith("interpreter smoke, not a measurement") and d["metrics"]["complete"]
        ran = {r["impl"]: r["nf4_path"] for r in lora["metrics"]["rows"] if r["impl"].startswith("fastft")}
        assert ran == {"fastft": {"forward": "in_kernel", "backward": "in_kernel"},
                       "fastft_dequant": {"forward": "dequantize", "backward": "dequantize"}}
        e2e = (tmp_path / "logs" / "e2e.log").read_text()
        assert "8,030,261,248 parameters" in e2e and "bench.train: dry run ok" in e2e
        assert "h100 unsloth:fastft: share" in e2e
    else:
        assert [n for n in results if n.startswith("plan-plan-vs-measured-")]
        collected = (tmp_path / "logs" / "gpu-tests.log").read_text()
        assert "tests collected" in collected or "test collected" in collected
