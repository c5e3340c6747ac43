"""A run directory's files, by name, and reading/writing its record.

    out/adapter/          plain PEFT adapter (adapter_model.safetensors, adapter_config.json) + tokenizer
    out/fastft.json       resolved recipe, backend and why, versions, data hash, metrics summary
    out/metrics.jsonl     one JSON object per logged step
    out/eval.json         base vs adapter (fastft eval, and the end of fastft train)
    out/export.json       GGUF exports and their verification (fastft export)
    out/report.md         a summary for terminals and review
    out/checkpoints/      resumable checkpoints while a run is unfinished (fastft-run.json says which recipe)

Files are written to a temporary name and renamed into place, so an interrupted save never leaves
a file that looks complete.

    from peft import PeftModel
    model = PeftModel.from_pretrained(base_model, "out/adapter")   # no fastft needed
"""
from __future__ import annotations

import json
from pathlib import Path

from .files import atomic_write_text, building

SCHEMA_VERSION = 1

INFO = "fastft.json"
EVAL = "eval.json"
METRICS = "metrics.jsonl"
EXPORT = "export.json"
REPORT_MD = "report.md"
RUN_STATE = "fastft-run.json"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
STORED_FILES = (INFO, EVAL, METRICS, REPORT_MD, EXPORT)  # what the registry keeps with adapter/, when present


class RunDir:
    """The paths of one run directory (``output.dir``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    info = property(lambda self: self.root / INFO)
    eval = property(lambda self: self.root / EVAL)
    metrics = property(lambda self: self.root / METRICS)
    export = property(lambda self: self.root / EXPORT)
    report_md = property(lambda self: self.root / REPORT_MD)
    run_state = property(lambda self: self.root / RUN_STATE)
    adapter = property(lambda self: self.root / ADAPTER)
    checkpoints = property(lambda self: self.root / CHECKPOINTS)

    def is_run(self) -> bool:
        return self.info.is_file()


def save_adapter(model, tokenizer, out_dir: Path, state_dict: dict | None = None) -> Path:
    """Save the LoRA adapter (safetensors) and tokenizer into out_dir/adapter atomically.
    state_dict: the adapter weights to write instead of the model's own (FSDP: gathered on rank 0)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = RunDir(out_dir).adapter
    with building(final, prefix=".adapter.") as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True,
                              **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(str(tmp))
    return final


def write_run_info(out_dir: Path, info: dict) -> Path:
    path = RunDir(out_dir).info
    atomic_write_text(path, json.dumps({"schema_version": SCHEMA_VERSION, **info}, indent=2, default=str) + "\n")
    return path


def read_run_info(out_dir: str | Path) -> dict:
    path = RunDir(out_dir).info
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a fastft run directory (no fastft.json); give the output.dir of a run")
    return json.loads(path.read_text(encoding="utf-8"))
