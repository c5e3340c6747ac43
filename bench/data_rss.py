"""Diagnostic: where fastft-cold's main-process memory goes, phase by phase (after reading and
tokenizing, after writing each split, at the end), as anonymous pages, file-backed pages (the
memory-mapped Arrow files) and the peak of each, sampled from /proc/self/status (Linux) while
``data.build`` runs on N generated alpaca rows in a fresh process.

    python bench/data_rss.py 200000

It found the two things that made a million rows peak at 2.86 GB before: the mapped pages of the
written training split left resident (1.16 GB), and pyarrow's ``Table.take`` joining the whole
example-JSON column for each chunk of held-out rows (0.57 GB anonymous, 0.5 GB mapped).
"""
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def status() -> dict:
    keys = ("RssAnon", "RssFile", "VmHWM")
    return {ln.split(":")[0]: int(ln.split()[1]) // 1024 for ln in open("/proc/self/status") if ln.startswith(keys)}


def main() -> None:
    n = int(sys.argv[1])
    if len(sys.argv) == 2:  # the rows are generated in another process: this one starts from its imports only
        work = Path(tempfile.mkdtemp(prefix="fastft-rss-"))
        code = "import sys; from pathlib import Path; from bench import data as bd; print(bd.write_set('alpaca', %d, Path(sys.argv[1])))" % n
        path = subprocess.check_output([sys.executable, "-c", code, str(work)], text=True,
                                       cwd=str(Path(__file__).resolve().parents[1])).strip().splitlines()[-1]
        tok = subprocess.check_output([sys.executable, "-c", "from bench import data as bd; print(bd.tokenizer_path('smollm2'))"],
                                      text=True, cwd=str(Path(__file__).resolve().parents[1])).strip().splitlines()[-1]
        os.execv(sys.executable, [sys.executable, __file__, str(n), path, tok, str(work)])
    path, tok_path, work = sys.argv[2], sys.argv[3], Path(sys.argv[4])
    os.environ["FASTFT_CACHE"] = str(work / "cache")
    os.environ["FASTFT_QUIET"] = "1"
    from transformers import AutoTokenizer

    import datasets  # noqa: F401
    from bench import data as bd
    from fastft import data
    from fastft.data import encode, split

    peak = {"RssAnon": 0, "RssFile": 0}

    def sample():
        while True:
            s = status()
            for k in peak:
                peak[k] = max(peak[k], s[k])
            time.sleep(0.05)

    def phase(name: str) -> None:
        s = status()
        print(f"{name:>24}: anon {s['RssAnon']:>5} MB  file {s['RssFile']:>5} MB  | peak anon {peak['RssAnon']:>5} MB  "
              f"peak file {peak['RssFile']:>5} MB  peak RSS {s['VmHWM']:>5} MB", flush=True)

    def wrap(owner, name, label):
        orig = getattr(owner, name)

        def inner(*a, **k):
            out = orig(*a, **k)
            phase(label if not callable(label) else label(a))
            return out
        setattr(owner, name, inner)

    wrap(encode.SourceStream, "tokenize", "read + tokenize")
    wrap(split, "write_split", lambda a: f"write {Path(a[2]).name} split")
    threading.Thread(target=sample, daemon=True).start()
    tok = AutoTokenizer.from_pretrained(tok_path)
    r = bd._d(Path(path), "alpaca", 2)
    phase("start (imports)")
    t0 = time.perf_counter()
    data.build(r.data, tok, seed=r.train.seed, max_length=r.model.max_seq_length, log=lambda m: None)
    phase(f"end ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
