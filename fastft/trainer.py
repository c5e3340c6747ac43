"""TRL's SFTTrainer with what a fastft run needs, configured through its constructor.

    from fastft.trainer import FastftTrainer
    trainer = FastftTrainer(model=model, args=sft_config, train_dataset=ds, processing_class=tok,
                            meter=meter, guard=callbacks.NonFiniteGuard(10, print), out_dir=Path("out"))

- every micro-batch's real tokens go to the ``Meter`` (counted on the device);
- the optimizer is wrapped by the ``NonFiniteGuard`` (NaN/Inf steps skipped, then the run stops);
- checkpoints are staged in checkpoints/.staging and renamed into place only when complete
  (fastft.checkpoints), keeping the newest ``keep_checkpoints``.

``sft_config`` maps the recipe's ``train`` section onto TRL's SFTConfig (the base of the dpo /
orpo / grpo configs too).

Imports TRL: import it after the backend has loaded the model (Unsloth patches TRL's trainers as
it is imported).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from trl import SFTTrainer

from . import checkpoints, progress, trackers
from .callbacks import Meter, NonFiniteGuard
from .recipe import Recipe
from .world import World


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


# -- the trainer's arguments from the recipe -------------------------------------------------------

def optim_for(recipe: Recipe, device: str, log) -> str:
    """``train.optim``, or its unpaged twin on CPU (paging needs CUDA memory)."""
    optim = recipe.train.optim
    if device == "cpu" and optim.startswith("paged_"):
        plain = {"paged_adamw_8bit": "adamw_8bit", "paged_adamw_32bit": "adamw_torch"}[optim]
        log(f"warning: train.optim={optim}: paged optimizers need CUDA memory paging; using {plain} on CPU")
        return plain
    return optim


def sft_config(recipe: Recipe, out_dir: Path, info, optim: str, has_eval: bool, world: World,
               batch: tuple[int, int]):
    """The recipe's ``train`` section as TRL's SFTConfig (also the base of the dpo / orpo / grpo configs)."""
    from trl import SFTConfig

    t = recipe.train
    cuda = info.device.startswith("cuda")
    kwargs = dict(
        output_dir=str(out_dir / "checkpoints"),
        per_device_train_batch_size=batch[0],
        per_device_eval_batch_size=t.eval_batch_size or max(batch[0], 8),
        gradient_accumulation_steps=batch[1],
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a fraction of the total steps
        max_steps=t.max_steps if t.max_steps else -1,
        num_train_epochs=t.epochs,
        optim=optim,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_every,
        logging_first_step=True,
        eval_strategy="steps" if (has_eval and t.eval_every) else "no",
        eval_steps=t.eval_every,
        save_strategy="steps" if t.save_every else "no",
        save_steps=t.save_every or 500,
        save_total_limit=None,  # fastft rotates complete checkpoints itself (checkpoints.finalize)
        save_only_model=False,
        ddp_find_unused_parameters=False if world.size > 1 else None,
        report_to=trackers.trainer_args(recipe.train.report_to, out_dir),  # "none" unless train.report_to
        # the backend already set gradient checkpointing up (Unsloth's own, or PEFT's for k-bit models)
        gradient_checkpointing=False,
        bf16=cuda and info.dtype == "bfloat16",
        fp16=cuda and info.dtype == "float16",
        max_length=recipe.model.max_seq_length,
        packing=recipe.data.packing,
        dataset_num_proc=None,
        disable_tqdm=not world.main or progress.quiet(),  # --quiet: no training bar either
        use_cpu=not cuda,
    )
    return SFTConfig(**kwargs)


def adapters_follow_compute_dtype(model, compute_dtype: str) -> None:
    """TRL's SFTTrainer casts QLoRA adapter weights to bf16 (the QLoRA paper's setting, made for
    bf16 compute). With fp32 compute (CPU) or fp16 mixed precision that loses update precision and
    the trained function differs from the saved adapter reloaded in fp32 (measured: logits 0.016
    apart on the tiny model), so there fastft keeps trainable weights in fp32."""
    import torch

    if compute_dtype == "bfloat16":
        return
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
