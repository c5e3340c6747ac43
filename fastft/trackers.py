"""Experiment trackers (``train.report_to``): the trainer's own integrations plus fastft's figures.

    train:
      report_to: [tensorboard]        # any of tensorboard, wandb, mlflow, trackio (default: none)

The names go to the trainer (transformers' integrations log loss, learning rate, grad norm and the
held-out loss as training runs). At the end of the run fastft logs its own figures to the same
trackers: tokens/s and peak memory at every logged step (``fastft/...``), and once, at the last
step, the run's figures: held-out loss before/after, the evaluation by slice (``eval/task/...``),
the regression set and forgetting (``eval/regression/...``) and each gate's value and result
(``gates/...``). TensorBoard event files go to ``output.dir/tensorboard`` (``$TENSORBOARD_LOGGING_DIR``
when set). A tracker whose package is missing stops the run before it loads anything, naming the
package to install. wandb, mlflow and trackio use their own configuration (``WANDB_MODE=offline``,
``MLFLOW_TRACKING_URI``, ...), as with transformers alone.
"""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

from .errors import FastftError
from .schema import TRACKERS

PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
            "trackio": ("trackio",)}
TENSORBOARD_DIR = "tensorboard"
_USER_TB_DIR = os.environ.get("TENSORBOARD_LOGGING_DIR")


class TrackerError(FastftError):
    """An unknown tracker name, or a tracker whose package is not installed."""


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def require(names: list[str] | None) -> list[str]:
    """The recipe's trackers, checked: each known and its package importable."""
    names = list(names or [])
    for n in names:
        if n not in TRACKERS:
            raise TrackerError(f"train.report_to: unknown tracker {n!r}; choose from {', '.join(TRACKERS)}")
        if not any(_installed(m) for m in PACKAGES[n]):
            raise TrackerError(f"train.report_to: {n} needs the {PACKAGES[n][0]} package, which is not installed: "
                               f"pip install {PACKAGES[n][0]} (or remove {n} from train.report_to)")
    return names


def tensorboard_dir(out_dir: str | Path) -> Path:
    return Path(_USER_TB_DIR) if _USER_TB_DIR else Path(out_dir) / TENSORBOARD_DIR


def trainer_args(names: list[str] | None, out_dir: str | Path) -> list[str] | str:
    """``report_to`` for the trainer's config; points transformers' TensorBoard callback at
    ``tensorboard_dir(out_dir)``."""
    names = require(names)
    if not names:
        return "none"
    if "tensorboard" in names:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(tensorboard_dir(out_dir))
    return names


def _num(v) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None


def step_figures(history: list[dict]) -> list[tuple[int, dict[str, float]]]:
    """(step, {tag: value}) for each training log row: tokens/s and peak memory."""
    out = []
    for row in history:
        if "loss" not in row or "step" not in row:
            continue
        figs = {f"fastft/{k}": _num(row[k]) for k in ("tokens_per_second", "peak_rss_gb", "peak_vram_allocated_gb",
                                                        "peak_vram_reserved_gb", "tokens_seen") if k in row}
        figs = {k: v for k, v in figs.items() if v is not None}
        if figs:
            out.append((int(row["step"]), figs))
    return out


