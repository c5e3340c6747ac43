"""End-to-end training benchmark: tokens/sec, peak memory, step times, MFU and losses per run.

    python -m bench.train recipes/bench-tiny-cpu.yaml --target cpu --steps 6 --warmup 2
    python -m bench.train recipes/bench-llama3-8b.yaml --target h100 \\
        --run hf --run unsloth:unsloth --run unsloth:fastft --steps 4 --warmup 1
    python -m bench.train recipes/bench-llama3-8b.yaml --target rtx4090 --backend unsloth --kernels unsloth fastft
    python -m bench.train recipes/bench-llama3-8b.yaml --target h100 --run unsloth:unsloth --run unsloth:fastft \\
        --steps 8 --warmup 2 --budget 151          # the GPU suite's pair: the runs share 151 s
    python -m bench.train recipes/bench-llama3-8b.yaml --target h100 --run hf --budget 60 --dry-run   # checks only

Each (target, backend, kernels) runs in a fresh process, one after another, through the same
``fastft.train.run`` a user runs (its Meter times every optimizer step, synchronized on CUDA, and
counts real tokens from the attention mask). The recipe's ``train.max_steps`` becomes
``warmup + steps``; the first ``warmup`` steps are excluded from every timing. Evaluation and
checkpoints are off. With ``--data random`` (the default) the data are rows of random words of the
tiny tokenizer's vocabulary, each truncated to exactly ``model.max_seq_length`` real tokens, so a
run measures the training step and not a data set; ``--data recipe`` keeps the recipe's data.

Results as they go: the result JSON (one per target) is written before the first run, every run
listed as not started, and each worker rewrites its run's record after every optimizer step: the
steps so far (tokens, seconds, loss, peak memory), the metrics they give, the kernels report and
the compile regime. Until a run finishes, its record says ``"status": "cut", "cut": true`` with
``steps_done``; a finished run says ``ok``. So a run stopped at its limit, by SIGINT/SIGTERM (it
stops at the end of the step, writing no checkpoint) or killed outright keeps every step it made.

Budget and floors: ``--budget SECONDS`` is the whole invocation's; each run's limit is its share of
what is left, in proportion to its floor (FLOORS: import + load + get_peft_model + the first step
with its compiles + the other steps + writing the adapter, for Llama-3-8B QLoRA on an H100, the GPU
suite's runs). A run whose share is below what it needs to reach its third measured step is not
started (recorded cut); one past its limit gets SIGINT, then SIGKILL after WORKER_GRACE_S.
``--dry-run --budget`` fails, naming the run, when a share is below its floor. ``--timeout`` caps
each run as well. Exit status: 0 when every run finished, 3 (bench.common.EXIT_CUT) when one was
cut, 128 + the signal when this process was stopped.

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
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
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


# --- how long a run needs ----------------------------------------------------------------------

@dataclass(frozen=True)
class RunFloor:
    """Seconds one run needs, by phase, from its worker's start to its last write."""

    imports: float  # python, torch, transformers, peft, trl (and unsloth)
    load: float  # the NF4 checkpoint from the page cache onto the GPU
    peft: float  # get_peft_model: LoRA on every linear layer
    first_step: float  # the first optimizer step, with the compiles it triggers
    step: float  # every later step
    finish: float  # after the last step: the adapter and fastft.json written

    def seconds(self, steps: int, extra_compile: float = 0.0) -> float:
        return self.imports + self.load + self.peft + self.first_step + extra_compile + (steps - 1) * self.step \
            + self.finish

    def to_measured(self, warmup: int, extra_compile: float = 0.0) -> float:
        """Seconds until MIN_MEASURED measured steps have been written."""
        return self.imports + self.load + self.peft + self.first_step + extra_compile \
            + (warmup - 1 + MIN_MEASURED) * self.step

    def explain(self, steps: int, extra_compile: float = 0.0) -> str:
        parts = [f"imports {self.imports:g}", f"load {self.load:g}", f"get_peft_model {self.peft:g}",
                 f"first step {self.first_step:g}"]
        if extra_compile:
            parts.append(f"fastft kernels' compiles {extra_compile:g}")
        parts += [f"{steps - 1} steps x {self.step:g}", f"finish {self.finish:g}"]
        return " + ".join(parts) + f" = {self.seconds(steps, extra_compile):.0f} s"


