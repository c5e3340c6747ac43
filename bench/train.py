"""End-to-end training benchmark: tokens/sec, peak memory, step times, MFU and losses per run.

    python -m bench.train recipes/bench-tiny-cpu.yaml --target cpu --steps 6 --warmup 2
    python -m bench.train recipes/bench-llama3-8b.yaml --target h100 \\
        --run hf --run unsloth:unsloth --run unsloth:fastft --steps 4 --warmup 1
    python -m bench.train recipes/bench-llama3-8b.yaml --target rtx4090 --backend unsloth --kernels unsloth fastft
    python -m bench.train recipes/bench-llama3-8b.yaml --target h100 --run hf --dry-run   # checks only

Each (target, backend, kernels) runs in a fresh process, one after another, through the same
``fastft.train.run`` a user runs (its Meter times every optimizer step, synchronized on CUDA, and
counts real tokens from the attention mask). The recipe's ``train.max_steps`` becomes
``warmup + steps``; the first ``warmup`` steps are excluded from every timing. Evaluation and
checkpoints are off. With ``--data random`` (the default) the data are rows of random words of the
tiny tokenizer's vocabulary, each truncated to exactly ``model.max_seq_length`` real tokens, so a
run measures the training step and not a data set; ``--data recipe`` keeps the recipe's data.

Targets: a GPU target caps the process's CUDA memory with ``set_per_process_memory_fraction`` to
the target's size (fastft.hardware.TARGETS) on a larger card; a cap emulates memory, not speed,
and every result names the GPU that ran it. An out-of-memory run is reported as "does not fit",
with the peak it reached. ``--target cpu`` runs on the CPU (CUDA hidden), for CI.

MFU (model FLOPs utilization) counts, per real token, the work QLoRA/LoRA must do, and no more:
    4 * N_linear        frozen linear layers incl. lm_head: 2N forward + 2N backward for the input
                        gradient (no weight gradient is computed for frozen weights)
  + 6 * N_lora          trainable adapters: forward, input gradient and weight gradient
  + 6 * L * s * H*hd    attention scores and values with causal masking (half of s x s on average):
                        2*s*H*hd forward per layer, twice that backward; s = real tokens per row
Gradient-checkpointing recompute, embeddings, norms, softmax and the optimizer are not counted (it
is MFU, not hardware utilization). The peak is the *running* GPU's dense bf16 tensor throughput.

Output: one result JSON per target (bench.common; ``$FASTFT_BENCH_RESULTS`` or bench/results/),
plus a Markdown table (.md) and a chart (.png, when matplotlib is installed) beside it; the table
on stdout, then the result as one compact JSON line, last.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import common

ROOT = common.ROOT
BACKENDS = ("hf", "unsloth")
KERNELS = ("auto", "fastft", "unsloth", "none")
WEIGHTS_SYNTHETIC = "synthetic weights"

# Dense bf16 tensor-core peak (TFLOP/s, fp32 accumulate) by the GPU's reported name, for MFU.
# Datasheet values; more specific names first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("RTX 4090", 165.2),
    ("L40S", 362.0),
)


def peak_bf16_flops(device_name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None


def flops_per_token(config, n_lora: int, tokens_per_row: float) -> dict:
    """The MFU numerator (see the module docstring), from the model config alone."""
    d, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    H = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or H
    hd = getattr(config, "head_dim", None) or d // H
    ff = config.intermediate_size
    per_layer = d * H * hd + 2 * d * kv * hd + H * hd * d + 3 * d * ff  # q, k, v, o, gate, up, down
    n_linear = L * per_layer + d * V  # + lm_head
    attention = 6 * L * tokens_per_row * H * hd
    return {"n_linear": n_linear, "n_lora": n_lora, "tokens_per_row": tokens_per_row,
            "flops_per_token": 4 * n_linear + 6 * n_lora + attention,
            "formula": "4*N_linear + 6*N_lora + 6*L*s*H*head_dim (causal)"}


# --- runs ------------------------------------------------------------------------------------------

def parse_runs(args, recipe) -> list[tuple[str, str]]:
    """(backend, kernels) pairs: every --run, then the product of --backend x --kernels; without
    either, the recipe's own backend and kernels."""
    runs: list[tuple[str, str]] = []
    for spec in args.run or []:
        backend, _, kernels = spec.partition(":")
        runs.append((backend, kernels or "auto"))
    if args.backend or args.kernels:
        for b in args.backend or [recipe.backend]:
            for k in args.kernels or [recipe.kernels]:
                runs.append((b, k))
    if not runs:
        runs.append((recipe.backend, recipe.kernels))
    bad = [f"{b}:{k}" for b, k in runs if b not in BACKENDS + ("auto",) or k not in KERNELS]
    if bad:
        raise SystemExit(f"bench.train: error: unknown run {', '.join(bad)}: backend one of "
                         f"{', '.join(BACKENDS)}, kernels one of {', '.join(KERNELS)} (e.g. --run unsloth:fastft)")
    out = []
    for r in runs:
        if r not in out:
            out.append(r)
    return out


