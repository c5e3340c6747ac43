"""Progress for every step that can take more than a few seconds: one API, two renderings.

    from fastft.progress import progress
    for row in progress(rows, total=n, desc="tokenize", unit="rows"):
        ...
    with progress(total=n, desc="eval", unit="prompts") as bar:
        bar.update(1)

On a terminal (stderr is a TTY) it is a tqdm bar with the rate and the ETA. Elsewhere (CI logs, files)
it prints one plain line when the step starts, a line at most every ``FASTFT_PROGRESS_EVERY`` seconds
(default 30) while it runs, and one when it ends, so logs stay readable. ``set_quiet(True)`` (the
CLI's ``--quiet``) or ``FASTFT_QUIET=1`` turns all of it off. Leaf module: imports no other fastft one.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator

_QUIET = os.environ.get("FASTFT_QUIET", "") not in ("", "0")


def set_quiet(quiet: bool) -> None:
    """Turn progress output off (True) or back on for the rest of the process."""
    global _QUIET
    _QUIET = bool(quiet)
    # The steps fastft hands to datasets (TRL's packing map, Arrow writes) draw datasets' own bars.
    try:
        import datasets

        (datasets.disable_progress_bars if _QUIET else datasets.enable_progress_bars)()
    except ImportError:
        pass


def quiet() -> bool:
    return _QUIET


def _rate(n: float, seconds: float, unit: str) -> str:
    return f"{n / seconds:,.1f} {unit}/s" if seconds > 0 else f"- {unit}/s"


class _Lines:
    """The non-terminal rendering: a start line, throttled update lines, an end line."""

    def __init__(self, iterable, total, desc, unit, stream, every):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.stream, self.every = stream, every
        self.n = 0
        self.start = self.last = time.monotonic()
        self.closed = False
        what = f"{total:,} {unit}" if total is not None else unit
        self._say(f"{desc}: started ({what})")

    def _say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def _status(self) -> str:
        elapsed = time.monotonic() - self.start
        done = f"{self.n:,}" + (f"/{self.total:,}" if self.total is not None else "")
        eta = ""
        if self.total and 0 < self.n < self.total and elapsed > 0:
            eta = f", eta {((self.total - self.n) * elapsed / self.n):.0f} s"
        return f"{self.desc}: {done} {self.unit}, {_rate(self.n, elapsed, self.unit)}{eta}, {elapsed:.1f} s"

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._say(self._status())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._say(self._status() + " (done)")

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Silent:
    def __init__(self, iterable):
        self.iterable = iterable
        self.n = 0

    def update(self, n: float = 1) -> None:
        self.n += n

    def close(self) -> None:
        pass

    def __iter__(self) -> Iterator:
        return iter(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", stream=None, force_lines: bool = False):
    """Wrap ``iterable`` (or make a manual bar with ``total``) with progress output on stderr.

    Returns an object that iterates like ``iterable`` and has ``update(n)``, ``close()`` and the
    context-manager protocol. ``total`` defaults to ``len(iterable)`` where it has one.
    """
    stream = sys.stderr if stream is None else stream
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if _QUIET:
        return _Silent(iterable)
    if not force_lines and getattr(stream, "isatty", lambda: False)():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True,
                    unit_scale=total is not None and total >= 10_000)
    every = float(os.environ.get("FASTFT_PROGRESS_EVERY", "30"))
    return _Lines(iterable, total, desc, unit, stream, every)
