"""Several processes, one recipe: data-parallel (DDP) or sharded (FSDP-QLoRA), at training time.

    torchrun --nproc_per_node 2 -m fastft train recipes/llama3-70b-qlora-fsdp-2x4090.yaml

``distributed.strategy`` picks how a run launched by torchrun / accelerate launch uses its processes
(fastft.world.strategy):

- ``ddp`` (the default): every process holds the whole 4-bit model and the gradients are averaged
  (torch's DistributedDataParallel, through accelerate, as the HF Trainer does it).
- ``fsdp``: the model is sharded over the processes with torch's FSDP2 ``fully_shard``: one FSDP
  unit per decoder layer (its frozen NF4 weights, norms and LoRA weights together), then the root
  (embeddings, final norm, lm_head). A layer's full weights exist only while it runs (all-gathered
  before its forward and again before its backward, freed after). For that the packed NF4 weights
  are stored in the compute dtype (``bnb_4bit_quant_storage``: FSDP shards floating tensors), and
  each ``Linear4bit`` keeps its quantization state (absmax, code; small) on the module, where
  bitsandbytes finds it again after FSDP swapped the parameter. Activation checkpointing is the
  per-layer one ``train.gradient_checkpointing`` already turns on; ``distributed.cpu_offload``
  keeps the parameter shards (and so the optimizer's update) in host memory.

Loading (rank 0 reads the checkpoint, the other ranks build the model on the meta device and
receive their shards once it is sharded) is fastft.models.sharded_load's. Training: each device holds
1/N of every weight, one gathered layer at a time, its activations, and 1/N of the LoRA weights,
gradients and optimizer state. ``fastft plan RECIPE --gpus N --strategy fsdp`` prints these
per-rank figures.

Evaluation is sharded too: the held-out loss (before, every ``train.eval_every`` steps, after) and
the base-vs-adapter evaluation after training run on every rank on the same rows (each forward
gathers the layers; generation keeps all ranks stepping until all are done), and rank 0 writes
the results. The best adapter kept under ``eval_every`` is gathered from the shards.

Checkpoints (fastft.checkpoints layout): the adapter is gathered from all ranks and written by
rank 0 in the plain PEFT format, the optimizer state is written by every rank as its own shard
(``optimizer-rank<R>-of-<N>.pt``), RNG states per rank as with DDP. Resuming needs the same number
of processes. SIGINT/SIGTERM (to torchrun or to any rank): the ranks agree at each step end
(``stop_together``), all write the checkpoint of that step and exit 143.
"""
from __future__ import annotations

import os
from pathlib import Path

from .models import sharded_load
from .errors import TrainError
from .world import World, split_batch


def per_device_batch(recipe, world: World) -> tuple[int, int]:
    """(per-device batch, grad accum) keeping the recipe's global batch (batch_size x grad_accum)
    when N processes train data-parallel: the accumulation is split first, then the batch."""
    b, g, n = recipe.train.batch_size, recipe.train.grad_accum, world.size
    split = split_batch(b, g, n)
    if split is not None:
        return split
    raise TrainError(f"train.batch_size={b} x train.grad_accum={g} = {b * g} examples per step cannot be split "
                     f"evenly over {n} processes; make it a multiple of {n}")