def run_label(run: dict) -> str:
    return f"{run['backend']}" + ("" if run["kernels"] == "auto" else f" + {run['kernels']} kernels")


def random_rows(n_rows: int, words_per_row: int, seed: int) -> list[dict]:
    """Rows of random words from the tiny tokenizer's vocabulary (one token each there)."""
    vocab = json.loads((ROOT / "fastft" / "assets" / "tiny-llama" / "tokenizer.json").read_text())["model"]["vocab"]
    words = sorted(w for w in vocab if w.isalpha() and w.isascii())
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choices(words, k=words_per_row))} for _ in range(n_rows)]


# --- the worker: one run in this process -----------------------------------------------------------

def worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import torch

    from fastft import hardware, recipe as recipe_mod

    target = hardware.get(spec["target"])
    notes: list[str] = []
    out = {"backend": spec["backend"], "kernels": spec["kernels"], "target": spec["target"], "notes": notes}
    if target.memory_bytes is not None:
        total = torch.cuda.get_device_properties(0).total_memory
        fraction = target.memory_bytes / total
        if fraction < 1.0:
            torch.cuda.set_per_process_memory_fraction(fraction, 0)
            notes.append(f"memory capped to {target.memory_bytes / 2**30:.0f} GiB ({fraction:.3f} of "
                         f"{total / 2**30:.1f} GiB) to emulate {target.name}; speed is the real GPU's")
        else:
            notes.append(f"the GPU has {total / 2**30:.1f} GiB, not more than {target.name}'s "
                         f"{target.memory_bytes / 2**30:.0f} GiB: no cap")
        out["memory_cap_bytes"] = min(target.memory_bytes, total)
    out["device"] = common.device()

    r = recipe_mod.load(spec["recipe"], spec["overrides"])
    r.backend, r.kernels = spec["backend"], spec["kernels"]
    t = r.train
    t.max_steps = spec["warmup"] + spec["steps"]
    t.logging_every, t.eval_every, t.early_stopping_patience = 1, None, None
    if hasattr(t, "save_every"):
        t.save_every = None
    if hasattr(r, "eval") and hasattr(r.eval, "after_training"):  # no base-vs-adapter evaluation
        r.eval.after_training = False
    r.data.eval, r.data.eval_fraction = None, 0.0
    work = Path(spec["work_dir"])
    r.output.dir = str(work / "run")
    if spec["data"] == "random":
        rows = t.max_steps * t.batch_size * t.grad_accum
        path = work / "random-rows.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for row in random_rows(rows, r.model.max_seq_length + 8, t.seed):
                f.write(json.dumps(row) + "\n")
        r.data.train, r.data.format, r.data.packing, r.data.max_examples = str(path), "text", False, None
    out["model"] = r.model.name
    from fastft import models

    out["weights"] = WEIGHTS_SYNTHETIC if models.is_synthetic(r.model.name) else "as loaded"

    from fastft import train

    try:
        result = train.run(r, log=lambda m: print(m, flush=True))
    except BaseException as e:  # noqa: BLE001  (every failure becomes a reported status)
        oom = isinstance(e, torch.OutOfMemoryError) or isinstance(e.__cause__, torch.OutOfMemoryError) \
            or "out of memory" in str(e).lower()
        out["status"] = "does not fit" if oom else "error"
        out["message"] = f"{type(e).__name__}: {str(e).splitlines()[0][:500] if str(e) else ''}"
        from fastft.callbacks import peak_memory

        out["metrics"] = peak_memory()
        if not oom:
            out["traceback"] = traceback.format_exc()[-3000:]
        _write_json(spec["result_path"], out)
        print(f"bench.train: {out['status']}: {out['message']}", file=sys.stderr)
        return 0
    out.update(status="ok", **_metrics(result, spec, r))
    _write_json(spec["result_path"], out)
    return 0


