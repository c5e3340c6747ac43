"""The output directory's state: fresh, unfinished (resumable) or finished, and its checkpoints.

    output.dir/
      fastft-run.json            written at start: the resolved recipe, scores before training
      checkpoints/checkpoint-N/  adapter, optimizer, scheduler, RNG states, trainer state (data position)
        fastft-checkpoint.json   written last, atomically: the meter's counters; marks N complete
      fastft.json                written at the end: the run finished

A checkpoint is staged in checkpoints/.staging/checkpoint-N and renamed into place only after its
marker is written, so a crash mid-write leaves nothing that looks complete; directories without
the marker are ignored on resume and removed by the next save.

    from fastft import checkpoints
    state = checkpoints.inspect("outputs/run")     # RunDirState(kind="unfinished", latest=Path(...), ...)
    previous, ckpt = checkpoints.prepare_output(recipe, out_dir, resume, overwrite, world, log)  # a run's start
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import TrainError
from .files import atomic_write_text
from .rundir import METRICS, RunDir
from .world import World

MARKER = "fastft-checkpoint.json"
PREFIX = "checkpoint-"


@dataclass
class RunDirState:
    kind: str  # "fresh" | "unfinished" | "finished"
    run: dict | None  # contents of fastft-run.json
    latest: Path | None  # newest complete checkpoint
    incomplete: list[Path]  # checkpoint dirs without a marker (crashed mid-write)


def checkpoint_root(out_dir: Path) -> Path:
    return RunDir(out_dir).checkpoints


def _step(p: Path) -> int:
    try:
        return int(p.name[len(PREFIX):])
    except ValueError:
        return -1


def complete_checkpoints(out_dir: Path) -> list[Path]:
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and _step(p) >= 0]
    return sorted((p for p in found if (p / MARKER).is_file()), key=_step)


def inspect(out_dir: str | Path) -> RunDirState:
    out = Path(out_dir)
    root = checkpoint_root(out)
    incomplete = []
    if root.is_dir():
        incomplete = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and not (p / MARKER).is_file()]
        staging = root / ".staging"
        if staging.is_dir():
            incomplete += list(staging.iterdir())
    rd = RunDir(out)
    run = json.loads(rd.run_state.read_text()) if rd.run_state.is_file() else None
    if rd.info.is_file():
        kind = "finished"
    elif run is not None:
        kind = "unfinished"
    else:
        kind = "fresh"
    done = complete_checkpoints(out)
    return RunDirState(kind=kind, run=run, latest=done[-1] if done else None, incomplete=incomplete)


def recipe_differences(old: dict, new: dict) -> list[str]:
    """Key paths whose values differ between two resolved recipes, e.g. ["lora.r: 16 -> 32"]; a
    section added since the run started (distributed) counts as its defaults on the old side."""
    from .flat import differences

    added = {k: _default_section(k) for k, v in new.items() if k not in old and isinstance(v, dict)}
    return [f"{k}: {a!r} -> {b!r}" for k, (a, b) in differences({**old, **added}, new).items()]


def _default_section(key: str) -> dict | None:
    import dataclasses

    from .recipe import Recipe

    return dataclasses.asdict(Recipe()).get(key)


def write_run_state(out_dir: Path, state: dict) -> None:
    atomic_write_text(RunDir(out_dir).run_state, json.dumps(state, indent=2, default=str) + "\n")


def clear(out_dir: Path) -> None:
    """Remove what a previous run left (for --overwrite): only fastft's own files and folders."""
    rd = RunDir(out_dir)
    for folder in (rd.adapter, rd.checkpoints):
        shutil.rmtree(folder, ignore_errors=True)
    for file in (rd.run_state, rd.info, rd.metrics):
        file.unlink(missing_ok=True)


def finalize(staged: Path, root: Path, marker: dict, keep: int) -> Path:
    """Write the marker into a staged checkpoint, rename it into place, drop old and broken ones."""
    atomic_write_text(staged / MARKER, json.dumps(marker, indent=2, default=str) + "\n")
    _fsync_dir(staged)
    final = root / staged.name
    if final.exists():  # a leftover of a crashed run at the same step
        shutil.rmtree(final)
    os.replace(staged, final)
    _fsync_dir(root)
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    complete = sorted((p for p in done if (p / MARKER).is_file()), key=_step)
    for p in complete[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    for p in done:
        if not (p / MARKER).is_file():
            shutil.rmtree(p, ignore_errors=True)
    return final


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines logged after ``last_step`` (steps a killed run did past its last checkpoint)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= last_step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_output(recipe, out_dir: Path, resume: bool, overwrite: bool, world: World, log):
    """Decide fresh / resume / refuse for output.dir. Returns (run state, checkpoint to resume or None)."""
    from .recipe import without_removed_keys

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{world.rank}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise TrainError(f"output.dir {out_dir}: cannot write there ({e.strerror or e}); "
                         "choose a writable directory (output.dir in the recipe or --set output.dir=...)") from e
    state = inspect(out_dir)
    if state.kind == "finished":
        if not overwrite:
            raise TrainError(f"output.dir {out_dir} holds a finished run (fastft.json); pass --overwrite to "
                             "replace it, or choose another output.dir")
        if world.main:
            clear(out_dir)
        return None, None
    if state.kind == "unfinished":
        diff = recipe_differences(without_removed_keys(state.run["recipe"]), recipe.to_dict())
        if diff and not overwrite:
            raise TrainError(f"output.dir {out_dir} holds an unfinished run of a different recipe ("
                             + "; ".join(diff) + "); use the same recipe to resume it, pass --overwrite to "
                             "start over, or choose another output.dir")
        if overwrite:
            if world.main:
                clear(out_dir)
            return None, None
        for p in state.incomplete:
            log(f"fastft: ignoring incomplete checkpoint {p} (a crash during its write)")
        if state.latest is None:
            log(f"fastft: {out_dir} holds an unfinished run with no complete checkpoint; starting it again")
            return state.run, None
        log(f"fastft: resuming the unfinished run in {out_dir} from {state.latest.name}")
        return state.run, state.latest
    if resume:
        raise TrainError(f"--resume: nothing to resume in {out_dir} (no unfinished fastft run there)")
    return None, None


def resumed_counters(out_dir: Path, ckpt: Path | None, world: World) -> dict | None:
    """The meter's counters saved with the checkpoint a run resumes from; metrics.jsonl is cut back
    to that step (or started empty for a fresh run)."""
    metrics_path = out_dir / METRICS
    if ckpt is None:
        if world.main:
            metrics_path.write_text("")
        return None
    marker = json.loads((ckpt / MARKER).read_text())
    if world.main:
        truncate_metrics(metrics_path, marker["step"])
    return marker.get("meter")
