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


class FastftMixin:
    """What every fastft trainer adds to its TRL trainer (SFT here; DPO, ORPO, GRPO in fastft.methods)."""

    def __init__(self, *args, meter: Meter, guard: NonFiniteGuard, out_dir: Path, keep_checkpoints: int = 2,
                 log: Callable[[str], None] = print, fsdp: bool = False, **kwargs):
        self.meter, self.guard, self.out_dir = meter, guard, Path(out_dir)
        self.keep_checkpoints, self.log_fn = keep_checkpoints, log
        self._staging: str | None = None
        self.fsdp = fsdp  # the model is (or will be, before train) sharded by fastft.distributed.shard
        super().__init__(*args, **kwargs)
        if fsdp:
            self._keep_sharded_model_unwrapped()

    # -- fsdp (fastft.distributed): the model arrives sharded with FSDP2 fully_shard -------------
    def _keep_sharded_model_unwrapped(self):
        """accelerate knows FSDP only as its own plugin (CUDA only); for a multi-process CPU or GPU
        run it would wrap the already sharded model in DDP. Hand a sharded model through as is."""
        from .distributed import is_fsdp_model

        accelerator = self.accelerator
        prepare_model = accelerator.prepare_model

        def prepare_sharded(model, *a, **k):
            if is_fsdp_model(model):
                if not any(m is model for m in accelerator._models):
                    accelerator._models.append(model)
                return model
            return prepare_model(model, *a, **k)

        accelerator.prepare_model = prepare_sharded

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.fsdp:
            return super().save_model(output_dir, _internal_call=_internal_call)
        from .distributed import save_adapter

        output_dir = output_dir or self.args.output_dir
        save_adapter(self.model, Path(output_dir), self.args.should_save)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.fsdp:
            return super()._save_optimizer_and_scheduler(output_dir)
        import torch

        from .distributed import save_optimizer

        save_optimizer(self.optimizer, output_dir, self.args.process_index, self.args.world_size)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), f"{output_dir}/scheduler.pt")

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if not self.fsdp or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        import torch

        from .distributed import load_optimizer

        load_optimizer(self.optimizer, checkpoint, self.args.process_index, self.args.world_size)
        self.lr_scheduler.load_state_dict(torch.load(f"{checkpoint}/scheduler.pt", weights_only=True))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self.fsdp:
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        from .distributed import load_adapter

        load_adapter(model or self.model, Path(resume_from_checkpoint))

    def training_step(self, model, inputs, *args, **kwargs):
        self.count_tokens(inputs)
        return super().training_step(model, inputs, *args, **kwargs)

    def count_tokens(self, inputs) -> None:
        self.meter.count(inputs)

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


class FastftTrainer(FastftMixin, SFTTrainer):
    """TRL's SFTTrainer with fastft's meter, non-finite guard and staged checkpoints."""
