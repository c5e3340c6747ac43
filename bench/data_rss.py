"""Diagnostic: where fastft-cold's main-process memory goes (anonymous vs file-backed pages of the
memory-mapped Arrow files), sampled from /proc/self/status while ``data.build`` runs on N generated alpaca rows.

    python bench/data_rss.py 200000
"""
import os, sys, threading, time, tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["FASTFT_CACHE"] = tempfile.mkdtemp(prefix="rsscache-")
from bench import data as bd
n = int(sys.argv[1])
work = Path(tempfile.mkdtemp(prefix="rsswork-"))
path = bd.write_set("alpaca", n, work)
tok = bd.tokenizer_path("smollm2")
peak = {"anon": 0, "file": 0, "rss": 0}
stop = False
def sample():
    while not stop:
        f = {l.split(":")[0]: int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(("RssAnon", "RssFile", "VmRSS"))}
        peak["anon"] = max(peak["anon"], f["RssAnon"]); peak["file"] = max(peak["file"], f["RssFile"]); peak["rss"] = max(peak["rss"], f["VmRSS"])
        time.sleep(0.1)
t = threading.Thread(target=sample, daemon=True); t.start()
res = bd._run_method("fastft-cold", path, "alpaca", tok, 2)
stop = True; t.join()
print(n, "rows", round(res["seconds"],1), "s; peak main RssAnon %.2f GB, RssFile %.2f GB, VmRSS %.2f GB" % tuple(peak[k]/2**20 for k in ("anon","file","rss")))