# Llama-3-8B QLoRA, r=16 on all linear layers, seq 2048 x batch 2 (4,096 tokens a step), on an H100,
# from the start of the run's process (the GPU suite's e2e runs; a smaller model needs less):
#   imports     `import unsloth` takes 10-20 s cold (it patches transformers, TRL and PEFT as they
#               import; the suite's imports step has compiled its bytecode by then, 5-10 s more on a machine
#               where nothing has imported it yet); the plain stack ~8 s
#   load        5.7 GB from the page cache (the synthetic-8b step has just written it) onto the GPU;
#               Unsloth's from_pretrained patches the model as it loads
#   first step  Unsloth compiles each decoder block on torch >= 2.11 + CUDA (~20 s); the plain stack
#               only warms cuBLAS
#   step        0.6-1 s with Unsloth's kernels and offloaded checkpointing, 1-1.5 s on the plain
#               stack: the upper ends
#   finish      the adapter (~170 MB with its config) and fastft.json written after the last step
FLOORS = {"unsloth": RunFloor(imports=15, load=12, peft=4, first_step=20, step=1.0, finish=3),
          "hf": RunFloor(imports=8, load=12, peft=3, first_step=4, step=1.3, finish=3)}
# kernels: fastft compiles its own Triton kernels on the first step as well: about ten
# specializations (fused QKV, SwiGLU MLP and O, forward and backward) at ~1 s each for sm_90
# (bench.kernels static under triton 3.6 on the CPU machine: 0.6-1.6 s per bf16 specialization)
FASTFT_COMPILE_S = 10.0
# This process's own share: python, the recipe, nvidia-smi, the result written before and after
# each run (bench/gpu.sh adds it to the e2e step's floor)
PARENT_S = 5.0
PARENT_END_S = 2.0  # kept back at run time for the last run's record, the table and the chart
MIN_MEASURED = 3  # a run is worth starting when it can reach this many measured steps
WORKER_GRACE_S = 8.0  # after SIGINT: the step in progress ends, the record is written (a step is ~1 s)


def _floor(backend: str, kernels: str) -> tuple[RunFloor, float]:
    """The run's phases and the extra first-step compile its kernels add."""
    return FLOORS["hf" if backend == "hf" else "unsloth"], FASTFT_COMPILE_S if kernels == "fastft" else 0.0


def run_floor(backend: str, kernels: str, target: str, steps: int) -> float | None:
    """Seconds the run needs (None on the CPU target: no floor, the runs share the budget evenly)."""
    if target == "cpu":
        return None
    floor, extra = _floor(backend, kernels)
    return floor.seconds(steps, extra)


def run_floor_explained(backend: str, kernels: str, target: str, steps: int) -> str:
    if target == "cpu":
        return "no floor on the CPU target"
    floor, extra = _floor(backend, kernels)
    return floor.explain(steps, extra)


def run_to_measured(backend: str, kernels: str, target: str, warmup: int) -> float | None:
    if target == "cpu":
        return None
    floor, extra = _floor(backend, kernels)
    return floor.to_measured(warmup, extra)


def invocation_floor(targets: list[str], runs: list[tuple[str, str]], steps: int) -> float:
    """Seconds a whole invocation needs: this process's own share and every run's floor (what
    bench/gpu.sh gives a bench.train step at least)."""
    return PARENT_S + sum(run_floor(b, k, t, steps) or 0.0 for t in targets for b, k in runs)


def invocation_floor_explained(targets: list[str], runs: list[tuple[str, str]], steps: int) -> str:
    parts = [f"{t} {b}:{k} ({run_floor_explained(b, k, t, steps)})" for t in targets for b, k in runs]
    return f"this process {PARENT_S:g} + " + " + ".join(parts) + f" = {invocation_floor(targets, runs, steps):.0f} s"


