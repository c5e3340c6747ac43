"""A training run, start to finish: load -> data -> score before -> train -> score after -> save.

    from fastft import recipe, train
    result = train.run(recipe.load("recipes/tiny-demo.yaml"))
    result.info["metrics"]["after"]["exact_match"], result.model   # summary, trained PEFT model

The trainer is TRL's SFTTrainer. ``Meter`` counts real (non-padding) tokens per optimizer step
and the time spent in steps (evaluation excluded), and reads peak memory: CUDA max allocated and
reserved on a GPU, the process's peak resident set (RSS) on CPU.

Faults (see fastft.checkpoints for the directory layout):
- ``train.save_every`` writes resumable checkpoints (staged, then renamed into place); a run
  whose output dir holds an unfinished run of the same recipe resumes from the newest complete one.
- SIGINT / SIGTERM: checkpoint at the end of the current step, then exit (130 / 143) with the
  resume command; a second signal exits at once.
- A NaN/Inf loss or gradient skips the optimizer step, up to ``train.max_nonfinite_steps``, then
  the run stops with the step and the usual causes; a non-finite adapter is never saved.
- CUDA out-of-memory ends the run with the measured peak and what to change.
- Under ``torchrun`` / ``accelerate launch`` (several processes) it trains data-parallel (DDP) with
  the recipe's global batch, rank 0 writes every output, and tokens/sec is summed over ranks.

Fault-injection hooks for tests (environment): FASTFT_FAULT_NAN_STEPS="3,4" poisons those optimizer
steps' loss with NaN; FASTFT_FAULT_OOM_STEP=N raises a CUDA out-of-memory error at step N.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import backends, checkpoints, data, evaluate, files, patch, provenance, rundir
from .errors import FastftError
from .recipe import Recipe


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


def _all_reduce_sum(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def peak_memory() -> dict:
    """Peak memory so far, in GB: CUDA allocated/reserved, or the process's peak RSS on CPU."""
    import torch

    if torch.cuda.is_available():
        return {"peak_vram_allocated_gb": torch.cuda.max_memory_allocated() / 1e9,
                "peak_vram_reserved_gb": torch.cuda.max_memory_reserved() / 1e9}
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {"peak_rss_gb": rss_kb * 1024 / 1e9}


def _cuda_sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _meter_callback_class():
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        """Tokens/sec over optimizer steps and peak memory, logged with every Trainer log line."""

        def __init__(self, metrics_path: Path, write: bool = True, counters: dict | None = None):
            self.metrics_path = metrics_path
            self.write = write  # only rank 0 writes metrics.jsonl
            self.tokens = 0  # real tokens seen in this process's training micro-batches
            self.step_time = 0.0  # seconds inside optimizer steps, this process
            self.tokens_before = 0  # all ranks' tokens from the runs this one resumed
            self.time_before = 0.0
            if counters:
                self.tokens_before, self.time_before = counters["tokens"], counters["step_seconds"]
            self._t0 = None
            self._t0_tokens = 0
            self.steps: list[tuple[int, int, float]] = []  # (global step, real tokens, seconds) per optimizer step
            self._last_tokens = float(self.tokens_before)
            self._last_time = self.time_before
            self.history: list[dict] = []

        def on_step_begin(self, args, state, control, **kw):
            _cuda_sync()  # CUDA runs asynchronously: a step's time ends when its kernels have
            self._t0, self._t0_tokens = time.perf_counter(), self.tokens

        def on_step_end(self, args, state, control, **kw):
            if self._t0 is not None:
                _cuda_sync()
                dt = time.perf_counter() - self._t0
                self.step_time += dt
                self.steps.append((state.global_step, self.tokens - self._t0_tokens, dt))
                self._t0 = None

        def totals(self) -> tuple[float, float]:
            """(tokens over all ranks, step seconds of the slowest-equivalent rank), this run + resumed."""
            tokens, seconds = _all_reduce_sum([float(self.tokens), self.step_time])
            size = int(os.environ.get("WORLD_SIZE", 1))
            return self.tokens_before + tokens, self.time_before + seconds / size

        def on_log(self, args, state, control, logs=None, **kw):
            logs = dict(logs or {})
            tokens, seconds = self.totals()  # collective: every rank logs at the same steps
            dt = seconds - self._last_time
            if "loss" in logs and dt > 0:
                logs["tokens_per_second"] = (tokens - self._last_tokens) / dt
                self._last_tokens, self._last_time = tokens, seconds
            logs.update(peak_memory())
            logs["step"] = state.global_step
            logs["tokens_seen"] = int(tokens)
            self.history.append(logs)
            if self.write:
                with open(self.metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(logs) + "\n")

        def counters(self) -> dict:
            tokens, seconds = self.totals()
            return {"tokens": tokens, "step_seconds": seconds}

        def summary(self) -> dict:
            tokens, seconds = self.totals()
            return {"train_tokens": int(tokens), "train_step_seconds": seconds,
                    "tokens_per_second": tokens / seconds if seconds else None, **peak_memory(),
                    "per_step": [list(s) for s in self.steps]}  # [step, tokens, seconds], this process

    return Meter


