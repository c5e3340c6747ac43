"""fastft's overhead: the same QLoRA work through the plain libraries and through fastft, alternated.

    python -m bench.overhead                                   # SmolLM2-135M-Instruct 4-bit, 14 steps, 3 repeats
    python -m bench.overhead --steps 2 --repeats 1             # a quick check that it works
    python -m bench.overhead --tiny --steps 2 --repeats 1      # fastft-tiny: the harness in seconds
    python -m bench.overhead --model smollm2-135m-instruct --steps 20 --warmup 3 --repeats 5

Pairs, each side the same work:
  plain-hf       transformers + bitsandbytes NF4 (double quant) + PEFT LoRA + TRL SFTTrainer, written
                 directly against the libraries    vs  fastft-hf       fastft.train.run, backend hf
  plain-unsloth  FastLanguageModel + TRL SFTTrainer  vs  fastft-unsloth  fastft.train.run, backend unsloth
                 (only when unsloth imports here)
The work: 4-bit base, LoRA r=16 alpha=16 on every linear layer, batch 4, max length 256, no
gradient checkpointing, adamw_torch, constant lr, seed 3407; every row is random words cut to
exactly 256 real tokens (bench.train.random_rows), so each step trains on batch x 256 tokens.

Runs alternate plain, fastft, plain, fastft, ... (``--repeats`` times each), each in a fresh process
(its own memory, threads and imports). Both sides time optimizer steps the same way: synchronize
the GPU, read the clock at a step's start and end; the first ``--warmup`` steps are left out.
Reported per side: tokens/s of every repeat, their median, min, max and spread, and the ratio of
medians fastft / plain. On a shared CPU the plain runs alone move by 10% between repeats: read the
spread before the ratio.

Output: one result JSON (bench.common; ``$FASTFT_BENCH_RESULTS`` or bench/results/), a table on
stdout, then the result as one compact JSON line, last.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common
from bench.train import random_rows

ROOT = common.ROOT
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --- the worker: one run in this process ----------------------------------------------------------

def _rows(spec: dict) -> list[dict]:
    return [json.loads(line) for line in Path(spec["data"]).read_text().splitlines() if line.strip()]


def _dtype(spec: dict):
    import torch

    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _sft_config(spec: dict, dtype):
    import torch
    from trl import SFTConfig

    cuda = torch.cuda.is_available()
    return SFTConfig(output_dir=str(Path(spec["work_dir"]) / "plain"), per_device_train_batch_size=spec["batch_size"],
                     gradient_accumulation_steps=1, learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0,
                     max_steps=spec["steps"], optim="adamw_torch", seed=spec["seed"], data_seed=spec["seed"],
                     logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
                     gradient_checkpointing=False, max_length=spec["max_length"], packing=False,
                     bf16=cuda and dtype == torch.bfloat16, fp16=cuda and dtype == torch.float16,
                     use_cpu=not cuda, dataset_num_proc=None)


def _plain_model(spec: dict, dtype):
    """The base in 4-bit with LoRA, as the libraries' own documentation does it."""
    if spec["backend"] == "unsloth":
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=spec["model_path"], max_seq_length=spec["max_length"], dtype=dtype, load_in_4bit=True,
            random_state=spec["seed"])
        model = FastLanguageModel.get_peft_model(
            model, r=spec["lora_r"], lora_alpha=spec["lora_r"], lora_dropout=0.0, target_modules=LORA_TARGETS,
            bias="none", use_gradient_checkpointing=False, random_state=spec["seed"],
            max_seq_length=spec["max_length"])
        return model, tokenizer
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=dtype, quantization_config=bnb,
                                                 device_map={"": device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    set_seed(spec["seed"])
    config = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_r"], lora_dropout=0.0, target_modules="all-linear",
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config), tokenizer


def run_plain(spec: dict) -> dict:
    if spec["backend"] == "unsloth":
        import unsloth  # noqa: F401  first: it patches transformers, PEFT and TRL as they are imported
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTTrainer

    dtype = _dtype(spec)
    model, tokenizer = _plain_model(spec, dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    steps: list[list] = []
    collated: collections.deque[int] = collections.deque()  # real tokens of each batch, in order

    class StepClock(TrainerCallback):
        """Times optimizer steps as fastft's Meter does: synchronize, clock, step, synchronize, clock.
        A step trains on the next batch the collator made (one batch per step: no accumulation)."""

        def on_step_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            steps.append([state.global_step, collated.popleft(), time.perf_counter() - self.t0])

    trainer = SFTTrainer(model=model, args=_sft_config(spec, dtype), train_dataset=Dataset.from_list(_rows(spec)),
                         processing_class=tokenizer, callbacks=[StepClock()])
    collate = trainer.data_collator

    def counting_collator(examples):  # on the host, before the batch moves: costs no sync
        batch = collate(examples)
        mask = batch.get("attention_mask")
        collated.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting_collator
    if dtype != torch.bfloat16:
        # SFTTrainer casts QLoRA adapters to bf16; fastft.train keeps them in the compute dtype unless it
        # is bf16 (fastft.trainer.adapters_follow_compute_dtype), so the plain side does the same: without
        # it the two sides train different numerics at different speeds
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"per_step": steps, "losses": losses}