def share_of(left: float, floors: list[float | None]) -> float:
    """The first run's share of ``left`` seconds among ``floors`` (it and the runs after it): in
    proportion to the floors, evenly where there are none."""
    if all(f is not None for f in floors) and sum(floors) > 0:
        return left * floors[0] / sum(floors)
    return left / len(floors)


def planned_shares(budget: float, floors: list[float | None]) -> list[float]:
    """Each run's share when every run before it uses all of its own (what --dry-run checks)."""
    left, out = budget - PARENT_S, []
    for i in range(len(floors)):
        out.append(share_of(left, floors[i:]))
        left -= out[-1]
    return out


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


def pending_record(backend: str, kernels: str, target: str, steps_planned: int) -> dict:
    """A run's record before its worker has written one: not started, so cut."""
    return {"backend": backend, "kernels": kernels, "target": target, "notes": [], "status": "cut", "cut": True,
            "cut_reason": "not started", "steps_planned": steps_planned, "steps_done": 0, "steps": []}


# --- the worker: one run in this process -----------------------------------------------------------

class RunStopped(BaseException):
    """SIGINT or SIGTERM before training started (during it, fastft.train stops at the step's end)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def worker(spec_path: str) -> int:
    """One run (``--worker SPEC``): its own process in a benchmark; the SIGINT/SIGTERM handlers it
    installs are put back when it returns, for a caller in the same process (the tests)."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _worker(spec_path)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _worker(spec_path: str) -> int:
    t_start = time.monotonic()
    spec = json.loads(Path(spec_path).read_text())
    doc_path, index = Path(spec["doc_path"]), spec["run_index"]
    doc = json.loads(doc_path.read_text())
    out = doc["metrics"]["runs"][index]
    out.update(cut_reason="started; no step finished yet", worker_pid=os.getpid())

    def save() -> None:  # the parent writes only while no worker runs: this process owns the file now
        doc["metrics"]["runs"][index] = out
        common.write_json(doc_path, doc)

    def stop(signum, frame):
        raise RunStopped(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import torch

    from fastft import hardware, recipe as recipe_mod

    target = hardware.get(spec["target"])
    notes = out["notes"]
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
    from fastft.models import named

    out["model"] = r.model.name
    out["weights"] = WEIGHTS_SYNTHETIC if named.is_synthetic(r.model.name) else "as loaded"
    out["phases"] = {"setup_s": round(time.monotonic() - t_start, 2)}
    save()

    from fastft import train

    recorder = StepRecorder(out, spec, r, save, t_start)
    restore = observe(recorder)
    try:
        try:
            result = train.run(r, log=lambda m: print(m, flush=True))
        finally:
            restore()
    except BaseException as e:  # noqa: BLE001  (every failure becomes a reported status)
        signum = e.signum if isinstance(e, RunStopped) else getattr(e, "exit_code", 0) - 128 \
            if isinstance(e, train.TrainInterrupted) else None
        if signum is not None:
            out.update(status="cut", cut=True, cut_reason=f"{signal.Signals(signum).name} received after step "
                       f"{len(out['steps'])} of {out['steps_planned']}")
        else:
            oom = isinstance(e, torch.OutOfMemoryError) or isinstance(e.__cause__, torch.OutOfMemoryError) \
                or "out of memory" in str(e).lower()
            out.update(status="does not fit" if oom else "error", cut=False, cut_reason=None,
                       message=f"{type(e).__name__}: {str(e).splitlines()[0][:500] if str(e) else ''}")
            if not oom:
                out["traceback"] = traceback.format_exc()[-3000:]
        from fastft.callbacks import peak_memory

        out["metrics"] = {**recorder.metrics(), **peak_memory()}
        out["final"] = True
        save()
        print(f"bench.train: {out['status']}: {out.get('cut_reason') or out.get('message')}", file=sys.stderr)
        return 0
    info = result.info
    out["metrics"] = recorder.metrics(final=info["metrics"]["train"])
    if not out["metrics"].get("measured_steps"):
        out.update(status="error", cut=False, cut_reason=None, final=True,
                   message=f"no measured steps: the run made {len(out['steps'])} steps, warm-up is {spec['warmup']}")
        save()
        return 0
    out.update(status="ok", cut=False, cut_reason=None, backend_info=info["backend"], data=info.get("data", {}),
               kernels_report=info.get("kernels", out.get("kernels_report")), final=True)
    out["phases"]["total_s"] = round(time.monotonic() - t_start, 2)
    save()
    return 0


class StepRecorder:
    """What a worker learns as its run goes: the model once loaded and patched (kernels report and
    compile regime), then every optimizer step as it is logged; each change is saved at once."""

    def __init__(self, out: dict, spec: dict, recipe, save, t_start: float):
        self.out, self.spec, self.recipe, self.save, self.t_start = out, spec, recipe, save, t_start
        self.config = self.n_lora = None
        self.bf16 = False

    def patched(self, report) -> None:
        self.out["phases"]["loaded_and_patched_s"] = round(time.monotonic() - self.t_start, 2)
        self.out["kernels_report"] = report.to_dict()
        self.out["compile_regime"] = compile_regime(report)
        self.save()

    def train_begin(self, args, model) -> None:
        self.out["phases"]["train_begin_s"] = round(time.monotonic() - self.t_start, 2)
        if model is not None:
            self.config = getattr(model, "config", None)
            self.n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.bf16 = bool(getattr(args, "bf16", False))
        self.save()

    def steps(self, new: list[tuple[int, int, float]], logs: dict) -> None:
        for i, (step, tokens, seconds) in enumerate(new):
            rec = {"step": step, "tokens": tokens, "seconds": seconds,
                   "at_s": round(time.monotonic() - self.t_start, 2)}
            if i == len(new) - 1:  # a log line covers the steps since the last one: its loss is theirs
                rec.update({k: logs[k] for k in ("loss", "peak_vram_allocated_gb", "peak_vram_reserved_gb",
                                                 "peak_rss_gb") if k in logs})
            self.out["steps"].append(rec)
        done = len(self.out["steps"])
        self.out["steps_done"] = done
        self.out["cut_reason"] = (f"in progress: {done} of {self.out['steps_planned']} steps written; a finished "
                                  "run says ok")
        self.out["metrics"] = self.metrics()
        self.save()

    def metrics(self, final: dict | None = None) -> dict:
        """Timings over the measured steps written so far (none before the first one after warm-up)."""
        steps, warmup = self.out["steps"], self.spec["warmup"]
        measured = steps[warmup:]
        last = next((s for s in reversed(steps) if "loss" in s), {})
        peaks = {k: (final or last).get(k) for k in ("peak_vram_allocated_gb", "peak_vram_reserved_gb", "peak_rss_gb")
                 if (final or last).get(k) is not None}
        m = {"measured_steps": len(measured), "warmup_steps": warmup,
             "losses": [s["loss"] for s in steps if "loss" in s], **peaks}
        if not measured:
            return m
        tokens = sum(s["tokens"] for s in measured)
        seconds = sum(s["seconds"] for s in measured)
        step_s = [s["seconds"] for s in measured]
        median = statistics.median(step_s)
        tps = tokens / seconds
        m.update(tokens_per_second=tps, measured_tokens=tokens, tokens_per_step=tokens / len(measured),
                 step_seconds_median=median, step_seconds_min=min(step_s), step_seconds_max=max(step_s),
                 step_seconds_stdev=statistics.stdev(step_s) if len(step_s) > 1 else 0.0,
                 step_seconds_spread_pct=100.0 * (max(step_s) - min(step_s)) / median if median else None,
                 first_step_seconds=steps[0]["seconds"])
        if self.config is not None:
            rows_per_step = self.recipe.train.batch_size * self.recipe.train.grad_accum
            fpt = flops_per_token(self.config, self.n_lora or 0, tokens / len(measured) / rows_per_step)
            dev = self.out.get("device", {})
            peak = peak_bf16_flops(dev.get("name", "")) if dev.get("type") == "cuda" and self.bf16 else None
            m.update(flops=fpt, mfu=tps * fpt["flops_per_token"] / peak if peak else None,
                     mfu_peak_tflops=peak / 1e12 if peak else None)
        return m


def observe(recorder: StepRecorder):
    """Let the worker watch fastft.train.run without changing it: ``patch.apply`` (called once the
    model is loaded) is wrapped to keep its report, and from then on ``callbacks.Meter`` (created just
    after) is a subclass that hands every step to the recorder as it is logged. fastft.callbacks is
    imported only then: on the unsloth backend, Unsloth must be imported before transformers.
    Returns the function that puts both back (the recording Meter writes no checkpoint, so a run
    in the same process after this one must get fastft's own)."""
    from fastft.models import patch

    apply = patch.apply
    meters = []

    def apply_and_record(model, mode="auto", log_fn=None):
        report = apply(model, mode, log_fn)
        from fastft import callbacks

        if not getattr(callbacks.Meter, "_bench_recording", False):
            meters.append(callbacks.Meter)
            callbacks.Meter = recording_meter(callbacks.Meter, recorder)
        recorder.patched(report)
        return report

    def restore() -> None:
        patch.apply = apply
        if meters:
            from fastft import callbacks

            callbacks.Meter = meters[0]

    patch.apply = apply_and_record
    return restore


def recording_meter(meter_cls, recorder: StepRecorder):
    class RecordingMeter(meter_cls):
        """fastft's Meter; every logged step also goes to the benchmark's recorder."""

        _bench_recording = True

        def on_train_begin(self, args, state, control, model=None, **kw):
            recorder.train_begin(args, model)
            return super().on_train_begin(args, state, control, model=model, **kw)

        def on_log(self, args, state, control, logs=None, **kw):
            super().on_log(args, state, control, logs=logs, **kw)
            # no checkpoint in a benchmark, not even the one a stop signal asks for: the stop must
            # end within the parent's grace, and the steps are already written
            control.should_save = False
            handed = getattr(self, "_handed", 0)
            if len(self.steps) > handed:
                recorder.steps(self.steps[handed:], self.history[-1] if self.history else {})
                self._handed = len(self.steps)

    return RecordingMeter


def compile_regime(report) -> dict:
    """How this run compiles: fastft.models.patch's own account when its report carries one
    (``compile_regime``), else what decides Unsloth's (it compiles each decoder block on torch >= 2.11
    with CUDA) and the environment switches that change it."""
    regime = getattr(report, "compile_regime", None)
    if regime is not None:
        if hasattr(regime, "to_dict"):
            regime = regime.to_dict()
        return {"source": "fastft.models.patch", **(regime if isinstance(regime, dict) else {"regime": regime})}
    import torch

    switches = {k: v for k, v in sorted(os.environ.items())
                if k.startswith(("UNSLOTH_COMPILE", "TORCH_COMPILE", "TORCHDYNAMO", "TORCHINDUCTOR"))}
    return {"source": "bench.train (the kernels report has no compile_regime)", "torch": torch.__version__,
            "cuda": torch.cuda.is_available(), "environment": switches}


# --- the parent: plan, run each in a fresh process, write results ---------------------------------

class Stop:
    """SIGINT/SIGTERM to this process: no new run starts; the worker running stops at its step's end
    (it shares this process group, so the suite's signal reaches it too)."""

    def __init__(self):
        self.signum: int | None = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum


def wait_worker(proc: subprocess.Popen, limit: float | None, stop: Stop) -> tuple[int | None, str | None]:
    """Wait for the worker; at ``limit`` seconds, or when this process is told to stop, SIGINT it and
    after WORKER_GRACE_S SIGKILL it. Returns (exit code, None | "limit" | signal name)."""
    t0 = time.monotonic()
    why = None
    while proc.poll() is None:
        if why is None and limit is not None and time.monotonic() - t0 > limit:
            why = "limit"
        elif why is None and stop.signum is not None:
            why = signal.Signals(stop.signum).name
        if why is not None:
            # a group signal reached the worker already; a second SIGINT would make it exit at once
            if why == "limit":
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=WORKER_GRACE_S)
            except subprocess.TimeoutExpired:
                if why != "limit":
                    proc.send_signal(signal.SIGINT)
                    try:
                        proc.wait(timeout=WORKER_GRACE_S / 2)
                    except subprocess.TimeoutExpired:
                        pass
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            break
        time.sleep(0.2)
    return proc.returncode, why