def _early_stop_callback(patience: int, log):
    from transformers import TrainerCallback

    class EarlyStop(TrainerCallback):
        """Stop when held-out loss has not improved for `patience` evaluations in a row."""

        def __init__(self):
            self.best = float("inf")
            self.bad = 0
            self.stopped_at = None

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            loss = (metrics or {}).get("eval_loss")
            if loss is None:
                return
            if loss < self.best:
                self.best, self.bad = loss, 0
            else:
                self.bad += 1
                if self.bad >= patience and state.global_step < state.max_steps:
                    self.stopped_at = state.global_step
                    log(f"fastft: early stop at step {state.global_step}: held-out loss {loss:.4f} has not "
                        f"improved on {self.best:.4f} for {patience} evaluations")
                    control.should_training_stop = True

    return EarlyStop()


class NonFiniteError(TrainError):
    pass


def _best_adapter_callback(model, path: Path, write: bool, log):
    """Track the adapter with the lowest held-out loss among the evaluations during training.
    Rank 0 keeps a copy on disk (checkpoints/best-adapter.safetensors + .json, written atomically)
    so a resumed run still knows it; every rank keeps one in memory to restore at the end."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import TrainerCallback

    def trainable():
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    class BestAdapter(TrainerCallback):
        def __init__(self):
            self.loss, self.step, self.weights = float("inf"), None, None
            meta = path.with_suffix(".json")
            if meta.is_file() and path.is_file():
                info = json.loads(meta.read_text())
                self.loss, self.step, self.weights = info["eval_loss"], info["step"], load_file(str(path))

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            loss = (metrics or {}).get("eval_loss")
            if loss is None or not loss < self.loss:
                return
            self.loss, self.step = loss, state.global_step
            self.weights = {n: p.detach().to("cpu", copy=True).contiguous() for n, p in trainable().items()}
            if write and state.global_step > 0:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                save_file(self.weights, str(tmp))
                os.replace(tmp, path)
                files.atomic_write_text(path.with_suffix(".json"),
                                            json.dumps({"eval_loss": loss, "step": state.global_step}))

        def restore_if_better(self, final_loss: float) -> bool:
            """Load the best weights when an evaluation during training beat the final state."""
            if self.step is None or self.step == 0 or not self.loss < final_loss:
                return False
            with torch.no_grad():
                for n, p in trainable().items():
                    p.copy_(self.weights[n].to(p.device, p.dtype))
            log(f"fastft: restored the best adapter, from step {self.step} (held-out loss {self.loss:.4f} "
                f"< {final_loss:.4f} at the end)")
            return True

    return BestAdapter()


def _trainer_class():
    import torch
    from trl import SFTTrainer

    class FastftTrainer(SFTTrainer):
        """SFTTrainer that counts real tokens for the meter, skips optimizer steps whose gradients
        are not finite, and stages checkpoints so only complete ones appear under checkpoints/."""

        meter = None
        log_fn = print
        max_nonfinite = 10
        nonfinite_steps: list
        poison_steps: frozenset = frozenset()
        oom_step: int | None = None
        out_dir: Path | None = None
        keep_checkpoints = 2
        _staging: str | None = None

        def training_step(self, model, inputs, *args, **kwargs):
            if self.oom_step is not None and self.state.global_step + 1 == self.oom_step:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by FASTFT_FAULT_OOM_STEP)")
            if self.meter is not None:
                mask = inputs.get("attention_mask")
                self.meter.tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            return super().training_step(model, inputs, *args, **kwargs)

        def compute_loss(self, model, inputs, *args, **kwargs):
            out = super().compute_loss(model, inputs, *args, **kwargs)
            if self.model.training and self.state.global_step + 1 in self.poison_steps:
                if isinstance(out, tuple):
                    return (out[0] * float("nan"), *out[1:])
                return out * float("nan")
            return out

        def create_optimizer(self, *args, **kwargs):
            opt = super().create_optimizer(*args, **kwargs)
            if not getattr(opt, "_fastft_guarded", False):
                self._guard(opt)
            return opt

        def _guard(self, opt):
            """Wrap optimizer.step: a step with any non-finite gradient (a NaN/Inf loss makes them all
            NaN) is skipped; past the recipe's limit the run stops. Grads are already all-reduced
            under DDP, so every rank takes the same decision."""
            step = opt.step
            self.nonfinite_steps = []

            def guarded_step(*a, **k):
                grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
                if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
                    return step(*a, **k)
                n = self.state.global_step + 1
                self.nonfinite_steps.append(n)
                opt.zero_grad(set_to_none=True)
                if len(self.nonfinite_steps) > self.max_nonfinite:
                    raise NonFiniteError(
                        f"training stopped at step {n}: the loss or gradients were NaN/Inf on "
                        f"{len(self.nonfinite_steps)} steps ({self.nonfinite_steps[:10]}), more than "
                        f"train.max_nonfinite_steps={self.max_nonfinite}. Usual causes: a learning rate too high "
                        "(train.lr), fp16 overflow (use model.dtype: bfloat16 or float32), a broken quantization "
                        "config or checkpoint (model.load_in_4bit, the model files), or corrupt data rows. "
                        "Nothing non-finite was saved; earlier checkpoints are intact.")
                self.log_fn(f"fastft: step {n}: non-finite loss or gradient, optimizer step skipped "
                            f"({len(self.nonfinite_steps)} of at most {self.max_nonfinite})")
                return None

            opt.step = guarded_step
            opt._fastft_guarded = True

        # -- checkpoints: staged in checkpoints/.staging, renamed into place when complete --------
        def _get_output_dir(self, trial=None):
            return self._staging or super()._get_output_dir(trial=trial)

        def _save_checkpoint(self, model, trial):
            import torch.distributed as dist

            root = Path(self.args.output_dir)
            staging = root / ".staging"
            if self.args.should_save:
                staging.mkdir(parents=True, exist_ok=True)
            self._staging = str(staging)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging = None
            distributed = dist.is_available() and dist.is_initialized()
            if distributed:
                dist.barrier()  # every rank has written its RNG state into the staged folder
            counters = self.meter.counters() if self.meter is not None else {}
            if self.args.should_save:
                name = f"{checkpoints.PREFIX}{self.state.global_step}"
                final = checkpoints.finalize(staging / name, root, {"step": self.state.global_step,
                                                                     "meter": counters}, self.keep_checkpoints)
                if self.out_dir is not None:
                    self.log_fn(f"fastft: checkpoint {final.relative_to(self.out_dir)} written")
            if distributed:
                dist.barrier()

    return FastftTrainer


class _Signals:
    """SIGINT/SIGTERM: ask the trainer to checkpoint and stop at the end of the step; a second
    signal exits at once."""

    def __init__(self, log):
        self.log = log
        self.received: int | None = None
        self._old: dict = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, frame):
        if self.received is not None:
            os._exit(128 + signum)
        self.received = signum
        self.log(f"fastft: {signal.Signals(signum).name} received: writing a checkpoint at the end of this step "
                 "(send it again to exit at once)")

    def callback(self):
        from transformers import TrainerCallback

        signals = self

        class StopOnSignal(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if signals.received is not None:
                    control.should_save = True
                    control.should_training_stop = True

        return StopOnSignal()


def _optimizer(recipe: Recipe, device: str, log) -> str:
    optim = recipe.train.optim
    if device == "cpu" and optim.startswith("paged_"):
        plain = {"paged_adamw_8bit": "adamw_8bit", "paged_adamw_32bit": "adamw_torch"}[optim]
        log(f"warning: train.optim={optim}: paged optimizers need CUDA memory paging; using {plain} on CPU")
        return plain
    return optim


def _sft_config(recipe: Recipe, out_dir: Path, info, optim: str, has_eval: bool, world: World,
                batch: tuple[int, int]):
    import torch
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
        report_to="none",
        # the backend already set gradient checkpointing up (Unsloth's own, or PEFT's for k-bit models)
        gradient_checkpointing=False,
        bf16=cuda and info.dtype == "bfloat16",
        fp16=cuda and info.dtype == "float16",
        max_length=recipe.model.max_seq_length,
        packing=recipe.data.packing,
        dataset_num_proc=None,
        disable_tqdm=not world.main,
        use_cpu=not cuda,
    )
    del torch
    return SFTConfig(**kwargs)


def _per_device_batch(recipe: Recipe, world: World) -> tuple[int, int]:
    """(per-device batch, grad accum) keeping the recipe's global batch (batch_size x grad_accum)
    when N processes train data-parallel: the accumulation is split first, then the batch."""
    b, g, n = recipe.train.batch_size, recipe.train.grad_accum, world.size
    if n == 1:
        return b, g
    if g % n == 0:
        return b, g // n
    if b % n == 0:
        return b // n, g
    if (b * g) % n == 0:
        return b * g // n, 1
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
        diff = checkpoints.recipe_differences(state.run["recipe"], recipe.to_dict())
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
    previous, ckpt = _prepare_output(recipe, out_dir, resume, overwrite, world, say)
    batch = _per_device_batch(recipe, world)

    # 1. model
    model, tokenizer, info = backends.load(recipe, world_size=world.size, local_rank=world.local_rank)
    say(f"fastft: {info.summary()}")
    kernels = patch.apply(model, recipe.kernels)  # fastft's fused LoRA, Unsloth's, or stock PEFT
    say(f"fastft: {kernels.summary()}")
    if world.size > 1:
        say(f"fastft: data-parallel over {world.size} processes: per-device batch {batch[0]} x grad accum "
            f"{batch[1]} x {world.size} = global batch {recipe.train.batch_size * recipe.train.grad_accum}")

    # 2. data
    bundle = data.build(recipe, tokenizer, log=lambda m: say(f"fastft: {m}"))
    say(f"fastft: data {bundle.stats['train_examples']} train / {bundle.stats['eval_examples']} eval examples, "
        f"{bundle.stats['train_tokens']:,} train tokens ({bundle.data_hash[:19]})")

    # 3. trainer
    optim = _optimizer(recipe, info.device, say)
    metrics_path = out_dir / "metrics.jsonl"
    counters = None
    if ckpt is not None:
        marker = json.loads((ckpt / checkpoints.MARKER).read_text())
        counters = marker.get("meter")
        if world.main:
            checkpoints.truncate_metrics(metrics_path, marker["step"])
    elif world.main:
        metrics_path.write_text("")
    meter = _meter_callback_class()(metrics_path, write=world.main, counters=counters)
    config = _sft_config(recipe, out_dir, info, optim, bundle.eval is not None, world, batch)
    signals = _Signals(say)
    callbacks = [meter, signals.callback()]
    if recipe.train.early_stopping_patience and bundle.eval is not None:
        callbacks.append(_early_stop_callback(recipe.train.early_stopping_patience, say))
    best = None
    if recipe.train.eval_every and bundle.eval is not None:
        best = _best_adapter_callback(model, checkpoints.checkpoint_root(out_dir) / "best-adapter.safetensors",
                                      world.main, say)
        callbacks.append(best)
    trainer = _trainer_class()(model=model, args=config, train_dataset=bundle.train,
                               eval_dataset=bundle.eval, processing_class=tokenizer, callbacks=callbacks)
    trainer.meter, trainer.log_fn, trainer.out_dir = meter, say, out_dir
    trainer.max_nonfinite = recipe.train.max_nonfinite_steps
    trainer.keep_checkpoints = recipe.train.keep_checkpoints
    trainer.poison_steps = frozenset(int(x) for x in os.environ.get("FASTFT_FAULT_NAN_STEPS", "").split(",") if x)
    trainer.oom_step = int(os.environ["FASTFT_FAULT_OOM_STEP"]) if os.environ.get("FASTFT_FAULT_OOM_STEP") else None
    _adapters_follow_compute_dtype(model, info.dtype)

    # 4. score before (once per run: a resumed run reuses the first one's), train, score after
    n_gen = min(recipe.train.eval_generate, len(bundle.eval_pairs))
    if previous is not None and "before" in previous:
        before = previous["before"]
    else:
        before = _score(trainer, model, tokenizer, bundle, n_gen, recipe, world)
        _forget_eval_preparation(trainer, model)
    say(f"fastft: before training: {_fmt_scores(before)}")
    if world.main:
        checkpoints.write_run_state(out_dir, {"status": "running", "recipe": recipe.to_dict(),
                                              "recipe_source": recipe.source, "before": before,
                                              "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    try:
        with signals:
            trainer.train(resume_from_checkpoint=str(ckpt) if ckpt is not None else None)
    except torch.cuda.OutOfMemoryError as e:
        raise TrainError(_oom_message(recipe, e, out_dir)) from e
    if signals.received is not None:
        name = signal.Signals(signals.received).name
        where = checkpoints.complete_checkpoints(out_dir)
        msg = (f"stopped by {name} at step {trainer.state.global_step}; checkpoint "
               f"{where[-1] if where else '(none)'} is complete. Resume with: fastft train "
               f"{recipe.source or 'RECIPE'} --resume")
        say(f"fastft: {msg}")
        raise TrainInterrupted(msg, signals.received)
    after = _score(trainer, model, tokenizer, bundle, n_gen, recipe, world)
    best_step = trainer.state.global_step
    if best is not None and best.restore_if_better(after["eval_loss"]):
        best_step = best.step
        after = _score(trainer, model, tokenizer, bundle, n_gen, recipe, world)
    say(f"fastft: after training:  {_fmt_scores(after)}")
    for ex in after.get("examples", [])[:3]:
        say(f"fastft:   {ex['prompt']!r} -> {ex['answer']!r} (reference {ex['reference']!r})")

    # 5. save (rank 0); a non-finite adapter is never written
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise TrainError(f"the trained adapter has non-finite weights ({bad[0]} and {len(bad) - 1} more); "
                         "nothing was saved. Lower train.lr or check the data.")
    # base vs adapter (task by slice, regression set) and the recipe's gates; writes eval.json
    verdict = evaluate.after_training(model, tokenizer, recipe, bundle, out_dir, log=say) if world.main else {}
    summary = {
        "train": meter.summary(),
        "steps": trainer.state.global_step,
        "losses": [h["loss"] for h in meter.history if "loss" in h],
        "nonfinite_steps_skipped": getattr(trainer, "nonfinite_steps", []),
        "resumed_from": str(ckpt) if ckpt is not None else None,
        "adapter_step": best_step,  # the saved adapter's step: the best held-out loss when eval_every is set
        "world_size": world.size,
        "before": {k: v for k, v in before.items() if k != "examples"},
        "after": {k: v for k, v in after.items() if k != "examples"},
        "after_examples": after.get("examples", []),
        "wall_seconds": time.perf_counter() - t_start,
    }
    run_info = {
        "recipe": recipe.to_dict(),
        "recipe_source": recipe.source,
        "backend": info.to_dict(),
        "kernels": kernels.to_dict(),
        "versions": backends.versions(),
        "data": {"hash": bundle.data_hash, **bundle.stats},
        "metrics": summary,
        "command": " ".join(sys.argv),
        **verdict,  # "eval"; with eval.gates also "gates" and "status": accepted | rejected
        **provenance.provenance(recipe, info),  # base model fingerprint + fastft commit: compatibility checks
    }
    if world.main:
        try:
            adapter_dir = rundir.save_adapter(model, tokenizer, out_dir)
            rundir.write_run_info(out_dir, run_info)
        except OSError as e:
            raise TrainError(f"cannot write the results into {out_dir}: {e.strerror or e}"
                             + (" (the disk is full: free space and run the same command again; it resumes "
                                "from the last checkpoint)" if e.errno == 28 else "")
                             + ". Nothing incomplete was left in place of adapter/ or fastft.json.") from e
        say(_final_table(summary, adapter_dir))
    return Run(info=run_info, model=model, tokenizer=tokenizer, out_dir=out_dir)


def _forget_eval_preparation(trainer, model) -> None:
    """Trainer.evaluate() before train() prepares the model for evaluation and marks it prepared;
    train() then skips preparing it, so under torchrun the model is never wrapped in DDP and each
    rank silently trains on its own gradients (measured here: rank-local grad norms, diverging
    loss curves). Clear the mark so train() prepares (and DDP-wraps) the model as usual."""
    if getattr(model, "_is_accelerate_prepared", False):
        model._is_accelerate_prepared = False
        models = trainer.accelerator._models
        models[:] = [m for m in models if m is not model]


def _oom_message(recipe: Recipe, e: Exception, out_dir: Path) -> str:
    mem = peak_memory()
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


def _score(trainer, model, tokenizer, bundle, n_gen: int, recipe: Recipe, world: World) -> dict:
    out: dict = {}
    if bundle.eval is not None:
        out["eval_loss"] = trainer.evaluate()["eval_loss"]  # collective under DDP
    if n_gen and world.main:
        em = evaluate.exact_match(model, tokenizer, bundle.eval_pairs[:n_gen], recipe.train.max_new_tokens)
        out.update(em)
    return out


def _fmt_scores(s: dict) -> str:
    parts = []
    if "eval_loss" in s:
        parts.append(f"held-out loss {s['eval_loss']:.4f}")
    if s.get("n"):
        parts.append(f"exact match {100 * s['exact_match']:.1f}% of {s['n']}")
    return ", ".join(parts) or "no held-out data (data.eval_fraction 0 and no data.eval)"


def _final_table(summary: dict, adapter_dir: Path) -> str:
    b, a, t = summary["before"], summary["after"], summary["train"]
    rows = [("", "before", "after")]
    if "eval_loss" in a:
        rows.append(("held-out loss", f"{b['eval_loss']:.4f}", f"{a['eval_loss']:.4f}"))
    if a.get("n"):
        rows.append((f"exact match (n={a['n']})", f"{100 * b['exact_match']:.1f}%", f"{100 * a['exact_match']:.1f}%"))
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
