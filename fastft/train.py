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

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import backends, checkpoints, data, distributed, evaluate, patch, progress, provenance, rundir, trackers
from .errors import FastftError
from .recipe import Recipe, without_removed_keys


class TrainError(FastftError, RuntimeError):
    """A run that cannot go on; the message says what to change."""

    exit_code = 1


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


@dataclass
class World:
    """This process's place in a data-parallel job (torchrun / accelerate launch set the env)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @classmethod
    def from_env(cls) -> "World":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("WORLD_SIZE", 1)))

    @property
    def main(self) -> bool:
        return self.rank == 0


def _optimizer(recipe: Recipe, device: str, log) -> str:
    optim = recipe.train.optim
    if device == "cpu" and optim.startswith("paged_"):
        plain = {"paged_adamw_8bit": "adamw_8bit", "paged_adamw_32bit": "adamw_torch"}[optim]
        log(f"warning: train.optim={optim}: paged optimizers need CUDA memory paging; using {plain} on CPU")
        return plain
    return optim


def _sft_config(recipe: Recipe, out_dir: Path, info, optim: str, has_eval: bool, world: World,
                batch: tuple[int, int]):
    from trl import SFTConfig

    t = recipe.train
    cuda = info.device.startswith("cuda")
    kwargs = dict(
        output_dir=str(out_dir / "checkpoints"),
        per_device_train_batch_size=batch[0],
        per_device_eval_batch_size=t.eval_batch_size or max(batch[0], 8),
        gradient_accumulation_steps=batch[1],
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a fraction of the total steps
        max_steps=t.max_steps if t.max_steps else -1,
        num_train_epochs=t.epochs,
        optim=optim,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_every,
        logging_first_step=True,
        eval_strategy="steps" if (has_eval and t.eval_every) else "no",
        eval_steps=t.eval_every,
        save_strategy="steps" if t.save_every else "no",
        save_steps=t.save_every or 500,
        save_total_limit=None,  # fastft rotates complete checkpoints itself (checkpoints.finalize)
        save_only_model=False,
        ddp_find_unused_parameters=False if world.size > 1 else None,
        report_to=trackers.trainer_args(recipe.train.report_to, out_dir),  # "none" unless train.report_to
        # the backend already set gradient checkpointing up (Unsloth's own, or PEFT's for k-bit models)
        gradient_checkpointing=False,
        bf16=cuda and info.dtype == "bfloat16",
        fp16=cuda and info.dtype == "float16",
        max_length=recipe.model.max_seq_length,
        packing=recipe.data.packing,
        dataset_num_proc=None,
        disable_tqdm=not world.main or progress.quiet(),  # --quiet: no training bar either
        use_cpu=not cuda,
    )
    return SFTConfig(**kwargs)


def _per_device_batch(recipe: Recipe, world: World) -> tuple[int, int]:
    """(per-device batch, grad accum) keeping the recipe's global batch (batch_size x grad_accum)
    when N processes train data-parallel: the accumulation is split first, then the batch."""
    b, g, n = recipe.train.batch_size, recipe.train.grad_accum, world.size
    split = distributed.split_batch(b, g, n)
    if split is not None:
        return split
    raise TrainError(f"train.batch_size={b} x train.grad_accum={g} = {b * g} examples per step cannot be split "
                     f"evenly over {n} processes; make it a multiple of {n}")


def _prepare_output(recipe: Recipe, out_dir: Path, resume: bool, overwrite: bool, world: World, log):
    """Decide fresh / resume / refuse for output.dir. Returns (run state, checkpoint to resume or None)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{world.rank}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise TrainError(f"output.dir {out_dir}: cannot write there ({e.strerror or e}); "
                         "choose a writable directory (output.dir in the recipe or --set output.dir=...)") from e
    state = checkpoints.inspect(out_dir)
    if state.kind == "finished":
        if not overwrite:
            raise TrainError(f"output.dir {out_dir} holds a finished run (fastft.json); pass --overwrite to "
                             "replace it, or choose another output.dir")
        if world.main:
            checkpoints.clear(out_dir)
        return None, None
    if state.kind == "unfinished":
        diff = checkpoints.recipe_differences(without_removed_keys(state.run["recipe"]), recipe.to_dict())
        if diff and not overwrite:
            raise TrainError(f"output.dir {out_dir} holds an unfinished run of a different recipe ("
                             + "; ".join(diff) + "); use the same recipe to resume it, pass --overwrite to "
                             "start over, or choose another output.dir")
        if overwrite:
            if world.main:
                checkpoints.clear(out_dir)
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
    previous, ckpt = _prepare_output(recipe, out_dir, resume, overwrite, world, say)
    batch = _per_device_batch(recipe, world)
    fsdp = distributed.strategy(recipe, world.size) == "fsdp"

    # 1. load (the backend imports Unsloth first when it runs: it patches the HF stack and TRL as
    #    they are imported, so fastft's trainer and callbacks are imported after it)
    model, tokenizer, info = backends.load(recipe, world_size=world.size, local_rank=world.local_rank)
    say(f"fastft: {info.summary()}")
    from . import callbacks, data_preference, methods
    from .trainer import FastftTrainer
    start = methods.start_from(model, recipe, say) if recipe.model.adapter else None  # SFT -> DPO/GRPO

    # 2. patch: fastft's fused LoRA, Unsloth's, or stock PEFT
    kernels = patch.apply(model, recipe.kernels)
    say(f"fastft: {kernels.summary()}")
    if world.size > 1:
        say(f"fastft: {'sharded (FSDP), ' if fsdp else ''}data-parallel over {world.size} processes: "
            f"per-device batch {batch[0]} x grad accum "
            f"{batch[1]} x {world.size} = global batch {recipe.train.batch_size * recipe.train.grad_accum}")

    # 3. data (dpo / orpo / grpo: fastft.data_preference; their held-out rows are evaluated as SFT's)
    md = None
    if recipe.train.method == "sft":
        bundle = data.build(recipe.data, tokenizer, seed=recipe.train.seed, max_length=recipe.model.max_seq_length,
                            log=lambda m: say(f"fastft: {m}"))
        say(f"fastft: data {bundle.stats['train_examples']} train / {bundle.stats['eval_examples']} eval examples, "
            f"{bundle.stats['train_tokens']:,} train tokens ({bundle.data_hash[:19]})")
    else:
        md = data_preference.build(recipe, tokenizer, log=lambda m: say(f"fastft: {m}"))
        bundle = md.held_out
        say(f"fastft: data ({recipe.train.method}) {md.stats['train_examples']} train / "
            f"{md.stats['eval_examples']} held-out rows ({bundle.data_hash[:19]})")

    # 4. trainer
    meter = callbacks.Meter(out_dir / rundir.METRICS, write=world.main, counters=_resumed_counters(out_dir, ckpt, world))
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
    config = _sft_config(recipe, out_dir, info, _optimizer(recipe, info.device, say), bundle.eval is not None,
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
    _adapters_follow_compute_dtype(model, info.dtype)
    sharding = _shard(model, recipe, info, say) if fsdp else None

    # 5. train, with the held-out loss before (once per run: a resumed run reuses the first one's) and after
    if previous is not None and "before" in previous:
        before = previous["before"]
    else:
        before = _score(trainer, bundle)
        _forget_eval_preparation(trainer, model)
    say(f"fastft: before training: {_fmt_scores(before, bundle, recipe.train.method)}")
    if world.main:
        checkpoints.write_run_state(out_dir, {"status": "running", "recipe": recipe.to_dict(),
                                              "recipe_source": recipe.source, "before": before,
                                              "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    try:
        with signals:
            trainer.train(resume_from_checkpoint=str(ckpt) if ckpt is not None else None)
    except torch.cuda.OutOfMemoryError as e:
        raise TrainError(_oom_message(recipe, e, out_dir, callbacks.peak_memory())) from e
    except callbacks.NonFiniteError as e:
        raise TrainError(str(e)) from e
    if signals.received is not None:
        raise _interrupted(signals.received, trainer.state.global_step, recipe, out_dir, say)
    after = _score(trainer, bundle)
    adapter_step = trainer.state.global_step
    if best is not None and best.restore_if_better(after["eval_loss"]):
        adapter_step = best.step
        after = _score(trainer, bundle)
    say(f"fastft: after training:  {_fmt_scores(after, bundle, recipe.train.method)}")
    if md is not None:
        methods.finish(model)  # drop the frozen reference adapter: adapter/ holds the trained one alone

    # 6. save (rank 0): base vs adapter (task by slice, regression set) and the recipe's gates into
    #    eval.json, then adapter/ and fastft.json; a non-finite adapter is never written
    trained = (distributed.full_trainable_state(model) if fsdp  # fsdp: gathered from the shards
               else {n: p for n, p in model.named_parameters() if p.requires_grad})
    bad = [n for n, p in trained.items() if not torch.isfinite(p).all()]
    if bad:
        raise TrainError(f"the trained adapter has non-finite weights ({bad[0]} and {len(bad) - 1} more); "
                         "nothing was saved. Lower train.lr or check the data.")
    if fsdp:  # every rank runs the sharded forwards on the same rows; rank 0's result is written
        verdict = _evaluate_sharded(model, tokenizer, recipe, bundle, out_dir, world, say)
    else:
        verdict = evaluate.after_training(model, tokenizer, recipe, bundle, out_dir, log=say) if world.main else {}
    summary = {
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
        "versions": backends.versions(),
        "data": {"hash": bundle.data_hash, **bundle.stats},
        "metrics": summary,
        "method": methods.describe(recipe, start, reward),  # sft | dpo | orpo | grpo, its reward and reference
        "command": " ".join(sys.argv),
        **verdict,  # "eval"; with eval.gates also "gates" and "status": accepted | rejected
        **provenance.provenance(recipe, info),  # base model fingerprint + fastft commit: compatibility checks
    }
    if world.main:
        adapter_dir = _save(model, tokenizer, out_dir, run_info, trained if fsdp else None)
        say(_final_table(summary, verdict.get("eval"), adapter_dir))
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


def _resumed_counters(out_dir: Path, ckpt: Path | None, world: World) -> dict | None:
    """The meter's counters saved with the checkpoint a run resumes from; metrics.jsonl is cut back
    to that step (or started empty for a fresh run)."""
    metrics_path = out_dir / rundir.METRICS
    if ckpt is None:
        if world.main:
            metrics_path.write_text("")
        return None
    marker = json.loads((ckpt / checkpoints.MARKER).read_text())
    if world.main:
        checkpoints.truncate_metrics(metrics_path, marker["step"])
    return marker.get("meter")


def _interrupted(signum: int, step: int, recipe: Recipe, out_dir: Path, say) -> TrainInterrupted:
    where = checkpoints.complete_checkpoints(out_dir)
    msg = (f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint "
           f"{where[-1] if where else '(none)'} is complete. Resume with: fastft train "
           f"{recipe.source or 'RECIPE'} --resume")
    say(f"fastft: {msg}")
    return TrainInterrupted(msg, signum)


def _save(model, tokenizer, out_dir: Path, run_info: dict, state_dict: dict | None = None) -> Path:
    try:
        adapter_dir = (rundir.save_adapter(model, tokenizer, out_dir) if state_dict is None
                       else distributed.save_final_adapter(model, tokenizer, out_dir, state_dict))
        rundir.write_run_info(out_dir, run_info)
    except OSError as e:
        raise TrainError(f"cannot write the results into {out_dir}: {e.strerror or e}"
                         + (" (the disk is full: free space and run the same command again; it resumes "
                            "from the last checkpoint)" if e.errno == 28 else "")
                         + ". Nothing incomplete was left in place of adapter/ or fastft.json.") from e
    return adapter_dir


def _shard(model, recipe: Recipe, info, say) -> dict:
    """distributed.strategy: fsdp: shard the model over the processes (fastft.distributed) and
    record each rank's share of the frozen base."""
    import resource

    import torch
    import torch.distributed as dist

    full = distributed.local_bytes(model)
    # what loading left in this process's memory: rank 0 the whole model, the others (meta) none
    loaded = [None] * dist.get_world_size()
    dist.all_gather_object(loaded, {"host_bytes": distributed.materialized_bytes(model),
                                    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
    done = distributed.shard(model, getattr(torch, info.dtype), info.device, recipe.distributed.cpu_offload)
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, distributed.local_bytes(model))
    done.update(base_bytes_unsharded=full, base_bytes_per_rank=per_rank,
                loaded_host_bytes_per_rank=[r["host_bytes"] for r in loaded],
                peak_rss_after_load_per_rank=[r["peak_rss_bytes"] for r in loaded])
    say(f"fastft: FSDP over {done['processes']} processes, {done['units']} units ({done['decoder_layers']} "
        f"decoder layers); frozen base {full / 2**20:.1f} MiB, per rank " + " / ".join(f"{b / 2**20:.1f}" for b in per_rank) + " MiB"
        + ("; parameter shards offloaded to CPU" if done["cpu_offload"] else "")
        + f"; loaded by {done['loaded_by']}, host memory after loading per rank "
        + " / ".join(f"{r['host_bytes'] / 2**20:.1f}" for r in loaded) + " MiB")
    return done


def _evaluate_sharded(model, tokenizer, recipe: Recipe, bundle, out_dir: Path, world: World, say) -> dict:
    """The base-vs-adapter evaluation on an FSDP model: a collective (each forward gathers the
    layers from every rank), so every rank evaluates the same rows; the others write their copy
    of eval.json into a scratch directory that is then removed."""
    import tempfile

    if world.main:
        return evaluate.after_training(model, tokenizer, recipe, bundle, out_dir, log=say)
    with tempfile.TemporaryDirectory(prefix=f"fastft-eval-rank{world.rank}-") as scratch:
        evaluate.after_training(model, tokenizer, recipe, bundle, Path(scratch), log=lambda m: None)
    return {}


def _forget_eval_preparation(trainer, model) -> None:
    """Trainer.evaluate() before train() prepares the model for evaluation and marks it prepared;
    train() then skips preparing it, so under torchrun the model is never wrapped in DDP and each
    rank silently trains on its own gradients (measured here: rank-local grad norms, diverging
    loss curves). Clear the mark so train() prepares (and DDP-wraps) the model as usual."""
    if getattr(model, "_is_accelerate_prepared", False):
        model._is_accelerate_prepared = False
        models = trainer.accelerator._models
        models[:] = [m for m in models if m is not model]


def _oom_message(recipe: Recipe, e: Exception, out_dir: Path, mem: dict) -> str:
    peak = (f"peak {mem['peak_vram_allocated_gb']:.2f} GB allocated / {mem['peak_vram_reserved_gb']:.2f} GB reserved"
            if "peak_vram_allocated_gb" in mem else "peak memory not measured (no CUDA device)")
    t, m = recipe.train, recipe.model
    tips = []
    if t.batch_size > 1:
        tips.append(f"train.batch_size {t.batch_size} -> {max(1, t.batch_size // 2)} with train.grad_accum "
                    f"{t.grad_accum} -> {t.grad_accum * 2} (same global batch)")
    tips.append(f"model.max_seq_length {m.max_seq_length} -> {max(8, m.max_seq_length // 2)}")
    if not t.gradient_checkpointing:
        tips.append("train.gradient_checkpointing: true (or 'unsloth' to offload activations)")
    if t.optim in ("adamw_torch", "paged_adamw_32bit"):
        tips.append("train.optim: adamw_8bit")
    if not m.load_in_4bit:
        tips.append("model.load_in_4bit: true")
    done = checkpoints.complete_checkpoints(out_dir)
    return (f"out of GPU memory ({peak}). Try: " + "; ".join(tips) + ". "
            + (f"The last checkpoint ({done[-1].name}) is intact: the same command resumes from it."
               if done else "No checkpoint was written (set train.save_every to make runs resumable).")
            + f" [{str(e).splitlines()[0][:200]}]")


def _adapters_follow_compute_dtype(model, compute_dtype: str) -> None:
    """TRL's SFTTrainer casts QLoRA adapter weights to bf16 (the QLoRA paper's setting, made for
    bf16 compute). With fp32 compute (CPU) or fp16 mixed precision that loses update precision and
    the trained function differs from the saved adapter reloaded in fp32 (measured: logits 0.016
    apart on the tiny model), so there fastft keeps trainable weights in fp32."""
    import torch

    if compute_dtype == "bfloat16":
        return
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def _score(trainer, bundle) -> dict:
    """The held-out loss (a collective under DDP: every rank calls it)."""
    return {"eval_loss": trainer.evaluate()["eval_loss"]} if bundle.eval is not None and trainer.eval_dataset is not None else {}


def _fmt_scores(s: dict, bundle=None, method: str = "sft") -> str:
    if "eval_loss" in s:
        return f"held-out loss {s['eval_loss']:.4f}"
    if method != "sft" and bundle is not None and bundle.eval_pairs:  # held-out prompts, but no pair loss
        why = "grpo has no loss on fixed answers" if method == "grpo" else "the held-out rows are not preference pairs"
        return (f"no held-out {method} loss ({why}); its {len(bundle.eval_pairs)} held-out prompts are "
                "evaluated after training")
    return "no held-out data (data.eval_fraction 0 and no data.eval)"


def _final_table(summary: dict, ev: dict | None, adapter_dir: Path) -> str:
    """Held-out loss before/after training and, from the evaluation, the task metric of the base
    (the adapter disabled: the model before training) and of the adapter."""
    b, a, t = summary["before"], summary["after"], summary["train"]
    rows = [("", "before", "after")]
    if "eval_loss" in a:
        rows.append(("held-out loss", f"{b['eval_loss']:.4f}", f"{a['eval_loss']:.4f}"))
    task = (ev or {}).get("task")
    if task and task.get("n"):
        metric = ev["metric"]
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        rows.append((f"{metric.replace('_', ' ')} (n={task['n']})", pct(task["base"][metric]),
                     pct(task["adapter"][metric])))
    width = max(len(r[0]) for r in rows)
    lines = ["", "fastft: run summary"] + [f"  {r[0]:<{width}}  {r[1]:>10}  {r[2]:>10}" for r in rows]
    mem = (f"peak VRAM {t['peak_vram_allocated_gb']:.2f} GB allocated / {t['peak_vram_reserved_gb']:.2f} GB reserved"
           if "peak_vram_allocated_gb" in t else f"peak RSS {t['peak_rss_gb']:.2f} GB")
    tps = t["tokens_per_second"]
    lines.append(f"  {summary['steps']} steps, {t['train_tokens']:,} tokens, "
                 f"{tps:,.0f} tokens/s, {mem}, wall {summary['wall_seconds']:.1f} s" if tps else
                 f"  {summary['steps']} steps, {mem}, wall {summary['wall_seconds']:.1f} s")
    lines.append(f"  adapter: {adapter_dir}")
    return "\n".join(lines)
