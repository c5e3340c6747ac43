"""Several processes, one recipe: data-parallel (DDP) or sharded (FSDP-QLoRA).

    torchrun --nproc_per_node 2 -m fastft train recipes/llama3-70b-qlora-fsdp-2x4090.yaml

``distributed.strategy`` picks how a run launched by torchrun / accelerate launch uses its processes:

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

What is held where (fsdp, N processes): during loading each process reads the 4-bit checkpoint
into host memory, quantized (1/N of it is kept once sharded, the rest freed before training); on
the device each process then holds 1/N of every weight, one gathered layer at a time, its
activations, and 1/N of the LoRA weights, gradients and optimizer state. ``fastft plan RECIPE
--gpus N --strategy fsdp`` prints these per-rank figures.

Checkpoints (fastft.checkpoints layout): the adapter is gathered from all ranks and written by
rank 0 in the plain PEFT format, the optimizer state is written by every rank as its own shard
(``optimizer-rank<R>-of-<N>.pt``), RNG states per rank as with DDP. Resuming needs the same number
of processes.
"""
from __future__ import annotations

import os
from pathlib import Path

STRATEGIES = ("ddp", "fsdp")


def strategy(recipe, world_size: int) -> str:
    """"single" for one process, else the recipe's ``distributed.strategy`` (auto: ddp)."""
    if world_size <= 1:
        return "single"
    want = recipe.distributed.strategy
    return "ddp" if want == "auto" else want


def is_fsdp_model(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def keep_quant_state(model) -> int:
    """Pin each Linear4bit's quantization state on the module: FSDP replaces the Params4bit weight
    by a plain (D)Tensor, which drops the ``quant_state`` bitsandbytes keeps on the parameter; its
    forward then takes it from the module. Returns the number of layers."""
    import bitsandbytes as bnb

    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and m.weight.__class__.__name__ == "Params4bit":
            m.quant_state = m.weight.quant_state
            n += 1
    return n


def float_storage(model, dtype) -> int:
    """Re-type packed NF4 weights held as uint8 (a pre-quantized checkpoint's own storage wins over
    ``bnb_4bit_quant_storage``) as ``dtype``: the same bytes, viewed; FSDP shards only floating
    tensors. Returns the number of weights re-typed."""
    import bitsandbytes as bnb
    import torch

    n = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if not isinstance(m, bnb.nn.Linear4bit) or w.__class__.__name__ != "Params4bit" or w.dtype == dtype:
            continue
        if w.dtype != torch.uint8:
            raise ValueError(f"packed NF4 weight stored as {w.dtype}, expected uint8 or {dtype}")
        w.data = w.data.reshape(-1).view(dtype).reshape(-1, 1)
        w.quant_storage = dtype
        if hasattr(m, "quant_storage"):
            m.quant_storage = dtype
        n += 1
    return n


def decoder_layers(model) -> list:
    """The transformer blocks (one FSDP unit each): the modules in the model's ``layers`` list."""
    import torch

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and name.endswith("layers") and len(m):
            return list(m)
    raise ValueError("distributed.strategy: fsdp: no decoder layer list (model.layers) found in this model")


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
    retyped = float_storage(model, compute_dtype)
    quantized = keep_quant_state(model)
    for m in model.modules():  # the quantization state travels with its layer's shard device
        qs = getattr(m, "quant_state", None)
        if qs is not None and hasattr(qs, "to"):
            qs.to(torch.device(device))
    # compute in the recipe's dtype, reduce gradients in fp32 (LoRA weights stay in their dtype)
    mp = (fsdp.MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
          if compute_dtype != torch.float32 else fsdp.MixedPrecisionPolicy())
    offload = fsdp.CPUOffloadPolicy() if cpu_offload else fsdp.OffloadPolicy()
    kw = {"mesh": mesh, "mp_policy": mp, "offload_policy": offload}
    layers = decoder_layers(model)
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
    return {"strategy": "fsdp", "processes": world, "units": units, "decoder_layers": len(layers),
            "quantized_layers": quantized, "retyped_to_float_storage": retyped, "cpu_offload": cpu_offload}


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
            full = saved[key].to(p.dtype)
            if hasattr(p, "to_local"):  # FSDP2 shards dim 0 as torch.chunk does: this rank's chunk
                mesh = p.device_mesh
                chunks = torch.chunk(full, mesh.size(), dim=0)
                rank = mesh.get_local_rank()
                if rank < len(chunks):
                    local = p.to_local()
                    local.copy_(chunks[rank].to(local.device))
            else:
                p.copy_(full.to(p.device))


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


def save_final_adapter(model, tokenizer, out_dir: Path, state_dict: dict) -> Path:
    """Rank 0: the run's adapter/ (as fastft.rundir.save_adapter writes it) from gathered weights."""
    from .rundir import save_adapter

    return save_adapter(model, tokenizer, out_dir, state_dict)


def split_batch(batch_size: int, grad_accum: int, n: int) -> tuple[int, int] | None:
    """(per-device batch, grad accum) keeping the global batch over ``n`` processes, as fastft.train
    splits it (the accumulation first, then the batch); None when it does not split evenly."""
    b, g = batch_size, grad_accum
    if n == 1:
        return b, g
    if g % n == 0:
        return b, g // n
    if b % n == 0:
        return b // n, g
    if (b * g) % n == 0:
        return b * g // n, 1
    return None