def run_one(args, target: str, backend: str, kernels: str, recipe_path: str, log_dir: Path, doc_path: Path,
            index: int, limit: float | None, stop: Stop) -> dict:
    """One run in a fresh worker process; returns its record as the worker left it in the result JSON,
    finished here where the worker could not (killed at its limit, crashed)."""
    with tempfile.TemporaryDirectory(prefix="fastft-bench-") as work:
        spec = {"recipe": recipe_path, "overrides": args.overrides, "target": target, "backend": backend,
                "kernels": kernels, "steps": args.steps, "warmup": args.warmup, "data": args.data,
                "work_dir": work, "doc_path": str(doc_path), "run_index": index}
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
        print(f"bench.train: {target} {backend}:{kernels} ... (limit "
              f"{'none' if limit is None else f'{limit:.0f} s'}; log {log_path})", file=sys.stderr, flush=True)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            rc, why = wait_worker(proc, limit, stop)
        out = json.loads(doc_path.read_text())["metrics"]["runs"][index]
        if why == "limit":
            out.update(status="cut", cut=True, cut_reason=f"stopped at its {limit:.0f} s limit after step "
                       f"{out.get('steps_done', 0)} of {out.get('steps_planned')}"
                       + (" (killed: no final record)" if not out.get("final") else ""))
        elif why is not None and out.get("status") in ("cut", None):
            out.update(status="cut", cut=True, cut_reason=f"bench.train got {why} after step "
                       f"{out.get('steps_done', 0)} of {out.get('steps_planned')}")
        elif not out.get("final"):  # the worker died without its last write
            tail = log_path.read_text(errors="replace")[-1500:]
            out.update(status="error", cut=False, cut_reason=None,
                       message=f"worker exited with code {rc} after step {out.get('steps_done', 0)}; log tail:\n{tail}")
        out["seconds"] = time.perf_counter() - t0
        out["limit_s"] = None if limit is None else round(limit, 1)
        out["log"] = str(log_path)
        return out