def run_figures(run_info: dict, eval_result: dict | None) -> dict[str, float]:
    """The run's figures as flat scalar tags: throughput, memory, held-out loss, eval by slice,
    regression / forgetting, gates (1 passed, 0 failed)."""
    m = run_info.get("metrics") or {}
    t = m.get("train") or {}
    out: dict[str, float | None] = {f"fastft/run/{k}": _num(t.get(k)) for k in (
        "tokens_per_second", "train_tokens", "peak_rss_gb", "peak_vram_allocated_gb", "peak_vram_reserved_gb")}
    out["fastft/run/wall_seconds"] = _num(m.get("wall_seconds"))
    out["eval/heldout_loss_before"] = _num((m.get("before") or {}).get("eval_loss"))
    out["eval/heldout_loss_after"] = _num((m.get("after") or {}).get("eval_loss"))
    ev = eval_result or {}
    task, metric = ev.get("task"), ev.get("metric")
    if task:
        for side in ("base", "adapter"):
            out[f"eval/task/{metric}/{side}"] = _num(task[side].get(metric))
            out[f"eval/task/loss/{side}"] = _num(task[side].get("loss"))
            for name, s in (task[side].get("slices") or {}).items():
                out[f"eval/task/slice/{name}/{metric}/{side}"] = _num(s.get(metric))
        out[f"eval/task/{metric}/gain"] = _num(task.get("gain"))
    reg = ev.get("regression")
    if reg:
        out["eval/regression/accuracy/base"] = _num(reg["base"]["accuracy"])
        out["eval/regression/accuracy/adapter"] = _num(reg["adapter"]["accuracy"])
        out["eval/regression/forgotten"] = _num(reg.get("forgotten"))
        out["eval/regression/forgotten_count"] = _num(reg.get("forgotten_count"))
        out["eval/regression/loss_delta"] = _num(reg.get("loss_delta"))
    gates = run_info.get("gates") or ev.get("gates")
    if gates:
        out["gates/passed"] = _num(bool(gates["passed"]))
        for g in gates["results"]:
            out[f"gates/{g['gate']}/value"] = _num(g["value"])
            out[f"gates/{g['gate']}/passed"] = _num(bool(g["passed"]))
    return {k: v for k, v in out.items() if v is not None}


def log_run(names: list[str] | None, out_dir: str | Path, history: list[dict], run_info: dict,
            eval_result: dict | None, step: int, log=print) -> None:
    """Log fastft's figures to each tracker in ``names`` (after the trainer's own logging)."""
    names = list(names or [])
    if not names:
        return
    per_step, final = step_figures(history), run_figures(run_info, eval_result)
    for n in names:
        {"tensorboard": _tensorboard, "wandb": _wandb, "mlflow": _mlflow, "trackio": _trackio}[n](
            out_dir, per_step, final, step, run_info)
    log(f"fastft: logged {len(final)} run figures and {len(per_step)} steps of tokens/s and memory to "
        + ", ".join(names) + (f" (TensorBoard: {tensorboard_dir(out_dir)})" if "tensorboard" in names else ""))


def _tensorboard(out_dir, per_step, final, step, run_info) -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboardX alone
        from tensorboardX import SummaryWriter
    writer = SummaryWriter(log_dir=str(tensorboard_dir(out_dir)))
    try:
        for s, figs in per_step:
            for k, v in figs.items():
                writer.add_scalar(k, v, s)
        for k, v in final.items():
            writer.add_scalar(k, v, step)
    finally:
        writer.close()


def _wandb(out_dir, per_step, final, step, run_info) -> None:
    import wandb

    run = wandb.run or wandb.init(project=os.environ.get("WANDB_PROJECT", "fastft"), name=Path(out_dir).name,
                                  resume="allow")
    for s, figs in per_step:
        run.log(figs, step=s)
    run.log(final, step=max(step, per_step[-1][0] if per_step else 0))
    run.finish()


def _mlflow(out_dir, per_step, final, step, run_info) -> None:
    import mlflow

    started = mlflow.active_run() is None
    if started:
        mlflow.start_run(run_name=Path(out_dir).name)
    try:
        for s, figs in per_step:
            mlflow.log_metrics({k.replace("/", "."): v for k, v in figs.items()}, step=s)
        mlflow.log_metrics({_mlflow_key(k): v for k, v in final.items()}, step=step)
    finally:
        if started:
            mlflow.end_run()


def _mlflow_key(k: str) -> str:
    # mlflow metric names allow alphanumerics, _ - . space / ; gate names hold '.' already
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in k)


def _trackio(out_dir, per_step, final, step, run_info) -> None:
    import trackio

    trackio.init(project=os.environ.get("TRACKIO_PROJECT", "fastft"), name=Path(out_dir).name, resume="allow")
    for s, figs in per_step:
        trackio.log(figs, step=s)
    trackio.log(final, step=step)
    trackio.finish()
