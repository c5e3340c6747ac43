"""A training run, start to finish: load -> data -> score before -> train -> score after -> save.

    from fastft import recipe, train
    result = train.run(recipe.load("recipes/tiny-demo.yaml"))
    result.info["metrics"]["after"]["exact_match"], result.model   # summary, trained PEFT model

The trainer is TRL's SFTTrainer. ``Meter`` counts real (non-padding) tokens per optimizer step
and the time spent in steps (evaluation excluded), and reads peak memory: CUDA max allocated and
reserved on a GPU, the process's peak resident set (RSS) on CPU.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import artifacts, backends, data, evaluate
from .recipe import Recipe


class TrainError(RuntimeError):
    """A run that cannot go on; the message says what to change."""


@dataclass
class Run:
    """What ``run`` returns: the summary written to fastft.json, and the trained model in memory."""

    info: dict
    model: Any
    tokenizer: Any
    out_dir: Path


def peak_memory() -> dict:
    """Peak memory so far, in GB: CUDA allocated/reserved, or the process's peak RSS on CPU."""
    import torch

    if torch.cuda.is_available():
        return {"peak_vram_allocated_gb": torch.cuda.max_memory_allocated() / 1e9,
                "peak_vram_reserved_gb": torch.cuda.max_memory_reserved() / 1e9}
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {"peak_rss_gb": rss_kb * 1024 / 1e9}


def _meter_callback_class():
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        """Tokens/sec over optimizer steps and peak memory, logged with every Trainer log line."""

        def __init__(self, metrics_path: Path):
            self.metrics_path = metrics_path
            self.tokens = 0  # real tokens seen in training micro-batches (counted by the trainer)
            self.step_time = 0.0
            self._t0 = None
            self._last_tokens = 0
            self._last_time = 0.0
            self.history: list[dict] = []

        def on_step_begin(self, args, state, control, **kw):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self._t0 is not None:
                self.step_time += time.perf_counter() - self._t0
                self._t0 = None

        def on_log(self, args, state, control, logs=None, **kw):
            logs = dict(logs or {})
            dt = self.step_time - self._last_time
            if "loss" in logs and dt > 0:
                logs["tokens_per_second"] = (self.tokens - self._last_tokens) / dt
                self._last_tokens, self._last_time = self.tokens, self.step_time
            logs.update(peak_memory())
            logs["step"] = state.global_step
            logs["tokens_seen"] = self.tokens
            self.history.append(logs)
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(logs) + "\n")

        def summary(self) -> dict:
            return {"train_tokens": self.tokens, "train_step_seconds": self.step_time,
                    "tokens_per_second": self.tokens / self.step_time if self.step_time else None,
                    **peak_memory()}

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


def _trainer_class():
    from trl import SFTTrainer

    class FastftTrainer(SFTTrainer):
        """SFTTrainer that counts the real tokens of each training micro-batch for the meter."""

        meter = None

        def training_step(self, model, inputs, *args, **kwargs):
            if self.meter is not None:
                mask = inputs.get("attention_mask")
                self.meter.tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            return super().training_step(model, inputs, *args, **kwargs)

    return FastftTrainer


def _optimizer(recipe: Recipe, device: str, log) -> str:
    optim = recipe.train.optim
    if device == "cpu" and optim.startswith("paged_"):
        plain = {"paged_adamw_8bit": "adamw_8bit", "paged_adamw_32bit": "adamw_torch"}[optim]
        log(f"warning: train.optim={optim}: paged optimizers need CUDA memory paging; using {plain} on CPU")
        return plain
    return optim


def _sft_config(recipe: Recipe, out_dir: Path, info, optim: str, has_eval: bool):
    import torch
    from trl import SFTConfig

    t = recipe.train
    cuda = info.device.startswith("cuda")
    kwargs = dict(
        output_dir=str(out_dir / "checkpoints"),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=max(t.batch_size, 8),
        gradient_accumulation_steps=t.grad_accum,
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
        save_strategy="no",
        report_to="none",
        # the backend already set gradient checkpointing up (Unsloth's own, or PEFT's for k-bit models)
        gradient_checkpointing=False,
        bf16=cuda and info.dtype == "bfloat16",
        fp16=cuda and info.dtype == "float16",
        max_length=recipe.model.max_seq_length,
        packing=recipe.data.packing,
        dataset_num_proc=None,
        disable_tqdm=False,
        use_cpu=not cuda,
    )
    del torch
    return SFTConfig(**kwargs)