def run_fastft(spec: dict) -> dict:
    from fastft import recipe, train

    work = Path(spec["work_dir"])
    r = recipe.from_dict({
        "model": {"name": spec["model"], "max_seq_length": spec["max_length"], "load_in_4bit": True},
        "backend": spec["backend"], "kernels": spec["kernels"],
        "lora": {"r": spec["lora_r"], "alpha": spec["lora_r"], "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": spec["data"], "format": "text", "eval_fraction": 0.0, "packing": False,
                 "train_on_responses_only": False},
        "train": {"batch_size": spec["batch_size"], "grad_accum": 1, "lr": 2e-4, "scheduler": "constant",
                  "warmup_ratio": 0.0, "max_steps": spec["steps"], "optim": "adamw_torch",
                  "gradient_checkpointing": False, "seed": spec["seed"], "logging_every": 1},
        "eval": {"after_training": False},
        "output": {"dir": str(work / "fastft")},
    })
    result = train.run(r, log=lambda m: print(m, flush=True))
    m = result.info["metrics"]
    return {"per_step": m["train"]["per_step"], "losses": m["losses"], "kernels": result.info["kernels"]}


def worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    out = run_plain(spec) if spec["side"] == "plain" else run_fastft(spec)
    from fastft.callbacks import peak_memory  # after the run: unsloth is imported first when it runs

    measured = out["per_step"][spec["warmup"]:]
    tokens, seconds = sum(s[1] for s in measured), sum(s[2] for s in measured)
    out.update(tokens_per_second=tokens / seconds if seconds else None, measured_steps=len(measured),
               measured_tokens=tokens, measured_seconds=seconds, process_seconds=time.perf_counter() - t0,
               **peak_memory())
    Path(spec["result_path"]).write_text(json.dumps(out))
    return 0


# --- the parent: alternate runs in fresh processes, summarize -------------------------------------

def _spread(values: list[float]) -> dict:
    med = statistics.median(values)
    return {"tokens_per_second": values, "median": med, "min": min(values), "max": max(values),
            "spread_pct": 100.0 * (max(values) - min(values)) / med if med else None}


def summarize(runs: list[dict], backends: list[str]) -> dict:
    """Per backend: each side's tokens/s (median, min, max, spread) and fastft/plain."""
    pairs = {}
    for b in backends:
        side = {s: [r["tokens_per_second"] for r in runs if r["backend"] == b and r["side"] == s
                    and r["status"] == "ok"] for s in ("plain", "fastft")}
        if not (side["plain"] and side["fastft"]):
            pairs[b] = {"status": "incomplete", "ok_runs": {s: len(v) for s, v in side.items()}}
            continue
        plain, fast = _spread(side["plain"]), _spread(side["fastft"])
        per_repeat = [f / p for p, f in zip(side["plain"], side["fastft"])]
        pairs[b] = {"status": "ok", "plain": plain, "fastft": fast, "ratio": fast["median"] / plain["median"],
                    "ratio_per_repeat": per_repeat, "ratio_min": min(per_repeat), "ratio_max": max(per_repeat)}
    return pairs


