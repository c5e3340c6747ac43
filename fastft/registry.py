"""A local, versioned adapter registry: an SQLite index plus content-addressed files.

    fastft registry push outputs/run --name support-bot        # -> support-bot@v1
    fastft registry list
    fastft registry show support-bot@v1
    fastft registry diff support-bot@v1 support-bot@v2         # hyperparameters and metrics
    fastft registry promote support-bot@v2 --stage production
    fastft registry rollback support-bot                       # production back to the previous one
    fastft registry attach support-bot@v2 outputs/run/export/run-q8_0.gguf   # a GGUF export (fastft export)
    fastft eval support-bot@production                         # any REF where a run dir is accepted

    from fastft import registry
    run_dir = registry.resolve_ref("support-bot@production")   # a folder with fastft.json + adapter/

Layout of ``--registry DIR`` (default: ``$FASTFT_CACHE/registry``):

    index.sqlite           versions (name, version, manifest, metadata) and stage events
    objects/ab/abcd...     every stored file once, named by its sha256
    checkouts/NAME/vN/     the files of one version as a run directory (fastft.json, adapter/),
                           built from objects/ on first use and checked against the manifest

Exports (GGUF files from ``fastft export``) are attached to a version after the fact: the file is
stored in ``objects/`` like any other, with its type, size and the verification fastft recorded
for it in the run's export.json (matched by sha256); ``show`` lists them with their stored path.

A push copies the run's files into ``objects/`` (each written to a temporary name and renamed:
a file either exists whole under its hash or not at all), then records the version in one
``BEGIN IMMEDIATE`` transaction that reads the highest version and inserts the next: two processes
pushing at once serialize there and get distinct versions. A crash before the commit leaves only
unreferenced objects. Every read of a version re-hashes its files; a mismatch is reported as a
damaged entry (``DamagedEntryError``), never loaded.

References: ``NAME@vN`` (one version), ``NAME`` or ``NAME@latest`` (the newest), ``NAME@production``
/ ``NAME@staging`` (the version holding that stage); ``resolve_ref`` also takes a run directory.
What an entry records, its diff and its printed forms are in ``fastft.registry_meta``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import FastftError
from .files import building, file_sha256
from .progress import progress
from .registry_meta import export_record, gate_summary, run_metadata
from .rundir import ADAPTER, STORED_FILES, RunDir, read_run_info

REPORT_HTML = "report.html"  # fastft.report's page, stored with the version when the run has one
BIG_FILE = 64 << 20  # files at least this large are hashed / copied with a progress bar
STAGES = ("staging", "production")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
REF_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,127})(?:@(?P<sel>v\d+|latest|staging|production))?$")
SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    created TEXT NOT NULL,
    status TEXT,
    source TEXT,
    manifest TEXT NOT NULL,
    meta TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS exports (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    file TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    quant TEXT,
    record TEXT NOT NULL,
    attached TEXT NOT NULL,
    PRIMARY KEY (name, version, sha256)
);
CREATE TABLE IF NOT EXISTS stage_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    stage TEXT NOT NULL,
    version INTEGER NOT NULL,
    action TEXT NOT NULL,
    forced INTEGER NOT NULL DEFAULT 0,
    time TEXT NOT NULL
);
"""



def _bytes_bar(size: int, desc: str):
    """A progress bar over ``size`` bytes for a large file; none for small ones."""
    return progress(total=size, desc=desc, unit="B") if size >= BIG_FILE else _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _sha256(path: Path) -> str:
    """sha256 of a file; a large one (checkpoints, GGUF files) shows its progress."""
    size = path.stat().st_size
    if size < BIG_FILE:
        return file_sha256(path)
    h = hashlib.sha256()
    with open(path, "rb") as f, progress(total=size, desc=f"sha256 {path.name}", unit="B") as bar:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()

class RegistryError(FastftError, ValueError):
    """A registry operation that cannot be done; the message says why and what to do."""


class DamagedEntryError(RegistryError):
    """A stored file whose content no longer matches the hash recorded at push time."""


@dataclass
class Entry:
    name: str
    version: int
    created: str
    status: str | None
    source: str | None
    manifest: dict  # relative path -> sha256 hex
    meta: dict

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"


def default_dir() -> Path:
    from .files import cache_dir

    return cache_dir() / "registry"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def parse_ref(ref: str) -> tuple[str, str]:
    """``NAME@v3`` -> ("NAME", "v3"); ``NAME`` -> ("NAME", "latest")."""
    m = REF_RE.match(ref)
    if not m:
        raise RegistryError(f"{ref!r} is not a registry reference: use NAME, NAME@vN, NAME@latest, NAME@staging "
                            "or NAME@production (NAME: letters, digits, '.', '_', '-')")
    return m["name"], m["sel"] or "latest"


