"""What fastft adds to TRL's training loop: trainer callbacks and the optimizer-step guard.

    from fastft import callbacks
    meter = callbacks.Meter(Path("out/metrics.jsonl"))
    trainer = FastftTrainer(..., callbacks=[meter, callbacks.EarlyStop(3, print)])
    meter.summary()["tokens_per_second"]

- ``Meter``: real (non-padding) tokens per optimizer step and the time inside steps (evaluation
  excluded), peak memory; one line per Trainer log into metrics.jsonl.
- ``EarlyStop``: stop when the held-out loss has not improved for ``patience`` evaluations.
- ``BestAdapter``: keep the adapter with the lowest held-out loss, restore it at the end.
- ``StopOnSignal``: SIGINT / SIGTERM checkpoint at the end of the step and stop.
- ``NonFiniteGuard``: skip optimizer steps with NaN/Inf gradients, up to a limit.

Imports transformers: import it after the backend has loaded the model (Unsloth patches the HF
stack as it is imported).
"""
from __future__ import annotations

import json
import os
import resource
import signal
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import TrainerCallback

from .errors import EXIT_FAILED, FastftError
from .files import atomic_write_text
from .world import World


class NonFiniteError(FastftError, RuntimeError):
    """More NaN/Inf steps than train.max_nonfinite_steps."""

    exit_code = EXIT_FAILED


