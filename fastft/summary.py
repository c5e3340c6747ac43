"""What a run prints about itself: the held-out scores before and after, and the closing table.

    from fastft import summary
    summary.fmt_scores({"eval_loss": 1.2345})       # 'held-out loss 1.2345'
    print(summary.final_table(run_summary, eval_result, Path("outputs/run/adapter")))
"""
from __future__ import annotations

from pathlib import Path

from .fmt import pct


def score(trainer, bundle) -> dict:
    """The held-out loss (a collective under DDP: every rank calls it)."""
    return {"eval_loss": trainer.evaluate()["eval_loss"]} if bundle.eval is not None and trainer.eval_dataset is not None else {}


def fmt_scores(s: dict, bundle=None, method: str = "sft") -> str:
    """The held-out score in words, or why there is none."""
    if "eval_loss" in s:
        return f"held-out loss {s['eval_loss']:.4f}"
    if method != "sft" and bundle is not None and bundle.eval_pairs:  # held-out prompts, but no pair loss
        why = "grpo has no loss on fixed answers" if method == "grpo" else "the held-out rows are not preference pairs"
        return (f"no held-out {method} loss ({why}); its {len(bundle.eval_pairs)} held-out prompts are "
                "evaluated after training")
    return "no held-out data (data.eval_fraction 0 and no data.eval)"


def final_table(summary: dict, ev: dict | None, adapter_dir: Path) -> str:
    """Held-out loss before/after training and, from the evaluation, the task metric of the base
    (the adapter disabled: the model before training) and of the adapter."""
    b, a, t = summary["before"], summary["after"], summary["train"]
    rows = [("", "before", "after")]
    if "eval_loss" in a:
        rows.append(("held-out loss", f"{b['eval_loss']:.4f}", f"{a['eval_loss']:.4f}"))
    task = (ev or {}).get("task")
    if task and task.get("n"):
        metric = ev["metric"]
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