def _run(args, spec: dict, log_dir: Path) -> dict:
    name = f"{spec['side']}-{spec['backend']}-{spec['repeat']}"
    spec_path = Path(spec["work_dir"]) / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    log_path = log_dir / f"{name}.log"
    print(f"bench.overhead: {name} ... (log {log_path})", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run([sys.executable, "-m", "bench.overhead", "--worker", str(spec_path)], cwd=ROOT,
                                env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    res = Path(spec["result_path"])
    run = {"side": spec["side"], "backend": spec["backend"], "repeat": spec["repeat"], "log": str(log_path),
           "seconds": time.perf_counter() - t0}
    if res.is_file():
        run.update(status="ok", **json.loads(res.read_text()))
        if not run["tokens_per_second"]:
            run.update(status="error", message="no tokens were measured")
    else:
        tail = log_path.read_text(errors="replace")[-1500:]
        run.update(status="timeout" if rc is None else "error",
                   message=(f"no result after {args.timeout} s" if rc is None else f"worker exited with code {rc}")
                   + f"; log tail:\n{tail}")
    tps = run.get("tokens_per_second")
    print(f"bench.overhead: {name}: {run['status']}" + (f", {tps:,.0f} tokens/s" if tps else ""),
          file=sys.stderr, flush=True)
    return run


def table(doc: dict) -> str:
    c = doc["config"]
    lines = [f"**{c['model']}** 4-bit, LoRA r={c['lora_r']} all-linear, batch {c['batch_size']} x {c['max_length']} "
             f"tokens, {c['steps']} steps ({c['warmup']} warm-up), {c['repeats']} repeats alternated, on "
             f"{doc['device'].get('name')}", "",
             "| backend | plain tokens/s (median, min-max) | fastft tokens/s (median, min-max) | fastft / plain |",
             "| --- | --- | --- | --- |"]
    for b, p in doc["metrics"]["pairs"].items():
        if p["status"] != "ok":
            lines.append(f"| {b} | {p['status']} | | |")
            continue
        cell = lambda s: f"{s['median']:,.0f} ({s['min']:,.0f}-{s['max']:,.0f})"  # noqa: E731
        lines.append(f"| {b} | {cell(p['plain'])} | {cell(p['fastft'])} | {p['ratio']:.2f}x "
                     f"({p['ratio_min']:.2f}-{p['ratio_max']:.2f}) |")
    return "\n".join(lines + ["", f"`{doc['command']}`"]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="an embedded fastft model name or a local checkpoint (default smollm2-135m-instruct)")
    p.add_argument("--tiny", action="store_true", help="fastft-tiny instead of --model: checks the harness quickly")
    p.add_argument("--steps", type=int, default=14, help="optimizer steps per run, warm-up included (default 14)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing (default 2; "
                   "at most steps - 1)")
    p.add_argument("--repeats", type=int, default=3, help="runs per side, alternated (default 3)")
    p.add_argument("--backend", nargs="+", choices=["hf", "unsloth"],
                   help="pairs to run (default: hf, and unsloth when it imports)")
    p.add_argument("--kernels", default="auto", choices=["auto", "fastft", "unsloth", "none"],
                   help="fastft's kernels setting for its runs (default auto)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--out", help="results folder (default $FASTFT_BENCH_RESULTS or bench/results)")
    p.add_argument("--no-write", action="store_true", help="print the result, write no file")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run before it is stopped")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.steps < 1 or args.repeats < 1:
        p.error("--steps and --repeats must be >= 1")
    warmup = max(0, min(args.warmup, args.steps - 1))
    model = "fastft-tiny" if args.tiny else args.model
    backends = args.backend or (["hf", "unsloth"] if importlib.util.find_spec("unsloth") else ["hf"])

    from fastft import hardware
    from fastft.models import named

    model_path = named.resolve(model)  # the plain runs load the same checkpoint files
    work = Path(tempfile.mkdtemp(prefix="fastft-overhead-"))
    data = work / "rows.jsonl"
    rows = random_rows(args.steps * args.batch_size, args.max_length + 8, 3407)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {"model": model, "model_path": str(model_path), "data": str(data), "steps": args.steps,
            "warmup": warmup, "batch_size": args.batch_size, "max_length": args.max_length,
            "lora_r": args.lora_r, "seed": 3407, "kernels": args.kernels}
    load = os.getloadavg()
    runs = []
    for b in backends:
        for i in range(args.repeats):
            for side in ("plain", "fastft"):
                run_dir = work / f"{side}-{b}-{i}"
                run_dir.mkdir()
                spec = {**base, "side": side, "backend": b, "repeat": i, "work_dir": str(run_dir),
                        "result_path": str(run_dir / "result.json")}
                runs.append(_run(args, spec, work))
    notes = [f"load average at start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) on "
             f"{os.cpu_count()} cores"]
    if args.tiny:
        notes.append("fastft-tiny: a harness check; its steps are too short for the ratio to mean much")
    config = {**{k: v for k, v in base.items() if k not in ("data", "model_path")}, "repeats": args.repeats,
              "backends": backends, "optim": "adamw_torch", "gradient_checkpointing": False,
              "rows": "random words, each cut to max_length real tokens"}
    doc = common.result(kind="overhead", name=model, target=hardware.detect_target(), config=config,
                        metrics={"pairs": summarize(runs, backends), "runs": runs}, notes=notes,
                        command=["python", "-m", "bench.overhead", *(argv if argv is not None else sys.argv[1:])])
    print(table(doc))
    if not args.no_write:
        print(f"bench.overhead: wrote {common.write(doc, args.out)}")
    print(common.dumps_line(doc))
    bad = [r for r in runs if r["status"] != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
