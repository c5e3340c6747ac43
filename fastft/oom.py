"""CUDA out-of-memory during training: the measured peak and the recipe changes that lower it.

    from fastft import oom
    raise TrainError(oom.message(recipe, e, out_dir, callbacks.peak_memory())) from e
"""
from __future__ import annotations

from pathlib import Path

from . import checkpoints
from .recipe import Recipe


def message(recipe: Recipe, e: Exception, out_dir: Path, mem: dict) -> str:
    """What ran out (the measured peak), what to change in the recipe, and whether the last
    checkpoint lets the same command resume."""
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
