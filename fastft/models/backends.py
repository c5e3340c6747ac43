"""Model loading: one recipe, two backends.

    from fastft import recipe
    from fastft.models import backends
    model, tokenizer, info = backends.load(recipe.load("recipes/tiny-demo.yaml"))
    print(info.summary())   # "backend hf (auto: no CUDA device ...)"
    model, tokenizer, r, run_info = backends.load_run("outputs/tiny-demo")   # a finished run: base + adapter

- ``unsloth``: Unsloth's ``FastLanguageModel.from_pretrained`` + ``get_peft_model`` (its fused
  kernels and offloaded gradient checkpointing). Unsloth 2026.10 also has a CPU backend.
- ``hf``: transformers ``AutoModelForCausalLM`` with bitsandbytes NF4 (double quant) when
  ``model.load_in_4bit``, ``prepare_model_for_kbit_training``, and a PEFT ``LoraConfig``.

``auto`` picks unsloth when a CUDA device is present and unsloth imports, else hf, and says why.
Unsloth must be imported before transformers/peft/trl to patch them, so ``choose`` runs first and
``load`` imports unsloth before anything else of the HF stack when it is the chosen backend.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass, field

from ..errors import FastftError
from ..recipe import Recipe
from ..world import World, strategy

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class BackendError(FastftError, RuntimeError):
    """A backend that cannot run here; the message says what to install or change."""


@dataclass
class BackendInfo:
    name: str  # "unsloth" | "hf"
    reason: str  # why this backend was chosen
    device: str  # "cuda:0" | "cpu"
    dtype: str  # compute dtype
    model_path: str  # what from_pretrained loaded
    load_in_4bit: bool
    trainable_params: int = 0
    total_params: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        return (f"backend {self.name} ({self.reason}); device {self.device}, compute dtype {self.dtype}, "
                f"{'4-bit NF4 base' if self.load_in_4bit else '16-bit base'}; "
                f"trainable {self.trainable_params:,} of {self.total_params:,} params ({pct:.2f}%)"
                + "".join(f"; {n}" for n in self.notes))

    def to_dict(self) -> dict:
        return asdict(self)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def unsloth_installed() -> bool:
    return importlib.util.find_spec("unsloth") is not None


def choose(recipe: Recipe, world_size: int = 1) -> tuple[str, str]:
    """(backend, reason) for the recipe's ``backend`` key, without loading a model."""
    want = recipe.backend
    if want == "hf":
        return "hf", "requested in the recipe (backend: hf)"
    if world_size > 1:
        # Unsloth's open-source trainer runs on one GPU; multi-process runs use the hf backend (DDP or FSDP)
        how = strategy(recipe, world_size).upper()
        return "hf", (f"{'backend: unsloth' if want == 'unsloth' else 'auto'}: {world_size} processes, and "
                      f"Unsloth trains on a single GPU, so falling back to hf ({how})")
    if want == "unsloth":
        if not unsloth_installed():
            raise BackendError(
                "backend 'unsloth' was requested but unsloth is not installed. Install it with "
                "pip install 'fastft[gpu]' (see the README for the CPU constraint), or set backend: hf "
                "(or auto) in the recipe / --set backend=hf."
            )
        return "unsloth", "requested in the recipe (backend: unsloth)"
    if not cuda_available():
        return "hf", "auto: no CUDA device, so transformers + bitsandbytes + PEFT"
    if not unsloth_installed():
        return "hf", "auto: CUDA found but unsloth is not installed (pip install 'fastft[gpu]' for it)"
    try:
        import unsloth  # noqa: F401  (must be imported before transformers to patch it)
    except Exception as e:  # unsloth raises many kinds of errors on a broken install
        return "hf", f"auto: CUDA found but unsloth failed to import ({type(e).__name__}: {e})"
    return "unsloth", "auto: CUDA device and unsloth available"


def resolve_dtype(name: str, device: str):
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # CPU: bitsandbytes' CPU path and the interpreter are fastest and exact in fp32