def doc_for_target(args, target: str, runs: list[dict], recipe) -> dict:
    from fastft.models import named

    synthetic = named.is_synthetic(recipe.model.name)
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
        "data": args.data, "budget_s": args.budget, "timeout_s": args.timeout,
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
                         metrics={"runs": runs, "complete": False}, notes=notes)


def regime_note(runs: list[dict]) -> str | None:
    """A note when the runs of one result did not compile alike (their ratio is then not like for like)."""
    regimes = {}
    for r in runs:
        if r.get("compile_regime"):
            regime = {k: v for k, v in r["compile_regime"].items() if k != "source"}
            regimes.setdefault(json.dumps(regime, sort_keys=True, default=str), []).append(run_label(r))
    if len(regimes) > 1:
        return "compile regimes differ between runs: " + "; ".join(f"{', '.join(v)}: {k}" for k, v in regimes.items())
    return None


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
        status = r.get("status")
        if status == "cut":
            status = f"cut ({r.get('steps_done', 0)} of {r.get('steps_planned')} steps)"
        if m.get("tokens_per_second"):
            tps = m["tokens_per_second"]
            alloc = m.get("peak_vram_allocated_gb")
            reserved = m.get(mem_key)
            losses = m.get("losses") or [None]
            lines.append(
                f"| {run_label(r)} | {status} | {tps:,.0f} | {fmt(base and tps / base, '.2f')}x | {fmt(alloc, '.2f')} | "
                f"{fmt(reserved, '.2f')}{'' if dev.get('type') == 'cuda' else ' (RSS)'} | "
                f"{m['step_seconds_median']:.3f} (±{m['step_seconds_spread_pct'] / 2:.0f}%) | "
                f"{fmt(m.get('mfu') and 100 * m['mfu'], '.1f')}{'%' if m.get('mfu') else ''} | "
                f"{fmt(losses[-1], '.3f')} |")
        else:
            peak = m.get("peak_vram_reserved_gb", m.get("peak_rss_gb"))
            lines.append(f"| {run_label(r)} | {status} | - | - | - | {fmt(peak, '.2f')} | - | - | - |")
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


