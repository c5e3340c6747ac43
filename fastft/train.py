"""A training run, start to finish: load -> patch -> data -> trainer -> train -> save.

    from fastft import recipe, train
    result = train.run(recipe.load("recipes/tiny-demo.yaml"))
    result.info["eval"]["task"]["adapter"]["exact_match"], result.model   # summary, trained PEFT model

The trainer is TRL's SFTTrainer (fastft.trainer) with fastft's callbacks (fastft.callbacks): the
``Meter`` counts real (non-padding) tokens per optimizer step and the time spent in steps
(evaluation excluded), and reads peak memory: CUDA max allocated and reserved on a GPU, the
process's peak resident set (RSS) on CPU. Held-out loss is measured before and after training;
the base-vs-adapter evaluation (``eval.*``, fastft.evaluate) runs at the end and writes eval.json.

Faults (see fastft.checkpoints for the directory layout):
- ``train.save_every`` writes resumable checkpoints (staged, then renamed into place); a run
  whose output dir holds an unfinished run of the same recipe resumes from the newest complete one.
- SIGINT / SIGTERM: checkpoint at the end of the current step, then exit (130 / 143) with the
  resume command; a second signal exits at once.
- A NaN/Inf loss or gradient skips the optimizer step, up to ``train.max_nonfinite_steps``, then
  the run stops with the step and the usual causes; a non-finite adapter is never saved.
- CUDA out-of-memory ends the run with the measured peak and what to change.
- Under ``torchrun`` / ``accelerate launch`` (several processes) it trains data-parallel (DDP) with
  the recipe's global batch, rank 0 writes every output, and tokens/sec is summed over ranks;
  with ``distributed.strategy: fsdp`` the model is sharded over them instead (fastft.distributed).
"""
from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checkpoints, data, distributed, evaluate, oom, rundir, summary, trackers
from .models import backends, patch, provenance
from .errors import TrainError
from .info import versions as package_versions
from .recipe import Recipe
from .world import World, strategy


