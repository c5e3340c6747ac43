"""The tokenized rows of Arrow stream files, memory-mapped read-only, gathered in any order without
the resident memory growing with the number of rows.

    rows = RowStore.open(a) + RowStore.open(b)          # two sources, indexed as one
    rows.gather([5, 0, 5], ["input_ids", "ex"])   # a pyarrow Table of those rows, in that order
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


class RowStore:
    """The rows of tokenized Arrow stream files, memory-mapped read-only, as their record batches.

    Two things keep the resident memory from growing with the number of rows. ``gather`` takes rows
    in any order batch by batch (pyarrow's ``Table.take`` on a table of many batches first joins a
    whole column into one buffer in memory: the 500 MB of example JSON of a million rows for each
    chunk of held-out rows), and drops each batch's mapped pages from this process's resident set once
    it has taken its rows (they stay in the page cache; a later read maps them again without disk
    I/O): 10,000 held-out rows scattered over a million would otherwise fault in most of the file.
    ``release`` drops every mapped page (after reading whole columns).
    """

    def __init__(self, batches: list, maps: list, spans: list):
        self.batches, self.maps, self.spans = batches, maps, spans  # spans[j]: (map, first byte, end) of batch j
        self.starts = np.cumsum([0] + [b.num_rows for b in batches], dtype=np.int64)

    @classmethod
    def open(cls, path: Path) -> "RowStore":
        import mmap

        import pyarrow as pa

        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        whole = pa.py_buffer(m)
        batches = list(pa.ipc.open_stream(pa.BufferReader(whole)))
        spans = []
        for b in batches:  # where each batch's buffers lie in the mapping (zero-copy: inside it)
            bufs = [x for col in b.columns for x in col.buffers() if x is not None and x.size]
            lo = min((x.address for x in bufs), default=whole.address)
            hi = max((x.address + x.size for x in bufs), default=whole.address)
            spans.append((0, lo - whole.address, hi - whole.address))
        return cls(batches, [m], spans)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __add__(self, other: "RowStore") -> "RowStore":
        k = len(self.maps)
        return RowStore(self.batches + other.batches, self.maps + other.maps,
                     self.spans + [(i + k, lo, hi) for i, lo, hi in other.spans])

    def column(self, name: str) -> np.ndarray:
        """A fixed-width column (ntok, ntrain, trunc) as one numpy array."""
        return np.concatenate([b.column(name).to_numpy(zero_copy_only=False) for b in self.batches])

    def gather(self, idx, columns: list):
        """Rows ``idx`` (in that order) of ``columns`` as one pyarrow Table with a single chunk."""
        import pyarrow as pa

        idx = np.asarray(idx, dtype=np.int64)
        if not len(idx):
            return pa.Table.from_batches([self.batches[0].select(columns).slice(0, 0)])
        if idx.min() < 0 or idx.max() >= len(self):
            raise IndexError(f"row index out of range (0..{len(self) - 1})")
        which = np.searchsorted(self.starts, idx, side="right") - 1
        order = np.argsort(which, kind="stable")
        cuts = np.flatnonzero(np.diff(which[order])) + 1
        pieces = []
        for g in np.split(order, cuts):
            j = which[g[0]]
            pieces.append(self.batches[j].select(columns).take(pa.array(idx[g] - self.starts[j])))
            self._release_batch(j)  # scattered rows fault in pages all over the file: drop them as we go
        grouped = pa.Table.from_batches(pieces).combine_chunks()
        if np.all(np.diff(idx) >= 0):  # already in order (a training split without data.mix)
            return grouped
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return grouped.take(pa.array(back))

    def _release_batch(self, j: int) -> None:
        import mmap

        advice = getattr(mmap, "MADV_DONTNEED", None)
        i, lo, hi = self.spans[j]
        if advice is None or hi <= lo:
            return
        start = lo - lo % mmap.PAGESIZE
        try:
            self.maps[i].madvise(advice, start, hi - start)
        except (OSError, ValueError):  # pragma: no cover - a platform that refuses it: only memory
            pass

    def release(self) -> None:
        """Drop the mapped pages read so far from this process's resident set (a no-op where the
        platform has no MADV_DONTNEED)."""
        import mmap

        advice = getattr(mmap, "MADV_DONTNEED", None)
        if advice is None:
            return
        for m in self.maps:
            try:
                m.madvise(advice)
            except (OSError, ValueError):  # pragma: no cover - a platform that refuses it: only memory
                pass