def write_outputs(doc: dict, path: Path, no_chart: bool) -> dict:
    common.write_json(path, doc)
    md = path.with_suffix(".md")
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(markdown_table(doc))
    os.replace(tmp, md)
    png = None if no_chart else chart(doc, path.with_suffix(".png"))
    return {"json": path, "md": md, "png": png}


def dry_run(args, recipe, runs, targets) -> int:
    """Check everything that can be checked without training: recipe, runs, targets, the model's
    architecture (on `meta`), the FLOPs formula, the worker's imports, and with --budget each run's
    share against its floor."""
    import importlib.util

    from fastft import hardware
    from fastft.models import named

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
    if named.is_synthetic(recipe.model.name):
        meta = named.synthetic_on_meta(recipe.model.name)
        n = named.count_parameters(meta)
        fpt = flops_per_token(meta.config, 0, recipe.model.max_seq_length)
        print(f"  model {recipe.model.name}: {n:,} parameters (on meta, nothing allocated); "
              f"{fpt['flops_per_token'] / 1e9:.1f} GFLOP per token without LoRA at seq {recipe.model.max_seq_length}")
    else:
        print(f"  model {recipe.model.name}: loaded at run time")
    steps = args.warmup + args.steps
    t = recipe.train
    print(f"  {steps} steps ({args.warmup} warm-up) x {t.batch_size * t.grad_accum} rows x "
          f"{recipe.model.max_seq_length} tokens (data: {args.data})")
    plan = [(tg, b, k) for tg in targets for b, k in runs]
    floors = [run_floor(b, k, tg, steps) for tg, b, k in plan]
    if args.budget is not None:
        shares = planned_shares(args.budget, floors)
        print(f"  budget {args.budget:.0f} s: this process {PARENT_S:.0f} s, then each run's share (in proportion "
              "to its floor) against its floor:")
        for (tg, b, k), floor, share in zip(plan, floors, shares):
            if args.timeout is not None:
                share = min(share, args.timeout)
            verdict = "ok" if floor is None or share >= floor else "BELOW ITS FLOOR"
            print(f"    {tg} {b}:{k}: share {share:.0f} s, floor {fmt(floor, '.0f')} s "
                  f"({run_floor_explained(b, k, tg, steps)}): {verdict}")
            if floor is not None and share < floor:
                problems.append(f"run {tg} {b}:{k}: its share of --budget {args.budget:g} s is {share:.0f} s, below "
                                f"its floor of {floor:.0f} s ({run_floor_explained(b, k, tg, steps)})")
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