class Registry:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root else default_dir()
        self.db_path = self.root / "index.sqlite"

    # --- storage ---------------------------------------------------------------------------------
    def _object(self, digest: str) -> Path:
        return self.root / "objects" / digest[:2] / digest

    @contextmanager
    def _db(self, write: bool = False):
        self.root.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(str(self.db_path), timeout=120, isolation_level=None)
        try:
            con.execute("PRAGMA busy_timeout = 120000")
            if write:
                con.execute("BEGIN IMMEDIATE")  # take the write lock before reading the next version
                try:
                    for stmt in SCHEMA.split(";"):
                        if stmt.strip():
                            con.execute(stmt)
                    yield con
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
            else:
                yield con
        finally:
            con.close()

    def _store_object(self, src: Path) -> str:
        """Copy ``src`` into objects/ under its sha256 (staged, fsynced, renamed); returns the hash."""
        digest = _sha256(src)
        dst = self._object(digest)
        if dst.is_file() and dst.stat().st_size == src.stat().st_size:
            return digest
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".incoming.", dir=dst.parent)
        try:
            size = src.stat().st_size
            with os.fdopen(fd, "wb") as out, open(src, "rb") as f, _bytes_bar(size, f"store {src.name}") as bar:
                h = hashlib.sha256()
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            if h.hexdigest() != digest:
                raise RegistryError(f"{src} changed while it was being pushed; push again")
            os.chmod(tmp, 0o444)
            os.replace(tmp, dst)  # same content under the same name: a concurrent writer is harmless
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest

    # --- push ------------------------------------------------------------------------------------
    def push(self, run_dir: str | Path, name: str) -> Entry:
        """Store a finished run (adapter/ and fastft.json, plus eval.json / metrics.jsonl /
        report.md / report.html when present) as the next version of ``name``."""
        if not NAME_RE.match(name):
            raise RegistryError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (no '@'), at most 128")
        run = Path(run_dir)
        info = read_run_info(run)
        adapter = RunDir(run).adapter
        if not (adapter / "adapter_config.json").is_file():
            raise RegistryError(f"{run}: no {ADAPTER}/adapter_config.json; push the output.dir of a finished run")
        files = [run / f for f in (*STORED_FILES, REPORT_HTML) if (run / f).is_file()]  # with adapter/, when present
        files += sorted(p for p in adapter.rglob("*") if p.is_file())
        manifest = {p.relative_to(run).as_posix(): self._store_object(p) for p in files}
        meta = run_metadata(info, run, _now())
        with self._db(write=True) as con:
            (last,) = con.execute("SELECT MAX(version) FROM versions WHERE name = ?", (name,)).fetchone()
            version = (last or 0) + 1
            created = _now()
            con.execute("INSERT INTO versions (name, version, created, status, source, manifest, meta) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (name, version, created, meta.get("status"), str(run.resolve()),
                         json.dumps(manifest, sort_keys=True), json.dumps(meta, sort_keys=True, default=str)))
        return Entry(name, version, created, meta.get("status"), str(run.resolve()), manifest, meta)

    # --- reading ---------------------------------------------------------------------------------
    def names(self) -> list[str]:
        if not self.db_path.is_file():
            return []
        with self._db() as con:
            try:
                return [r[0] for r in con.execute("SELECT DISTINCT name FROM versions ORDER BY name")]
            except sqlite3.OperationalError:  # created but empty
                return []

    def versions(self, name: str | None = None) -> list[Entry]:
        if not self.db_path.is_file():
            return []
        q = "SELECT name, version, created, status, source, manifest, meta FROM versions"
        args: tuple = ()
        if name is not None:
            q, args = q + " WHERE name = ?", (name,)
        with self._db() as con:
            try:
                rows = con.execute(q + " ORDER BY name, version", args).fetchall()
            except sqlite3.OperationalError:
                return []
        return [Entry(n, v, c, s, src, json.loads(m), json.loads(meta)) for n, v, c, s, src, m, meta in rows]

    def _stage_events(self, name: str) -> list[tuple[str, int, str]]:
        if not self.db_path.is_file():
            return []
        with self._db() as con:
            try:
                return con.execute("SELECT stage, version, action FROM stage_events WHERE name = ? ORDER BY id",
                                   (name,)).fetchall()
            except sqlite3.OperationalError:
                return []

    def stage_history(self, name: str, stage: str) -> list[int]:
        """The stack of versions that held ``stage``: promote pushes, rollback pops; the last is current."""
        stack: list[int] = []
        for st, version, action in self._stage_events(name):
            if st != stage:
                continue
            if action == "promote":
                if not stack or stack[-1] != version:
                    stack.append(version)
            elif action == "rollback" and stack:
                stack.pop()
        return stack

    def stages(self, name: str) -> dict[str, int]:
        """{stage: version} for the stages ``name`` currently has."""
        out = {}
        for stage in STAGES:
            hist = self.stage_history(name, stage)
            if hist:
                out[stage] = hist[-1]
        return out

    def get(self, ref: str) -> Entry:
        name, sel = parse_ref(ref)
        entries = self.versions(name)
        if not entries:
            known = self.names()
            raise RegistryError(f"no adapter named {name!r} in the registry {self.root}"
                                + (f" (it has: {', '.join(known)})" if known else " (it is empty)"))
        if sel == "latest":
            return entries[-1]
        if sel in STAGES:
            version = self.stages(name).get(sel)
            if version is None:
                raise RegistryError(f"{name} has no {sel} version yet; promote one with "
                                    f"fastft registry promote {name}@vN --stage {sel}")
        else:
            version = int(sel[1:])
        for e in entries:
            if e.version == version:
                return e
        raise RegistryError(f"{name}@v{version} does not exist; {name} has v1..v{entries[-1].version}")

    def verify(self, entry: Entry) -> list[str]:
        """Problems with the stored files of ``entry`` (missing, or content not matching its hash)."""
        problems = []
        for rel, digest in entry.manifest.items():
            obj = self._object(digest)
            if not obj.is_file():
                problems.append(f"{rel}: stored file {obj} is missing")
            elif _sha256(obj) != digest:
                problems.append(f"{rel}: stored file {obj} does not match its recorded sha256 {digest[:16]}...")
        return problems

    def checkout(self, ref: str) -> Path:
        """A run directory (fastft.json, adapter/) holding ``ref``'s files, every one checked against
        the sha256 recorded at push time. Raises DamagedEntryError rather than return a bad file."""
        entry = self.get(ref)
        problems = self.verify(entry)
        if problems:
            raise DamagedEntryError(f"{entry.ref} in {self.root} is damaged and will not be loaded: "
                                    + "; ".join(problems) + ". Push the run again to store a good copy.")
        dst = self.root / "checkouts" / entry.name / f"v{entry.version}"
        if dst.is_dir() and all((dst / rel).is_file() and _sha256(dst / rel) == d for rel, d in entry.manifest.items()):
            return dst
        with building(dst, prefix=f".v{entry.version}.", install=self._install_checkout(entry)) as tmp:
            for rel, digest in entry.manifest.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self._object(digest), tmp / rel)
                if _sha256(tmp / rel) != digest:
                    raise DamagedEntryError(f"{entry.ref}: {rel} changed while being copied out of {self.root}")
        return dst

    @staticmethod
    def _install_checkout(entry: Entry):
        """Install a checked-out copy where another process may be installing the same version: a
        stale or damaged copy is moved aside first, and a copy that lands first is kept when good."""

        def install(tmp: Path, dst: Path) -> None:
            if dst.exists():
                old = Path(tempfile.mkdtemp(prefix=f".old-v{entry.version}.", dir=dst.parent))
                try:
                    os.replace(dst, old / "x")
                except FileNotFoundError:  # another process moved it first
                    pass
                shutil.rmtree(old, ignore_errors=True)
            try:
                os.replace(tmp, dst)
            except OSError:  # another process checked the same version out meanwhile: use theirs if good
                if not all((dst / rel).is_file() and _sha256(dst / rel) == d for rel, d in entry.manifest.items()):
                    raise

        return install

    # --- exports ---------------------------------------------------------------------------------
    def attach(self, ref: str, path: str | Path) -> dict:
        """Store a GGUF export with the version ``ref``; returns its record (quant, bytes, sha256,
        the verification fastft export recorded for the same file, the stored object's path)."""
        entry = self.get(ref)
        src = Path(path).expanduser()
        if not src.is_file():
            raise RegistryError(f"{path}: no such file; give a .gguf written by fastft export")
        with open(src, "rb") as f:
            if f.read(4) != b"GGUF":
                raise RegistryError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
        digest = self._store_object(src)
        record = export_record(entry, src, digest)
        with self._db(write=True) as con:
            con.execute("INSERT OR REPLACE INTO exports (name, version, file, sha256, bytes, quant, record, attached) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (entry.name, entry.version, src.name, digest, src.stat().st_size, record.get("quant"),
                         json.dumps(record, sort_keys=True, default=str), _now()))
        return {"ref": entry.ref, "file": src.name, "sha256": digest, "bytes": src.stat().st_size,
                "object": str(self._object(digest)), **record}

    def exports(self, entry: Entry) -> list[dict]:
        """The exports attached to ``entry``, each with its stored object's path and whether it is intact."""
        if not self.db_path.is_file():
            return []
        with self._db() as con:
            try:
                rows = con.execute("SELECT file, sha256, bytes, quant, record, attached FROM exports WHERE name = ? "
                                   "AND version = ? ORDER BY attached", (entry.name, entry.version)).fetchall()
            except sqlite3.OperationalError:  # a registry from before exports existed
                return []
        out = []
        for file, digest, size, quant, record, attached in rows:
            obj = self._object(digest)
            out.append({"file": file, "sha256": digest, "bytes": size, "quant": quant, "attached": attached,
                        "object": str(obj), "intact": obj.is_file() and obj.stat().st_size == size,
                        **{k: v for k, v in json.loads(record).items() if k != "quant"}})
        return out

    # --- stages ----------------------------------------------------------------------------------
    def promote(self, ref: str, stage: str, force: bool = False) -> Entry:
        if stage not in STAGES:
            raise RegistryError(f"--stage {stage!r}: choose one of {', '.join(STAGES)}")
        entry = self.get(ref)
        if entry.status == "rejected" and not force:
            gates = entry.meta.get("gates")
            raise RegistryError(f"{entry.ref} was rejected by its eval gates"
                                + (f" ({gate_summary(gates)})" if gates else "")
                                + f"; pass --force to promote it to {stage} anyway")
        problems = self.verify(entry)
        if problems:
            raise DamagedEntryError(f"{entry.ref} is damaged and cannot be promoted: " + "; ".join(problems))
        with self._db(write=True) as con:
            con.execute("INSERT INTO stage_events (name, stage, version, action, forced, time) VALUES (?, ?, ?, ?, ?, ?)",
                        (entry.name, stage, entry.version, "promote", int(force), _now()))
        return entry

    def rollback(self, name: str, stage: str = "production") -> tuple[int, int]:
        """Move ``stage`` back to the version that held it before the current one; (from, to)."""
        if stage not in STAGES:
            raise RegistryError(f"--stage {stage!r}: choose one of {', '.join(STAGES)}")
        self.get(name)  # the name exists
        with self._db(write=True) as con:  # read and write under one lock: two rollbacks pop two
            events = con.execute("SELECT stage, version, action FROM stage_events WHERE name = ? ORDER BY id",
                                 (name,)).fetchall()
            stack: list[int] = []
            for st, version, action in events:
                if st == stage and action == "promote" and (not stack or stack[-1] != version):
                    stack.append(version)
                elif st == stage and action == "rollback" and stack:
                    stack.pop()
            if len(stack) < 2:
                raise RegistryError(f"{name}: no earlier {stage} version to roll back to"
                                    + (f" (v{stack[-1]} is the only one)" if stack else f" (nothing is in {stage})"))
            con.execute("INSERT INTO stage_events (name, stage, version, action, forced, time) VALUES (?, ?, ?, ?, 0, ?)",
                        (name, stage, stack[-1], "rollback", _now()))
        return stack[-1], stack[-2]


# --- references -------------------------------------------------------------------------------------

def resolve_ref(ref: str | Path, registry: str | Path | None = None) -> Path:
    """A run directory for ``ref``: ``ref`` itself when it is a folder with fastft.json, else a
    registry reference (NAME, NAME@vN, NAME@latest, NAME@staging, NAME@production) checked out of
    ``registry`` (default: $FASTFT_CACHE/registry) after verifying every file's sha256.
    Raises RegistryError (DamagedEntryError for a hash mismatch) with what to do."""
    p = Path(ref).expanduser()
    if p.is_dir():
        if not RunDir(p).is_run():
            raise RegistryError(f"{p}: not a fastft run directory (no fastft.json); give the output.dir of a "
                                "finished run or a registry reference NAME@vN")
        return p
    if not REF_RE.match(str(ref)):
        raise RegistryError(f"{ref}: no such run directory, and not a registry reference (NAME, NAME@vN, "
                            "NAME@staging, NAME@production)")
    reg = Registry(registry)
    try:
        return reg.checkout(str(ref))
    except DamagedEntryError:
        raise
    except RegistryError as e:
        raise RegistryError(f"{ref}: no such run directory, and {e}") from None
