"""Line coverage of the CPU suite over fastft/, kernels/ (imported as fastft.kernels) and bench/:
which code no CPU test executes.

    python -m bench.coverage                                   # both suites of `make test` (~29 min on 2 cores)
    python -m bench.coverage --suite core -- tests/test_nf4.py # one suite, pytest arguments after --
    python -m bench.coverage --summarize /tmp/fastft-coverage/RUN   # re-read a run's data, no rerun
    python -m bench.coverage --markdown bench/results/coverage-cpu-suite-....json   # the docs table

The suites run under pytest-cov in a snapshot of the work tree (every tracked or untracked,
unignored file, and .git), not in the checkout itself: on a shared checkout other people edit
files during a 40-minute run, and a line number recorded before an edit would be read against the
file after it. The snapshot imports its own fastft (a sitecustomize points the editable install's
finder at it), so the measured lines and the sources they are read against are the same bytes.
Child processes (the CLI, `python -m bench.x`, torchrun's two ranks, compile workers) are measured
through coverage's own subprocess patch; each writes a parallel data file that is combined at the end.

The result JSON (bench/results/coverage-cpu-suite-<sha>-<time>.json) holds, per file, the
statement counts and every never-executed range (first and last line, the statements in it, the
function it sits in), totals per package, the git commit the snapshot was taken from (with the
list of files that differed from it), each suite's command and pytest outcome. The run folder
(data, snapshot) stays behind for --summarize.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import common

ROOT = common.ROOT
# package name -> folder in the tree; the order is the report's
PACKAGES = {"fastft": "fastft", "fastft.kernels": "kernels", "bench": "bench"}
# `make test`'s two halves: the core venv runs everything, the unsloth venv the tests marked unsloth
SUITES = {
    "core": (".venv", []),
    "unsloth": (".venv-unsloth", ["-m", "unsloth"]),
}
DEFAULT_WORK = Path(os.environ.get("TMPDIR", "/tmp")) / "fastft-coverage"

RCFILE = """\
[run]
data_file = {data_file}
source =
    {tree}/fastft
    {tree}/kernels
    {tree}/bench
parallel = true
# thread: trainer callbacks and the data loader's threads; multiprocessing: datasets' and the
# tokenizer's worker pools
concurrency = thread, multiprocessing
# subprocess: every child python (CLI, bench modules, torchrun ranks); execv: bench.data_rss
# re-executes itself; _exit: a child that leaves through os._exit still saves its lines
patch = subprocess, execv, _exit
# no `sigterm = true`: fastft.data.encode's fork pool ends its workers with SIGTERM (Pool.terminate),
# and coverage's handler, saving a worker's data inside that signal, can wait forever on a lock the
# fork inherited held (one worker did, and the suite hung); a process SIGTERM ends loses its lines
"""

# Makes the snapshot, not the checkout, the `fastft` that imports: the editable install maps the
# package names to the checkout's folders in a finder module that the .pth file installs before
# sitecustomize runs.
SITECUSTOMIZE = """\
import sys
for _name, _mod in list(sys.modules.items()):
    if _name.startswith("__editable___fastft") and hasattr(_mod, "MAPPING"):
        _mod.MAPPING.update({mapping!r})
