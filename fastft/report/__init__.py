"""A run's report: one self-contained HTML page (report.html) and a Markdown summary (report.md).

    fastft report outputs/run                     # -> outputs/run/report.html + report.md
    fastft report outputs/a outputs/b             # A/B: curves overlaid, a side-by-side table
                                                  #   -> outputs/a/compare.html + compare.md (or --out DIR)
    from fastft import report
    html_path, md_path = report.write([Path("outputs/run")])

Read from the run directory: fastft.json (recipe, versions, training summary, gates), metrics.jsonl
(loss, learning rate, tokens/s and peak memory per logged step, held-out loss at each evaluation),
eval.json (base vs adapter by slice, the regression set with the forgotten items) and export.json
(GGUF files and their verification). The figures are SVG drawn here and inlined: the page needs no
network, no JavaScript and no other file. Every plotted series is also listed, value by value, in a
collapsed table under its figure. ``fastft train`` writes both files at the end of every run.
"""
from __future__ import annotations

from pathlib import Path

from .. import rundir
from ..files import atomic_write_text
from .html import SECTIONS, html_report
from .markdown import markdown_report
from .run import COMPARE_HTML, COMPARE_MD, REPORT_HTML, ReportError, RunData, load

__all__ = ["COMPARE_HTML", "COMPARE_MD", "REPORT_HTML", "SECTIONS", "ReportError", "RunData", "load", "refresh", "write"]


def write(run_dirs: list[str | Path], out: str | Path | None = None) -> tuple[Path, Path]:
    """Write the report of one run (RUN/report.html + report.md) or the comparison of several
    (``out``/compare.html + compare.md; default ``out``: the first run). Returns both paths."""
    if not run_dirs:
        raise ReportError("give at least one run directory")
    runs = [load(d) for d in run_dirs]
    names = [r.name for r in runs]
    for i, r in enumerate(runs):  # two runs with the same folder name: tell them apart
        if names.count(r.name) > 1:
            r.name = f"{r.name} ({i + 1})"
    folder = Path(out) if out is not None else runs[0].path
    folder.mkdir(parents=True, exist_ok=True)
    if len(runs) == 1:
        html_path, md_path = folder / REPORT_HTML, folder / rundir.REPORT_MD
    else:
        html_path, md_path = folder / COMPARE_HTML, folder / COMPARE_MD
    atomic_write_text(html_path, html_report(runs))
    atomic_write_text(md_path, markdown_report(runs))
    return html_path, md_path


def refresh(run_dir: str | Path, log=print) -> None:
    """Rewrite RUN/report.html + report.md when the run has them (after ``fastft eval`` or
    ``fastft export`` changed eval.json / export.json); a failure is a warning, never an error."""
    run_dir = Path(run_dir)
    if not (run_dir / REPORT_HTML).is_file():
        return
    try:
        write([run_dir])
        log(f"fastft: report updated: {run_dir / REPORT_HTML}")
    except (OSError, ReportError) as e:
        log(f"fastft: warning: the report was not updated ({e}); `fastft report {run_dir}` writes it again")