def nf4_config(compute_dtype, float_storage: bool = False):
    """The one 4-bit quantization fastft trains, evaluates and merges with: NF4, double quant, packed
    weights stored as uint8. ``compute_dtype``: a torch dtype or its name ("bfloat16").
    ``float_storage``: store the packed bytes in a compute-dtype tensor instead (same bytes, same
    values; FSDP shards only floating tensors)."""
    import torch
    from transformers import BitsAndBytesConfig

    if isinstance(compute_dtype, str):
        compute_dtype = getattr(torch, compute_dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_quant_storage=compute_dtype if float_storage else torch.uint8)


def target_modules(recipe: Recipe):
    return recipe.lora.target_modules  # "all-linear" or an explicit list


def load(recipe: Recipe, world_size: int = 1, local_rank: int = 0):
    """Load the base model and add LoRA as the recipe says. Returns (model, tokenizer, BackendInfo).
    Under torchrun / accelerate launch each process loads onto its own GPU (``local_rank``)."""
    name, reason = choose(recipe, world_size)
    if name == "unsloth":
        import unsloth  # noqa: F401  first, before transformers/peft/trl are imported below
    from . import named

    device = f"cuda:{local_rank}" if cuda_available() else "cpu"
    dtype = resolve_dtype(recipe.model.dtype, device)
    try:
        path = named.resolve(recipe.model.name, load_in_4bit=recipe.model.load_in_4bit)
    except ValueError as e:  # an unknown synthetic architecture
        raise BackendError(str(e)) from None
    info = BackendInfo(name=name, reason=reason, device=device, dtype=str(dtype).replace("torch.", ""),
                       model_path=path, load_in_4bit=recipe.model.load_in_4bit)
    if named.is_synthetic(recipe.model.name):
        info.notes.append(f"synthetic weights (random, seed {named.SYNTHETIC_SEED}): speed and memory only")
    if name == "unsloth":
        model, tokenizer = _load_unsloth(recipe, path, dtype, info)
    else:
        model, tokenizer = _load_hf(recipe, path, dtype, device, info, fsdp=_fsdp(recipe, world_size))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device == "cpu":
        keep_4bit_trainable_on_cpu(model)
    trainable, total = _count_params(model)
    info.trainable_params, info.total_params = trainable, total
    return model, tokenizer, info


def _fsdp(recipe: Recipe, world_size: int) -> bool:
    return strategy(recipe, world_size) == "fsdp"


def _load_hf(recipe: Recipe, path: str, dtype, device: str, info: BackendInfo, fsdp: bool = False):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    # fsdp: the model is read into host memory and each rank's shards move to its GPU as the layers
    # are sharded (fastft.distributed.shard), so no GPU ever holds the whole model
    kwargs = {"dtype": dtype, "device_map": {"": "cpu" if fsdp else device}}
    if recipe.model.attn_implementation != "auto":
        kwargs["attn_implementation"] = recipe.model.attn_implementation
    if recipe.model.load_in_4bit:
        kwargs["quantization_config"] = nf4_config(dtype, float_storage=fsdp)
        if fsdp:
            info.notes.append(f"NF4 packed weights stored as {info.dtype} for FSDP, loaded into host memory")
    # fsdp, 4-bit: rank 0 alone reads the checkpoint; the other ranks build the same model on the
    # meta device and receive their shards from rank 0 once it is sharded (fastft.models.sharded_load).
    # (16-bit: every rank reads it; the trainer would move a meta model to the device.)
    from_rank0 = (fsdp and recipe.model.load_in_4bit
                  and os.environ.get("FASTFT_FSDP_LOAD", "rank0") != "every-rank")
    if from_rank0:
        from . import sharded_load

        sharded_load.init_process_group(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if from_rank0 and not World.from_env().main:
            model = sharded_load.receive_skeleton(dtype)
            info.notes.append("built on the meta device; its shards come from rank 0")
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            if from_rank0:
                sharded_load.send_skeleton(model)
    except OSError as e:
        raise BackendError(_not_found(recipe.model.name, e)) from e
    gc = bool(recipe.train.gradient_checkpointing)
    if recipe.model.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = recipe.lora
    # LoRA A is drawn from the global RNG: seed it, or two runs of one recipe start from different adapters
    set_seed(recipe.train.seed)
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target_modules(recipe),
        use_dora=lora.use_dora, use_rslora=lora.use_rslora, bias="none", task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config), tokenizer