def _cuda_visible() -> bool:
    """Whether a worker will find a CUDA GPU; nvidia-smi answers in well under a second, where
    importing torch to ask takes seconds of the runs' budget."""
    import shutil

    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
        return r.returncode == 0 and "GPU" in r.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"],
                           capture_output=True)
    return probe.returncode == 0


def main(argv: list[str] | None = None) -> int:
    t_start = time.monotonic()
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
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for this whole invocation: each run gets a share in proportion to its floor")
    p.add_argument("--timeout", type=float, default=None, help="seconds per run before it is stopped")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    p.add_argument("--dry-run", action="store_true", help="check the recipe, runs, model and budget without training")
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
    if gpu_targets and not _cuda_visible():
        print(f"bench.train: error: target {gpu_targets[0]} needs a CUDA GPU and none is visible; "
              "use --target cpu here", file=sys.stderr)
        return 2
    # This process never touches the GPU (a CUDA context here would take memory from the runs);
    # each result names the GPU its worker reported.
    _hide_gpu_from_this_process()
    log_dir = Path(tempfile.mkdtemp(prefix="fastft-bench-logs-"))
    steps_total = args.warmup + args.steps
    plan = [(t, b, k) for t in targets for b, k in runs]
    floors = [run_floor(b, k, t, steps_total) for t, b, k in plan]
    command = shlex.join(["python", "-m", "bench.train", *(argv if argv is not None else sys.argv[1:])])
    docs, paths = {}, {}
    for target in targets:  # every run listed before the first starts: a cut call still says what was planned
        doc = doc_for_target(args, target, [pending_record(b, k, target, steps_total) for b, k in runs], recipe)
        doc["command"] = command
        if target != "cpu":
            doc["device"] = {"type": "cuda", "name": "unknown (no run reported its GPU)"}
        elif doc["device"].get("type") == "cpu":
            doc["device"]["load_average_1min"] = round(os.getloadavg()[0], 2)  # other processes on the CPU
        docs[target], paths[target] = doc, common.result_path(doc, args.out)
        write_outputs(doc, paths[target], no_chart=True)
    stop = Stop()
    for i, (target, backend, kernels) in enumerate(plan):
        doc, index = docs[target], runs.index((backend, kernels))
        record = doc["metrics"]["runs"][index]
        limit = args.timeout
        if stop.signum is not None:
            record["cut_reason"] = f"not started: bench.train got {signal.Signals(stop.signum).name}"
            write_outputs(doc, paths[target], no_chart=True)
            continue
        if args.budget is not None:
            left = args.budget - (time.monotonic() - t_start) - PARENT_END_S
            share = share_of(left, floors[i:])
            limit = share if limit is None else min(limit, share)
            need = run_to_measured(backend, kernels, target, args.warmup)
            if need is not None and limit < need:
                record["cut_reason"] = (f"not started: its share of the {left:.0f} s left is {limit:.0f} s, under the "
                                        f"{need:.0f} s it needs to reach {MIN_MEASURED} measured steps (floor "
                                        f"{floors[i]:.0f} s: {run_floor_explained(backend, kernels, target, steps_total)})")
                print(f"bench.train: {target} {backend}:{kernels}: {record['cut_reason']}", file=sys.stderr)
                write_outputs(doc, paths[target], no_chart=True)
                continue
            if floors[i] is not None and limit < floors[i]:
                print(f"bench.train: {target} {backend}:{kernels}: its {limit:.0f} s are under its {floors[i]:.0f} s "
                      "floor: it may be cut (its steps so far are kept)", file=sys.stderr)
        res = run_one(args, target, backend, kernels, str(Path(args.recipe).resolve()), log_dir, paths[target],
                      index, limit, stop)
        doc["metrics"]["runs"][index] = res
        if target != "cpu" and res.get("device", {}).get("type") == "cuda":
            doc["device"] = res["device"]
        m = res.get("metrics") or {}
        print(f"bench.train: {target} {backend}:{kernels}: {res['status']}"
              + (f", {m['tokens_per_second']:,.0f} tokens/s" if m.get("tokens_per_second") else "")
              + (f" ({res.get('cut_reason') or res.get('message', '')[:300]})" if res["status"] != "ok" else ""),
              file=sys.stderr, flush=True)
        write_outputs(doc, paths[target], no_chart=True)
    last = None
    for target in targets:
        doc = docs[target]
        note = regime_note(doc["metrics"]["runs"])
        if note:
            doc["notes"].append(note)
        doc["metrics"]["complete"] = True
        written = write_outputs(doc, paths[target], args.no_chart or stop.signum is not None)
        print(markdown_table(doc))
        print(f"bench.train: wrote {', '.join(str(v) for v in written.values() if v)}")
        last = doc
    print(common.dumps_line(last))
    if stop.signum is not None:
        return 128 + stop.signum
    cut = [r for d in docs.values() for r in d["metrics"]["runs"] if r.get("status") == "cut"]
    return common.EXIT_CUT if cut else 0


if __name__ == "__main__":
    sys.exit(main())