def run(recipe: Recipe, log=print) -> Run:
    """Train the recipe; the summary is also written to output.dir/fastft.json."""
    t_start = time.perf_counter()
    if recipe.kernels == "fastft":
        raise TrainError("kernels: 'fastft' is not available in this build yet (the fused Triton LoRA kernels "
                         "are not installed); use kernels: auto, unsloth or none")
    out_dir = Path(recipe.output.dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise TrainError(f"output.dir {out_dir}: cannot write there ({e.strerror}); choose a writable directory") from e

    # 1. model
    model, tokenizer, info = backends.load(recipe)
    log(f"fastft: {info.summary()}")
    kernels_used = {"auto": f"{info.name}'s own", "unsloth": "unsloth's", "none": "stock PEFT"}[recipe.kernels]
    log(f"fastft: kernels: {recipe.kernels} -> {kernels_used} LoRA path (fastft's Triton kernels are not in this build)")

    # 2. data
    bundle = data.build(recipe, tokenizer, log=lambda m: log(f"fastft: {m}"))
    log(f"fastft: data {bundle.stats['train_examples']} train / {bundle.stats['eval_examples']} eval examples, "
        f"{bundle.stats['train_tokens']:,} train tokens ({bundle.data_hash[:19]})")

    # 3. trainer
    optim = _optimizer(recipe, info.device, log)
    metrics_path = out_dir / "metrics.jsonl"
    metrics_path.write_text("")
    meter = _meter_callback_class()(metrics_path)
    config = _sft_config(recipe, out_dir, info, optim, bundle.eval is not None)
    callbacks = [meter]
    if recipe.train.early_stopping_patience and bundle.eval is not None:
        callbacks.append(_early_stop_callback(recipe.train.early_stopping_patience, log))
    trainer = _trainer_class()(model=model, args=config, train_dataset=bundle.train,
                               eval_dataset=bundle.eval, processing_class=tokenizer, callbacks=callbacks)
    trainer.meter = meter
    _adapters_follow_compute_dtype(model, info.dtype)

    # 4. score before, train, score after
    n_gen = min(recipe.train.eval_generate, len(bundle.eval_pairs))
    before = _score(trainer, model, tokenizer, bundle, n_gen, recipe)
    log(f"fastft: before training: {_fmt_scores(before)}")
    trainer.train()
    after = _score(trainer, model, tokenizer, bundle, n_gen, recipe)
    log(f"fastft: after training:  {_fmt_scores(after)}")
    for ex in after.get("examples", [])[:3]:
        log(f"fastft:   {ex['prompt']!r} -> {ex['answer']!r} (reference {ex['reference']!r})")

    # 5. save
    adapter_dir = artifacts.save_adapter(model, tokenizer, out_dir)
    summary = {
        "train": meter.summary(),
        "steps": trainer.state.global_step,
        "losses": [h["loss"] for h in meter.history if "loss" in h],
        "before": {k: v for k, v in before.items() if k != "examples"},
        "after": {k: v for k, v in after.items() if k != "examples"},
        "after_examples": after.get("examples", []),
        "wall_seconds": time.perf_counter() - t_start,
    }
    run_info = {
        "recipe": recipe.to_dict(),
        "recipe_source": recipe.source,
        "backend": info.to_dict(),
        "versions": backends.versions(),
        "data": {"hash": bundle.data_hash, **bundle.stats},
        "metrics": summary,
        "command": " ".join(sys.argv),
    }
    artifacts.write_run_info(out_dir, run_info)
    log(_final_table(summary, adapter_dir))
    return Run(info=run_info, model=model, tokenizer=tokenizer, out_dir=out_dir)


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


def _score(trainer, model, tokenizer, bundle, n_gen: int, recipe: Recipe) -> dict:
    out: dict = {}
    if bundle.eval is not None:
        out["eval_loss"] = trainer.evaluate()["eval_loss"]
    if n_gen:
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