def _metrics(result, spec: dict, r) -> dict:
    info = result.info
    train_m = info["metrics"]["train"]
    per_step = train_m.get("per_step")
    if not per_step:
        raise RuntimeError("fastft.train's Meter reported no per-step timings (per_step); bench.train needs them")
    warmup = spec["warmup"]
    measured = per_step[warmup:]
    if not measured:
        raise RuntimeError(f"no measured steps: the run made {len(per_step)} steps, warm-up is {warmup}")
    tokens = sum(s[1] for s in measured)
    seconds = sum(s[2] for s in measured)
    step_s = [s[2] for s in measured]
    median = statistics.median(step_s)
    tps = tokens / seconds
    n_lora = info["backend"]["trainable_params"]
    rows_per_step = r.train.batch_size * r.train.grad_accum
    fpt = flops_per_token(result.model.config, n_lora, tokens / len(measured) / rows_per_step)
    from bench.common import device

    dev = device()
    peak = peak_bf16_flops(dev["name"]) if dev["type"] == "cuda" and info["backend"]["dtype"] == "bfloat16" else None
    m = {
        "tokens_per_second": tps,
        "measured_steps": len(measured),
        "warmup_steps": warmup,
        "measured_tokens": tokens,
        "tokens_per_step": tokens / len(measured),
        "step_seconds_median": median,
        "step_seconds_min": min(step_s),
        "step_seconds_max": max(step_s),
        "step_seconds_stdev": statistics.stdev(step_s) if len(step_s) > 1 else 0.0,
        "step_seconds_spread_pct": 100.0 * (max(step_s) - min(step_s)) / median if median else None,
        "per_step": per_step,
        "losses": info["metrics"].get("losses", []),
        "flops": fpt,
        "mfu": tps * fpt["flops_per_token"] / peak if peak else None,
        "mfu_peak_tflops": peak / 1e12 if peak else None,
        "wall_seconds": info["metrics"].get("wall_seconds"),
    }
    for k in ("peak_vram_allocated_gb", "peak_vram_reserved_gb", "peak_rss_gb"):
        if k in train_m:
            m[k] = train_m[k]
    return {"metrics": m, "backend_info": info["backend"], "data": info.get("data", {})}


def _write_json(path, obj) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


# --- the parent: plan, run each in a fresh process, write results ---------------------------------

def run_one(args, target: str, backend: str, kernels: str, recipe_path: str, log_dir: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="fastft-bench-") as work:
        spec = {"recipe": recipe_path, "overrides": args.overrides, "target": target, "backend": backend,
                "kernels": kernels, "steps": args.steps, "warmup": args.warmup, "data": args.data,
                "work_dir": work, "result_path": str(Path(work) / "result.json")}
        Path(work, "spec.json").write_text(json.dumps(spec))
        env = dict(os.environ)
        if _HIDDEN:  # give the worker the GPUs this process hid from itself
            env.pop("CUDA_VISIBLE_DEVICES", None)
            if _PARENT_CUDA_VISIBLE is not None:
                env["CUDA_VISIBLE_DEVICES"] = _PARENT_CUDA_VISIBLE
        if target == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
        log_path = log_dir / f"{target}-{backend}-{kernels}.log"
        cmd = [sys.executable, "-m", "bench.train", "--worker", str(Path(work, "spec.json"))]
        t0 = time.perf_counter()
        print(f"bench.train: {target} {backend}:{kernels} ... (log {log_path})", file=sys.stderr, flush=True)
        with open(log_path, "w") as log:
            try:
                proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=args.timeout)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = None
        res_path = Path(spec["result_path"])
        if res_path.is_file():
            out = json.loads(res_path.read_text())
        else:
            tail = log_path.read_text(errors="replace")[-1500:]
            out = {"backend": backend, "kernels": kernels, "target": target, "notes": [],
                   "status": "timeout" if rc is None else "error",
                   "message": (f"no result after {args.timeout} s" if rc is None
                               else f"worker exited with code {rc}") + f"; log tail:\n{tail}"}
        out["seconds"] = time.perf_counter() - t0
        out["log"] = str(log_path)
        return out