def is_fsdp_model(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model, compute_dtype, device: str, cpu_offload: bool = False) -> dict:
    """Shard ``model`` in place over the default process group with FSDP2 ``fully_shard``: each
    decoder layer, then the root. Returns what was done, for the log and fastft.json."""
    import torch
    import torch.distributed as dist
    from torch.distributed import fsdp
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    device_type = torch.device(device).type
    if device_type == "cuda":  # FSDP places each rank's shards on the current device
        torch.cuda.set_device(torch.device(device))
    mesh = init_device_mesh(device_type, (world,))
    retyped = sharded_load.float_storage(model, compute_dtype)
    quantized = sharded_load.keep_quant_state(model)
    for m in model.modules():  # the quantization state travels with its layer's shard device
        qs = getattr(m, "quant_state", None)
        if qs is not None and hasattr(qs, "to"):
            qs.to(torch.device(device))
    # compute in the recipe's dtype, reduce gradients in fp32 (LoRA weights stay in their dtype)
    mp = (fsdp.MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
          if compute_dtype != torch.float32 else fsdp.MixedPrecisionPolicy())
    offload = fsdp.CPUOffloadPolicy() if cpu_offload else fsdp.OffloadPolicy()
    kw = {"mesh": mesh, "mp_policy": mp, "offload_policy": offload}
    on_meta = [None] * world  # which ranks built the model on the meta device (receive_skeleton)
    dist.all_gather_object(on_meta, any(p.device.type == "meta" for p in model.parameters()))
    full = ({n: p.detach() for n, p in model.named_parameters()}  # rank 0's whole tensors, sent after sharding
            if any(on_meta) and dist.get_rank() == 0 else None)
    layers = sharded_load.decoder_layers(model)
    for layer in layers:
        fsdp.fully_shard(layer, reshard_after_forward=True, **kw)
    units = len(layers) + 1
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is not None and head is not None and embed.weight is not head.weight:
        # their own units, so that only one vocabulary-sized matrix is gathered at a time; the LM
        # head stays gathered from the end of the forward to its backward, which follows at once
        fsdp.fully_shard(embed, reshard_after_forward=True, **kw)
        fsdp.fully_shard(head, reshard_after_forward=False, **kw)
        units += 2
    fsdp.fully_shard(model, **kw)
    # generation (the evaluation after training): the root's weights are gathered around
    # generate() too, and transformers keeps every rank stepping until all are done (synced_gpus)
    if hasattr(model, "generate"):
        fsdp.register_fsdp_forward_method(model, "generate")
    for m in model.modules():
        m._is_fsdp_managed_module = True
    if any(on_meta):
        sharded_load.fill_from_rank0(model, full, device, cpu_offload)
        del full
    return {"strategy": "fsdp", "processes": world, "units": units, "decoder_layers": len(layers),
            "quantized_layers": quantized, "retyped_to_float_storage": retyped, "cpu_offload": cpu_offload,
            "loaded_by": "rank 0 (meta device elsewhere)" if any(on_meta) else "every rank"}