class TrainInterrupted(TrainError):
    """Stopped by SIGINT/SIGTERM after writing a checkpoint; the message says how to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


@dataclass
class Run:
    """What ``run`` returns: the summary written to fastft.json, and the trained model in memory."""

    info: dict
    model: Any
    tokenizer: Any
    out_dir: Path


def run(recipe: Recipe, log=print, resume: bool = False, overwrite: bool = False) -> Run:
    """Train the recipe; the summary is also written to output.dir/fastft.json. With ``resume`` (or
    when output.dir holds an unfinished run of the same recipe) it continues from the newest
    complete checkpoint."""
    import torch

    t_start = time.perf_counter()
    world = World.from_env()
    say = log if world.main else (lambda m: None)
    out_dir = Path(recipe.output.dir)
    trackers.require(recipe.train.report_to)  # a missing tracker package stops the run before it loads anything
    previous, ckpt = checkpoints.prepare_output(recipe, out_dir, resume, overwrite, world, say)
    batch = distributed.per_device_batch(recipe, world)
    fsdp = strategy(recipe, world.size) == "fsdp"

    # 1. load (the backend imports Unsloth first when it runs: it patches the HF stack and TRL as
    #    they are imported, so fastft's trainer and callbacks are imported after it)
    model, tokenizer, info = backends.load(recipe, world_size=world.size, local_rank=world.local_rank)
    say(f"fastft: {info.summary()}")
    from . import callbacks, methods
    from .data import preference
    from .trainer import FastftTrainer, adapters_follow_compute_dtype, optim_for, sft_config
    start = methods.start_from(model, recipe, say) if recipe.model.adapter else None  # SFT -> DPO/GRPO

    # 2. patch: fastft's fused LoRA, Unsloth's, or stock PEFT
    kernels = patch.apply(model, recipe.kernels)
    say(f"fastft: {kernels.summary()}")
    if world.size > 1:
        say(f"fastft: {'sharded (FSDP), ' if fsdp else ''}data-parallel over {world.size} processes: "
            f"per-device batch {batch[0]} x grad accum "
            f"{batch[1]} x {world.size} = global batch {recipe.train.batch_size * recipe.train.grad_accum}")

    # 3. data (dpo / orpo / grpo: fastft.data.preference; their held-out rows are evaluated as SFT's)
    md = None
    if recipe.train.method == "sft":
        bundle = data.build(recipe.data, tokenizer, seed=recipe.train.seed, max_length=recipe.model.max_seq_length,
                            log=lambda m: say(f"fastft: {m}"))
        say(f"fastft: data {bundle.stats['train_examples']} train / {bundle.stats['eval_examples']} eval examples, "
            f"{bundle.stats['train_tokens']:,} train tokens ({bundle.data_hash[:19]})")
    else:
        md = preference.build(recipe, tokenizer, log=lambda m: say(f"fastft: {m}"))
        bundle = md.held_out
        say(f"fastft: data ({recipe.train.method}) {md.stats['train_examples']} train / "
            f"{md.stats['eval_examples']} held-out rows ({bundle.data_hash[:19]})")

    # 4. trainer
    meter = callbacks.Meter(out_dir / rundir.METRICS, write=world.main,
                            counters=checkpoints.resumed_counters(out_dir, ckpt, world))
    signals = callbacks.StopOnSignal(say)
    guard = callbacks.NonFiniteGuard(recipe.train.max_nonfinite_steps, say)
    extra, best = [], None
    if world.size > 1:  # every rank stops at the same step boundary, whichever got the signal
        extra.append(distributed.stop_together(signals))
    if recipe.train.early_stopping_patience and bundle.eval is not None:
        extra.append(callbacks.EarlyStop(recipe.train.early_stopping_patience, say))
    if recipe.train.eval_every and bundle.eval is not None:
        best = (distributed.best_adapter if fsdp else callbacks.BestAdapter)(
            model, checkpoints.checkpoint_root(out_dir) / "best-adapter.safetensors", world.main, say)
        extra.append(best)
    config = sft_config(recipe, out_dir, info, optim_for(recipe, info.device, say), bundle.eval is not None,
                        world, batch)
    reward = None
    if md is None:
        trainer = FastftTrainer(model=model, args=config, train_dataset=bundle.train, eval_dataset=bundle.eval,
                                processing_class=tokenizer, callbacks=[meter, signals, *extra], meter=meter,
                                guard=guard, out_dir=out_dir, keep_checkpoints=recipe.train.keep_checkpoints, log=say,
                                fsdp=fsdp)
    else:
        if fsdp:
            raise TrainError(f"train.method: {recipe.train.method} does not run under distributed.strategy: fsdp "
                             "yet; use strategy: ddp or one process")
        trainer, reward = methods.make_trainer(recipe, model, tokenizer, md, config, info,
                                               callbacks=[meter, signals, *extra], meter=meter, guard=guard,
                                               out_dir=out_dir, keep_checkpoints=recipe.train.keep_checkpoints,
                                               log=say)
    adapters_follow_compute_dtype(model, info.dtype)
    sharding = distributed.shard_run(model, recipe, info, say) if fsdp else None

    # 5. train, with the held-out loss before (once per run: a resumed run reuses the first one's) and after
    if previous is not None and "before" in previous:
        before = previous["before"]
    else:
        before = summary.score(trainer, bundle)
        _forget_eval_preparation(trainer, model)
    say(f"fastft: before training: {summary.fmt_scores(before, bundle, recipe.train.method)}")
    if world.main:
        checkpoints.write_run_state(out_dir, {"status": "running", "recipe": recipe.to_dict(),
                                              "recipe_source": recipe.source, "before": before,
                                              "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    try:
        with signals:
            trainer.train(resume_from_checkpoint=str(ckpt) if ckpt is not None else None)
    except torch.cuda.OutOfMemoryError as e:
        raise TrainError(oom.message(recipe, e, out_dir, callbacks.peak_memory())) from e
    except callbacks.NonFiniteError as e:
        raise TrainError(str(e)) from e
    if signals.received is not None:
        raise _interrupted(signals.received, trainer.state.global_step, recipe, out_dir, say)
    after = summary.score(trainer, bundle)
    adapter_step = trainer.state.global_step
    if best is not None and best.restore_if_better(after["eval_loss"]):
        adapter_step = best.step
        after = summary.score(trainer, bundle)
    say(f"fastft: after training:  {summary.fmt_scores(after, bundle, recipe.train.method)}")
    if md is not None:
        methods.finish(model)  # drop the frozen reference adapter: adapter/ holds the trained one alone

    # 6. save (rank 0) the adapter and fastft.json before the evaluation, which loads data, generates
    #    and can still fail: a failure there must not lose the trained weights. A non-finite adapter
    #    is never written.
    trained = (distributed.full_trainable_state(model) if fsdp  # fsdp: gathered from the shards
               else {n: p for n, p in model.named_parameters() if p.requires_grad})
    bad = [n for n, p in trained.items() if not torch.isfinite(p).all()]
    if bad:
        raise TrainError(f"the trained adapter has non-finite weights ({bad[0]} and {len(bad) - 1} more); "
                         "nothing was saved. Lower train.lr or check the data.")
    metrics = {
        "train": meter.summary(),
        "steps": trainer.state.global_step,
        "losses": [h["loss"] for h in meter.history if "loss" in h],
        "nonfinite_steps_skipped": guard.skipped,
        "resumed_from": str(ckpt) if ckpt is not None else None,
        "adapter_step": adapter_step,  # the saved adapter's step: the best held-out loss when eval_every is set
        "world_size": world.size,
        **({"distributed": sharding} if sharding else {}),
        "before": before,
        "after": after,
        "wall_seconds": time.perf_counter() - t_start,
        "method": methods.figures(recipe.train.method, meter.history),  # reward mean/std, margins, KL
    }
    run_info = {
        "recipe": recipe.to_dict(),
        "recipe_source": recipe.source,
        "backend": info.to_dict(),
        "kernels": kernels.to_dict(),
        "versions": package_versions(),
        "data": {"hash": bundle.data_hash, **bundle.stats},
        "metrics": metrics,
        "method": methods.describe(recipe, start, reward),  # sft | dpo | orpo | grpo, its reward and reference
        "command": " ".join(sys.argv),
        **provenance.provenance(recipe, info),  # base model fingerprint + fastft commit: compatibility checks
    }
    adapter_dir = _save(model, tokenizer, out_dir, run_info, trained if fsdp else None) if world.main else None

    # 7. evaluate: base vs adapter (task by slice, regression set) and the recipe's gates into
    #    eval.json, then into fastft.json
    try:
        if fsdp:  # every rank runs the sharded forwards on the same rows; rank 0's result is written
            verdict = distributed.evaluate_sharded(model, tokenizer, recipe, bundle, out_dir, world, say)
        else:
            verdict = evaluate.after_training(model, tokenizer, recipe, bundle, out_dir, log=say) if world.main else {}
    except Exception as e:
        raise _evaluation_failed(e, out_dir, run_info, adapter_dir, world, say) from e
    run_info.update(verdict)  # "eval"; with eval.gates also "gates" and "status": accepted | rejected
    if world.main:
        rundir.write_run_info(out_dir, run_info)
        say(summary.final_table(metrics, verdict.get("eval"), adapter_dir))
        _report(recipe, out_dir, meter.history, run_info, verdict.get("eval"), trainer.state.global_step, say)
    return Run(info=run_info, model=model, tokenizer=tokenizer, out_dir=out_dir)


def _report(recipe: Recipe, out_dir: Path, history: list, run_info: dict, ev: dict | None, step: int, say) -> None:
    """fastft's figures to the recipe's trackers, then report.html + report.md; the run is saved
    already, so a failure here is reported and never loses it."""
    from . import report

    try:
        trackers.log_run(recipe.train.report_to, out_dir, history, run_info, ev, step, log=say)
    except Exception as e:  # noqa: BLE001 - a tracker's own failure (network, auth) must not fail a saved run
        say(f"fastft: warning: logging to {', '.join(recipe.train.report_to or [])} failed: {type(e).__name__}: {e}")
    try:
        html_path, md_path = report.write([out_dir])
        say(f"fastft: report: {html_path} (+ {md_path.name})")
    except (OSError, report.ReportError) as e:
        say(f"fastft: warning: the report was not written ({e}); `fastft report {out_dir}` writes it again")


def _interrupted(signum: int, step: int, recipe: Recipe, out_dir: Path, say) -> TrainInterrupted:
    where = checkpoints.complete_checkpoints(out_dir)
    msg = (f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint "
           f"{where[-1] if where else '(none)'} is complete. Resume with: fastft train "
           f"{recipe.source or 'RECIPE'} --resume")
    say(f"fastft: {msg}")
    return TrainInterrupted(msg, signum)


def _save(model, tokenizer, out_dir: Path, run_info: dict, state_dict: dict | None = None) -> Path:
    try:
        adapter_dir = rundir.save_adapter(model, tokenizer, out_dir, state_dict)
        rundir.write_run_info(out_dir, run_info)
    except OSError as e:
        raise TrainError(f"cannot write the results into {out_dir}: {e.strerror or e}"
                         + (" (the disk is full: free space and run the same command again; it resumes "
                            "from the last checkpoint)" if e.errno == 28 else "")
                         + ". Nothing incomplete was left in place of adapter/ or fastft.json.") from e
    return adapter_dir


def _evaluation_failed(e: Exception, out_dir: Path, run_info: dict, adapter_dir: Path | None, world: World,
                       say) -> TrainError:
    """The error for an evaluation that failed after the adapter was saved: fastft.json records the
    failure, and the message says where the adapter is and how to evaluate it again."""
    why = f"{type(e).__name__}: {e}"
    if world.main:
        try:
            rundir.write_run_info(out_dir, {**run_info, "eval_error": why})
        except OSError as err:
            say(f"fastft: warning: fastft.json does not record the failed evaluation ({err.strerror or err})")
    msg = (f"the evaluation after training failed ({why}). The trained adapter is saved"
           + (f" in {adapter_dir}" if adapter_dir else f" in {out_dir}")
           + f"; once the cause is fixed, evaluate it with: fastft eval {out_dir}")
    say(f"fastft: {msg}")
    return TrainError(msg, exit_code=getattr(e, "exit_code", None))  # a bad-input error keeps its exit code


def _forget_eval_preparation(trainer, model) -> None:
    """Trainer.evaluate() before train() prepares the model for evaluation and marks it prepared;
    train() then skips preparing it, so under torchrun the model is never wrapped in DDP and each
    rank silently trains on its own gradients (measured here: rank-local grad norms, diverging
    loss curves). Clear the mark so train() prepares (and DDP-wraps) the model as usual."""
    if getattr(model, "_is_accelerate_prepared", False):
        model._is_accelerate_prepared = False
        models = trainer.accelerator._models
        models[:] = [m for m in models if m is not model]