"""


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def snapshot(dest: Path) -> dict:
    """Copy the work tree (tracked and untracked, unignored files; .git) into dest/tree and
    return what it was taken from: the commit, whether and where the tree differed from it, and
    the sha256 of `git diff HEAD` so two snapshots can be told apart."""
    tree = dest / "tree"
    files = [f for f in git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0") if f]
    for rel in files:
        src = ROOT / rel
        if not src.is_file():  # deleted in the work tree, still in the index
            continue
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, tree / rel)
    shutil.copytree(ROOT / ".git", tree / ".git", symlinks=True)
    for venv in {v for v, _ in SUITES.values()}:  # the tests find .venv/triton36 beside themselves
        if (ROOT / venv).exists():
            (tree / venv).symlink_to(ROOT / venv)
    status = git("status", "--porcelain", "--untracked-files=all")
    return {
        "commit": git("rev-parse", "HEAD").strip(),
        "dirty": bool(status.strip()),
        "changed_files": sorted(line[3:] for line in status.splitlines()),
        "diff_sha256": hashlib.sha256(git("diff", "HEAD", "--binary").encode()).hexdigest(),
    }


def run_suite(name: str, work: Path, pytest_args: list[str]) -> dict:
    venv, marks = SUITES[name]
    tree = work / "tree"
    python = ROOT / venv / "bin" / "python"
    if not (ROOT / venv / ".done").exists():
        return {"suite": name, "skipped": f"{venv} is not set up (make test builds it)"}
    probe = subprocess.run([str(python), "-c", "import pytest_cov"], capture_output=True)
    if probe.returncode:
        return {"suite": name, "skipped": f"{venv} has no pytest-cov (the test extra installs it)"}
    data = work / "data"
    data.mkdir(exist_ok=True)
    rc = work / f"coveragerc.{name}"
    rc.write_text(RCFILE.format(data_file=data / f".coverage.{name}", tree=tree))
    site = work / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(
        mapping={"fastft": str(tree / "fastft"), "fastft.kernels": str(tree / "kernels")}))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [str(python), "-m", "pytest", *marks, "-p", "no:cacheprovider",
           "--cov", f"--cov-config={rc}", "--cov-report=", *pytest_args]
    log = work / f"pytest.{name}.log"
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=tree, env=env, stdout=f, stderr=subprocess.STDOUT)
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return {"suite": name, "command": shlex.join(cmd), "exit_code": proc.returncode,
            "summary": lines[-1].strip("= ") if lines else "", "wall_seconds": round(time.monotonic() - t0, 1),
            "log": str(log)}


def scopes(source: str) -> list[tuple[int, int, str]]:
    """(first line, last line, qualified name) of every function and class, outermost first."""
    out = []

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                out.append((first, child.end_lineno, name))
                walk(child, name + ".")
            else:
                walk(child, prefix)
    walk(ast.parse(source), "")
    return out


def missing_ranges(statements: list[int], missing: set[int], source: str) -> list[dict]:
    """Runs of consecutive statements (in statement order) none of which ran, each with the
    innermost function or class that holds its first line."""
    spans = scopes(source)
    ranges, run = [], []
    for line in sorted(statements) + [None]:
        if line is not None and line in missing:
            run.append(line)
            continue
        if run:
            inside = [s for s in spans if s[0] <= run[0] <= s[1]]
            ranges.append({"first": run[0], "last": run[-1], "statements": len(run),
                           "in": inside[-1][2] if inside else "<module>"})
            run = []
    return ranges


def summarize(work: Path) -> dict:
    """Combine the run's data files and read every source file of the snapshot against them."""
    import coverage

    tree = work / "tree"
    data_file = work / ".coverage"
    parts = sorted(str(p) for p in (work / "data").glob(".coverage.*"))
    cov = coverage.Coverage(data_file=str(data_file), config_file=str(next(work.glob("coveragerc.*"))))
    if parts:
        cov.combine(parts, keep=True)  # keep: --summarize can combine them again
        cov.save()
    cov.load()
    files, packages = [], {}
    for pkg, folder in PACKAGES.items():
        n_stmts = n_miss = 0
        for path in sorted((tree / folder).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            _, statements, _, missing, _ = cov.analysis2(str(path))
            rel = path.relative_to(tree).as_posix()
            miss = set(missing)
            files.append({"file": rel, "package": pkg, "statements": len(statements),
                          "missing": len(miss), "covered_percent": pct(len(statements) - len(miss), len(statements)),
                          "missing_ranges": missing_ranges(statements, miss, path.read_text())})
            n_stmts += len(statements)
            n_miss += len(miss)
        packages[pkg] = {"statements": n_stmts, "missing": n_miss, "covered_percent": pct(n_stmts - n_miss, n_stmts)}
    total_s = sum(p["statements"] for p in packages.values())
    total_m = sum(p["missing"] for p in packages.values())
    return {"total": {"statements": total_s, "missing": total_m, "covered_percent": pct(total_s - total_m, total_s)},
            "packages": packages, "files": files}


def pct(covered: int, total: int) -> float:
    return round(100.0 * covered / total, 1) if total else 100.0


def markdown(doc: dict) -> str:
    """The totals and the never-executed ranges as Markdown tables (the verdicts are the doc's)."""
    m, src = doc["metrics"], doc["config"]["source"]
    lines = [f"Measured on {src['commit'][:7]}{' (work tree differed: ' + ', '.join(src['changed_files']) + ')' if src['dirty'] else ''}, "
             f"{doc['created_utc']}.", "",
             "| package | statements | not executed | covered |", "| --- | ---: | ---: | ---: |"]
    for name, p in [*m["packages"].items(), ("all", m["total"])]:
        lines.append(f"| {name} | {p['statements']} | {p['missing']} | {p['covered_percent']}% |")
    lines += ["", "| file | lines | in | statements |", "| --- | --- | --- | ---: |"]
    for f in m["files"]:
        for r in f["missing_ranges"]:
            span = str(r["first"]) if r["first"] == r["last"] else f"{r['first']}-{r['last']}"
            lines.append(f"| {f['file']} | {span} | `{r['in']}` | {r['statements']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    pytest_args = given[given.index("--") + 1:] if "--" in given else []
    argv = given[:given.index("--")] if "--" in given else given
    p = argparse.ArgumentParser(prog="python -m bench.coverage", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", action="append", choices=list(SUITES), help="default: every suite")
    p.add_argument("--work", type=Path, help=f"run folder (default: a new one under {DEFAULT_WORK}); "
                   "an existing run's folder runs --suite in that run's snapshot and adds it to the run")
    p.add_argument("--summarize", type=Path, metavar="RUN", help="re-summarise a finished run folder, no rerun")
    p.add_argument("--markdown", type=Path, metavar="JSON", help="print a result's tables as Markdown")
    p.add_argument("--out", help="folder for the result JSON (default bench/results)")
    a = p.parse_args(argv)
    if a.markdown:
        import json

        print(markdown(json.loads(a.markdown.read_text())))
        return 0
    if a.summarize:
        import json

        work = a.summarize
        config = json.loads((work / "run.json").read_text())
    elif a.work and (a.work / "run.json").exists():
        # a suite added to an earlier run: same snapshot, its entry replaced
        import json

        work = a.work
        config = json.loads((work / "run.json").read_text())
        names = a.suite or list(SUITES)
        config["suites"] = [s for s in config["suites"] if s["suite"] not in names]
        config["suites"] += [run_suite(s, work, pytest_args) for s in names]
        (work / "run.json").write_text(json.dumps(config, indent=2))
    else:
        import json

        work = a.work or DEFAULT_WORK / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        work.mkdir(parents=True)
        config = {"source": snapshot(work), "run_folder": str(work), "pytest_args": pytest_args,
                  "suites": [run_suite(s, work, pytest_args) for s in (a.suite or list(SUITES))]}
        (work / "run.json").write_text(json.dumps(config, indent=2))
    metrics = summarize(work)
    sha = config["source"]["commit"][:7] + ("-dirty" if config["source"]["dirty"] else "")
    doc = common.result(kind="coverage", name="cpu-suite", target="cpu", config=config, metrics=metrics,
                        command=[sys.executable, "-m", "bench.coverage", *given])
    path = common.write(doc, a.out, stem=f"coverage-cpu-suite-{sha}")
    for s in config["suites"]:
        print(f"{s['suite']:8s} " + (f"skipped: {s['skipped']}" if "skipped" in s else
                                     f"exit {s['exit_code']}, {s['summary']} ({s['wall_seconds']:.0f} s)"))
    for name, pk in [*metrics["packages"].items(), ("all", metrics["total"])]:
        print(f"{name:15s} {pk['statements']:6d} statements {pk['missing']:6d} not executed {pk['covered_percent']:5.1f}%")
    print(f"wrote {path}")
    failed = [s for s in config["suites"] if s.get("exit_code")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