def shard_run(model, recipe, info, say) -> dict:
    """distributed.strategy: fsdp: shard the run's model over the processes (``shard``) and
    record each rank's share of the frozen base."""
    import resource

    import torch
    import torch.distributed as dist

    full = local_bytes(model)
    # what loading left in this process's memory: rank 0 the whole model, the others (meta) none
    loaded = [None] * dist.get_world_size()
    dist.all_gather_object(loaded, {"host_bytes": sharded_load.materialized_bytes(model),
                                    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
    done = shard(model, getattr(torch, info.dtype), info.device, recipe.distributed.cpu_offload)
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, local_bytes(model))
    done.update(base_bytes_unsharded=full, base_bytes_per_rank=per_rank,
                loaded_host_bytes_per_rank=[r["host_bytes"] for r in loaded],
                peak_rss_after_load_per_rank=[r["peak_rss_bytes"] for r in loaded])
    say(f"fastft: FSDP over {done['processes']} processes, {done['units']} units ({done['decoder_layers']} "
        f"decoder layers); frozen base {full / 2**20:.1f} MiB, per rank " + " / ".join(f"{b / 2**20:.1f}" for b in per_rank) + " MiB"
        + ("; parameter shards offloaded to CPU" if done["cpu_offload"] else "")
        + f"; loaded by {done['loaded_by']}, host memory after loading per rank "
        + " / ".join(f"{r['host_bytes'] / 2**20:.1f}" for r in loaded) + " MiB")
    return done


def local_bytes(model, frozen: bool = True) -> int:
    """Bytes of parameter storage this process holds (its shards under FSDP), frozen or trainable."""
    total = 0
    for p in model.parameters():
        if p.requires_grad == frozen:
            continue
        t = p.to_local() if hasattr(p, "to_local") else p
        total += t.numel() * t.element_size()
    return total


def full_trainable_state(model) -> dict:
    """{parameter name: full tensor on CPU} for every trainable parameter, gathered from the shards.
    A collective: every rank calls it, in the same order; every rank gets the full tensors (LoRA
    weights are small)."""
    out = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[n] = t.detach().to("cpu", copy=True).contiguous()
    return out


def save_adapter(model, directory: Path, main: bool) -> None:
    """Write the adapter in the plain PEFT format (adapter_model.safetensors + adapter_config.json):
    gathered on every rank, written by rank 0."""
    full = full_trainable_state(model)
    if main:
        model.save_pretrained(str(directory), state_dict=full, safe_serialization=True)


def load_adapter(model, directory: Path) -> None:
    """Load a PEFT adapter file (written by ``save_adapter``) into the sharded trainable parameters."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(Path(directory) / "adapter_model.safetensors"))
    names = {n: p for n, p in model.named_parameters() if p.requires_grad}
    adapter = getattr(model, "active_adapter", "default")
    with torch.no_grad():
        for n, p in names.items():
            key = n.replace(f".{adapter}.", ".")
            if key not in saved:
                raise KeyError(f"{directory}: the checkpoint's adapter has no {key}; it was written by another recipe")
            _copy_full(p, saved[key])


def _copy_full(p, full) -> None:
    """Write a whole tensor into parameter ``p``: under FSDP2 this rank's chunk of dim 0 (its
    shard, split as ``torch.chunk`` does), else all of it."""
    import torch

    full = full.to(p.dtype)
    if hasattr(p, "to_local"):
        mesh = p.device_mesh
        chunks = torch.chunk(full, mesh.size(), dim=0)
        rank = mesh.get_local_rank()
        if rank < len(chunks):
            local = p.to_local()
            local.copy_(chunks[rank].to(local.device))
    else:
        p.copy_(full.to(p.device))


def set_trainable(model, full: dict) -> None:
    """{parameter name: whole tensor} (as ``full_trainable_state`` returns it) into the trainable
    parameters, sharded or not."""
    import torch

    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                _copy_full(p, full[n])


def best_adapter(model, path: Path, write: bool, log):
    """fastft.callbacks.BestAdapter for a sharded model: the copy it keeps (and rank 0 writes) is
    gathered from the shards, and restoring it writes each rank's chunk back. Every rank sees the
    same held-out loss (the trainer reduces it over ranks), so all take the same branch and the
    gathers stay collective."""
    from .callbacks import BestAdapter

    class ShardedBestAdapter(BestAdapter):
        def _trainable(self) -> dict:
            return full_trainable_state(self.model)

        def restore_if_better(self, final_loss: float) -> bool:
            if not super().restore_if_better(final_loss):  # (it copies into gathered copies only)
                return False
            set_trainable(self.model, self.weights)
            return True

    return ShardedBestAdapter(model, path, write, log)


def stop_together(signals):
    """A trainer callback, after fastft.callbacks.StopOnSignal: the ranks agree at every step end
    whether any of them received SIGINT/SIGTERM (one small all-reduce), so that all write the
    checkpoint and stop at the same step; a rank signalled a step later than another would
    otherwise meet the others' checkpoint collectives in its next step's and hang."""
    from transformers import TrainerCallback

    class StopTogether(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            import torch
            import torch.distributed as dist

            flag = torch.tensor([signals.received or 0], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item():
                signals.received = signals.received or int(flag.item())
                control.should_save = True
                control.should_training_stop = True

    return StopTogether()


def evaluate_sharded(model, tokenizer, recipe, bundle, out_dir: Path, world: World, say) -> dict:
    """The base-vs-adapter evaluation on an FSDP model: a collective (each forward gathers the
    layers from every rank), so every rank evaluates the same rows; the others write their copy
    of eval.json into a scratch directory that is then removed."""
    import tempfile

    from . import evaluate

    if world.main:
        return evaluate.after_training(model, tokenizer, recipe, bundle, out_dir, log=say)
    with tempfile.TemporaryDirectory(prefix=f"fastft-eval-rank{world.rank}-") as scratch:
        evaluate.after_training(model, tokenizer, recipe, bundle, Path(scratch), log=lambda m: None)
    return {}


def _rank_file(directory: str, rank: int, world: int) -> str:
    return os.path.join(directory, f"optimizer-rank{rank}-of-{world}.pt")


def save_optimizer(optimizer, directory: str, rank: int, world: int) -> None:
    """Every rank writes the state of its own parameter shards (plain tensors)."""
    import torch

    state = optimizer.state_dict()
    local = {k: {n: (v.to_local() if hasattr(v, "to_local") else v) for n, v in s.items()}
             for k, s in state["state"].items()}
    os.makedirs(directory, exist_ok=True)
    path = _rank_file(directory, rank, world)
    torch.save({"state": local, "param_groups": state["param_groups"]}, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_optimizer(optimizer, directory: str, rank: int, world: int) -> None:
    import torch
    from torch.distributed.tensor import DTensor

    path = _rank_file(directory, rank, world)
    if not os.path.isfile(path):
        found = sorted(p.name for p in Path(directory).glob("optimizer-rank*.pt"))
        raise FileNotFoundError(f"{path} is missing ({', '.join(found) or 'no optimizer shards'} found): an fsdp "
                                f"checkpoint resumes with the number of processes that wrote it")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for k, s in saved["state"].items():
        p = params[int(k)]
        state[k] = {n: (DTensor.from_local(v.to(p.device), p.device_mesh, p.placements,
                                           shape=p.shape, stride=p.stride())
                        if isinstance(p, DTensor) and torch.is_tensor(v) and v.dim() > 0 else v)
                    for n, v in s.items()}
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