def doc_for_target(args, target: str, runs: list[dict], recipe) -> dict:
    from fastft import models

    synthetic = models.is_synthetic(recipe.model.name)
    t = recipe.train
    config = {
        "recipe": os.path.relpath(Path(args.recipe).resolve(), ROOT) if Path(args.recipe).resolve().is_relative_to(ROOT)
        else str(args.recipe),
        "overrides": args.overrides, "model": recipe.model.name,
        "weights": WEIGHTS_SYNTHETIC if synthetic else "as loaded",
        "max_seq_length": recipe.model.max_seq_length, "load_in_4bit": recipe.model.load_in_4bit,
        "lora_r": recipe.lora.r, "lora_alpha": recipe.lora.alpha, "target_modules": recipe.lora.target_modules,
        "batch_size": t.batch_size, "grad_accum": t.grad_accum, "optim": t.optim,
        "gradient_checkpointing": t.gradient_checkpointing, "steps": args.steps, "warmup": args.warmup,
        "data": args.data,
    }
    notes = ["synthetic weights: random from a seed, NF4 at load; speed and memory as with real weights"] \
        if synthetic else []
    if target != "cpu":
        notes.append("a target caps memory, not speed: device names the GPU that ran it")
    else:
        notes.append("target cpu: exercises the harness; these figures are a CPU's, not GPU claims")
        load = os.getloadavg()
        notes.append(f"CPU load average at start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) on "
                     f"{os.cpu_count()} cores: other processes share the CPU when it exceeds the core count")
    return common.result(kind="train", name=Path(args.recipe).stem, target=target, config=config,
                         metrics={"runs": runs}, notes=notes)


def fmt(v, spec=",.0f", none="-") -> str:
    return none if v is None else format(v, spec)