def _load_unsloth(recipe: Recipe, path: str, dtype, info: BackendInfo):
    from unsloth import FastLanguageModel

    try:
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=path,
            max_seq_length=recipe.model.max_seq_length,
            dtype=dtype,
            load_in_4bit=recipe.model.load_in_4bit,
            load_in_16bit=not recipe.model.load_in_4bit,
            random_state=recipe.train.seed,
        )
    except OSError as e:
        raise BackendError(_not_found(recipe.model.name, e)) from e
    lora = recipe.lora
    targets = LLAMA_LINEAR if lora.target_modules == "all-linear" else lora.target_modules
    gc = recipe.train.gradient_checkpointing
    model = FastLanguageModel.get_peft_model(
        model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
        bias="none", use_gradient_checkpointing=gc if gc == "unsloth" else bool(gc),
        random_state=recipe.train.seed, use_rslora=lora.use_rslora, use_dora=lora.use_dora,
        max_seq_length=recipe.model.max_seq_length,
    )
    return model, tokenizer


def keep_4bit_trainable_on_cpu(model) -> int:
    """Stop bitsandbytes (0.50) from repacking 4-bit weights for its CPU inference kernel.

    On a CPU with AVX512-BF16, the first forward of a Linear4bit in eval mode under no_grad (our
    held-out scoring before training) rewrites the weight in place into a CPU-only layout with
    bf16 absmax, and the layer keeps using it after model.train(): through ``gemv_4bit``, which has
    no autograd kernel, so input gradients stop at every base layer (torch warns "an autograd
    kernel was not registered") and the eval/train numbers shift with the bf16 rounding.
    Returns the number of layers changed.
    """
    n = 0
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _not_found(name: str, e: Exception) -> str:
    return (f"model.name: cannot load {name!r}: {e}. No model hub is reachable from this machine: give a "
            "local path to a transformers checkpoint, or an embedded model (fastft-tiny).")


def _count_params(model) -> tuple[int, int]:
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        # bitsandbytes packs two 4-bit values per byte (of a uint8 or, for FSDP, a float storage)
        if p.__class__.__name__ == "Params4bit":
            n *= 2 * p.element_size()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def load_run(run_dir, base: str | None = None, force: bool = False, log=print):
    """(model, tokenizer, recipe, run_info) for a finished run: its base (as trained: 4-bit or
    16-bit, the recipe's compute dtype) with the adapter on top, checked against the recorded base."""
    from pathlib import Path

    import torch

    from .. import recipe as recipe_mod, rundir
    from . import provenance

    run_dir = Path(run_dir)
    info = rundir.read_run_info(run_dir)
    adapter = rundir.RunDir(run_dir).adapter
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter}: no adapter (adapter_config.json missing); the run did not finish saving")
    r = recipe_mod.from_record(info)
    base_path = provenance.base_path_for(info, base)
    for note in provenance.check_compatible(info, base_path, force=force, load_in_4bit=r.model.load_in_4bit):
        log(f"fastft: {note}")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stdout/stderr carry the table or the streamed reply only

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype(r.model.dtype, device)
    kwargs: dict = {"dtype": dtype, "device_map": {"": device}}
    if r.model.load_in_4bit:
        kwargs["quantization_config"] = nf4_config(dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    model = PeftModel.from_pretrained(model, str(adapter))
    if device == "cpu":
        keep_4bit_trainable_on_cpu(model)  # the same 4-bit numerics as during training
    model.eval()
    return model, tokenizer, r, info


def load_tokenizer(model_name: str):
    """The tokenizer ``fastft train`` would use for ``model.name``, without loading the weights
    (the shipped tiny model's tokenizer from its asset folder)."""
    from transformers import AutoTokenizer

    from . import named

    src = named.EMBEDDED.get(model_name)
    tok = AutoTokenizer.from_pretrained(str(src) if src is not None else named.resolve(model_name))
    if tok.pad_token is None:  # as load does
        tok.pad_token = tok.eos_token
    return tok
