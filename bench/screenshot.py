"""Screenshot a run's report.html with headless Chromium: the picture in the README and docs.

    python -m bench.screenshot /tmp/demo-smollm2 --out docs/img/report-smollm2.png
    python -m bench.screenshot outputs/run/report.html --out /tmp/r.png --width 1240 --height 2080

The whole pipeline for the SmolLM2 demo's picture (the run dir is kept and named):

    python -m bench.demo recipes/smollm2-demo.yaml --name demo-smollm2 --run-dir /tmp/demo-smollm2 \\
        --out bench/results/demo-smollm2-cpu-2core-idle-f2.json
    python -m bench.screenshot /tmp/demo-smollm2 --out docs/img/report-smollm2.png

Chromium is Debian's package (``apt-get install -y chromium``); ``--chromium PATH`` or
``$CHROMIUM`` names another build. The window size is fixed (default 1240 x 2080 CSS pixels at scale
1), so the same report gives a picture of the same size; the page has no JavaScript and fetches
nothing. A fresh, temporary profile is used and deleted. Prints one JSON line: the file, its size
in pixels and the Chromium version.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL = "install Debian's chromium (apt-get install -y chromium) or give --chromium PATH"


class ScreenshotError(Exception):
    """No browser, no report, or a browser that wrote no picture."""


def find_chromium(explicit: str | None = None) -> str:
    name = explicit or os.environ.get("CHROMIUM")
    if name:
        path = shutil.which(name)
        if not path:
            raise ScreenshotError(f"chromium {name!r} not found or not executable; {INSTALL}")
        return path
    for c in CANDIDATES:
        path = shutil.which(c)
        if path:
            return path
    raise ScreenshotError(f"no Chromium on PATH (tried {', '.join(CANDIDATES)}); {INSTALL}")


def report_file(target: str | Path) -> Path:
    """``target``: a run directory (its report.html) or an HTML file."""
    p = Path(target)
    html = p / "report.html" if p.is_dir() else p
    if not html.is_file():
        fix = (f"`fastft report {p}` writes it" if p.is_dir() else "give a run directory or its report.html")
        raise ScreenshotError(f"{html}: no such report; {fix}")
    return html.resolve()


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ScreenshotError(f"{path}: not a PNG file")
    return struct.unpack(">II", head[16:24])


def command(chromium: str, html: Path, out: Path, width: int, height: int, profile: str) -> list[str]:
    return [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
            "--no-first-run", "--disable-extensions", "--disable-background-networking",
            "--force-device-scale-factor=1", f"--window-size={width},{height}", f"--user-data-dir={profile}",
            f"--screenshot={out}", html.as_uri()]


def screenshot(target: str | Path, out: str | Path, width: int = 1240, height: int = 2080,
               chromium: str | None = None, timeout: float = 120) -> dict:
    """Render ``target``'s report.html to ``out`` (PNG); returns what the JSON line prints."""
    html, out = report_file(target), Path(out).resolve()
    browser = find_chromium(chromium)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.unlink()  # a stale picture must not pass for a new one
    version = subprocess.run([browser, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="fastft-chromium-") as profile:
        cmd = command(browser, html, out, width, height, profile)
        shown = shlex.join(cmd).replace(profile, "TMP_PROFILE")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise ScreenshotError(f"chromium did not finish in {timeout:.0f} s; try --timeout") from e
    if not out.is_file():
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        raise ScreenshotError(f"chromium exited {proc.returncode} without writing {out}: " + " | ".join(tail))
    w, h = png_size(out)
    if (w, h) != (width, height):
        raise ScreenshotError(f"{out}: {w}x{h} pixels, expected {width}x{height} (a scaled display?)")
    return {"screenshot": str(out), "report": str(html), "width": w, "height": h, "bytes": out.stat().st_size,
            "chromium": version, "command": shown}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.screenshot", description=__doc__.split("\n\n")[0])
    p.add_argument("target", help="a run directory (its report.html) or an HTML file")
    p.add_argument("--out", required=True, help="the PNG to write (e.g. docs/img/report-smollm2.png)")
    p.add_argument("--width", type=int, default=1240, help="window width in CSS pixels (default 1240)")
    p.add_argument("--height", type=int, default=2080, help="window height in CSS pixels (default 2080)")
    p.add_argument("--chromium", help="the browser executable (default: $CHROMIUM, then chromium on PATH)")
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for the browser (default 120)")
    args = p.parse_args(argv)
    try:
        res = screenshot(args.target, args.out, args.width, args.height, args.chromium, args.timeout)
    except ScreenshotError as e:
        print(f"bench.screenshot: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