def markdown_table(doc: dict) -> str:
    dev = doc["device"]
    runs = doc["metrics"]["runs"]
    first = next((r for r in runs if r.get("status") == "ok"), None)
    base = first["metrics"]["tokens_per_second"] if first else None
    mem_key = "peak_vram_reserved_gb" if dev.get("type") == "cuda" else "peak_rss_gb"
    lines = [f"**{doc['name']}** on **{doc['target']}** (ran on {dev.get('name')}; {doc['config']['model']}, "
             f"{doc['config']['weights']}; seq {doc['config']['max_seq_length']}, batch {doc['config']['batch_size']}"
             f" x accum {doc['config']['grad_accum']}, LoRA r={doc['config']['lora_r']})", "",
             "| run | status | tokens/s | vs first | peak alloc GB | peak reserved GB | step s (median, spread) | MFU | last loss |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        m = r.get("metrics") or {}
        if r.get("status") == "ok":
            tps = m["tokens_per_second"]
            alloc = m.get("peak_vram_allocated_gb")
            reserved = m.get(mem_key)
            losses = m.get("losses") or [None]
            lines.append(
                f"| {run_label(r)} | ok | {tps:,.0f} | {tps / base:.2f}x | {fmt(alloc, '.2f')} | "
                f"{fmt(reserved, '.2f')}{'' if dev.get('type') == 'cuda' else ' (RSS)'} | "
                f"{m['step_seconds_median']:.3f} (±{m['step_seconds_spread_pct'] / 2:.0f}%) | "
                f"{fmt(m.get('mfu') and 100 * m['mfu'], '.1f')}{'%' if m.get('mfu') else ''} | "
                f"{fmt(losses[-1], '.3f')} |")
        else:
            peak = m.get("peak_vram_reserved_gb", m.get("peak_rss_gb"))
            lines.append(f"| {run_label(r)} | {r.get('status')} | - | - | - | {fmt(peak, '.2f')} | - | - | - |")
    lines += ["", f"`{doc['command']}`"]
    return "\n".join(lines) + "\n"


def chart(doc: dict, path: Path) -> Path | None:
    """Bar chart of tokens/s and peak memory per run; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = doc["metrics"]["runs"]
    cuda = doc["device"].get("type") == "cuda"
    labels = [run_label(r) for r in runs]
    tps = [(r.get("metrics") or {}).get("tokens_per_second") or 0 for r in runs]
    mem_key = "peak_vram_reserved_gb" if cuda else "peak_rss_gb"
    mem = [(r.get("metrics") or {}).get(mem_key) or 0 for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 1.2 + 0.6 * len(runs)))
    for ax, vals, title in ((axes[0], tps, "tokens / s (higher is better)"),
                            (axes[1], mem, ("peak VRAM reserved, GB" if cuda else "peak RSS, GB") + " (lower is better)")):
        bars = ax.barh(labels, vals, color=["#4c72b0" if r.get("status") == "ok" else "#c44e52" for r in runs])
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        for b, v, r in zip(bars, vals, runs):
            text = f"{v:,.0f}" if vals is tps else f"{v:.2f}"
            ax.text(b.get_width(), b.get_y() + b.get_height() / 2,
                    f" {text}" if r.get("status") == "ok" else f" {r.get('status')}", va="center", fontsize=8)
    cap = doc.get("target")
    fig.suptitle(f"{doc['config']['model']} ({doc['config']['weights']}), target {cap}, ran on {doc['device'].get('name')}",
                 fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_outputs(doc: dict, out_dir: Path | None, no_chart: bool) -> dict:
    path = common.write(doc, out_dir)
    md = path.with_suffix(".md")
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(markdown_table(doc))
    os.replace(tmp, md)
    png = None if no_chart else chart(doc, path.with_suffix(".png"))
    return {"json": path, "md": md, "png": png}


def dry_run(args, recipe, runs, targets) -> int:
    """Check everything that can be checked without training: recipe, runs, targets, the model's
    architecture (on `meta`), the FLOPs formula, and the worker's imports."""
    import importlib.util

    from fastft import hardware, models

    problems = []
    for t in targets:
        tgt = hardware.get(t)
        if tgt.memory_bytes is not None:
            print(f"  target {t}: cap {tgt.memory_bytes / 2**30:.0f} GiB via set_per_process_memory_fraction")
        else:
            print(f"  target {t}: CPU (CUDA hidden)")
    for b, k in runs:
        need = "unsloth" if b == "unsloth" else "peft"
        ok = importlib.util.find_spec(need) is not None
        print(f"  run {b}:{k}: {'ok' if ok else f'{need} is not installed here'}")
    if models.is_synthetic(recipe.model.name):
        meta = models.synthetic_on_meta(recipe.model.name)
        n = models.count_parameters(meta)
        fpt = flops_per_token(meta.config, 0, recipe.model.max_seq_length)
        print(f"  model {recipe.model.name}: {n:,} parameters (on meta, nothing allocated); "
              f"{fpt['flops_per_token'] / 1e9:.1f} GFLOP per token without LoRA at seq {recipe.model.max_seq_length}")
    else:
        print(f"  model {recipe.model.name}: loaded at run time")
    steps = args.warmup + args.steps
    t = recipe.train
    print(f"  {steps} steps ({args.warmup} warm-up) x {t.batch_size * t.grad_accum} rows x "
          f"{recipe.model.max_seq_length} tokens (data: {args.data})")
    for mod in ("fastft.train", "bench.common"):
        if importlib.util.find_spec(mod) is None:
            problems.append(f"cannot import {mod}")
    for p in problems:
        print(f"bench.train: dry run: {p}", file=sys.stderr)
    print("bench.train: dry run " + ("ok" if not problems else "FAILED"))
    return 1 if problems else 0


_HIDDEN = False
_PARENT_CUDA_VISIBLE: str | None = None


def _hide_gpu_from_this_process() -> None:
    global _HIDDEN, _PARENT_CUDA_VISIBLE
    if _HIDDEN or "torch" in sys.modules:  # too late to hide it; harmless for a parent that allocated nothing
        return
    _HIDDEN, _PARENT_CUDA_VISIBLE = True, os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", help="recipe .yaml (e.g. recipes/bench-llama3-8b.yaml)")
    p.add_argument("--target", nargs="+", choices=["rtx4090", "a100-40", "a100-80", "h100", "cpu"],
                   help="one or more targets; GPU targets cap memory to the target's size")
    p.add_argument("--backend", nargs="+", choices=BACKENDS, help="backends (x --kernels)")
    p.add_argument("--kernels", nargs="+", choices=KERNELS, help="LoRA kernels (x --backend)")
    p.add_argument("--run", action="append", metavar="BACKEND[:KERNELS]",
                   help="one run, e.g. --run hf --run unsloth:fastft (repeatable)")
    p.add_argument("--steps", type=int, default=5, help="measured optimizer steps (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps run before timing (default 2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, as in fastft train")
    p.add_argument("--data", choices=["random", "recipe"], default="random",
                   help="random: full rows of max_seq_length real tokens (default); recipe: the recipe's data")
    p.add_argument("--out", help="results folder (default $FASTFT_BENCH_RESULTS or bench/results)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run before it is stopped")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    p.add_argument("--dry-run", action="store_true", help="check the recipe, runs and model without training")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if not args.recipe or not args.target:
        p.error("give a RECIPE and --target")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    from fastft import recipe as recipe_mod

    try:
        recipe = recipe_mod.load(args.recipe, args.overrides)
    except (recipe_mod.RecipeError, FileNotFoundError) as e:
        print(f"bench.train: error: {e}", file=sys.stderr)
        return 2
    runs = parse_runs(args, recipe)
    targets = list(dict.fromkeys(args.target))
    print(f"bench.train: {args.recipe}: {len(targets) * len(runs)} runs: "
          + ", ".join(f"{t} {b}:{k}" for t in targets for b, k in runs))
    if args.dry_run:
        return dry_run(args, recipe, runs, targets)
    gpu_targets = [t for t in targets if t != "cpu"]
    if gpu_targets:
        probe = subprocess.run([sys.executable, "-c", "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"],
                               capture_output=True)
        if probe.returncode != 0:
            print(f"bench.train: error: target {gpu_targets[0]} needs a CUDA GPU and none is visible; "
                  "use --target cpu here", file=sys.stderr)
            return 2
    # This process never touches the GPU (a CUDA context here would take memory from the runs);
    # each result names the GPU its worker reported.
    _hide_gpu_from_this_process()
    out_dir = Path(args.out) if args.out else None
    log_dir = Path(tempfile.mkdtemp(prefix="fastft-bench-logs-"))
    last = None
    for target in targets:
        results: list[dict] = []
        doc = doc_for_target(args, target, results, recipe)
        doc["command"] = shlex.join(["python", "-m", "bench.train", *(argv if argv is not None else sys.argv[1:])])
        if target != "cpu":
            doc["device"] = {"type": "cuda", "name": "unknown (no run reported its GPU)"}
        elif doc["device"].get("type") == "cpu":
            doc["device"]["load_average_1min"] = round(os.getloadavg()[0], 2)  # other processes on the CPU
        for backend, kernels in runs:
            res = run_one(args, target, backend, kernels, str(Path(args.recipe).resolve()), log_dir)
            results.append(res)
            if target != "cpu" and res.get("device", {}).get("type") == "cuda":
                doc["device"] = res["device"]
            m = res.get("metrics") or {}
            print(f"bench.train: {target} {backend}:{kernels}: {res['status']}"
                  + (f", {m['tokens_per_second']:,.0f} tokens/s" if res["status"] == "ok" else
                     f" ({res.get('message', '')[:300]})"), file=sys.stderr, flush=True)
            # rewritten (same file) after every run, so a suite cut short keeps what was measured
            paths = write_outputs(doc, out_dir, args.no_chart)
        print(markdown_table(doc))
        print(f"bench.train: wrote {', '.join(str(v) for v in paths.values() if v)}")
        last = doc
    print(common.dumps_line(last))
    return 0


if __name__ == "__main__":
    sys.exit(main())
