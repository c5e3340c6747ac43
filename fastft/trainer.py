"""TRL's SFTTrainer with what a fastft run needs, configured through its constructor.

    from fastft.trainer import FastftTrainer
    trainer = FastftTrainer(model=model, args=sft_config, train_dataset=ds, processing_class=tok,
                            meter=meter, guard=callbacks.NonFiniteGuard(10, print), out_dir=Path("out"))

- every micro-batch's real tokens go to the ``Meter`` (counted on the device);
- the optimizer is wrapped by the ``NonFiniteGuard`` (NaN/Inf steps skipped, then the run stops);
- checkpoints are staged in checkpoints/.staging and renamed into place only when complete
  (fastft.checkpoints), keeping the newest ``keep_checkpoints``.

Imports TRL: import it after the backend has loaded the model (Unsloth patches TRL's trainers as
it is imported).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from trl import SFTTrainer

from . import checkpoints
from .callbacks import Meter, NonFiniteGuard


class FastftTrainer(SFTTrainer):
    def __init__(self, *args, meter: Meter, guard: NonFiniteGuard, out_dir: Path, keep_checkpoints: int = 2,
                 log: Callable[[str], None] = print, **kwargs):
        self.meter, self.guard, self.out_dir = meter, guard, Path(out_dir)
        self.keep_checkpoints, self.log_fn = keep_checkpoints, log
        self._staging: str | None = None
        super().__init__(*args, **kwargs)

    def training_step(self, model, inputs, *args, **kwargs):
        self.meter.count(inputs)
        return super().training_step(model, inputs, *args, **kwargs)

    def create_optimizer(self, *args, **kwargs):
        opt = super().create_optimizer(*args, **kwargs)
        return self.guard.wrap(opt, lambda: self.state.global_step + 1)

    # -- checkpoints: staged in checkpoints/.staging, renamed into place when complete ------------
    def _get_output_dir(self, trial=None):
        return self._staging or super()._get_output_dir(trial=trial)

    def _save_checkpoint(self, model, trial):
        import torch.distributed as dist

        root = Path(self.args.output_dir)
        staging = root / ".staging"
        if self.args.should_save:
            staging.mkdir(parents=True, exist_ok=True)
        self._staging = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.barrier()  # every rank has written its RNG state into the staged folder
        counters = self.meter.counters()
        if self.args.should_save:
            name = f"{checkpoints.PREFIX}{self.state.global_step}"
            final = checkpoints.finalize(staging / name, root, {"step": self.state.global_step, "meter": counters},
                                         self.keep_checkpoints)
            self.log_fn(f"fastft: checkpoint {final.relative_to(self.out_dir)} written")
        if distributed:
            dist.barrier()
