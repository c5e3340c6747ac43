"""Loading one 4-bit model across the processes of an FSDP job, and the format FSDP needs it in.

    from fastft.models import sharded_load
    sharded_load.init_process_group("cuda:0")
    if rank == 0: model = from_pretrained(...); sharded_load.send_skeleton(model)
    else:         model = sharded_load.receive_skeleton(torch.bfloat16)   # on the meta device
    # after fully_shard (fastft.distributed.shard): sharded_load.fill_from_rank0(model, full, ...)

What is held where (fsdp, N processes). Loading (4-bit): rank 0 alone reads the checkpoint, into host
memory and quantized (the whole 4-bit model, once in the job); every other rank builds the same
model on the meta device (no storage) from rank 0's config, shapes and NF4 quantization states
(absmax and code, ~1/32 of the packed bytes, kept whole on every rank). Once sharded, each other
rank allocates its 1/N and receives it from rank 0, one parameter at a time and only its own
chunk; rank 0 then frees its whole copy. So host memory while loading is one whole model on rank
0 and the quantization state elsewhere (a 16-bit base, or ``FASTFT_FSDP_LOAD=every-rank``:
every rank reads the whole checkpoint).

FSDP shards floating tensors only, so the packed NF4 weights are stored in the compute dtype
(``float_storage``), and each ``Linear4bit`` keeps its quantization state on the module
(``keep_quant_state``), where bitsandbytes finds it again after FSDP swapped the parameter.
"""
from __future__ import annotations


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
