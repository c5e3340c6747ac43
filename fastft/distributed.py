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

What is held where (fsdp, N processes). Loading (4-bit): rank 0 alone reads the checkpoint, into host
memory and quantized (the whole 4-bit model, once in the job); every other rank builds the same
model on the meta device (no storage) from rank 0's config, shapes and NF4 quantization states
(absmax and code, ~1/32 of the packed bytes, kept whole on every rank). Once sharded, each other
rank allocates its 1/N and receives it from rank 0, one parameter at a time and only its own
chunk; rank 0 then frees its whole copy. So host memory while loading is one whole model on rank
0 and the quantization state elsewhere (a 16-bit base, or ``FASTFT_FSDP_LOAD=every-rank``:
every rank reads the whole checkpoint). Training: each device holds 1/N of every weight, one gathered layer
at a time, its activations, and 1/N of the LoRA weights, gradients and optimizer state.
``fastft plan RECIPE --gpus N --strategy fsdp`` prints these per-rank figures.

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


# --- loading: rank 0 reads the checkpoint, the other ranks build the same model on the meta device --

def init_process_group(device: str) -> None:
    """Join the job's process group before loading (torchrun's env://); accelerate uses it as is."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend="nccl" if torch.device(device).type == "cuda" else "gloo")


def _quantized_layers(model) -> dict:
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def send_skeleton(model) -> None:
    """Rank 0, after loading: tell the other ranks what to build on the meta device (the config,
    every parameter's and buffer's shape and dtype, each Linear4bit's settings), then each
    layer's NF4 quantization state (absmax, code: ~1/32 of the packed bytes), in groups so that
    no single message holds all of it. A collective: the other ranks call ``receive_skeleton``."""
    import torch.distributed as dist

    layers = _quantized_layers(model)
    head = {"config": model.config,
            "attributes": {a: getattr(model, a) for a in ("is_quantized", "quantization_method", "is_loaded_in_4bit")
                           if hasattr(model, a)},
            "params": {n: (tuple(p.shape), p.dtype) for n, p in model.named_parameters()},
            "linear4bit": {n: dict(in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None,
                                   compute_dtype=m.compute_dtype, quant_storage=m.weight.quant_storage,
                                   quant_type=m.weight.quant_type, blocksize=m.weight.blocksize,
                                   compress_statistics=m.weight.compress_statistics)
                           for n, m in layers.items()}}
    dist.broadcast_object_list([head], src=0)
    names = list(layers)
    for i in range(0, len(names), _QUANT_STATE_GROUP):
        dist.broadcast_object_list([{n: layers[n].weight.quant_state for n in names[i:i + _QUANT_STATE_GROUP]}], src=0)


_QUANT_STATE_GROUP = 32  # Linear4bit quantization states per message (70B: 560 layers, ~2 MB of state each)


def receive_skeleton(dtype):
    """Ranks > 0: the model rank 0 loaded, built on the meta device (no weight is allocated), with
    its Linear4bit layers, packed-weight shapes and quantization states; the values arrive after
    sharding (``fill_from_rank0``)."""
    import copy

    import bitsandbytes as bnb
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    box = [None]
    dist.broadcast_object_list(box, src=0)
    head = box[0]
    config = copy.deepcopy(head["config"])
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if getattr(head["config"], "quantization_config", None) is not None:
        model.config.quantization_config = head["config"].quantization_config
    for a, v in head["attributes"].items():
        setattr(model, a, v)
    if getattr(model.config, "quantization_config", None) is not None:  # the trainer checks it is trainable
        from transformers.quantizers import AutoHfQuantizer

        model.hf_quantizer = AutoHfQuantizer.from_config(model.config.quantization_config, pre_quantized=False)
    names = list(head["linear4bit"])
    states = {}
    for i in range(0, len(names), _QUANT_STATE_GROUP):
        box = [None]
        dist.broadcast_object_list(box, src=0)
        states.update(box[0])
    for name in names:
        s = head["linear4bit"][name]
        parent, _, child = name.rpartition(".")
        layer = bnb.nn.Linear4bit(s["in_features"], s["out_features"], bias=s["bias"],
                                  compute_dtype=s["compute_dtype"], compress_statistics=s["compress_statistics"],
                                  quant_type=s["quant_type"], quant_storage=s["quant_storage"], device="meta")
        shape, wdtype = head["params"][f"{name}.weight"]
        layer.weight = bnb.nn.Params4bit(torch.empty(shape, dtype=wdtype, device="meta"), requires_grad=False,
                                         quant_state=states[name], blocksize=s["blocksize"],
                                         compress_statistics=s["compress_statistics"], quant_type=s["quant_type"],
                                         quant_storage=s["quant_storage"], module=layer, bnb_quantized=True)
        if s["bias"]:
            layer.bias = torch.nn.Parameter(torch.empty(head["params"][f"{name}.bias"][0], device="meta",
                                                        dtype=head["params"][f"{name}.bias"][1]), requires_grad=False)
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    built = {n: (tuple(p.shape), p.dtype) for n, p in model.named_parameters()}
    if built != head["params"]:
        diff = sorted(set(built.items()) ^ set(head["params"].items()))[:3]
        raise RuntimeError(f"distributed.strategy: fsdp: the model built on the meta device differs from the one "
                           f"rank 0 loaded ({diff}); load on every rank with FASTFT_FSDP_LOAD=every-rank")
    return model


def materialized_bytes(model) -> int:
    """Bytes of parameter, buffer and NF4 quantization-state storage this process holds (meta
    tensors hold none)."""
    import torch

    def state_tensors(qs):
        for v in vars(qs).values():
            if torch.is_tensor(v):
                yield v
            elif hasattr(v, "absmax"):  # the nested (double-quant) state
                yield from state_tensors(v)

    tensors = [*model.parameters(), *model.buffers()]
    for layer in _quantized_layers(model).values():
        qs = getattr(layer.weight, "quant_state", None) or getattr(layer, "quant_state", None)
        if qs is not None:
            tensors += list(state_tensors(qs))
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        if t.device.type != "meta":
            total += t.numel() * t.element_size()
    return total


def fill_from_rank0(model, full: dict | None, device: str, cpu_offload: bool) -> None:
    """After ``fully_shard``: ranks > 0 (whose shards are on the meta device) allocate their shards
    and receive them from rank 0, one parameter at a time, each rank only its own chunk (FSDP2
    shards dim 0 as ``torch.chunk`` does); buffers (rotary frequencies, small) are broadcast.
    ``full``: rank 0's {name: full tensor} taken before sharding; None elsewhere."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    comm = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
    if rank != 0:  # FSDP2 wants offloaded shards materialized on the CPU; buffers live where it computes
        model.to_empty(device="cpu" if cpu_offload else device)
        if cpu_offload:
            for m in model.modules():
                for k, b in m._buffers.items():
                    if b is not None:
                        m._buffers[k] = b.to(device)
    with torch.no_grad():
        for n, p in model.named_parameters():  # the same order on every rank
            local = p.to_local() if hasattr(p, "to_local") else p
            if rank == 0:
                chunks = torch.chunk(full[n], world, dim=0)
                for r in range(1, world):
                    if r < len(chunks) and chunks[r].numel():
                        dist.send(chunks[r].contiguous().to(comm), dst=r)
            elif local.numel():
                buf = torch.empty(local.shape, dtype=local.dtype, device=comm)
                dist.recv(buf, src=0)
                local.copy_(buf)
        for _, b in model.named_buffers():
            buf = b.to(comm) if rank == 0 else torch.empty(b.shape, dtype=b.dtype, device=comm)
            dist.broadcast(buf, src=0)
            if rank != 0:
                b.copy_(buf)


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
    on_meta = [None] * world  # which ranks built the model on the meta device (receive_skeleton)
    dist.all_gather_object(on_meta, any(p.device.type == "meta" for p in model.parameters()))
    full = ({n: p.detach() for n, p in model.named_parameters()}  # rank 0's whole tensors, sent after sharding
            if any(on_meta) and dist.get_rank() == 0 else None)
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
    # generation (the evaluation after training): the root's weights are gathered around
    # generate() too, and transformers keeps every rank stepping until all are done (synced_gpus)
    if hasattr(model, "generate"):
        fsdp.register_fsdp_forward_method(model, "generate")
    for m in model.modules():
        m._is_fsdp_managed_module = True
    if any(on_meta):
        fill_from_rank0(model, full, device, cpu_offload)
        del full
    return {"strategy": "fsdp", "processes": world, "units": units, "decoder_layers": len(layers),
            "quantized_layers": quantized, "retyped_to_float_storage": retyped, "cpu_offload": cpu_offload,
            "loaded_by": "rank 0 (meta device elsewhere)" if any(on_meta) else "every rank"}


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
