"""What a run leaves behind, and reading it back.

    out/adapter/          plain PEFT adapter (adapter_model.safetensors, adapter_config.json) + tokenizer
    out/fastft.json       resolved recipe, backend and why, versions, data hash, metrics summary
    out/metrics.jsonl     one JSON object per logged step

Files are written to a temporary name and renamed into place, so an interrupted save never leaves
a file that looks complete.

    from peft import PeftModel
    model = PeftModel.from_pretrained(base_model, "out/adapter")   # no fastft needed
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

SCHEMA_VERSION = 1


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_adapter(model, tokenizer, out_dir: Path) -> Path:
    """Save the LoRA adapter (safetensors) and tokenizer into out_dir/adapter atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / "adapter"
    tmp = Path(tempfile.mkdtemp(prefix=".adapter.", dir=out_dir))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=".adapter-old.", dir=out_dir))
            os.replace(final, old / "adapter")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_run_info(out_dir: Path, info: dict) -> Path:
    path = out_dir / "fastft.json"
    atomic_write_text(path, json.dumps({"schema_version": SCHEMA_VERSION, **info}, indent=2, default=str) + "\n")
    return path


def read_run_info(out_dir: str | Path) -> dict:
    path = Path(out_dir) / "fastft.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a fastft run directory (no fastft.json); give the output.dir of a run")
    return json.loads(path.read_text(encoding="utf-8"))