def peak_memory() -> dict:
    """Peak memory so far, in GB: CUDA allocated/reserved, or the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return {"peak_vram_allocated_gb": torch.cuda.max_memory_allocated() / 1e9,
                "peak_vram_reserved_gb": torch.cuda.max_memory_reserved() / 1e9}
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {"peak_rss_gb": rss_kb * 1024 / 1e9}


def _cuda_sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _all_reduce_sum(values: list[float]) -> list[float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class Meter(TrainerCallback):
    """Tokens/sec over optimizer steps and peak memory, logged with every Trainer log line.

    The trainer calls ``count(inputs)`` for every micro-batch: the mask is summed on its device and
    added to the step's count there, so counting never waits for the GPU. The per-step counts are
    read back together when a log line, a checkpoint or the summary needs them."""

    def __init__(self, metrics_path: Path, write: bool = True, counters: dict | None = None):
        self.metrics_path = metrics_path
        self.write = write  # only rank 0 writes metrics.jsonl
        self.tokens = 0  # real tokens of this process's finished steps, once read back
        self.step_time = 0.0  # seconds inside optimizer steps, this process
        self.tokens_before = 0  # all ranks' tokens from the runs this one resumed
        self.time_before = 0.0
        if counters:
            self.tokens_before, self.time_before = counters["tokens"], counters["step_seconds"]
        self._t0 = None
        self._step_tokens = 0  # this step's count: an int, or a tensor on the batch's device
        self._unread: list[tuple[int, object, float]] = []  # (global step, token count, seconds)
        self.steps: list[tuple[int, int, float]] = []  # (global step, real tokens, seconds) per optimizer step
        self._last_tokens = float(self.tokens_before)
        self._last_time = self.time_before
        self.history: list[dict] = []

    def count(self, inputs) -> None:
        mask = inputs.get("attention_mask")
        self._step_tokens = self._step_tokens + (mask.sum() if mask is not None else inputs["input_ids"].numel())

    def _read(self) -> None:
        """Move the unread per-step counts to the host: one transfer for all of them."""
        if not self._unread:
            return
        tensors = [n for _, n, _ in self._unread if torch.is_tensor(n)]
        values = iter(torch.stack(tensors).tolist() if tensors else [])
        for step, n, dt in self._unread:
            n = int(next(values)) if torch.is_tensor(n) else int(n)
            self.tokens += n
            self.steps.append((step, n, dt))
        self._unread = []

    def on_step_begin(self, args, state, control, **kw):
        _cuda_sync()  # CUDA runs asynchronously: a step's time ends when its kernels have
        self._t0, self._step_tokens = time.perf_counter(), 0

    def on_step_end(self, args, state, control, **kw):
        if self._t0 is not None:
            _cuda_sync()
            dt = time.perf_counter() - self._t0
            self.step_time += dt
            self._unread.append((state.global_step, self._step_tokens, dt))
            self._t0, self._step_tokens = None, 0

    def totals(self) -> tuple[float, float]:
        """(tokens over all ranks, step seconds of the slowest-equivalent rank), this run + resumed."""
        self._read()
        tokens, seconds = _all_reduce_sum([float(self.tokens), self.step_time])
        size = World.from_env().size
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


class EarlyStop(TrainerCallback):
    """Stop when held-out loss has not improved for `patience` evaluations in a row."""

    def __init__(self, patience: int, log: Callable[[str], None]):
        self.patience, self.log = patience, log
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
            if self.bad >= self.patience and state.global_step < state.max_steps:
                self.stopped_at = state.global_step
                self.log(f"fastft: early stop at step {state.global_step}: held-out loss {loss:.4f} has not "
                         f"improved on {self.best:.4f} for {self.patience} evaluations")
                control.should_training_stop = True


class BestAdapter(TrainerCallback):
    """Track the adapter with the lowest held-out loss among the evaluations during training.
    Rank 0 (``write``) keeps a copy on disk (``path`` + its .json, written atomically) so a resumed
    run still knows it; every rank keeps one in memory to restore at the end."""

    def __init__(self, model, path: Path, write: bool, log: Callable[[str], None]):
        from safetensors.torch import load_file

        self.model, self.path, self.write, self.log = model, Path(path), write, log
        self.loss, self.step, self.weights = float("inf"), None, None
        meta = self.path.with_suffix(".json")
        if meta.is_file() and self.path.is_file():
            info = json.loads(meta.read_text())
            self.loss, self.step, self.weights = info["eval_loss"], info["step"], load_file(str(self.path))

    def _trainable(self) -> dict:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        from safetensors.torch import save_file

        loss = (metrics or {}).get("eval_loss")
        if loss is None or not loss < self.loss:
            return
        self.loss, self.step = loss, state.global_step
        self.weights = {n: p.detach().to("cpu", copy=True).contiguous() for n, p in self._trainable().items()}
        if self.write and state.global_step > 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            save_file(self.weights, str(tmp))
            os.replace(tmp, self.path)
            atomic_write_text(self.path.with_suffix(".json"), json.dumps({"eval_loss": loss, "step": state.global_step}))

    def restore_if_better(self, final_loss: float) -> bool:
        """Load the best weights when an evaluation during training beat the final state."""
        if self.step is None or self.step == 0 or not self.loss < final_loss:
            return False
        with torch.no_grad():
            for n, p in self._trainable().items():
                p.copy_(self.weights[n].to(p.device, p.dtype))
        self.log(f"fastft: restored the best adapter, from step {self.step} (held-out loss {self.loss:.4f} "
                 f"< {final_loss:.4f} at the end)")
        return True


class StopOnSignal(TrainerCallback):
    """SIGINT/SIGTERM: checkpoint and stop at the end of the step; a second signal exits at once.
    The handlers are installed while the object is used as a context manager (around train())."""

    def __init__(self, log: Callable[[str], None]):
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

    def on_step_end(self, args, state, control, **kw):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True


class NonFiniteGuard:
    """Wraps optimizer.step: a step with any non-finite gradient (a NaN/Inf loss makes them all NaN)
    is skipped; past ``limit`` such steps the run stops. Under DDP the gradients are already
    all-reduced when the optimizer steps, so every rank takes the same decision."""

    def __init__(self, limit: int, log: Callable[[str], None]):
        self.limit, self.log = limit, log
        self.skipped: list[int] = []

    @staticmethod
    def all_finite(grads: list) -> bool:
        """One check on the device, one read back: the largest |g| of every gradient (a fused
        _foreach_norm, ord=inf, which never overflows and carries NaN/Inf through) is finite only
        when every element is."""
        return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf"), dtype=torch.float32))).all())

    def wrap(self, optimizer, step_number: Callable[[], int]):
        """Guard ``optimizer`` in place; ``step_number()`` is the step about to be taken (1-based)."""
        if getattr(optimizer, "_fastft_guarded", False):
            return optimizer
        step = optimizer.step

        def guarded_step(*a, **k):
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if not grads or self.all_finite(grads):
                return step(*a, **k)
            n = step_number()
            self.skipped.append(n)
            optimizer.zero_grad(set_to_none=True)
            if len(self.skipped) > self.limit:
                raise NonFiniteError(
                    f"training stopped at step {n}: the loss or gradients were NaN/Inf on "
                    f"{len(self.skipped)} steps ({self.skipped[:10]}), more than "
                    f"train.max_nonfinite_steps={self.limit}. Usual causes: a learning rate too high "
                    "(train.lr), fp16 overflow (use model.dtype: bfloat16 or float32), a broken quantization "
                    "config or checkpoint (model.load_in_4bit, the model files), or corrupt data rows. "
                    "Nothing non-finite was saved; earlier checkpoints are intact.")
            self.log(f"fastft: step {n}: non-finite loss or gradient, optimizer step skipped "
                     f"({len(self.skipped)} of at most {self.limit})")
            return None

        optimizer.step = guarded_step
        optimizer._fastft_guarded = True
        return optimizer
