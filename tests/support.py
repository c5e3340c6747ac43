"""Test helpers shared by the test modules (imported as `support`: tests/ is on pytest's pythonpath)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_recipe_dict(out_dir, **sections) -> dict:
    """The demo recipe shrunk for tests; keyword arguments replace or extend its sections."""
    base = {
        "model": {"name": "fastft-tiny", "max_seq_length": 64},
        "lora": {"r": 8, "alpha": 16},
        "data": {"train": "asset:data/word-categories.jsonl", "eval_fraction": 0.1, "max_examples": 400},
        "train": {"batch_size": 8, "grad_accum": 1, "lr": 3e-3, "max_steps": 40, "optim": "adamw_torch",
                  "gradient_checkpointing": False, "logging_every": 5, "warmup_ratio": 0.0},
        "output": {"dir": str(out_dir)},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return base


def assert_close(actual, expected, atol, rtol, what="tensor"):
    """torch.testing.assert_close that also prints where and by how much the tensors differ."""
    import torch

    diff = (actual.float() - expected.float()).abs()
    if diff.numel():
        idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        print(f"{what}: max abs diff {diff.max().item():.3e} at {idx}, mean {diff.mean().item():.3e}")
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
